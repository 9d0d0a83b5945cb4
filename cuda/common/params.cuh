// params.cuh: the one argument of every kernel, mirrored field for field in src/cuda/params.rs.
//
// Field order is ABI. Pointers are 64-bit device addresses (host addresses under the emu backend),
// offsets and strides are 64-bit element counts. Both sides assert the size and a few offsets; a
// change here without the same change in params.rs fails to compile on one side or the other.
#pragma once
#include <stddef.h>
#include <stdint.h>

// Pairing styles (src/model.rs PairingStyle): how a D-vector is read as D/2 complex pairs.
#define TRI_STYLE_HALF 0         // pair f = dims (f, f + D/2)
#define TRI_STYLE_INTERLEAVED 1  // pair f = dims (2f, 2f + 1)

// One z-score partial: the candidate slots of one (sequence, layer, head, tile). `mean` and `m2`
// are taken about the tile's own mean, so the host combines tiles without cancellation.
struct tri_row_partial {
  float count;  // candidate slots in the tile
  float mean;   // their mean raw score
  float m2;     // sum of squared deviations from `mean`
  float pad;
};
static_assert(sizeof(tri_row_partial) == 16, "keep in sync with RowPartial");

// triattn_score_*: raw per-attention-head scores of every cached key, all layers, KV heads and
// sequences of one round in one launch.
struct tri_score_params {
  // Key row (s, l, g, n): contiguous caches (block_size == 0):
  //   keys[s * num_layers + l] + g * head_stride + n * row_stride
  // paged caches: keys[l] + block_table[s * block_table_stride + n / block_size] * block_stride
  //   + g * head_stride + (n % block_size) * row_stride
  const uint64_t* keys;         // [S * L] or [L] addresses of KeyT elements
  // mean (V <= 1): f32 [S?, L, H, V, D]; max (V = J): the bf16 level image, u16
  // [S?, L, H, 3, jpad, D + 8] (tri::weight_levels, jpad = V rounded up to 8, zero padded);
  // sequence s at s * weights_seq_stride elements
  const void* weights;
  const float* norm;            // [L, H, F]  sigma * c_f
  const int32_t* block_table;   // [S, block_table_stride] (paged), else null
  const int32_t* seq_lens;      // [S] cached slots per sequence
  const int32_t* stat_start;    // [S] first z-score candidate slot per sequence, or null (0)
  const int32_t* stat_end;      // [S] one past the last z-score candidate slot per sequence, or
                                // null (seq_lens[s])
  float* raw;                   // out: (s, l, h, n) at s * raw_seq_stride + (l * H + h) * raw_row_stride + n
  tri_row_partial* partials;    // out: [S, L, H, num_tiles], or null
  int64_t head_stride;          // elements between KV heads
  int64_t row_stride;           // elements between slots (within a block when paged)
  int64_t block_stride;         // elements between pool blocks (paged)
  int64_t weights_seq_stride;   // elements (f32 or u16) between sequences' weights (0: shared)
  int64_t raw_seq_stride;       // elements
  int64_t raw_row_stride;       // elements between (l, h) rows of raw
  int32_t block_table_stride;   // entries per block-table row
  int32_t block_size;           // slots per block; 0 = contiguous cache
  int32_t num_seqs;             // S
  int32_t num_layers;           // L
  int32_t num_heads;            // H
  int32_t num_kv_heads;         // Hkv
  int32_t group;                // G = H / Hkv
  int32_t num_vectors;          // V: weight vectors per head (0: no trig term, 1: mean, J: max)
  int32_t style;                // TRI_STYLE_*
  int32_t num_tiles;            // gridDim.x, the partials' last extent
};
static_assert(sizeof(tri_score_params) == 160, "keep in sync with ScoreParams");
static_assert(offsetof(tri_score_params, head_stride) == 72, "keep in sync with ScoreParams");
static_assert(offsetof(tri_score_params, block_table_stride) == 120, "keep in sync with ScoreParams");

