// compact.cuh: physical eviction — compaction of K and V after selection, all layers and KV
// heads of S sequences of one shape in one launch (src/cpu/compact.rs is the specification).
// Sequence s = blockIdx.z uses table entries [s * L + l], keep sets and slot map at
// s * keep_seq_stride, source positions at s * sets * N, position output at s * pos_seq_stride
// and block-table row s * block_table_stride; everything below is per sequence.
//
// Computes:  for every layer l and KV head g, with the keep set keep[set_index[l * Hkv + g]]
//            (K ascending slots of N):
//            order-preserving (COMPACT_ORDER):  row i <- row keep[i], i < K, for K and for V;
//            hole-filling (COMPACT_HOLE): holes = evicted slots < K, movers = kept slots >= K
//              (the last M = K - P entries of keep, P = #{keep < K}); the i-th mover is copied
//              into the i-th hole, nothing else moves (at most min(K, N - K) rows);
//            per set (blocks y >= L * Hkv): slot_map[set, i] = the original slot now held by
//            slot i (keep[i], or the hole-filling map), and positions
//            pos_dst[set * pos_dst_stride + i] = pos_src[set * N + slot_map(i)] (i32 or i64).
//            Rows are byte copies of row_bytes in 16-byte chunks: dtype-agnostic, and K and V
//            rows may differ in size.
// Mapping:   grid = (row tiles, L * Hkv + sets, S). Blocks y < L * Hkv own one (layer, KV head):
//            tile x covers R = rows_per_tile destination rows (order) or movers (hole); each
//            thread stages up to CHUNKS 16-byte chunks of the tile in registers. A block loops
//            x, x + gridDim.x, ... and per tile reads every chunk, syncs, then writes, so with
//            gridDim.x == 1 an order-preserving compaction is safe in place (row i is written
//            only after every tile <= i has been read, and later tiles read slots keep[j] >= j,
//            never written before them). Hole-filling sources (>= K) and destinations (< K)
//            are disjoint, so it runs in place with any grid. Blocks y >= L * Hkv write one
//            set's slot map and positions, staged the same way (NT * CHUNKS slots per tile).
// Shared memory: static, the tile's moves: 2 * NT * CHUNKS int32 (8 KiB at NT 256, CHUNKS 4).
// Host guarantees (CompactSpec::new): 1 <= K <= N <= INT32_MAX; keep rows strictly ascending
//            in [0, N) and set_index entries < sets (checked by the emu entry; device buffers
//            are the caller's contract); row_bytes a multiple of 16 and R * row_bytes <=
//            NT * CHUNKS * 16 for K and for V; bases and strides 16-byte aligned; paged: one
//            block-table row per sequence with distinct blocks (across all sequences) covering
//            N slots, block_size 16..256; sequences' rows, keep sets and outputs disjoint;
//            order-preserving in place only with gridDim.x == 1 (CompactSpec::grid);
//            hole-filling only in place; pos_bytes 4 or 8, positions aligned to pos_bytes.
// Numerics:  byte copies and integer index arithmetic: exact on every backend.
// Knobs:     MODE (COMPACT_ORDER, COMPACT_HOLE), NT, CHUNKS (16-byte chunks per thread per tile).
#pragma once
#include "../common/params.cuh"
#include "../common/types.cuh"

