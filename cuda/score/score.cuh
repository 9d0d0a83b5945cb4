// score.cuh: fused TriAttention key scoring (ALGORITHM.md sections 2.2 and 9).
//
// Computes:  raw[s, l, h, n] = k . w(s, l, h) + |k| . c(l, h)                      (mean, V = 1)
//                            = max_{j < V} k . W(s, l, h, j) + |k| . c(l, h)     (max, V = J)
//            for every sequence s, layer l, attention head h and cached slot n < seq_lens[s],
//            k the stored (post-RoPE) key of KV head h / G widened to f32, |k| its F pair
//            moduli, c = sigma * c_f. With V = 0 the trig term is dropped (raw = |k| . c).
//            The same pass writes, per (s, l, h, tile), the count, mean and M2 of the scores of
//            the z-score candidates in the tile: slots in [stat_start[s], stat_end[s]) (0 and
//            seq_lens[s] when null), NaN scores left out (src/cpu/normalize.rs row_moments).
//            src/cpu/score.rs is the specification.
// Mapping:   grid = (tiles of BLOCK_KEYS slots, L * Hkv, S); one CTA reads the tile's key rows of
//            one (l, KV head) once and scores them for all G query heads of the group.
//            score_mean: a team of TPR threads per row, each thread holding CPT 16-byte chunks
//            of the row's first half and the mirrored chunks of its second half (so every thread
//            owns whole rotary pairs in both pairing styles); dot products reduced over the team
//            with shuffles. score_max: the tile sits in shared memory (bf16, or f32 split into
//            bf16 levels as fragments are read); each warp multiplies 16-row blocks by the
//            head's D x V weights (3 bf16 levels) with mma.sync m16n8k16, f32 accumulation.
// Shared memory: score_mean: static, HEAD_CHUNK * (D + F + BLOCK_KEYS) floats.
//            score_max: dynamic, max_smem_bytes() below (mirrored in src/variant.rs).
// Host guarantees (ScoreSpec): rows 16-byte aligned (bases and strides), 1 <= G, H = G * Hkv,
//            seq_lens[s] <= tiles * BLOCK_KEYS, 0 <= V <= 32, block tables cover seq_lens,
//            max mode only with V >= 1, raw and partials sized for the grid.
// Numerics:  contraction allowed (the hot path): nvcc fuses the dot products, the norm term and
//            the partials' M2 into FFMA, and tensor cores accumulate in their own order, so scores
//            agree with the CPU within about 1e-6 of a row's standard deviation, not bit for bit
//            (tests/kernels/cuda_score.rs: 8e-6; rounds: common::assert_keep_sets_match). Identical keys
//            still get identical scores: every row runs the same instructions.
// Knobs:     KeyT (f32, f16, bf16), HEAD_DIM (32..256), BLOCK_KEYS, NT; pairing style, layout,
//            group size and counts are run-time parameters.
#pragma once
#include "../common/params.cuh"
#include "../common/types.cuh"

namespace tri {

constexpr int WARP_SIZE = 32;
constexpr int SCORE_HEAD_CHUNK = 8;  // query heads whose weights sit in shared memory at once
constexpr int SCORE_MAX_VECTORS = 32;

// Address of key row (s, l, g, n).
template <class KeyT>
TRI_DEVICE const KeyT* key_row(const tri_score_params& p, int s, int l, int g, int n) {
  if (p.block_size == 0) {
    const KeyT* base = reinterpret_cast<const KeyT*>(p.keys[(int64_t)s * p.num_layers + l]);
    return base + (int64_t)g * p.head_stride + (int64_t)n * p.row_stride;
  }
  const KeyT* pool = reinterpret_cast<const KeyT*>(p.keys[l]);
  const int32_t block = p.block_table[(int64_t)s * p.block_table_stride + n / p.block_size];
  return pool + (int64_t)block * p.block_stride + (int64_t)g * p.head_stride +
         (int64_t)(n % p.block_size) * p.row_stride;
}

TRI_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int m = WARP_SIZE / 2; m >= 1; m /= 2) v += shfl_xor(v, m);
  return v;
}