// triattn_score_trig_*: the per-round weights of ALGORITHM.md section 9.1-9.2, trigonometry in f64.
struct tri_trig_params {
  const float* q_mean_real;     // [L, H, F]
  const float* q_mean_imag;     // [L, H, F]
  const float* q_abs_mean;      // [L, H, F]
  const double* omega;          // [F]
  const int64_t* round_start;   // [S] read on the device: a replayed graph sees the new value
  // out: V = 1: f32 [S, L, H, 1, D]; V = J: the bf16 level image u16 [S, L, H, 3, jpad, D + 8];
  // null when V == 0
  void* weights;
  float* norm;                  // out [L, H, F] = sigma * c_f; written by sequence 0
  double sigma;                 // s^2
  int32_t num_seqs;             // S
  int32_t num_layers;           // L
  int32_t num_heads;            // H
  int32_t head_dim;             // D
  int32_t num_offsets;          // J: offsets 1, 2, 4, ..., 2^(J-1)
  int32_t num_vectors;          // V: 0, 1 or J
  int32_t style;                // TRI_STYLE_*
  int32_t norm_residual;        // 1: c = a - |q|, 0: c = a
};
static_assert(sizeof(tri_trig_params) == 96, "keep in sync with TrigParams");
static_assert(offsetof(tri_trig_params, sigma) == 56, "keep in sync with TrigParams");

// triattn_select_*: deterministic top-k of every row of one round. Single-block rows: one launch,
// grid (num_rows). Long rows (multi-block, select.cuh): a fixed sequence of launches over the same
// struct, differing only in `pass`, grid (num_rows, num_chunks) or (num_rows).
struct tri_select_params {
  const float* scores;          // row r at r * score_stride, `len` slots
  int32_t* keep;                // out: row r at r * keep_stride, `budget` slots ascending
  int64_t score_stride;         // elements between rows of scores
  int64_t keep_stride;          // elements between rows of keep
  int32_t num_rows;             // gridDim.x
  int32_t len;                  // N slots per row
  int32_t prefix;               // P: slots < P are protected
  int32_t window_start;         // W: slots >= W are protected
  int32_t budget;               // K: kept slots per row, protected ones included
  int32_t pass;                 // multi-block: radix pass 0..3 of the histogram and scan kernels
  uint32_t* scratch;            // multi-block: per row select_scratch_words(num_chunks) words; else null
  int32_t num_chunks;           // multi-block: chunks per row (gridDim.y); else 0
  int32_t chunk_len;            // multi-block: slots per chunk, a multiple of the block; else 0
  // Batched rounds: row r protects slots < prefixes[r / rows_per_seq] (i32 [rows / rows_per_seq]);
  // null: `prefix` for every row. len, window_start and budget stay shared.
  const int32_t* prefixes;
  int32_t rows_per_seq;         // rows per sequence when prefixes is set; else 0
  int32_t pad3;
};
static_assert(sizeof(tri_select_params) == 88, "keep in sync with SelectParams");
static_assert(offsetof(tri_select_params, prefixes) == 72, "keep in sync with SelectParams");
static_assert(offsetof(tri_select_params, score_stride) == 16, "keep in sync with SelectParams");
static_assert(offsetof(tri_select_params, num_rows) == 32, "keep in sync with SelectParams");
static_assert(offsetof(tri_select_params, pass) == 52, "keep in sync with SelectParams");
static_assert(offsetof(tri_select_params, scratch) == 56, "keep in sync with SelectParams");
static_assert(offsetof(tri_select_params, num_chunks) == 64, "keep in sync with SelectParams");

