// arch.cuh: the only door from kernel code to hardware-specific instructions.
//
// Kernels call these small wrappers, never intrinsics or inline PTX directly. Under nvcc they are
// the real instructions; under the emu backend (TRI_EMU) cuda/host/simt.h defines the same names
// for the host SIMT layer, so the kernel files compile unchanged for both. Static shared arrays
// are declared with TRI_SHARED (the emu poisons them per block); the emu also checks the
// alignment of load16/store16, load_i64/store_i64 and smem_u32 and fails the launch on a
// misaligned one, as the device would.
#pragma once
#include <stdint.h>

#if defined(TRI_EMU)
#include "../host/simt.h"
#else

#include <cuda_fp16.h>

#define TRI_DEVICE __device__ __forceinline__

namespace tri {

constexpr unsigned FULL_MASK = 0xffffffffu;

// A static shared array, `TRI_SHARED(float, tile, [32][33]);`; `type` may carry __align__(n).
// Fresh shared memory is garbage: write before reading (the emu fills it with 0xff per block).
#define TRI_SHARED(type, name, dims) __shared__ type name dims

// 16-byte read-only load; `p` is 16-byte aligned (ScoreSpec checks bases and strides).
TRI_DEVICE uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Two adjacent bf16 from shared memory; `p` is 4-byte aligned.
TRI_DEVICE uint32_t smem_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// 16-byte store; `p` is 16-byte aligned.
TRI_DEVICE void store16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// 8-byte integer load and store (positions); `p` is 8-byte aligned.
TRI_DEVICE int64_t load_i64(const void* p) { return *reinterpret_cast<const int64_t*>(p); }
TRI_DEVICE void store_i64(void* p, int64_t v) { *reinterpret_cast<int64_t*>(p) = v; }

TRI_DEVICE float bits_to_float(uint32_t u) { return __uint_as_float(u); }
TRI_DEVICE uint32_t float_to_bits(float f) { return __float_as_uint(f); }

// Exact binary16 -> binary32.
TRI_DEVICE float f16_bits_to_float(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

TRI_DEVICE float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(FULL_MASK, v, lane_mask); }
TRI_DEVICE float shfl(float v, int src_lane) { return __shfl_sync(FULL_MASK, v, src_lane); }
TRI_DEVICE unsigned ballot(bool pred) { return __ballot_sync(FULL_MASK, pred); }

TRI_DEVICE void sync_block() { __syncthreads(); }

// Atomic add on a 32-bit word in shared or global memory; returns the old value.
TRI_DEVICE uint32_t atomic_add_u32(uint32_t* p, uint32_t v) { return atomicAdd(p, v); }

// Number of set bits.
TRI_DEVICE int popc(uint32_t v) { return __popc(v); }

// Dynamic shared memory of the launch, 16-byte aligned.
TRI_DEVICE unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char tri_dynamic_smem[];
  return tri_dynamic_smem;
}

// f64 sine and cosine (device libm, within 2 ulp).
TRI_DEVICE void sincos64(double x, double* s, double* c) { sincos(x, s, c); }

// f64 product and sum, each rounded on its own: nvcc never contracts these into an FMA (it does
// contract a plain `a * b + c`). For the few expressions the host reproduces bit for bit.
TRI_DEVICE double dmul_rn(double a, double b) { return __dmul_rn(a, b); }
TRI_DEVICE double dadd_rn(double a, double b) { return __dadd_rn(a, b); }

// d += A * B on tensor cores: m16n8k16, A row-major bf16 (4 regs), B column-major bf16 (2 regs),
// f32 accumulators (4 regs). Fragment layout as in the PTX ISA "Matrix Fragments for mma.m16n8k16":
// lane = 4 * group + tig; a0: (group, 2tig..+1), a1: (group+8, 2tig..+1), a2: (group, 2tig+8..+9),
// a3: (group+8, 2tig+8..+9); b0: (k 2tig..+1, n group), b1: (k 2tig+8..+9, n group);
// d0,d1: (group, 2tig..+1), d2,d3: (group+8, 2tig..+1).
TRI_DEVICE void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace tri
#endif

namespace tri {

// Round to nearest even binary32 -> bfloat16 (bits in the low half). Integer arithmetic, so the
// device and the emu backend round identically. Finite inputs only (weights and keys are finite
// or the score is NaN anyway).
TRI_DEVICE uint32_t float_to_bf16_bits(float f) {
  uint32_t u = float_to_bits(f);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

TRI_DEVICE float bf16_bits_to_float(uint32_t b) { return bits_to_float(b << 16); }

// x as LEVELS bf16 pieces, largest first (bits in the low half): x ~ x0 + x1 + x2 with
// |x_i| <= 2^(-8i) |x| roughly. src/cuda/spec.rs weight_levels() does the same on the host.
template <int LEVELS>
TRI_DEVICE void split_bf16(float x, uint32_t (&out)[LEVELS]) {
#pragma unroll
  for (int i = 0; i < LEVELS; ++i) {
    out[i] = float_to_bf16_bits(x);
    x -= bf16_bits_to_float(out[i]);
  }
}

// The max-mode weight image: per head WEIGHT_LEVELS x jpad x (D + 8) bf16, [level][j][d], rows
// j >= V and columns d >= D zero. It is the shared-memory tile score_max multiplies, copied as is.
constexpr int WEIGHT_LEVELS = 3;
TRI_DEVICE int weight_jpad(int vectors) { return (vectors + 7) / 8 * 8; }
TRI_DEVICE int64_t weight_image_elems(int vectors, int head_dim) {
  return (int64_t)WEIGHT_LEVELS * weight_jpad(vectors) * (head_dim + 8);
}

}  // namespace tri