// `a` unless `b` is larger; NaN never wins (the CPU reference's rule).
TRI_DEVICE float keep_larger(float a, float b) { return b > a ? b : a; }

// NaN test that no optimisation flag folds away (no fast-math here, but be explicit).
TRI_DEVICE bool is_nan(float v) { return v != v; }

// One warp: count, mean and M2 of the non-NaN values of vals[lo, hi) into *dst (NaN left out, as
// the CPU reference does). Deterministic: fixed lane striding and butterfly sums; the count is a
// float sum of ones, exact for a tile.
TRI_DEVICE void tile_partial(const float* vals, int lo, int hi, tri_row_partial* dst) {
  const int lane = threadIdx.x % WARP_SIZE;
  float count = 0.f, sum = 0.f;
  for (int i = lo + lane; i < hi; i += WARP_SIZE) {
    const float v = vals[i];
    if (!is_nan(v)) {
      count += 1.f;
      sum += v;
    }
  }
  count = warp_sum(count);
  sum = warp_sum(sum);
  const float mean = count > 0.f ? sum / count : 0.f;
  float m2 = 0.f;
  for (int i = lo + lane; i < hi; i += WARP_SIZE) {
    const float v = vals[i];
    if (!is_nan(v)) {
      const float d = v - mean;
      m2 += d * d;
    }
  }
  m2 = warp_sum(m2);
  if (lane == 0) {
    tri_row_partial r;
    r.count = count;
    r.mean = mean;
    r.m2 = m2;
    r.pad = 0.f;
    *dst = r;
  }
}

// Store scores of `heads` heads (out_s[hh * stride + r]) and their tile partials.
template <int NT>
TRI_DEVICE void store_tile(const tri_score_params& p, const float* out_s, int stride, int heads, int s, int l,
                           int h0, int tile, int tile_begin, int len) {
  const int rows = len - tile_begin < stride ? len - tile_begin : stride;
  for (int idx = threadIdx.x; idx < heads * stride; idx += NT) {
    const int hh = idx / stride, r = idx % stride;
    if (r < rows) {
      p.raw[(int64_t)s * p.raw_seq_stride + (int64_t)(l * p.num_heads + h0 + hh) * p.raw_row_stride + tile_begin +
            r] = out_s[hh * stride + r];
    }
  }
  if (p.partials == nullptr) return;
  // Candidates [stat_start, stat_end) clipped to the tile's rows, relative to tile_begin.
  const int start = p.stat_start ? p.stat_start[s] : 0;
  const int end = p.stat_end ? p.stat_end[s] : len;
  const int lo = start > tile_begin ? start - tile_begin : 0;
  int hi = end - tile_begin < rows ? end - tile_begin : rows;
  if (hi < 0) hi = 0;
  for (int hh = threadIdx.x / WARP_SIZE; hh < heads; hh += NT / WARP_SIZE) {
    const int64_t at = ((int64_t)(s * p.num_layers + l) * p.num_heads + h0 + hh) * p.num_tiles + tile;
    tile_partial(out_s + hh * stride, lo, hi, p.partials + at);
  }
}

// A tile past the end of its sequence: empty partials for the group's heads, nothing else.
template <int NT>
TRI_DEVICE void store_empty_tile(const tri_score_params& p, int s, int l, int g, int tile) {
  if (p.partials == nullptr) return;
  for (int hh = threadIdx.x; hh < p.group; hh += NT) {
    const int64_t at = ((int64_t)(s * p.num_layers + l) * p.num_heads + g * p.group + hh) * p.num_tiles + tile;
    tri_row_partial r;
    r.count = 0.f;
    r.mean = 0.f;
    r.m2 = 0.f;
    r.pad = 0.f;
    p.partials[at] = r;
  }
}

// The pairs a thread owns: slot j < CPT * VEC of its first-half chunks (half style: pair f is
// dims f and f + F, one element of each half) or of its first- then second-half chunks taken two
// adjacent elements at a time (interleaved). Index of the pair, and its modulus.
template <int CPT, int VEC, int TPR, int F>
TRI_DEVICE int pair_index(int style, int lane_t, int j) {
  if (style == TRI_STYLE_HALF) return (lane_t + (j / VEC) * TPR) * VEC + j % VEC;
  const int half = j / (CPT * VEC / 2), r = j % (CPT * VEC / 2);
  return (half * F + (lane_t + (r / (VEC / 2)) * TPR) * VEC) / 2 + r % (VEC / 2);
}

