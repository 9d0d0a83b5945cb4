// select.cuh: deterministic top-k of every row (the `select` stage).
//
// Computes:  for every row r < num_rows of scores (f32, row r at r * score_stride, N = len
//            slots), the K = budget kept slots, ascending, into keep[r * keep_stride + i]:
//            every protected slot (n < prefix or n >= window_start; prefix =
//            prefixes[r / rows_per_seq] when prefixes is set) plus the best
//            K - protected candidates (the other slots). Order: the larger score wins; equal
//            scores (-0 == +0) -> the lower slot; NaN below every number (-inf included), NaNs
//            among themselves by slot. src/cpu/select.rs select_row is the specification.
// Mapping:   grid = (num_rows); one block of NT threads per row. Each candidate's score becomes
//            an order-preserving 32-bit key (select_key: NaN -> 0, -inf -> 0x007fffff,
//            +inf -> 0xff800000). Radix select, most significant 8-bit digit first: a pass
//            builds a shared histogram of the candidates that match the digits found so far,
//            warp 0 scans its bins from the top and finds the digit holding the candidate of
//            rank `rank`; the rank within that bucket carries to the next pass. At most four
//            passes give the boundary key prefix T and `take`, the number of candidates with
//            prefix T that are kept (the lowest slots); a pass stops early when the whole bucket
//            is kept. The last pass walks the row in slot order, NT slots at a time (slot
//            c * NT + threadIdx.x, coalesced), marks kept slots (protected; prefix > T; prefix
//            == T and among the first `take` of those), and compacts them with ballots and the
//            warp totals: position = kept-before + min(ties-before, take).
//            Rows of up to NT * SELECT_ITEMS (16) slots are read once: thread t keeps the keys
//            of slots t + j * NT in registers. Longer rows are re-read from global memory (L2)
//            in every pass, so any row length fits.
// Shared memory: static, (256 + 2 * NT / 32 + 3) words: 1.1 KiB at NT = 256, 1.2 KiB at 512.
// Host guarantees (SelectSpec): 1 <= len, 0 <= prefix <= len, 0 <= window_start <= len,
//            protected count <= budget <= len (for every row's own prefix when prefixes is set;
//            then rows_per_seq >= 1), score_stride >= len, keep_stride >= budget.
// Numerics:  integer keys and counts only: exact on every backend.
// Knobs:     NT (a multiple of 32, at most 1024).
#pragma once
#include "../common/arch.cuh"
#include "../common/params.cuh"

namespace tri {

constexpr int SELECT_RADIX = 256;

// Order-preserving key: a larger score gives a larger key; -0 is +0; every NaN is 0, below -inf
// (0x007fffff).
TRI_DEVICE uint32_t select_key(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The protected prefix of row `row`: per sequence (prefixes[row / rows_per_seq]) or shared.
TRI_DEVICE int select_row_prefix(const tri_select_params& p, int row) {
  return p.prefixes != nullptr ? p.prefixes[row / p.rows_per_seq] : p.prefix;
}

// Slots per thread whose keys stay in registers: rows up to NT * SELECT_ITEMS slots are read from
// global memory once; longer rows are re-read in every pass.
constexpr int SELECT_ITEMS = 16;

// Warp 0 of a block: find the digit (bits `shift`..`shift`+7) of the candidate of rank `rank`
// (1-based, from the top) in the 256-bin histogram `hist`. Writes found[0] = `prefix` with that
// digit, found[1] = the rank within its bin, found[2] = 1 when the whole bin is kept. Lane l owns
// digits 255 - 8l - j, j < 8 (the bins from the top, in lane order).
TRI_DEVICE void select_find_digit(const uint32_t* hist, uint32_t rank, uint32_t prefix, int shift, uint32_t* found) {
  const int lane = threadIdx.x % 32;
  uint32_t c[8];
  uint32_t sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[SELECT_RADIX - 1 - 8 * lane - j];
    sum += c[j];
  }
  // Inclusive scan over the lanes; counts <= 2^24 travel exactly as floats.
  uint32_t incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const uint32_t up = (uint32_t)shfl((float)incl, lane >= off ? lane - off : lane);
    if (lane >= off) incl += up;
  }
  const uint32_t excl = incl - sum;
  if (excl < rank && rank <= incl) {
    // Walk the lane's bins without indexing registers dynamically (no local memory).
    uint32_t acc = excl, digit = 0, within = 0, whole = 0;
    bool hit = false;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (!hit && acc + c[j] >= rank) {
        hit = true;
        digit = (uint32_t)(SELECT_RADIX - 1 - 8 * lane - j);
        within = rank - acc;
        whole = within == c[j] ? 1u : 0u;
      } else if (!hit) {
        acc += c[j];
      }
    }
    found[0] = prefix | (digit << shift);
    found[1] = within;
    found[2] = whole;
  }
}