// One tensor (K or V) of a compaction: per layer a source and a destination base address (equal
// for in place), byte strides. Row (g, n): contiguous base + g * head_stride + n * row_stride;
// paged base + block_table[n / block_size] * block_stride + g * head_stride
// + (n % block_size) * row_stride (the destination uses dst_head_stride, dst_row_stride).
struct tri_compact_tensor {
  const uint64_t* src;          // [L] addresses
  const uint64_t* dst;          // [L] addresses (the same as src in place)
  int64_t head_stride;          // bytes between KV heads (source)
  int64_t row_stride;           // bytes between slots (source; within a block when paged)
  int64_t dst_head_stride;      // bytes (destination)
  int64_t dst_row_stride;       // bytes (destination)
  int64_t block_stride;         // bytes between pool blocks (paged, source and destination)
  int32_t row_bytes;            // bytes copied per row, a multiple of 16
  int32_t pad;
};
static_assert(sizeof(tri_compact_tensor) == 64, "keep in sync with CompactTensor");

// triattn_compact_*: compaction of K and V of all layers and KV heads of S sequences.
struct tri_compact_params {
  tri_compact_tensor k;
  tri_compact_tensor v;
  const int32_t* keep;          // [sets, K] ascending slots
  const int32_t* set_index;     // [L * Hkv] keep set of (l, g)
  const int32_t* block_table;   // [>= ceil(N / block_size)] (paged), else null
  int32_t* slot_map;            // out [sets, K]: original slot held by each new slot, or null
  const void* pos_src;          // [sets, N] i32 or i64 positions, or null
  void* pos_dst;                // out: (set, i) at set * pos_dst_stride + i, or null
  int64_t pos_dst_stride;       // elements
  int32_t num_layers;           // L
  int32_t num_kv_heads;         // Hkv
  int32_t num_sets;             // sets
  int32_t num_slots;            // N
  int32_t keep_len;             // K
  int32_t rows_per_tile;        // R: rows (order) or movers (hole) per block tile
  int32_t block_size;           // slots per block; 0 = contiguous
  int32_t pos_bytes;            // 4 (i32) or 8 (i64)
  // Batched rounds: sequence s = blockIdx.z (num_seqs of one shape) uses table entries
  // [s * L + l] of k/v src/dst, keep and slot_map at s * keep_seq_stride, pos_src at
  // s * num_sets * num_slots, pos_dst at s * pos_seq_stride, block-table row at
  // s * block_table_stride.
  int32_t num_seqs;             // S (gridDim.z), >= 1
  int32_t block_table_stride;   // entries per block-table row (paged); else 0
  int64_t keep_seq_stride;      // elements between sequences' keep sets and slot maps
  int64_t pos_seq_stride;       // elements between sequences' position outputs
};
static_assert(sizeof(tri_compact_params) == 240, "keep in sync with CompactParams");
static_assert(offsetof(tri_compact_params, keep) == 128, "keep in sync with CompactParams");
static_assert(offsetof(tri_compact_params, num_layers) == 184, "keep in sync with CompactParams");
static_assert(offsetof(tri_compact_params, num_seqs) == 216, "keep in sync with CompactParams");

// triattn_calibrate_*: one layer's pre-RoPE queries added to the f64 calibration sums.
struct tri_calibrate_params {
  const void* queries;          // [H, T, D] of QT: (h, t, d) at h * head_stride + t * token_stride + d
  double* sum_real;             // in/out [H, D/2]
  double* sum_imag;             // in/out [H, D/2]
  double* sum_abs;              // in/out [H, D/2]
  int64_t head_stride;          // elements
  int64_t token_stride;         // elements
  int32_t num_heads;            // H
  int32_t num_tokens;           // T
  int32_t head_dim;             // D
  int32_t style;                // TRI_STYLE_*
};
static_assert(sizeof(tri_calibrate_params) == 64, "keep in sync with CalibrateParams");
static_assert(offsetof(tri_calibrate_params, num_heads) == 48, "keep in sync with CalibrateParams");

// Reduction modes (src/policy.rs SelectionMode).
#define TRI_REDUCE_PER_HEAD 0
#define TRI_REDUCE_PER_LAYER_PER_HEAD 1
#define TRI_REDUCE_UNION 2