template <int CPT, int VEC>
TRI_DEVICE void pair_moduli(int style, const float (&k)[2][CPT][VEC], float (&mod)[CPT * VEC]) {
  if (style == TRI_STYLE_HALF) {
#pragma unroll
    for (int c = 0; c < CPT; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float re = k[0][c][e], im = k[1][c][e];
        mod[c * VEC + e] = sqrtf(re * re + im * im);
      }
  } else {
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int c = 0; c < CPT; ++c)
#pragma unroll
        for (int e = 0; e < VEC / 2; ++e) {
          const float re = k[half][c][2 * e], im = k[half][c][2 * e + 1];
          mod[half * CPT * VEC / 2 + c * VEC / 2 + e] = sqrtf(re * re + im * im);
        }
  }
}

template <class KeyT, int CPT>
TRI_DEVICE void widen_row(const uint4 (&raw)[2][CPT], float (&k)[2][CPT][Key<KeyT>::VEC]) {
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int c = 0; c < CPT; ++c) Key<KeyT>::widen(raw[half][c], k[half][c]);
}

// ---------------------------------------------------------------------------------------------
// Mean aggregation (and V = 0): a streaming GEMV, keys in registers, 16-byte loads.
template <class KeyT, int HEAD_DIM, int BLOCK_KEYS, int NT>
TRI_DEVICE void score_mean(const tri_score_params& p) {
  using Team = RowTeam<KeyT, HEAD_DIM>;
  constexpr int VEC = Team::VEC, TPR = Team::TPR, CPT = Team::CPT;
  constexpr int F = HEAD_DIM / 2;
  constexpr int ROWS_PER_PASS = NT / TPR;
  constexpr int RPT = BLOCK_KEYS / ROWS_PER_PASS;  // rows per thread
  constexpr int HC = SCORE_HEAD_CHUNK;
  static_assert(NT % TPR == 0 && BLOCK_KEYS % ROWS_PER_PASS == 0, "tile must be whole passes");

  TRI_SHARED(__align__(16) float, w_s, [HC][HEAD_DIM]);
  TRI_SHARED(__align__(16) float, c_s, [HC][F]);
  TRI_SHARED(float, out_s, [HC][BLOCK_KEYS]);

  const int tile = blockIdx.x, s = blockIdx.z;
  const int l = blockIdx.y / p.num_kv_heads, g = blockIdx.y % p.num_kv_heads;
  const int len = p.seq_lens[s];
  const int tile_begin = tile * BLOCK_KEYS;
  if (tile_begin >= len) {
    store_empty_tile<NT>(p, s, l, g, tile);
    return;
  }
  const int t = threadIdx.x, team = t / TPR, lane_t = t % TPR;

  // Phase 1: issue every 16-byte load of this thread's rows before any arithmetic.
  uint4 raw_k[RPT][2][CPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int n = tile_begin + team + i * ROWS_PER_PASS;
    if (n < len) {
      const KeyT* row = key_row<KeyT>(p, s, l, g, n);
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        const int cc = lane_t + c * TPR;
        raw_k[i][0][c] = load16(row + cc * VEC);
        raw_k[i][1][c] = load16(row + F + cc * VEC);
      }
    } else {
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        raw_k[i][0][c] = uint4{0u, 0u, 0u, 0u};
        raw_k[i][1][c] = uint4{0u, 0u, 0u, 0u};
      }
    }
  }

  // Pair moduli once per row; the keys stay packed and are widened again per head.
  float mod[RPT][CPT * VEC];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    float k[2][CPT][VEC];
    widen_row<KeyT, CPT>(raw_k[i], k);
    pair_moduli<CPT, VEC>(p.style, k, mod[i]);
  }

  const bool trig = p.num_vectors > 0;
  for (int h0 = 0; h0 < p.group; h0 += HC) {
    const int heads = p.group - h0 < HC ? p.group - h0 : HC;
    const int head0 = g * p.group + h0;  // first attention head of this chunk

    // Phase 2: this chunk's weights and norm coefficients into shared memory.
    sync_block();
    const float* w_src = static_cast<const float*>(p.weights) + (int64_t)s * p.weights_seq_stride;
    for (int idx = t; idx < heads * HEAD_DIM && trig; idx += NT) {
      const int hh = idx / HEAD_DIM, d = idx % HEAD_DIM;
      w_s[hh][d] = w_src[(int64_t)(l * p.num_heads + head0 + hh) * HEAD_DIM + d];
    }
    // c_s in thread order: slot q = (j / VEC) * TPR * VEC + lane_t * VEC + j % VEC holds the
    // coefficient of the pair that thread lane_t keeps as its j-th modulus, so the hot loop reads
    // it style-free with vector loads.
    for (int idx = t; idx < heads * F; idx += NT) {
      const int hh = idx / F, q = idx % F;
      const int owner = (q / VEC) % TPR, j = (q / (TPR * VEC)) * VEC + q % VEC;
      const int f = pair_index<CPT, VEC, TPR, F>(p.style, owner, j);
      c_s[hh][q] = p.norm[(int64_t)(l * p.num_heads + head0 + hh) * F + f];
    }
    sync_block();

    // Phase 3: every head of the chunk against every row; the team reduces with shuffles.
    for (int hh = 0; hh < heads; ++hh) {
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        float acc = 0.f;
        if (trig) {
          float k[2][CPT][VEC];
          widen_row<KeyT, CPT>(raw_k[i], k);
#pragma unroll
          for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int c = 0; c < CPT; ++c)
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc += k[half][c][e] * w_s[hh][half * F + (lane_t + c * TPR) * VEC + e];
        }
#pragma unroll
        for (int j = 0; j < CPT * VEC; ++j) acc += mod[i][j] * c_s[hh][(j / VEC) * TPR * VEC + lane_t * VEC + j % VEC];
#pragma unroll
        for (int m = TPR / 2; m >= 1; m /= 2) acc += shfl_xor(acc, m);
        if (lane_t == 0) out_s[hh][team + i * ROWS_PER_PASS] = acc;
      }
    }
    sync_block();

    // Phase 4: coalesced stores and z-score partials.
    store_tile<NT>(p, &out_s[0][0], BLOCK_KEYS, heads, s, l, head0, tile, tile_begin, len);
  }
}

