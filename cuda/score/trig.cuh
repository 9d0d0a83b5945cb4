// trig.cuh: the per-round scoring weights, trigonometry in f64 on the device.
//
// Computes:  for t_j = round_start[s] + 2^j and pair f (ALGORITHM.md section 9.1):
//              W[s, l, h, j, re(f)] = sigma (qr cos(t_j w_f) - qi sin(t_j w_f))
//              W[s, l, h, j, im(f)] = sigma (qr sin(t_j w_f) + qi cos(t_j w_f))
//            folded as the mean over j (mean, V = 1: f32 [S, L, H, D]), or per j as the bf16
//            level image score_max reads (max, V = J: 3 levels of the f32 value, [level][j][d],
//            zero padded; see arch.cuh), each formed and summed in f64 and rounded once to f32;
//            and norm[l, h, f] = sigma * c_f with
//            c_f = a_f - |q_f| (MLR) or a_f. src/score.rs RoundWeights::build is the
//            specification. round_start is read from device memory, so a captured graph
//            replays correctly as positions advance.
// Mapping:   grid = (ceil(F / 32) pair chunks, L, S); the block evaluates cos/sin for its 32
//            pairs and J offsets once, then forms the weights of every head of layer l.
// Shared memory: static, 2 * 32 * 32 doubles (16 KiB).
// Host guarantees (TrigSpec): 1 <= J <= 32, V in {0, 1, J}, round_start >= 0, outputs sized
//            as TrigSpec::weights_len and [L, H, F].
// Numerics:  the weights may contract (f64 FMA) and use the device's sincos (within 2 ulp, not
//            glibc's): within 1e-6 of the largest weight of the host's, usually equal after the
//            f32 rounding; scoring takes them within its tolerance. The norm coefficients are
//            bit-identical to the host's: the sum of squares goes through dmul_rn/dadd_rn (never
//            an FMA) and f64 sqrt is correctly rounded (tests/kernels/cuda_score.rs compares them exactly).
// Knobs:     NT.
#pragma once
#include "../common/params.cuh"
#include "../common/types.cuh"

namespace tri {

constexpr int TRIG_PAIRS = 32;
constexpr int TRIG_MAX_OFFSETS = 32;

template <int NT>
TRI_DEVICE void score_trig(const tri_trig_params& p) {
  TRI_SHARED(double, cos_s, [TRIG_MAX_OFFSETS][TRIG_PAIRS]);
  TRI_SHARED(double, sin_s, [TRIG_MAX_OFFSETS][TRIG_PAIRS]);

  const int F = p.head_dim / 2, J = p.num_offsets, H = p.num_heads;
  const int f0 = blockIdx.x * TRIG_PAIRS, l = blockIdx.y, s = blockIdx.z;
  const int pairs = F - f0 < TRIG_PAIRS ? F - f0 : TRIG_PAIRS;
  const int64_t r = p.round_start[s];

  // Phase 1: cos/sin(t_j w_f) in f64; t_j is an exact integer, t_j w_f one rounding.
  for (int idx = threadIdx.x; idx < J * TRIG_PAIRS; idx += NT) {
    const int j = idx / TRIG_PAIRS, ff = idx % TRIG_PAIRS;
    if (ff < pairs) {
      const double tj = (double)(r + ((int64_t)1 << j));
      sincos64(tj * p.omega[f0 + ff], &sin_s[j][ff], &cos_s[j][ff]);
    }
  }
  sync_block();

  // Phase 2: weights of every head of layer l for this block's pairs.
  const int V = p.num_vectors, D = p.head_dim;
  for (int idx = threadIdx.x; idx < H * pairs; idx += NT) {
    const int h = idx / pairs, ff = idx % pairs, f = f0 + ff;
    const int64_t row = (int64_t)l * H + h;
    const double re = (double)p.q_mean_real[row * F + f], im = (double)p.q_mean_imag[row * F + f];
    const int dr = p.style == TRI_STYLE_HALF ? f : 2 * f;
    const int di = p.style == TRI_STYLE_HALF ? f + F : 2 * f + 1;
    if (V == 1) {
      double acc_r = 0.0, acc_i = 0.0;
      for (int j = 0; j < J; ++j) {
        const double c = cos_s[j][ff], sn = sin_s[j][ff];
        acc_r += p.sigma * (re * c - im * sn);
        acc_i += p.sigma * (re * sn + im * c);
      }
      float* w = static_cast<float*>(p.weights) + ((int64_t)s * p.num_layers * H + row) * D;
      w[dr] = (float)(acc_r / (double)J);
      w[di] = (float)(acc_i / (double)J);
    } else if (V > 1) {
      // The level image of this head: [level][j][d], stride D + 8; rows j in [V, jpad) zero.
      const int jpad = weight_jpad(V), AS = D + 8;
      uint16_t* img = static_cast<uint16_t*>(p.weights) +
                      ((int64_t)s * p.num_layers * H + row) * weight_image_elems(V, D);
      for (int j = 0; j < jpad; ++j) {
        uint32_t lr[WEIGHT_LEVELS] = {0u, 0u, 0u}, li[WEIGHT_LEVELS] = {0u, 0u, 0u};
        if (j < J) {
          const double c = cos_s[j][ff], sn = sin_s[j][ff];
          split_bf16<WEIGHT_LEVELS>((float)(p.sigma * (re * c - im * sn)), lr);
          split_bf16<WEIGHT_LEVELS>((float)(p.sigma * (re * sn + im * c)), li);
        }
        for (int v = 0; v < WEIGHT_LEVELS; ++v) {
          img[(v * jpad + j) * AS + dr] = (uint16_t)lr[v];
          img[(v * jpad + j) * AS + di] = (uint16_t)li[v];
        }
      }
    }
    if (s == 0) {
      const double a = (double)p.q_abs_mean[row * F + f];
      // Not contracted: the norm coefficients equal the host's bit for bit (src/score.rs).
      const double c = p.norm_residual ? a - sqrt(dadd_rn(dmul_rn(re, re), dmul_rn(im, im))) : a;
      p.norm[row * F + f] = (float)(p.sigma * c);
    }
  }
  // The image's padding columns d in [D, D + 8), once per (s, l) by the first pair chunk.
  if (V > 1 && blockIdx.x == 0) {
    const int jpad = weight_jpad(V), AS = D + 8;
    for (int idx = threadIdx.x; idx < H * WEIGHT_LEVELS * jpad * 8; idx += NT) {
      const int h = idx / (WEIGHT_LEVELS * jpad * 8), r = idx % (WEIGHT_LEVELS * jpad * 8);
      uint16_t* img = static_cast<uint16_t*>(p.weights) +
                      ((int64_t)s * p.num_layers * H + (int64_t)l * H + h) * weight_image_elems(V, D);
      img[(r / 8) * AS + D + r % 8] = 0;
    }
  }
}

}  // namespace tri