// triattn_reduce_*: per-(layer, head) rows of S sequences to the rows selection ranks.
struct tri_reduce_params {
  const float* z;               // (l, h, n) at l * layer_stride + h * head_stride + n
  float* out;                   // out: (set, n) at set * out_stride + n
  int64_t layer_stride;         // elements
  int64_t head_stride;          // elements
  int64_t out_stride;           // elements
  int32_t num_layers;           // L
  int32_t num_heads;            // H
  int32_t num_kv_heads;         // Hkv
  int32_t len;                  // N slots
  int32_t mode;                 // TRI_REDUCE_*
  int32_t group_mean;           // per layer per head: 1 mean over the group, 0 max
  int32_t prefix;               // slots < prefix get +inf
  int32_t window_start;         // slots >= window_start get +inf
  // Batched rounds: sequence s = blockIdx.z reads z at s * z_seq_stride, writes out at
  // s * out_seq_stride, protects slots < prefixes[s] (null: `prefix`); window_start is shared.
  const int32_t* prefixes;      // i32 [num_seqs], or null
  int64_t z_seq_stride;         // elements
  int64_t out_seq_stride;       // elements
  int32_t num_seqs;             // S (gridDim.z), >= 1
  int32_t pad2;
};
static_assert(sizeof(tri_reduce_params) == 104, "keep in sync with ReduceParams");
static_assert(offsetof(tri_reduce_params, prefixes) == 72, "keep in sync with ReduceParams");
static_assert(offsetof(tri_reduce_params, layer_stride) == 16, "keep in sync with ReduceParams");
static_assert(offsetof(tri_reduce_params, num_layers) == 40, "keep in sync with ReduceParams");

// Steps of a sharded round's reduction (src/shard, cuda/reduce/shard.cuh).
#define TRI_SHARD_STEP_PARTIAL 0     // z -> this rank's part of the reduction (keys or sums)
#define TRI_SHARD_STEP_LAYER_SUM 1   // all-reduced group-max keys -> f64 sums over the layers
#define TRI_SHARD_STEP_FINISH 2      // all-reduced keys or sums -> f32 rows, +inf guards
// What the partial step writes (its rows per sequence).
#define TRI_SHARD_PART_LAYER_SUMS 0  // f64 sum over layers of the group max (rows = Hkv)
#define TRI_SHARD_PART_GROUP_KEYS 1  // key of the group max per (layer, KV head) (rows = L * Hkv)
#define TRI_SHARD_PART_GROUP_SUMS 2  // f64 sum over the group per (layer, KV head) (rows = L * Hkv)
#define TRI_SHARD_PART_UNION_KEYS 3  // key of the max over every row (rows = 1)

// triattn_reduce_f32_ashard_*: one step of a sharded round's reduction, S sequences.
// Buffers are dense [S, rows, len]: keys i32 (order-preserving keys of f32 maxima), sums f64.
struct tri_reduce_shard_params {
  const float* z;               // partial: (l, h, n) at s * z_seq_stride + l * layer_stride + h * head_stride + n
  int32_t* keys;                // partial out (key forms); layer sum in ([S, L * Hkv, len]); finish in
  double* sums;                 // partial out (sum forms); layer sum out ([S, Hkv, len]); finish in
  float* out;                   // finish out: (set, n) at s * out_seq_stride + set * out_stride + n
  const int32_t* prefixes;      // finish: i32 [num_seqs] per-sequence prefixes, or null (`prefix`)
  int64_t layer_stride;         // elements of z
  int64_t head_stride;          // elements of z
  int64_t z_seq_stride;         // elements of z
  int64_t out_stride;           // elements of out
  int64_t out_seq_stride;       // elements of out
  double divisor;               // finish from sums: the global L (per head) or group size (mean)
  int32_t step;                 // TRI_SHARD_STEP_*
  int32_t part;                 // partial: TRI_SHARD_PART_*; finish: 0 from sums, 1 from keys
  int32_t num_layers;           // L of this rank
  int32_t num_heads;            // H of this rank
  int32_t num_kv_heads;         // Hkv of this rank
  int32_t len;                  // N slots
  int32_t rows;                 // rows per sequence this step writes (the grid's y)
  int32_t prefix;               // finish: slots < prefix get +inf
  int32_t window_start;         // finish: slots >= window_start get +inf
  int32_t num_seqs;             // S (the grid's z)
};
static_assert(sizeof(tri_reduce_shard_params) == 128, "keep in sync with ReduceShardParams");
static_assert(offsetof(tri_reduce_shard_params, layer_stride) == 40, "keep in sync with ReduceShardParams");
static_assert(offsetof(tri_reduce_shard_params, divisor) == 80, "keep in sync with ReduceShardParams");
static_assert(offsetof(tri_reduce_shard_params, step) == 88, "keep in sync with ReduceShardParams");

