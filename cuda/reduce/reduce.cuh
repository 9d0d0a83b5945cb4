// reduce.cuh: per-(layer, head) score rows to the rows selection ranks (the `reduce` stage).
//
// Computes:  for slot n < len of sequence s < num_seqs (z at s * z_seq_stride, out at
//            s * out_seq_stride), with z(l, h, n) at l * layer_stride +
//            h * head_stride + n and G = H / Hkv query heads per KV head g:
//              per head (mode 0):           out[g, n]       = mean_l max_{h in g} z(l, h, n)
//              per layer per head (mode 1): out[l * Hkv + g, n] = max_{h in g} z(l, h, n), or the
//                                           mean over the group (group_mean = 1)
//              union (mode 2):              out[0, n]       = max_{l, h} z(l, h, n)
//            then +inf on protected slots (n < prefix or n >= window_start; prefix =
//            prefixes[s] when prefixes is set). Maxima propagate
//            NaN (a NaN contribution makes the result NaN); means are summed in f64 in index
//            order and rounded once to f32. src/cpu/reduce.rs is the specification, bit for bit.
// Mapping:   grid = (ceil(len / NT), sets, num_seqs); one thread per (seq, set, slot), coalesced
//            along slots.
// Shared memory: none.
// Host guarantees (ReduceSpec): 1 <= Hkv, H a multiple of Hkv, 1 <= L, mode in 0..=2, strides
//            cover the rows, out holds sets rows of out_stride >= len per sequence; sequences
//            do not overlap in out; prefixes[s] in 0..=len.
// Numerics:  additions, maxima and one division per slot: nothing to contract (the SASS is the
//            same with --fmad=false); bit-identical to src/cpu/reduce.rs on every backend.
// Knobs:     NT.
#pragma once
#include "../common/arch.cuh"
#include "../common/params.cuh"

namespace tri {

// NaN if either is NaN, else the larger (the CPU reference's nan_max).
TRI_DEVICE float reduce_nan_max(float a, float b) {
  if (a != a || b != b) return bits_to_float(0x7fc00000u);  // f32::NAN
  return b > a ? b : a;
}

TRI_DEVICE float reduce_group_max(const float* z, const tri_reduce_params& p, int l, int h0, int G, int n) {
  float m = bits_to_float(0xff800000u);  // -inf
  for (int h = h0; h < h0 + G; ++h) m = reduce_nan_max(m, z[(int64_t)l * p.layer_stride + (int64_t)h * p.head_stride + n]);
  return m;
}

template <int NT>
TRI_DEVICE void reduce_rows(const tri_reduce_params& p) {
  const int n = blockIdx.x * NT + threadIdx.x, set = blockIdx.y, seq = blockIdx.z;
  if (n >= p.len) return;
  const float* z = p.z + (int64_t)seq * p.z_seq_stride;
  const int prefix = p.prefixes != nullptr ? p.prefixes[seq] : p.prefix;
  const int L = p.num_layers, G = p.num_heads / p.num_kv_heads;
  float v;
  if (p.mode == TRI_REDUCE_PER_HEAD) {
    double sum = 0.0;
    for (int l = 0; l < L; ++l) sum += (double)reduce_group_max(z, p, l, set * G, G, n);
    v = (float)(sum / (double)L);
  } else if (p.mode == TRI_REDUCE_PER_LAYER_PER_HEAD) {
    const int l = set / p.num_kv_heads, g = set % p.num_kv_heads;
    if (p.group_mean) {
      double sum = -0.0;  // as Rust's f64 Sum: a group of -0 means -0
      for (int h = g * G; h < (g + 1) * G; ++h)
        sum += (double)z[(int64_t)l * p.layer_stride + (int64_t)h * p.head_stride + n];
      v = (float)(sum / (double)G);
    } else {
      v = reduce_group_max(z, p, l, g * G, G, n);
    }
  } else {
    v = bits_to_float(0xff800000u);
    for (int l = 0; l < L; ++l) v = reduce_nan_max(v, reduce_group_max(z, p, l, 0, p.num_heads, n));
  }
  if (n < prefix || n >= p.window_start) v = bits_to_float(0x7f800000u);  // +inf guard
  p.out[(int64_t)seq * p.out_seq_stride + (int64_t)set * p.out_stride + n] = v;
}

}  // namespace tri
