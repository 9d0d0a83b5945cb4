// combine.cuh: the final o and lse of a split decode, from every split's normalised part
// (decode.cuh with num_splits > 1), with the sink joining the normaliser.
//
// Computes:  for each row (s, l, h, t), with part_lse_i and part_o_i of split i:
//              m = max(max_i part_lse_i, sink), w_i = exp(part_lse_i - m),
//              den = sum_i w_i + exp(sink - m), o = sum_i w_i part_o_i / den, lse = m + ln(den);
//            every part empty and no sink: o = 0, lse = -inf.
// Mapping:   grid = (S * launch_layers * H * T); one block per row, NT threads: the weights of the splits
//            once in shared memory, then thread t writes o[dv] for dv = t, t + NT, ...
// Shared memory: static: DECODE_MAX_SPLITS weights f32 and the row's scale (520 bytes).
// Host guarantees (DecodeSpec::new): 2 <= num_splits <= DECODE_MAX_SPLITS; the parts of every
//            split were written by the decode launch before this one.
// Numerics:  f32, splits summed in index order: deterministic; contraction allowed (the CPU
//            backend does not split, so agreement is within f32 rounding anyway).
// Knobs:     NT.
#pragma once
#include "../common/params.cuh"
#include "../common/types.cuh"

namespace tri {

constexpr int DECODE_MAX_SPLITS = 128;

template <int NT>
TRI_DEVICE void decode_combine(const tri_decode_combine_params& p) {
  TRI_SHARED(float, w_s, [DECODE_MAX_SPLITS]);
  TRI_SHARED(float, row_s, [2]);  // 1 / den (0 when empty), lse

  const int64_t row_id = blockIdx.x;
  const int tq = (int)(row_id % p.num_queries);
  const int64_t lh = row_id / p.num_queries;  // (s * L + l) * H + h
  const int h = (int)(lh % p.num_heads);
  const int64_t sl = lh / p.num_heads;  // s * launch_layers + ll
  const int ll = (int)(sl % p.launch_layers), s = (int)(sl / p.launch_layers);
  const int l = p.first_layer + ll;
  const float ninf = bits_to_float(0xff800000u);

  if (threadIdx.x == 0) {
    const float* lse = p.part_lse + row_id * p.num_splits;
    const float sink = p.sinks != nullptr ? p.sinks[(int64_t)l * p.num_heads + h] : ninf;
    float m = sink;
    for (int i = 0; i < p.num_splits; ++i) m = fmaxf(m, lse[i]);
    float den = 0.0f;
    for (int i = 0; i < p.num_splits; ++i) {
      const float w = lse[i] == ninf ? 0.0f : expf(lse[i] - m);
      w_s[i] = w;
      den += w;
    }
    if (sink != ninf) den += expf(sink - m);
    row_s[0] = den > 0.0f ? 1.0f / den : 0.0f;
    row_s[1] = den > 0.0f ? m + logf(den) : ninf;
  }
  sync_block();
  const float inv = row_s[0];
  const float* part = p.part_out + row_id * p.num_splits * p.value_dim;
  float* o = p.out + (int64_t)s * p.out_seq_stride + (((int64_t)ll * p.num_heads + h) * p.num_queries + tq) * p.out_row_stride;
  for (int dv = threadIdx.x; dv < p.value_dim; dv += NT) {
    float x = 0.0f;
    for (int i = 0; i < p.num_splits; ++i) x += w_s[i] * part[(int64_t)i * p.value_dim + dv];
    o[dv] = x * inv;
  }
  if (threadIdx.x == 0) {
    p.lse[(int64_t)s * p.lse_seq_stride + ((int64_t)ll * p.num_heads + h) * p.num_queries + tq] = row_s[1];
  }
}

}  // namespace tri