// ---------------------------------------------------------------------------------------------
// Max aggregation on tensor cores, f32 accuracy from bf16 pieces.
//
// Every operand is a sum of bf16 levels: x = x0 + x1 + x2 with |x_i| <= 2^(-8i) |x| roughly.
// Weights always take 3 levels; bf16 keys are exact in 1, f16 keys in 2 (11 significand bits),
// f32 keys take 3. The products x_a * w_b with a + b <= 2 are accumulated (smallest first); the
// dropped ones are below 2^-24 of the score terms, the f32 rounding level.

template <class KeyT>
struct KeyLevels {
  static constexpr int value = 3;  // f32
};
template <>
struct KeyLevels<f16_t> {
  static constexpr int value = 2;
};
template <>
struct KeyLevels<bf16_t> {
  static constexpr int value = 1;
};
// Dynamic shared memory of score_max for `vectors` weight vectors; src/variant.rs mirrors it.
template <class KeyT, int HEAD_DIM, int BLOCK_KEYS>
TRI_DEVICE constexpr int max_smem_bytes(int vectors) {
  constexpr int AS = HEAD_DIM + 8, AF = HEAD_DIM + 4, F = HEAD_DIM / 2;
  const int jpad = (vectors + 7) / 8 * 8;
  const int keys = KeyLevels<KeyT>::value == 1 ? 2 * BLOCK_KEYS * AS : 4 * BLOCK_KEYS * AF;
  return keys + 4 * BLOCK_KEYS * (F + 1) + 4 * F + 4 * BLOCK_KEYS + 2 * WEIGHT_LEVELS * jpad * AS;
}

