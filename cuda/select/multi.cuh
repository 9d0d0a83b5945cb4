// multi.cuh: the multi-block path of `select` for long rows (prompt-length rows, up to 128K slots).
//
// Computes:  exactly what select_topk (select.cuh) computes, bit for bit: per row the protected
//            slots plus the best K - protected candidates, ascending (src/cpu/select.rs
//            select_row is the specification).
// Mapping:   a row is cut into num_chunks chunks of chunk_len slots; a fixed sequence of launches,
//            all taking tri_select_params (only `pass` changes), runs the radix select of
//            select_topk with the row spread over many blocks:
//              for pass = 0..3: select_hist  grid (rows, chunks): the block's chunk histogram of
//                                            the candidates matching the digits found so far,
//                                            written (not added) to its own scratch slice;
//                               select_scan  grid (rows), 256 threads: sums the chunk histograms
//                                            in chunk order, finds the digit holding rank `rank`
//                                            and writes the row state for the next pass;
//              select_count  grid (rows, chunks): sure-kept slots and ties of the chunk;
//              select_place  grid (rows, chunks): adds the counts of the chunks before its own and
//                            writes its kept slots (ties: only the first `take` of the row in slot
//                            order) at their positions, ascending (select_emit of select.cuh).
//            No atomics leave a block and every sum runs in a fixed order, so the result is the
//            same run after run. Nothing in the scratch needs initialising: pass 0 writes the row
//            state and every histogram or count is written whole before it is read. A pass after
//            the boundary is found (the whole bucket kept) or with no candidate to keep returns at
//            once, so the launch sequence stays fixed.
// Scratch:   per row select_scratch_words(num_chunks) u32 at row * that: state[4] (key prefix,
//            mask, rank, done), hist[num_chunks][256], counts[num_chunks][2] (sure, ties).
// Shared memory: static; hist 1 KiB, scan 1 KiB + 16 B, count 8 B, place 2 * NT / 32 + 2 words.
// Host guarantees (SelectSpec::launches): those of select_topk; num_chunks * chunk_len >= len,
//            chunk_len a multiple of NT; scratch holds num_rows rows.
// Numerics:  integer keys and counts only: exact on every backend.
// Knobs:     NT (a multiple of 32, at most 1024; the scan kernel takes 256).
#pragma once
#include "../common/arch.cuh"
#include "../common/params.cuh"

