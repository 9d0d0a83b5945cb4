// simt.h: the host SIMT layer of the emu backend. Defines, for g++, every CUDA name the kernel
// files use, so cuda/**/*.cuh compile unchanged for the CPU (TRI_EMU).
//
// Model: a launch spreads its blocks over a few OS threads (TRIATTN_EMU_THREADS, default the
// hardware threads); each OS thread runs its blocks one after another. Each CUDA thread of a
// block is a fiber (its own stack); a fiber runs until it reaches a barrier, then the scheduler
// (simt.cpp) moves on. `__syncthreads` is a block barrier; warp shuffles, votes and the mma
// wrapper deposit their operands in a per-warp exchange buffer and meet at a warp barrier, so a
// warp's lanes exchange values exactly as on hardware.
//
// Shared memory: kernels declare static shared arrays with TRI_SHARED(type, name, dims), never
// with `__shared__` (which this header leaves undefined, so a raw declaration does not compile
// for the emu). Here a TRI_SHARED array is a function-local `static thread_local` (per block,
// because an OS thread runs one block at a time) that the first fiber of each new block to reach
// the declaration fills with 0xff: fresh shared memory holds garbage on hardware, and a read of
// an unwritten element, or a value left over from the previous block, must show. Blocks are
// told apart by a per-OS-thread epoch that the scheduler bumps before every block. Dynamic shared
// memory is a 16-byte aligned buffer per OS thread, refilled with 0xff before each block.
//
// Faults: 16-byte (load16/store16), 8-byte (load_i64/store_i64) and 4-byte (smem_u32) accesses
// check their alignment; a misaligned one is a sticky fault on hardware, so here the first one
// of a launch is recorded and the launch returns a nonzero status whose message
// (triattn_emu_last_error) names the address.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TRI_DEVICE inline
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