// z-score flavours (src/policy.rs ZScore).
#define TRI_ZSCORE_POPULATION_FLOOR 0
#define TRI_ZSCORE_UNBIASED_CENTRE_FLAT 1

// triattn_normalize_*: z-score finalisation of raw rows from the scorer's tile partials.
struct tri_normalize_params {
  const tri_row_partial* partials;  // [num_rows, num_tiles]
  const float* raw;                 // row r at r * raw_stride
  float* out;                       // out: row r at r * out_stride (may equal raw)
  int64_t raw_stride;               // elements
  int64_t out_stride;               // elements
  int32_t num_rows;                 // gridDim.x
  int32_t num_tiles;                // partials per row
  int32_t len;                      // N slots
  int32_t flavour;                  // TRI_ZSCORE_*
};
static_assert(sizeof(tri_normalize_params) == 56, "keep in sync with NormalizeParams");
static_assert(offsetof(tri_normalize_params, raw_stride) == 24, "keep in sync with NormalizeParams");
static_assert(offsetof(tri_normalize_params, num_rows) == 40, "keep in sync with NormalizeParams");

// Element type of a run-time-typed tensor (decode queries).
#define TRI_DTYPE_F32 0
#define TRI_DTYPE_F16 1
#define TRI_DTYPE_BF16 2

// Which list a (layer, KV head) reads (src/decode.rs ListLayout).
#define TRI_LIST_DENSE 0              // no lists: slots 0..seq_lens[s]
#define TRI_LIST_SHARED 1             // list 0
#define TRI_LIST_PER_KV_HEAD 2        // list g
#define TRI_LIST_PER_LAYER_KV_HEAD 3  // list l * Hkv + g