namespace tri {

// u32 words of scratch per row.
TRI_DEVICE int64_t select_scratch_words(int num_chunks) { return 4 + (int64_t)num_chunks * (SELECT_RADIX + 2); }

// Per-row view of the multi-block state.
struct SelectRow {
  const float* scores;
  uint32_t* state;   // [4] prefix, mask, rank, done
  uint32_t* hist;    // [num_chunks][256]
  uint32_t* counts;  // [num_chunks][2]
  int lo, hi, kc;    // candidates [lo, hi), of which kc are kept
};

TRI_DEVICE SelectRow select_row_view(const tri_select_params& p, int row) {
  SelectRow r;
  r.scores = p.scores + (int64_t)row * p.score_stride;
  r.state = p.scratch + (int64_t)row * select_scratch_words(p.num_chunks);
  r.hist = r.state + 4;
  r.counts = r.hist + (int64_t)p.num_chunks * SELECT_RADIX;
  r.lo = select_row_prefix(p, row);
  r.hi = p.window_start > r.lo ? p.window_start : r.lo;
  r.kc = p.budget - (p.len - (r.hi - r.lo));
  return r;
}

// Pass `pass` (shift 24 - 8 * pass): the histogram of the candidates of chunk blockIdx.y of row
// blockIdx.x whose key matches the prefix found so far.
template <int NT>
TRI_DEVICE void select_hist(const tri_select_params& p) {
  static_assert(NT % 32 == 0 && NT <= 1024, "NT: whole warps, at most 1024 threads");
  TRI_SHARED(uint32_t, hist, [SELECT_RADIX]);
  const SelectRow r = select_row_view(p, blockIdx.x);
  if (r.kc <= 0) return;  // no candidate kept: the state says so (select_scan, pass 0)
  uint32_t prefix = 0, mask = 0;
  if (p.pass > 0) {
    if (r.state[3] != 0u) return;  // boundary found in an earlier pass
    prefix = r.state[0];
    mask = r.state[1];
  }
  const int shift = 24 - 8 * p.pass;
  for (int i = threadIdx.x; i < SELECT_RADIX; i += NT) hist[i] = 0u;
  sync_block();
  const int begin = blockIdx.y * p.chunk_len;
  const int from = begin > r.lo ? begin : r.lo;
  const int end = begin + p.chunk_len < r.hi ? begin + p.chunk_len : r.hi;
  for (int i = from + threadIdx.x; i < end; i += NT) {
    const uint32_t key = select_key(r.scores[i]);
    if ((key & mask) == prefix) atomic_add_u32(&hist[(key >> shift) & 0xffu], 1u);
  }
  sync_block();
  uint32_t* out = r.hist + (int64_t)blockIdx.y * SELECT_RADIX;
  for (int i = threadIdx.x; i < SELECT_RADIX; i += NT) out[i] = hist[i];
}

// Pass `pass`: the row's histogram (chunk histograms summed in chunk order), the digit holding the
// candidate of rank `rank` (as select_topk's warp 0), the state for the next pass. One block per row.
template <int NT>
TRI_DEVICE void select_scan(const tri_select_params& p) {
  static_assert(NT == SELECT_RADIX, "one thread per digit");
  TRI_SHARED(uint32_t, hist, [SELECT_RADIX]);
  TRI_SHARED(uint32_t, found, [3]);  // key prefix, rank within it, whole bucket kept
  const SelectRow r = select_row_view(p, blockIdx.x);
  const int tid = threadIdx.x, warp = tid / 32;
  uint32_t prefix = 0, mask = 0, rank = (uint32_t)(r.kc > 0 ? r.kc : 0);
  if (p.pass == 0) {
    if (r.kc <= 0) {
      // Mask 0 and rank 0: every candidate is a tie, none taken.
      if (tid == 0) {
        r.state[0] = 0u;
        r.state[1] = 0u;
        r.state[2] = 0u;
        r.state[3] = 1u;
      }
      return;
    }
  } else {
    if (r.state[3] != 0u) return;
    prefix = r.state[0];
    mask = r.state[1];
    rank = r.state[2];
  }
  const int shift = 24 - 8 * p.pass;
  {
    uint32_t sum = 0;
    const uint32_t* h = r.hist + tid;
    for (int c = 0; c < p.num_chunks; ++c) sum += h[(int64_t)c * SELECT_RADIX];
    hist[tid] = sum;
  }
  sync_block();
  if (warp == 0) select_find_digit(hist, rank, prefix, shift, found);
  sync_block();
  if (tid == 0) {
    r.state[0] = found[0];
    r.state[1] = mask | (0xffu << shift);
    r.state[2] = found[1];
    r.state[3] = found[2];
  }
}

// Whether slot i (< len) of a row is kept for sure (protected, or its key prefix above the
// boundary) or a tie (its key prefix the boundary).
TRI_DEVICE void select_classify(const SelectRow& r, int i, uint32_t prefix, uint32_t mask, bool& sure, bool& tie) {
  if (i < r.lo || i >= r.hi) {
    sure = true;
    tie = false;
  } else {
    const uint32_t key = select_key(r.scores[i]) & mask;
    sure = key > prefix;
    tie = key == prefix;
  }
}

// Sure-kept slots and ties of chunk blockIdx.y of row blockIdx.x.
template <int NT>
TRI_DEVICE void select_count(const tri_select_params& p) {
  static_assert(NT % 32 == 0 && NT <= 1024, "NT: whole warps, at most 1024 threads");
  TRI_SHARED(uint32_t, totals, [2]);
  const SelectRow r = select_row_view(p, blockIdx.x);
  const uint32_t prefix = r.state[0], mask = r.state[1];
  if (threadIdx.x == 0) {
    totals[0] = 0u;
    totals[1] = 0u;
  }
  sync_block();
  const int begin = blockIdx.y * p.chunk_len;
  const int end = begin + p.chunk_len < p.len ? begin + p.chunk_len : p.len;
  uint32_t sure_n = 0, tie_n = 0;
  for (int i = begin + threadIdx.x; i < end; i += NT) {
    bool sure, tie;
    select_classify(r, i, prefix, mask, sure, tie);
    sure_n += sure ? 1u : 0u;
    tie_n += tie ? 1u : 0u;
  }
  if (sure_n != 0u) atomic_add_u32(&totals[0], sure_n);
  if (tie_n != 0u) atomic_add_u32(&totals[1], tie_n);
  sync_block();
  if (threadIdx.x == 0) {
    r.counts[2 * blockIdx.y] = totals[0];
    r.counts[2 * blockIdx.y + 1] = totals[1];
  }
}

// The kept slots of chunk blockIdx.y of row blockIdx.x at their positions in the row's output.
template <int NT>
TRI_DEVICE void select_place(const tri_select_params& p) {
  static_assert(NT % 32 == 0 && NT <= 1024, "NT: whole warps, at most 1024 threads");
  constexpr int WARPS = NT / 32;
  TRI_SHARED(uint32_t, warp_sure, [WARPS]);
  TRI_SHARED(uint32_t, warp_ties, [WARPS]);
  TRI_SHARED(uint32_t, before, [2]);  // sure-kept slots and ties of the chunks before this one
  const SelectRow r = select_row_view(p, blockIdx.x);
  const uint32_t prefix = r.state[0], mask = r.state[1], take = r.state[2];
  int32_t* keep = p.keep + (int64_t)blockIdx.x * p.keep_stride;
  if (threadIdx.x == 0) {
    before[0] = 0u;
    before[1] = 0u;
  }
  sync_block();
  uint32_t s = 0, t = 0;
  for (int c = threadIdx.x; c < (int)blockIdx.y; c += NT) {
    s += r.counts[2 * c];
    t += r.counts[2 * c + 1];
  }
  if (s != 0u) atomic_add_u32(&before[0], s);
  if (t != 0u) atomic_add_u32(&before[1], t);
  sync_block();
  uint32_t base_sure = before[0], base_ties = before[1];
  const int begin = blockIdx.y * p.chunk_len;
  const int end = begin + p.chunk_len < p.len ? begin + p.chunk_len : p.len;
  for (int c0 = begin; c0 < end; c0 += NT) {  // uniform over the block
    const int i = c0 + threadIdx.x;
    bool sure = false, tie = false;
    if (i < end) select_classify(r, i, prefix, mask, sure, tie);
    select_emit<NT>(i, sure, tie, take, warp_sure, warp_ties, base_sure, base_ties, keep);
  }
}

}  // namespace tri
