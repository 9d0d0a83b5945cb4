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
static_assert(sizeof(tri_score_params) == 152, "keep in sync with ScoreParams");
static_assert(offsetof(tri_score_params, head_stride) == 64, "keep in sync with ScoreParams");
static_assert(offsetof(tri_score_params, block_table_stride) == 112, "keep in sync with ScoreParams");

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
