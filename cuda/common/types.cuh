// types.cuh: key storage types and the 16-byte chunk loads every kernel reads keys with.
#pragma once
#include "arch.cuh"

namespace tri {

// Storage tags: kernels never compute in 16-bit types, they only widen them to f32.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// Elements per 16-byte chunk and the widening of one chunk to f32.
template <class KeyT>
struct Key;

template <>
struct Key<float> {
  static constexpr int VEC = 4;
  TRI_DEVICE static void widen(const uint4& v, float (&out)[VEC]) {
    out[0] = bits_to_float(v.x);
    out[1] = bits_to_float(v.y);
    out[2] = bits_to_float(v.z);
    out[3] = bits_to_float(v.w);
  }
};

template <>
struct Key<bf16_t> {
  static constexpr int VEC = 8;
  TRI_DEVICE static void widen(const uint4& v, float (&out)[VEC]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = bits_to_float(w[i] << 16);
      out[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Key<f16_t> {
  static constexpr int VEC = 8;
  TRI_DEVICE static void widen(const uint4& v, float (&out)[VEC]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = f16_bits_to_float(w[i] & 0xffffu);
      out[2 * i + 1] = f16_bits_to_float(w[i] >> 16);
    }
  }
};

// Largest power of two dividing n, at most 32.
constexpr int pow2_part(int n) { return (n % 2 != 0 || n >= 64) ? (n >= 64 ? 32 : 1) : 2 * pow2_part(n / 2); }

// How a team of threads covers one key row: every thread holds CPT chunks of the row's first half
// and the CPT mirrored chunks of its second half, so each thread owns whole rotary pairs in both
// pairing styles (half: dims f and f + D/2; interleaved: adjacent dims inside a chunk).
template <class KeyT, int HEAD_DIM>
struct RowTeam {
  static constexpr int VEC = Key<KeyT>::VEC;
  static constexpr int HALF_CHUNKS = HEAD_DIM / 2 / VEC;
  static constexpr int TPR = pow2_part(HALF_CHUNKS) > 32 ? 32 : pow2_part(HALF_CHUNKS);  // threads per row
  static constexpr int CPT = HALF_CHUNKS / TPR;                                          // chunks per half, per thread
  static_assert(HEAD_DIM % (2 * VEC) == 0, "half a row must be whole 16-byte chunks");
  static_assert(TPR * CPT == HALF_CHUNKS, "team must cover the row");
};

}  // namespace tri