namespace tri {

constexpr int COMPACT_ORDER = 0;
constexpr int COMPACT_HOLE = 1;

// Number of entries of ascending a[0, n) below x.
TRI_DEVICE int count_below(const int32_t* a, int n, int32_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (a[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The i-th hole of a keep set whose first P entries lie below K: i + #{a < P : keep[a] - a <= i}
// (keep[a] - a counts the holes before keep[a] and never decreases).
TRI_DEVICE int hole_slot(const int32_t* keep, int P, int i) {
  int lo = 0, hi = P;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (keep[mid] - mid <= i) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return i + lo;
}

// The original slot held by slot j < K after compaction.
template <int MODE>
TRI_DEVICE int source_slot(const int32_t* keep, int P, int j) {
  if (MODE == COMPACT_ORDER) return keep[j];
  const int below = count_below(keep, P, j);
  if (below < P && keep[below] == j) return j;
  return keep[P + (j - below)];
}

// Byte address of row (g, n) of one layer's tensor (`table`: the sequence's block-table row).
TRI_DEVICE unsigned char* compact_row(const tri_compact_params& p, const int32_t* table, uint64_t base,
                                      int64_t head_stride, int64_t row_stride, int64_t block_stride, int g, int n) {
  unsigned char* b = reinterpret_cast<unsigned char*>(base);
  if (p.block_size == 0) return b + (int64_t)g * head_stride + (int64_t)n * row_stride;
  const int32_t blk = table[n / p.block_size];
  return b + (int64_t)blk * block_stride + (int64_t)g * head_stride + (int64_t)(n % p.block_size) * row_stride;
}

// One tile of one tensor: row r < rows of the tile moves from slot from_s[r] to slot to_s[r].
template <int NT, int CHUNKS>
TRI_DEVICE void compact_tile(const tri_compact_params& p, const tri_compact_tensor& tn, const int32_t* table,
                             const int32_t* from_s, const int32_t* to_s, int64_t layer, int g, int rows) {
  const int cpr = tn.row_bytes / 16;  // chunks per row
  const int total = rows * cpr;
  const uint64_t src = tn.src[layer], dst = tn.dst[layer];
  uint4 staged[CHUNKS];
  // Phase 1: read every chunk of the tile.
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int idx = threadIdx.x + c * NT;
    if (idx < total) {
      const int r = idx / cpr, chunk = idx % cpr;
      staged[c] = load16(compact_row(p, table, src, tn.head_stride, tn.row_stride, tn.block_stride, g, from_s[r]) + 16 * chunk);
    }
  }
  sync_block();
  // Phase 2: write them.
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int idx = threadIdx.x + c * NT;
    if (idx < total) {
      const int r = idx / cpr, chunk = idx % cpr;
      store16(compact_row(p, table, dst, tn.dst_head_stride, tn.dst_row_stride, tn.block_stride, g, to_s[r]) + 16 * chunk,
              staged[c]);
    }
  }
  sync_block();
}

template <int MODE, int NT, int CHUNKS>
TRI_DEVICE void compact(const tri_compact_params& p) {
  const int heads = p.num_layers * p.num_kv_heads;
  const int y = blockIdx.y;
  const int K = p.keep_len;
  const int64_t seq = blockIdx.z;
  const int set = y < heads ? p.set_index[y] : y - heads;
  const int32_t* keep = p.keep + seq * p.keep_seq_stride + (int64_t)set * K;
  // P: kept slots below K (all K for order-preserving); M = K - P movers.
  const int P = MODE == COMPACT_ORDER ? K : count_below(keep, K, K);
  const int work = MODE == COMPACT_ORDER ? K : K - P;

  if (y < heads) {
    const int l = y / p.num_kv_heads, g = y % p.num_kv_heads;
    // The tile's moves, computed once for K and V (R <= NT * CHUNKS: rows are >= 16 bytes).
    TRI_SHARED(int32_t, from_s, [NT * CHUNKS]);
    TRI_SHARED(int32_t, to_s, [NT * CHUNKS]);
    const int R = p.rows_per_tile;
    for (int r0 = blockIdx.x * R; r0 < work; r0 += gridDim.x * R) {
      const int rows = work - r0 < R ? work - r0 : R;
      for (int r = threadIdx.x; r < rows; r += NT) {
        from_s[r] = MODE == COMPACT_ORDER ? keep[r0 + r] : keep[P + r0 + r];
        to_s[r] = MODE == COMPACT_ORDER ? r0 + r : hole_slot(keep, P, r0 + r);
      }
      sync_block();
      const int32_t* table = p.block_table + seq * p.block_table_stride;  // unused when contiguous
      const int64_t layer = seq * p.num_layers + l;
      compact_tile<NT, CHUNKS>(p, p.k, table, from_s, to_s, layer, g, rows);
      compact_tile<NT, CHUNKS>(p, p.v, table, from_s, to_s, layer, g, rows);
    }
    return;
  }

  // Set blocks: slot map and positions, NT * CHUNKS slots per tile, read before write.
  constexpr int SLOTS = NT * CHUNKS;
  for (int j0 = blockIdx.x * SLOTS; j0 < K; j0 += gridDim.x * SLOTS) {
    int from[CHUNKS];
    int64_t pos[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int j = j0 + threadIdx.x + c * NT;
      from[c] = 0;
      pos[c] = 0;
      if (j < K) {
        from[c] = source_slot<MODE>(keep, P, j);
        if (p.pos_src != nullptr) {
          const int64_t at = (seq * p.num_sets + set) * p.num_slots + from[c];
          pos[c] = p.pos_bytes == 8 ? load_i64(static_cast<const int64_t*>(p.pos_src) + at)
                                    : (int64_t) static_cast<const int32_t*>(p.pos_src)[at];
        }
      }
    }
    sync_block();
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int j = j0 + threadIdx.x + c * NT;
      if (j < K) {
        if (p.slot_map != nullptr) p.slot_map[seq * p.keep_seq_stride + (int64_t)set * K + j] = from[c];
        if (p.pos_dst != nullptr) {
          const int64_t at = seq * p.pos_seq_stride + (int64_t)set * p.pos_dst_stride + j;
          if (p.pos_bytes == 8) {
            store_i64(static_cast<int64_t*>(p.pos_dst) + at, pos[c]);
          } else {
            static_cast<int32_t*>(p.pos_dst)[at] = (int32_t)pos[c];
          }
        }
      }
    }
    sync_block();
  }
}

}  // namespace tri