template <class KeyT, int HEAD_DIM, int BLOCK_KEYS, int NT>
TRI_DEVICE void score_max(const tri_score_params& p) {
  using Team = RowTeam<KeyT, HEAD_DIM>;
  constexpr int VEC = Team::VEC, TPR = Team::TPR, CPT = Team::CPT;
  constexpr int F = HEAD_DIM / 2;
  constexpr int AS = HEAD_DIM + 8;  // bf16 row stride: 16-byte rows, conflict-free fragment reads
  constexpr int AF = HEAD_DIM + 4;  // f32 row stride: conflict-free 8-byte fragment reads
  constexpr int MS = F + 1;         // modulus row stride
  constexpr int KL = KeyLevels<KeyT>::value;
  constexpr int ROWS_PER_PASS = NT / TPR;
  constexpr int KSTEPS = HEAD_DIM / 16;
  constexpr int NTILES = SCORE_MAX_VECTORS / 8;
  constexpr int WARPS = NT / WARP_SIZE;
  static_assert(BLOCK_KEYS % 16 == 0 && BLOCK_KEYS % ROWS_PER_PASS == 0, "tile must be whole row blocks");

  const int tile = blockIdx.x, s = blockIdx.z;
  const int l = blockIdx.y / p.num_kv_heads, g = blockIdx.y % p.num_kv_heads;
  const int len = p.seq_lens[s];
  const int tile_begin = tile * BLOCK_KEYS;
  if (tile_begin >= len) {
    store_empty_tile<NT>(p, s, l, g, tile);
    return;
  }
  const int vectors = p.num_vectors;
  const int jpad = (vectors + 7) / 8 * 8;
  const int ntiles = jpad / 8;

  unsigned char* smem = dynamic_smem();
  uint16_t* a_bf = reinterpret_cast<uint16_t*>(smem);  // KL == 1: [BLOCK_KEYS][AS] bf16
  float* a_f32 = reinterpret_cast<float*>(smem);       // KL > 1: [BLOCK_KEYS][AF] f32
  float* mod_s = reinterpret_cast<float*>(smem + (KL == 1 ? 2 * BLOCK_KEYS * AS : 4 * BLOCK_KEYS * AF));
  float* c_s = mod_s + BLOCK_KEYS * MS;
  float* out_s = c_s + F;
  uint16_t* b_s = reinterpret_cast<uint16_t*>(out_s + BLOCK_KEYS);  // [WEIGHT_LEVELS][jpad][AS] bf16

  const int t = threadIdx.x, team = t / TPR, lane_t = t % TPR;
  const int warp = t / WARP_SIZE, lane = t % WARP_SIZE, group = lane / 4, tig = lane % 4;

  // Phase 1: the key tile, read once: pair moduli, and the values (bf16, or f32 to be split).
  for (int r = team; r < BLOCK_KEYS; r += ROWS_PER_PASS) {
    const int n = tile_begin + r;
    uint4 raw_k[2][CPT];
    if (n < len) {
      const KeyT* row = key_row<KeyT>(p, s, l, g, n);
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        const int cc = lane_t + c * TPR;
        raw_k[0][c] = load16(row + cc * VEC);
        raw_k[1][c] = load16(row + F + cc * VEC);
      }
    } else {
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        raw_k[0][c] = uint4{0u, 0u, 0u, 0u};
        raw_k[1][c] = uint4{0u, 0u, 0u, 0u};
      }
    }
    float k[2][CPT][VEC];
    widen_row<KeyT, CPT>(raw_k, k);
    float mod[CPT * VEC];
    pair_moduli<CPT, VEC>(p.style, k, mod);