// One chunk of the final pass: slot i (one per thread) is kept when `sure`, or when `tie` and
// among the first `take` ties of the row; kept slots go out in slot order.
template <int NT>
TRI_DEVICE void select_emit(int i, bool sure, bool tie, uint32_t take, uint32_t* warp_sure, uint32_t* warp_ties,
                            uint32_t& base_sure, uint32_t& base_ties, int32_t* keep) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t below = (1u << lane) - 1u;
  const uint32_t bs = ballot(sure), bt = ballot(tie);
  if (lane == 0) {
    warp_sure[warp] = (uint32_t)popc(bs);
    warp_ties[warp] = (uint32_t)popc(bt);
  }
  sync_block();
  uint32_t sure_before = base_sure + (uint32_t)popc(bs & below);
  uint32_t ties_before = base_ties + (uint32_t)popc(bt & below);
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    const uint32_t s = warp_sure[w], t = warp_ties[w];
    if (w < warp) {
      sure_before += s;
      ties_before += t;
    }
    base_sure += s;
    base_ties += t;
  }
  if (sure) {
    keep[sure_before + (ties_before < take ? ties_before : take)] = i;
  } else if (tie && ties_before < take) {
    keep[sure_before + ties_before] = i;
  }
  sync_block();  // warp totals are rewritten by the next chunk
}

template <int NT>
TRI_DEVICE void select_topk(const tri_select_params& p) {
  static_assert(NT % 32 == 0 && NT <= 1024, "NT: whole warps, at most 1024 threads");
  constexpr int WARPS = NT / 32;
  TRI_SHARED(uint32_t, hist, [SELECT_RADIX]);
  TRI_SHARED(uint32_t, warp_sure, [WARPS]);
  TRI_SHARED(uint32_t, warp_ties, [WARPS]);
  TRI_SHARED(uint32_t, found, [3]);  // key prefix, rank within it, whole bucket kept

  const int n = p.len, tid = threadIdx.x, warp = tid / 32;
  const float* scores = p.scores + (int64_t)blockIdx.x * p.score_stride;
  int32_t* keep = p.keep + (int64_t)blockIdx.x * p.keep_stride;
  // Candidates are the slots [lo, hi); the rest is protected.
  const int lo = select_row_prefix(p, blockIdx.x), hi = p.window_start > lo ? p.window_start : lo;
  const int kc = p.budget - (n - (hi - lo));  // candidates to keep, 0 <= kc <= hi - lo

  // Short rows: thread t keeps the keys of slots t + j * NT in registers (one global read).
  const bool cached = n <= NT * SELECT_ITEMS;
  uint32_t keys[SELECT_ITEMS];
#pragma unroll
  for (int j = 0; j < SELECT_ITEMS; ++j) {
    const int i = tid + j * NT;
    keys[j] = (cached && i >= lo && i < hi) ? select_key(scores[i]) : 0u;
  }

  uint32_t prefix = 0, mask = 0, rank = (uint32_t)kc;
  if (kc > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < SELECT_RADIX; i += NT) hist[i] = 0u;
      sync_block();
      if (cached) {
#pragma unroll
        for (int j = 0; j < SELECT_ITEMS; ++j) {
          const int i = tid + j * NT;
          if (i >= lo && i < hi && (keys[j] & mask) == prefix) atomic_add_u32(&hist[(keys[j] >> shift) & 0xffu], 1u);
        }
      } else {
        for (int i = lo + tid; i < hi; i += NT) {
          const uint32_t key = select_key(scores[i]);
          if ((key & mask) == prefix) atomic_add_u32(&hist[(key >> shift) & 0xffu], 1u);
        }
      }
      sync_block();
      if (warp == 0) select_find_digit(hist, rank, prefix, shift, found);
      sync_block();
      prefix = found[0];
      rank = found[1];
      mask |= 0xffu << shift;
      if (found[2] != 0u) break;  // every candidate with this prefix is kept: T is found
    }
  }
  // kc == 0: no candidate is kept (mask 0 and rank 0 make every candidate a tie never taken).
  const uint32_t take = rank;

  uint32_t base_sure = 0, base_ties = 0;  // sure-kept slots and ties before this chunk
  if (cached) {
#pragma unroll
    for (int j = 0; j < SELECT_ITEMS; ++j) {
      if (j * NT >= n) break;  // uniform over the block
      const int i = tid + j * NT;
      bool sure = false, tie = false;
      if (i < n) {
        if (i < lo || i >= hi) {
          sure = true;
        } else {
          const uint32_t key = keys[j] & mask;
          sure = key > prefix;
          tie = key == prefix;
        }
      }
      select_emit<NT>(i, sure, tie, take, warp_sure, warp_ties, base_sure, base_ties, keep);
    }
  } else {
    for (int c0 = 0; c0 < n; c0 += NT) {
      const int i = c0 + tid;
      bool sure = false, tie = false;
      if (i < n) {
        if (i < lo || i >= hi) {
          sure = true;
        } else {
          const uint32_t key = select_key(scores[i]) & mask;
          sure = key > prefix;
          tie = key == prefix;
        }
      }
      select_emit<NT>(i, sure, tie, take, warp_sure, warp_ties, base_sure, base_ties, keep);
    }
  }
}

}  // namespace tri

// Rows longer than SELECT_SINGLE_MAX_LEN (src/cuda/select.rs): the multi-block path.
#include "multi.cuh"
