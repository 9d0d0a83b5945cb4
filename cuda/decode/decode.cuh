// decode.cuh: sparse decode attention — T decode queries per attention head against each KV
// head's list of kept slots (or every slot), split-KV flash decoding, all layers and sequences of
// one decode in one launch (src/cpu/decode.rs is the specification, src/decode.rs the formula).
//
// Computes:  for sequence s, layer l, KV head g and the query rows r = (h, t) of its group
//            (h in [g G, (g + 1) G), t < T), over the split's part [j0, j1) of the list J:
//              s_j = softcap(scale * q[h,t] . k[g, J[j]]),
//              m = max_j s_j, den = sum_j exp(s_j - m), acc = sum_j exp(s_j - m) v[g, J[j]]
//            (one pass, online softmax per row). One split (num_splits == 1): the final
//            o = acc / den' and lse = m' + ln(den') with the sink in the normaliser
//            (m' = max(m, sink), den' = den e^(m - m') + e^(sink - m')). Several: the split's
//            part_o = acc / den and part_lse = m + ln(den), merged by combine.cuh. An empty range
//            gives acc = 0, den = 0: o = 0 and lse = -inf (sink without entries: lse = sink).
// Mapping:   grid = (splits, Hkv * row_chunks, S * launch_layers); a block owns one (s, l, g) (l =
//            first_layer + z % launch_layers), the ROWS query
//            rows of chunk y % row_chunks of its group, and one split; NT threads. Per tile of NT
//            list entries: thread j scores entry j against every row (its whole K row in 16-byte
//            loads, the rows' q broadcast from shared memory: no shuffles); warp w turns the
//            scores of rows w, w + W, ... into probabilities (online max and sum); then thread
//            (c, rg) adds V chunk c of the tile's entries rg, rg + RG, ... to every row's
//            accumulator. Each listed K and V row is read once for all the rows of the block; the
//            RG accumulators are summed in a fixed order at the end of the split.
// Shared memory: static: q ROWS x HEAD_DIM f32, scores ROWS x NT f32, slots NT i32, row stats
//            3 x ROWS f32, accumulator sum ROWS x DECODE_MAX_DV f32
//            (8 x (128 + 128 + 256) x 4 + 512 + 96 = 17 KiB at HEAD_DIM 128, NT 128).
// Host guarantees (DecodeSpec::new): G * T >= 1 rows in row_chunks chunks of ROWS; value_dim a
//            multiple of the 16-byte chunk, <= DECODE_MAX_DV; K/V bases and strides 16-byte
//            aligned; list entries in [0, N) (the tensors' slots) and lengths <= the list stride;
//            split_len a multiple of NT; num_splits <= DECODE_MAX_SPLITS; paged: each sequence's
//            block-table row holds in-range blocks for every listed slot.
// Numerics:  f32 throughout, exp/log/tanh of the device math library; nvcc may contract the dot
//            products and the accumulation into FMA: the CPU backend sums in another order
//            anyway, so agreement is within f32 rounding of the row (about 1e-6 of max |v|), and
//            the split count changes the result only by that much. One backend is bit-for-bit
//            deterministic: every sum has a fixed order (warp trees, row groups in turn).
// Knobs:     KeyT, HEAD_DIM, ROWS (query rows per block), NT (threads = tile entries).
#pragma once
#include "../common/params.cuh"
#include "../common/types.cuh"