#pragma unroll
    for (int j = 0; j < CPT * VEC; ++j) mod_s[r * MS + pair_index<CPT, VEC, TPR, F>(p.style, lane_t, j)] = mod[j];
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int c = 0; c < CPT; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int d = half * F + (lane_t + c * TPR) * VEC + e;
          if (KL == 1) {
            a_bf[r * AS + d] = (uint16_t)float_to_bf16_bits(k[half][c][e]);
          } else {
            a_f32[r * AF + d] = k[half][c][e];
          }
        }
  }

  for (int hh = 0; hh < p.group; ++hh) {
    const int h = g * p.group + hh;
    // Phase 2: the head's weight image (3 bf16 levels of D x V, zero padded), copied as is.
    sync_block();
    const int64_t image = weight_image_elems(vectors, HEAD_DIM);
    const uint16_t* w_src = static_cast<const uint16_t*>(p.weights) + (int64_t)s * p.weights_seq_stride +
                            (int64_t)(l * p.num_heads + h) * image;
    for (int idx = t; idx < image / 8; idx += NT) store16(b_s + idx * 8, load16(w_src + idx * 8));
    for (int f = t; f < F; f += NT) c_s[f] = p.norm[(int64_t)(l * p.num_heads + h) * F + f];
    sync_block();

    // Phase 3: 16-row blocks per warp: T = K W on tensor cores, max over j, plus the norm term.
    for (int rb = warp; rb < BLOCK_KEYS / 16; rb += WARPS) {
      // acc: the leading products x0 * w0; fix: the correction terms, summed apart so their
      // rounding is relative to their own small size.
      float acc[NTILES][4], fix[NTILES][4];
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = fix[nt][i] = 0.f;
      const int r0 = rb * 16 + group, r1 = r0 + 8;
#pragma unroll 1
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const int k0 = ks * 16 + 2 * tig;
        // A fragment registers: (r0, k0), (r1, k0), (r0, k0 + 8), (r1, k0 + 8), two k each.
        uint32_t a[KL][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = (i & 1) ? r1 : r0, col = k0 + ((i & 2) ? 8 : 0);
          if (KL == 1) {
            a[0][i] = smem_u32(a_bf + row * AS + col);
          } else {
            uint32_t lo[KL], hi[KL];
            split_bf16<KL>(a_f32[row * AF + col], lo);
            split_bf16<KL>(a_f32[row * AF + col + 1], hi);
#pragma unroll
            for (int v = 0; v < KL; ++v) a[v][i] = lo[v] | (hi[v] << 16);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
          if (nt < ntiles) {
            uint32_t b[WEIGHT_LEVELS][2];
#pragma unroll
            for (int v = 0; v < WEIGHT_LEVELS; ++v) {
              const uint16_t* bp = b_s + (v * jpad + nt * 8 + group) * AS + k0;
              b[v][0] = smem_u32(bp);
              b[v][1] = smem_u32(bp + 8);
            }
#pragma unroll
            for (int order = 2; order >= 1; --order)
#pragma unroll
              for (int ka = 0; ka < KL; ++ka) {
                const int kb = order - ka;
                if (kb >= 0 && kb < WEIGHT_LEVELS) mma_bf16_m16n8k16(fix[nt], a[ka], b[kb]);
              }
            mma_bf16_m16n8k16(acc[nt], a[0], b[0]);
          }
        }
      }
      float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = nt * 8 + 2 * tig + e;
          if (nt < ntiles && j < vectors) {
            m0 = keep_larger(m0, acc[nt][e] + fix[nt][e]);
            m1 = keep_larger(m1, acc[nt][2 + e] + fix[nt][2 + e]);
          }
        }
#pragma unroll
      for (int m = 1; m <= 2; m *= 2) {
        m0 = keep_larger(m0, shfl_xor(m0, m));
        m1 = keep_larger(m1, shfl_xor(m1, m));
      }
      // Norm term: lane covers row rb * 16 + lane % 16, half of the pairs.
      const int nrow = rb * 16 + lane % 16, f0 = (lane / 16) * (F / 2);
      float e_sum = 0.f;
      for (int f = f0; f < f0 + F / 2; ++f) e_sum += mod_s[nrow * MS + f] * c_s[f];
      e_sum += shfl_xor(e_sum, 16);
      const float e0 = shfl(e_sum, group), e1 = shfl(e_sum, group + 8);
      if (tig == 0) {
        out_s[r0] = m0 + e0;
        out_s[r1] = m1 + e1;
      }
    }
    sync_block();

    // Phase 4: coalesced stores and z-score partials.
    store_tile<NT>(p, out_s, BLOCK_KEYS, 1, s, l, h, tile, tile_begin, len);
  }
}

}  // namespace tri