// triattn_decode_*: T decode queries per attention head against each KV head's slot list (or
// every slot), all layers and sequences of one decode in one launch, split-KV.
struct tri_decode_params {
  // K/V row (s, l, g, n): contiguous caches (block_size == 0): keys[s * L + l] + g * k_head_stride
  // + n * k_row_stride; paged: keys[l] + block_table[s * block_table_stride + n / block_size] *
  // k_block_stride + g * k_head_stride + (n % block_size) * k_row_stride (the same for V).
  const uint64_t* keys;         // [S * L] or [L] addresses of KeyT elements
  const uint64_t* values;       // [S * L] or [L] addresses of KeyT elements
  const void* queries;          // (s, l, h, t, d) at s * q_seq_stride + ll * q_layer_stride +
                                // h * q_head_stride + t * q_token_stride + d, of query_dtype
  const float* sinks;           // [L, H] sink logits (all layers), or null
  const int32_t* lists;         // list i of sequence s at s * list_seq_stride + i * list_stride; null: dense
  const int32_t* list_lens;     // [S, num_lists] entries of each list, or null: list_len each
  const int32_t* seq_lens;      // [S] visible slots 0..seq_lens[s] of a dense decode
  const int32_t* block_table;   // [S, block_table_stride] (paged), else null
  // Layer l of the launch is ll = l - first_layer in q, o, lse and the parts.
  float* out;                   // o (s, l, h, t, dv) at s * out_seq_stride +
                                // ((ll * H + h) * T + t) * out_row_stride + dv (one split)
  float* lse;                   // lse (s, l, h, t) at s * lse_seq_stride + (ll * H + h) * T + t (one split)
  float* part_out;              // splits > 1: f32 [S, launch_layers, H, T, splits, Dv]
  float* part_lse;              // splits > 1: f32 [S, launch_layers, H, T, splits]
  int64_t k_head_stride;        // elements
  int64_t k_row_stride;
  int64_t k_block_stride;
  int64_t v_head_stride;
  int64_t v_row_stride;
  int64_t v_block_stride;
  int64_t q_seq_stride;
  int64_t q_layer_stride;
  int64_t q_head_stride;
  int64_t q_token_stride;
  int64_t list_seq_stride;      // entries between sequences' lists
  int64_t list_stride;          // entries between lists
  int64_t out_seq_stride;       // f32 elements between sequences' o
  int64_t out_row_stride;       // f32 elements between (l, h, t) rows of o (>= Dv)
  int64_t lse_seq_stride;       // f32 elements between sequences' lse
  float scale;                  // logit scale
  float softcap;                // > 0: logits become softcap * tanh(s / softcap); 0: off
  int32_t num_seqs;             // S
  int32_t num_layers;           // L: layers of the K/V tables, lists and sinks
  int32_t first_layer;          // the launch covers layers first_layer .. first_layer + launch_layers
  int32_t launch_layers;        // q, o, lse and the parts hold these layers only (index l - first_layer)
  int32_t num_heads;            // H
  int32_t num_kv_heads;         // Hkv
  int32_t group;                // G = H / Hkv
  int32_t num_queries;          // T
  int32_t value_dim;            // Dv
  int32_t list_layout;          // TRI_LIST_*
  int32_t num_lists;            // lists per sequence
  int32_t list_len;             // entries of every list when list_lens is null
  int32_t split_len;            // list entries per split, a multiple of the block's tile
  int32_t num_splits;           // gridDim.x
  int32_t row_chunks;           // query-row chunks per KV head (gridDim.y / Hkv)
  int32_t block_size;           // slots per block; 0: contiguous
  int32_t block_table_stride;   // entries per block-table row
  int32_t query_dtype;          // TRI_DTYPE_*
};
static_assert(sizeof(tri_decode_params) == 296, "keep in sync with DecodeParams");
static_assert(offsetof(tri_decode_params, k_head_stride) == 96, "keep in sync with DecodeParams");
static_assert(offsetof(tri_decode_params, scale) == 216, "keep in sync with DecodeParams");
static_assert(offsetof(tri_decode_params, query_dtype) == 292, "keep in sync with DecodeParams");

// triattn_decode_combine_*: a split decode's parts merged into o and lse, with the sinks.
struct tri_decode_combine_params {
  const float* part_out;        // f32 [S, launch_layers, H, T, splits, Dv]
  const float* part_lse;        // f32 [S, launch_layers, H, T, splits]
  const float* sinks;           // [L, H] (all layers), or null
  float* out;                   // as tri_decode_params::out
  float* lse;                   // as tri_decode_params::lse
  int64_t out_seq_stride;
  int64_t out_row_stride;
  int64_t lse_seq_stride;
  int32_t num_seqs;             // S
  int32_t first_layer;          // sink row of launch layer ll: first_layer + ll
  int32_t launch_layers;        // layers of the parts, o and lse
  int32_t num_heads;            // H
  int32_t num_queries;          // T
  int32_t value_dim;            // Dv
  int32_t num_splits;           // >= 2
  int32_t pad;
};
static_assert(sizeof(tri_decode_combine_params) == 96, "keep in sync with DecodeCombineParams");
static_assert(offsetof(tri_decode_combine_params, num_seqs) == 64, "keep in sync with DecodeCombineParams");
