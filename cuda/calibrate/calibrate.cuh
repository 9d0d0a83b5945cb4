// calibrate.cuh: streaming calibration sums of pre-RoPE queries (ALGORITHM.md section 5.1;
// src/stats/calibrate.rs `Accumulator` is the specification).
//
// Computes:  for one layer's queries q [H, T, D] (f32, f16 or bf16, widened to f32, then f64),
//            every head h and pair f with z = (q[h, t, re(f)], q[h, t, im(f)]) (pairing style
//            half: dims f, f + D/2; interleaved: 2f, 2f + 1):
//              sum_real[h, f] += sum_t Re z,  sum_imag[h, f] += sum_t Im z,
//              sum_abs[h, f]  += sum_t sqrt(Re^2 + Im^2)            (all in f64).
// Mapping:   grid = (ceil(F / 32), H); block = NT threads = NT / 32 warps. Lane = pair within
//            the block's 32 (consecutive pairs: coalesced reads in half style), warp w sums the
//            tokens t = w, w + NT/32, ... in order. The warps' sums are then added in warp order
//            by the first warp and added once to the running sums. No atomics: every (h, f) is
//            owned by one thread, so results are bit-identical run to run; against the CPU
//            accumulator (one sequential sum per pair) they differ only by f64 rounding order.
// Shared memory: static, 3 * NT doubles.
// Host guarantees (CalibrateSpec::new): 1 <= H <= 65535, D even >= 2, T >= 0, strides cover
//            the rows, sums sized [H, D/2].
// Numerics:  the modulus's sum of squares goes through dmul_rn/dadd_rn (never an FMA) and f64
//            sqrt is correctly rounded, so every f64 term equals the CPU accumulator's; the sums
//            differ from it only by summation order (tests: 1e-12 of the sum of |terms|) and
//            equal the emu's bit for bit.
// Knobs:     QT (f32, f16, bf16), NT (a multiple of 32).
#pragma once
#include "../common/params.cuh"
#include "../common/types.cuh"

namespace tri {

template <class QT>
TRI_DEVICE float load_query(const void* base, int64_t i);
template <>
TRI_DEVICE float load_query<float>(const void* base, int64_t i) {
  return static_cast<const float*>(base)[i];
}
template <>
TRI_DEVICE float load_query<f16_t>(const void* base, int64_t i) {
  return f16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
}
template <>
TRI_DEVICE float load_query<bf16_t>(const void* base, int64_t i) {
  return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <class QT, int NT>
TRI_DEVICE void calibrate(const tri_calibrate_params& p) {
  static_assert(NT % 32 == 0, "whole warps");
  constexpr int WARPS = NT / 32;
  TRI_SHARED(double, part_s, [3][NT]);

  const int F = p.head_dim / 2;
  const int h = blockIdx.y;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int f = blockIdx.x * 32 + lane;
  double sr = 0.0, si = 0.0, sa = 0.0;
  if (f < F) {
    const int re_dim = p.style == TRI_STYLE_HALF ? f : 2 * f;
    const int im_dim = p.style == TRI_STYLE_HALF ? f + F : 2 * f + 1;
    const int64_t head = (int64_t)h * p.head_stride;
    for (int t = warp; t < p.num_tokens; t += WARPS) {
      const int64_t row = head + (int64_t)t * p.token_stride;
      const double re = (double)load_query<QT>(p.queries, row + re_dim);
      const double im = (double)load_query<QT>(p.queries, row + im_dim);
      sr += re;
      si += im;
      sa += sqrt(dadd_rn(dmul_rn(re, re), dmul_rn(im, im)));  // not contracted: the CPU's terms
    }
  }
  part_s[0][threadIdx.x] = sr;
  part_s[1][threadIdx.x] = si;
  part_s[2][threadIdx.x] = sa;
  sync_block();
  if (warp == 0 && f < F) {
    double r = 0.0, i = 0.0, a = 0.0;
    for (int w = 0; w < WARPS; ++w) {
      r += part_s[0][w * 32 + lane];
      i += part_s[1][w * 32 + lane];
      a += part_s[2][w * 32 + lane];
    }
    const int64_t at = (int64_t)h * F + f;
    p.sum_real[at] += r;
    p.sum_imag[at] += i;
    p.sum_abs[at] += a;
  }
}

}  // namespace tri