namespace tri {

constexpr int DECODE_MAX_DV = 256;

// -inf, without a math-library constant that differs between the device and the host.
TRI_DEVICE float neg_inf() { return bits_to_float(0xff800000u); }

// Address of row (g, n) of one layer's K or V tensor (or pool) under the sequence's table row.
template <class T>
TRI_DEVICE const T* decode_row(uint64_t base, const int32_t* table, int block_size, int64_t block_stride,
                               int64_t head_stride, int64_t row_stride, int g, int n) {
  const T* b = reinterpret_cast<const T*>(base);
  if (block_size == 0) return b + (int64_t)g * head_stride + (int64_t)n * row_stride;
  const int32_t blk = table[n / block_size];
  return b + (int64_t)blk * block_stride + (int64_t)g * head_stride + (int64_t)(n % block_size) * row_stride;
}

// One query element as f32, whatever the query dtype.
TRI_DEVICE float decode_query(const tri_decode_params& p, int64_t at) {
  if (p.query_dtype == TRI_DTYPE_F32) return static_cast<const float*>(p.queries)[at];
  const uint32_t bits = static_cast<const uint16_t*>(p.queries)[at];
  return p.query_dtype == TRI_DTYPE_BF16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
}

template <class KeyT, int HEAD_DIM, int ROWS, int NT>
TRI_DEVICE void decode(const tri_decode_params& p) {
  constexpr int VEC = Key<KeyT>::VEC;
  constexpr int CHUNKS = HEAD_DIM / VEC;  // 16-byte chunks of a K row
  constexpr int WARPS = NT / 32;
  constexpr int PER_LANE = NT / 32;       // tile entries per lane in the row statistics
  static_assert(HEAD_DIM % VEC == 0 && NT % 32 == 0, "whole chunks, whole warps");

  TRI_SHARED(__align__(16) float, q_s, [ROWS][HEAD_DIM]);
  TRI_SHARED(float, p_s, [ROWS][NT]);  // scores, then probabilities
  TRI_SHARED(int32_t, slot_s, [NT]);
  TRI_SHARED(float, m_s, [ROWS]);      // running max
  TRI_SHARED(float, den_s, [ROWS]);    // running sum of exp(s - m)
  TRI_SHARED(float, alpha_s, [ROWS]);  // this tile's rescale of the accumulators
  TRI_SHARED(float, acc_s, [ROWS][DECODE_MAX_DV]);

  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int split = blockIdx.x;
  const int g = blockIdx.y / p.row_chunks, chunk = blockIdx.y % p.row_chunks;
  const int s = blockIdx.z / p.launch_layers, ll = blockIdx.z % p.launch_layers;
  const int l = p.first_layer + ll;
  const int group_rows = p.group * p.num_queries;
  const int row0 = chunk * ROWS;
  const int rows = group_rows - row0 < ROWS ? group_rows - row0 : ROWS;

  // The list of (l, g) and this split's range of it.
  const int32_t* list = nullptr;
  int len;
  if (p.list_layout == TRI_LIST_DENSE) {
    len = p.seq_lens[s];
  } else {
    const int idx = p.list_layout == TRI_LIST_SHARED        ? 0
                    : p.list_layout == TRI_LIST_PER_KV_HEAD ? g
                                                            : l * p.num_kv_heads + g;
    list = p.lists + (int64_t)s * p.list_seq_stride + (int64_t)idx * p.list_stride;
    len = p.list_lens != nullptr ? p.list_lens[(int64_t)s * p.num_lists + idx] : p.list_len;
  }
  const int j_begin = split * p.split_len;
  const int j_end = len < j_begin + p.split_len ? len : j_begin + p.split_len;

  const int32_t* table = p.block_table + (int64_t)s * p.block_table_stride;  // unused when contiguous
  const int64_t layer = p.block_size == 0 ? (int64_t)s * p.num_layers + l : l;
  const uint64_t k_base = p.keys[layer], v_base = p.values[layer];

  // q rows of the chunk (zero beyond `rows`: their scores are never used).
  for (int idx = t; idx < ROWS * HEAD_DIM; idx += NT) {
    const int r = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float x = 0.0f;
    if (r < rows) {
      const int h = g * p.group + (row0 + r) / p.num_queries, tq = (row0 + r) % p.num_queries;
      x = decode_query(p, (int64_t)s * p.q_seq_stride + (int64_t)ll * p.q_layer_stride +
                              (int64_t)h * p.q_head_stride + (int64_t)tq * p.q_token_stride + d);
    }
    q_s[r][d] = x;
  }
  if (t < ROWS) {
    m_s[t] = neg_inf();
    den_s[t] = 0.0f;
  }

  // V chunks: thread (c, rg) owns chunk c of the rows of row group rg.
  const int vchunks = p.value_dim / VEC;
  const int groups = NT / vchunks;
  const int c = t % vchunks, rg = t / vchunks;
  const bool accumulates = rg < groups;
  float acc[ROWS][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[r][e] = 0.0f;

  for (int tile = j_begin; tile < j_end; tile += NT) {
    const int n_tile = j_end - tile < NT ? j_end - tile : NT;
    sync_block();  // q_s and the row stats are written; the previous tile's p_s is consumed

    // Phase A: entry t's scores against every row.
    if (t < n_tile) {
      const int slot = list != nullptr ? list[tile + t] : tile + t;
      slot_s[t] = slot;
      const KeyT* row = decode_row<KeyT>(k_base, table, p.block_size, p.k_block_stride, p.k_head_stride,
                                         p.k_row_stride, g, slot);
      float dot[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dot[r] = 0.0f;
#pragma unroll 4
      for (int ch = 0; ch < CHUNKS; ++ch) {
        float k[VEC];
        Key<KeyT>::widen(load16(row + ch * VEC), k);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[r] += q_s[r][ch * VEC + e] * k[e];
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float sc = dot[r] * p.scale;
        if (p.softcap > 0.0f) sc = p.softcap * tanhf(sc / p.softcap);
        p_s[r][t] = sc;
      }
    } else {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) p_s[r][t] = neg_inf();
    }
    sync_block();

    // Phase B: per row, the tile's max, the new running max, probabilities and their sum.
    for (int r = warp; r < ROWS; r += WARPS) {
      float mx = neg_inf();
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) mx = fmaxf(mx, p_s[r][lane + 32 * i]);
#pragma unroll
      for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, shfl_xor(mx, o));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) {
        const float sc = p_s[r][lane + 32 * i];
        const float pr = sc == neg_inf() ? 0.0f : expf(sc - m_new);
        p_s[r][lane + 32 * i] = pr;
        sum += pr;
      }
#pragma unroll
      for (int o = 16; o > 0; o /= 2) sum += shfl_xor(sum, o);
      if (lane == 0) {
        const float alpha = m_old == neg_inf() ? 0.0f : expf(m_old - m_new);
        alpha_s[r] = alpha;
        den_s[r] = den_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    sync_block();

    // Phase C: rescale the accumulators and add this tile's V chunks.
    if (accumulates) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float a = alpha_s[r];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] *= a;
      }
      for (int j = rg; j < n_tile; j += groups) {
        const KeyT* row = decode_row<KeyT>(v_base, table, p.block_size, p.v_block_stride, p.v_head_stride,
                                           p.v_row_stride, g, slot_s[j]);
        float v[VEC];
        Key<KeyT>::widen(load16(row + c * VEC), v);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pr = p_s[r][j];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][e] += pr * v[e];
        }
      }
    }
  }

  // The row groups' accumulators, summed in group order.
  for (int grp = 0; grp < groups; ++grp) {
    sync_block();
    if (accumulates && rg == grp) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc_s[r][c * VEC + e] = grp == 0 ? acc[r][e] : acc_s[r][c * VEC + e] + acc[r][e];
    }
  }
  sync_block();

  // Outputs: the final o and lse with the sink (one split), or this split's normalised part.
  const int dv_total = p.value_dim;
  for (int idx = t; idx < rows * dv_total; idx += NT) {
    const int r = idx / dv_total, dv = idx % dv_total;
    const int h = g * p.group + (row0 + r) / p.num_queries, tq = (row0 + r) % p.num_queries;
    const int64_t row_id = (((int64_t)s * p.launch_layers + ll) * p.num_heads + h) * p.num_queries + tq;
    const float m = m_s[r], den = den_s[r];
    const float x = groups > 0 ? acc_s[r][dv] : 0.0f;
    if (p.num_splits == 1) {
      const float sink = p.sinks != nullptr ? p.sinks[(int64_t)l * p.num_heads + h] : neg_inf();
      const float mf = fmaxf(m, sink);
      const float em = m == neg_inf() ? 0.0f : expf(m - mf);
      const float total = den * em + (sink == neg_inf() ? 0.0f : expf(sink - mf));
      const float factor = total > 0.0f ? em / total : 0.0f;
      float* o = p.out + (int64_t)s * p.out_seq_stride +
                 (((int64_t)ll * p.num_heads + h) * p.num_queries + tq) * p.out_row_stride;
      o[dv] = x * factor;
      if (dv == 0) {
        p.lse[(int64_t)s * p.lse_seq_stride + ((int64_t)ll * p.num_heads + h) * p.num_queries + tq] =
            total > 0.0f ? mf + logf(total) : neg_inf();
      }
    } else {
      const int64_t part = row_id * p.num_splits + split;
      p.part_out[part * dv_total + dv] = den > 0.0f ? x / den : 0.0f;
      if (dv == 0) p.part_lse[part] = den > 0.0f ? m + logf(den) : neg_inf();
    }
  }
}

}  // namespace tri
