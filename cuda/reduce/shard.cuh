// shard.cuh: the reduce stage of a sharded round (tensor / pipeline parallelism), in steps
// around the engine's all-reduce (src/shard/mod.rs lists the collectives).
//
// Computes:  for slot n < len, row r < rows, sequence s < num_seqs, buffers dense [S, rows, len]
//            (index (s * rows + r) * len + n), with gmax(l, g, n) = max_{h in g} z(l, h, n) over
//            this rank's G = H / Hkv query heads of KV head g:
//              partial, LAYER_SUMS: sums[g]       = sum_l gmax(l, g, n)   (f64, from 0, layer order)
//              partial, GROUP_KEYS: keys[l*Hkv+g] = key(gmax(l, g, n))
//              partial, GROUP_SUMS: sums[l*Hkv+g] = sum_{h in g} z(l, h, n) (f64, from -0, head order)
//              partial, UNION_KEYS: keys[0]       = key(max_{l, h} z(l, h, n))
//              layer sum:           sums[g]       = sum_l value(keys[l*Hkv+g]) (f64, from 0)
//              finish:              out[r, n]     = (float)(sums[r] / divisor), or value(keys[r]);
//                                   then +inf on protected slots (n < prefix or n >= window_start;
//                                   prefix = prefixes[s] when set)
//            key(x) is the order-preserving i32 of src/shard/collective.rs (NaN -> INT32_MAX,
//            above every number), so the engine's integer max across ranks is the NaN-propagating
//            float max. Maxima propagate NaN; src/shard/round.rs is the specification, bit for bit.
// Mapping:   grid = (ceil(len / NT), rows, num_seqs); one thread per (seq, row, slot), coalesced
//            along slots.
// Shared memory: none.
// Host guarantees (ReduceShardSpec): the buffers hold S * rows * len elements of the step's
//            reads and writes; z covers this rank's rows; prefixes[s] in 0..=len; rows <= 65535.
// Numerics:  additions, maxima, one division per slot: nothing to contract.
// Knobs:     NT.
#pragma once
#include "../common/arch.cuh"
#include "../common/params.cuh"

namespace tri {

TRI_DEVICE int32_t shard_max_key(float x) {
  if (x != x) return 0x7fffffff;
  const int32_t bits = (int32_t)float_to_bits(x);
  return bits < 0 ? (bits ^ 0x7fffffff) : bits;
}

TRI_DEVICE float shard_key_value(int32_t key) {
  if (key == 0x7fffffff) return bits_to_float(0x7fc00000u);  // f32::NAN
  return bits_to_float((uint32_t)(key < 0 ? (key ^ 0x7fffffff) : key));
}

TRI_DEVICE float shard_nan_max(float a, float b) {
  if (a != a || b != b) return bits_to_float(0x7fc00000u);
  return b > a ? b : a;
}

TRI_DEVICE float shard_group_max(const float* z, const tri_reduce_shard_params& p, int l, int h0, int G, int n) {
  float m = bits_to_float(0xff800000u);  // -inf
  for (int h = h0; h < h0 + G; ++h)
    m = shard_nan_max(m, z[(int64_t)l * p.layer_stride + (int64_t)h * p.head_stride + n]);
  return m;
}

template <int NT>
TRI_DEVICE void reduce_shard(const tri_reduce_shard_params& p) {
  const int n = blockIdx.x * NT + threadIdx.x, r = blockIdx.y, seq = blockIdx.z;
  if (n >= p.len) return;
  const int64_t at = ((int64_t)seq * p.rows + r) * p.len + n;
  const int L = p.num_layers, Hkv = p.num_kv_heads, G = p.num_heads / p.num_kv_heads;
  if (p.step == TRI_SHARD_STEP_PARTIAL) {
    const float* z = p.z + (int64_t)seq * p.z_seq_stride;
    if (p.part == TRI_SHARD_PART_LAYER_SUMS) {
      double sum = 0.0;
      for (int l = 0; l < L; ++l) sum += (double)shard_group_max(z, p, l, r * G, G, n);
      p.sums[at] = sum;
    } else if (p.part == TRI_SHARD_PART_GROUP_KEYS) {
      p.keys[at] = shard_max_key(shard_group_max(z, p, r / Hkv, (r % Hkv) * G, G, n));
    } else if (p.part == TRI_SHARD_PART_GROUP_SUMS) {
      const int l = r / Hkv, g = r % Hkv;
      double sum = -0.0;  // as Rust's f64 Sum: a group of -0 sums to -0
      for (int h = g * G; h < (g + 1) * G; ++h) sum += (double)z[(int64_t)l * p.layer_stride + (int64_t)h * p.head_stride + n];
      p.sums[at] = sum;
    } else {
      float v = bits_to_float(0xff800000u);
      for (int l = 0; l < L; ++l) v = shard_nan_max(v, shard_group_max(z, p, l, 0, p.num_heads, n));
      p.keys[at] = shard_max_key(v);
    }
  } else if (p.step == TRI_SHARD_STEP_LAYER_SUM) {
    double sum = 0.0;
    for (int l = 0; l < L; ++l) sum += (double)shard_key_value(p.keys[(((int64_t)seq * L + l) * Hkv + r) * p.len + n]);
    p.sums[at] = sum;
  } else {
    float v = p.part == 0 ? (float)(p.sums[at] / p.divisor) : shard_key_value(p.keys[at]);
    const int prefix = p.prefixes != nullptr ? p.prefixes[seq] : p.prefix;
    if (n < prefix || n >= p.window_start) v = bits_to_float(0x7f800000u);  // +inf guard
    p.out[(int64_t)seq * p.out_seq_stride + (int64_t)r * p.out_stride + n] = v;
  }
}

}  // namespace tri