struct uint4 {
  uint32_t x, y, z, w;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

namespace tri_emu {

constexpr int WARP = 32;

// Per-OS-thread launch state, set by the scheduler.
extern thread_local dim3 block_idx;
extern thread_local dim3 grid_dim;
extern thread_local dim3 block_dim;
extern thread_local unsigned char* dyn_smem;
// Bumped by the scheduler before every block an OS thread runs (starts at 0, so 1 is the first).
extern thread_local uint64_t block_epoch;

// TRI_SHARED: fill a static shared array with 0xff once per block (`seen` is its own epoch).
inline void poison_shared(void* p, size_t bytes, uint64_t* seen) {
  if (*seen != block_epoch) {
    memset(p, 0xff, bytes);
    *seen = block_epoch;
  }
}

// Record a misaligned access of `bytes` at `p` (the launch fails; the first fault is reported).
void fault_misaligned(const void* p, size_t bytes);

// Whether `p` is a multiple of `bytes`; records the fault when not.
inline bool aligned_or_fault(const void* p, size_t bytes) {
  if (((uintptr_t)p & (bytes - 1)) == 0) return true;
  fault_misaligned(p, bytes);
  return false;
}

struct Fiber;
extern thread_local Fiber* current;

// Index of the running fiber's thread (threadIdx).
const dim3& thread_idx();

// Block barrier.
void sync_block();

// Warp barrier; returns the exchange slot array (32 lanes x 32 bytes) of this step.
unsigned char* warp_exchange_begin(const void* mine, size_t bytes);
unsigned lane_id();

}  // namespace tri_emu

#define threadIdx (tri_emu::thread_idx())
#define blockIdx (tri_emu::block_idx)
#define gridDim (tri_emu::grid_dim)
#define blockDim (tri_emu::block_dim)
#define __syncthreads() tri_emu::sync_block()

// A static shared array (see the header comment); `type` may carry __align__(n).
#define TRI_SHARED(type, name, dims)                  \
  static thread_local type name dims;                 \
  static thread_local uint64_t name##_tri_epoch = 0;  \
  tri_emu::poison_shared(&name, sizeof(name), &name##_tri_epoch)

namespace tri {

constexpr unsigned FULL_MASK = 0xffffffffu;

// Misaligned accesses are recorded as faults (the launch fails) and then performed anyway, so
// the fiber runs on to its next barrier as it would on any other path.
inline uint4 load16(const void* p) {
  tri_emu::aligned_or_fault(p, 16);
  uint4 v;
  memcpy(&v, p, 16);
  return v;
}

inline void store16(void* p, const uint4& v) {
  tri_emu::aligned_or_fault(p, 16);
  memcpy(p, &v, 16);
}

inline int64_t load_i64(const void* p) {
  tri_emu::aligned_or_fault(p, 8);
  int64_t v;
  memcpy(&v, p, 8);
  return v;
}

inline void store_i64(void* p, int64_t v) {
  tri_emu::aligned_or_fault(p, 8);
  memcpy(p, &v, 8);
}

inline uint32_t smem_u32(const uint16_t* p) {
  tri_emu::aligned_or_fault(p, 4);
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// Exact binary16 -> binary32 (normals, subnormals, infinities, NaN).
inline float f16_bits_to_float(uint32_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  return bits_to_float(u);
}

template <class T>
inline T shfl_generic(T v, int src_lane) {
  const unsigned char* slots = tri_emu::warp_exchange_begin(&v, sizeof(T));
  T out;
  memcpy(&out, slots + 32 * (src_lane & 31), sizeof(T));
  return out;
}

inline float shfl_xor(float v, int lane_mask) { return shfl_generic(v, (int)(tri_emu::lane_id() ^ (unsigned)lane_mask)); }
inline float shfl(float v, int src_lane) { return shfl_generic(v, src_lane); }

inline unsigned ballot(bool pred) {
  const int mine = pred ? 1 : 0;
  const unsigned char* slots = tri_emu::warp_exchange_begin(&mine, sizeof(int));
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    int v;
    memcpy(&v, slots + 32 * l, sizeof(int));
    bits |= (v ? 1u : 0u) << l;
  }
  return bits;
}

inline void sync_block() { tri_emu::sync_block(); }

// Fibers of a block interleave only at barriers, blocks on other OS threads share only global
// memory: a relaxed atomic is exactly the device's semantics for both.
inline uint32_t atomic_add_u32(uint32_t* p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

inline int popc(uint32_t v) { return __builtin_popcount(v); }

inline unsigned char* dynamic_smem() { return tri_emu::dyn_smem; }

inline void sincos64(double x, double* s, double* c) {
  *s = sin(x);
  *c = cos(x);
}

// Separately rounded product and sum; the emu unit is compiled with -ffp-contract=off (build.rs),
// so no host expression is fused either.
inline double dmul_rn(double a, double b) { return a * b; }
inline double dadd_rn(double a, double b) { return a + b; }

// m16n8k16 bf16 x bf16 + f32, emulated from the PTX fragment layout (see arch.cuh). Each lane
// deposits its A and B registers; after the warp barrier every lane rebuilds the rows and columns
// it owns and accumulates the exact products in f32, k ascending.
inline void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const unsigned char* slots = tri_emu::warp_exchange_begin(mine, sizeof(mine));
  auto reg = [&](int lane, int r) {
    uint32_t v;
    memcpy(&v, slots + 32 * lane + 4 * r, 4);
    return v;
  };
  auto half16 = [](uint32_t v, int hi) { return bits_to_float((hi ? (v >> 16) : (v & 0xffffu)) << 16); };
  // A(row, k): lane 4 * (row % 8) + (k % 8) / 2, register (row >= 8) + 2 * (k >= 8), half k % 2.
  auto A = [&](int row, int k) {
    int lane = 4 * (row % 8) + (k % 8) / 2;
    int r = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half16(reg(lane, r), k % 2);
  };
  // B(k, n): lane 4 * n + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto B = [&](int k, int n) {
    int lane = 4 * n + (k % 8) / 2;
    return half16(reg(lane, 4 + (k >= 8 ? 1 : 0)), k % 2);
  };
  const int lane = (int)tri_emu::lane_id();
  const int group = lane / 4, tig = lane % 4;
  for (int i = 0; i < 4; ++i) {
    int row = group + (i >= 2 ? 8 : 0);
    int col = 2 * tig + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
}

}  // namespace tri

// The raw CUDA builtins, for kernels that call them directly (the kernels here use the tri::
// wrappers above). Masks must name the whole warp: the layer runs every lane to each exchange.
inline float __uint_as_float(unsigned u) { return tri::bits_to_float(u); }
inline unsigned __float_as_uint(float f) { return tri::float_to_bits(f); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) {
  return tri::shfl_generic(v, src_lane);
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return tri::shfl_generic(v, (int)(tri_emu::lane_id() ^ (unsigned)lane_mask));
}
inline unsigned __ballot_sync(unsigned, int pred) { return tri::ballot(pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline void __syncwarp(unsigned = 0xffffffffu) {
  const int none = 0;
  (void)tri_emu::warp_exchange_begin(&none, sizeof(int));
}

// The instantiation unit's entry: run `body(params)` as a grid of `block` threads per block.
namespace tri_emu {
typedef void (*KernelBody)(const void* params);
// Returns 0 on success; nonzero on a block that is not whole warps (2), a divergent barrier (3)
// or a misaligned access (4), with the message in triattn_emu_last_error().
int launch(KernelBody body, const void* params, dim3 grid, dim3 block, size_t dynamic_smem_bytes);
}  // namespace tri_emu

// The message of the calling thread's last failed launch ("" after a successful one).
extern "C" const char* triattn_emu_last_error();
