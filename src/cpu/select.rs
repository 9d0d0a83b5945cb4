//! Top-k selection with the crate's deterministic order (ALGORITHM.md §3.6, DESIGN.md).
//!
//! Order: the larger score wins; on equal scores the lower slot index wins; NaN ranks below every
//! number (including `-inf`), NaNs among themselves by slot index. Output is ascending.
//!
//! A row is selected in three passes and no sort: every candidate's score becomes an
//! order-preserving integer key ([`rank_key`]), one `select_nth_unstable` over the keys finds the
//! key of the last slot kept (the threshold), and one ascending scan keeps the slots above it
//! plus, among those equal to it, the lowest-indexed ones still needed. The scan emits slots in
//! ascending order, so nothing is sorted afterwards.

use std::cmp::Ordering;

/// `Less` when slot `a` (score `sa`) must be kept before slot `b` (score `sb`).
#[inline]
pub fn rank_order(a: u32, sa: f32, b: u32, sb: f32) -> Ordering {
    match (sa.is_nan(), sb.is_nan()) {
        (false, false) => sb.partial_cmp(&sa).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => a.cmp(&b),
    }
}

/// An integer that orders scores as the selection ranks them (larger key, better rank):
/// `-inf < ... < -0 = +0 < ... < +inf`, every NaN below them all and equal to each other.
/// Slots with equal keys are exactly those whose scores tie in [`rank_order`].
#[inline]
pub fn rank_key(score: f32) -> u32 {
    // -0 and +0 compare equal: one key for both.
    let bits = if score == 0.0 { 0 } else { score.to_bits() };
    // Negative numbers: every bit flipped (reversed magnitude, below 2^31); the rest: the sign
    // bit set. Written without a branch on the sign (scores' signs are random). -inf maps to
    // 0x007f_ffff, above the NaN key.
    let key = bits ^ ((((bits as i32) >> 31) as u32) | 0x8000_0000);
    if score.is_nan() {
        0
    } else {
        key
    }
}

/// The key of a slot that is always kept: above every score's key (`+inf` is `0xff80_0000`).
const ALWAYS: u32 = u32::MAX;

/// Push to `kept`, ascending, every index of an [`ALWAYS`] key and the indices of the `k` best
/// other keys (larger key first, then lower index). `scratch` is reused for the threshold search.
fn keep_best(keys: &[u32], k: usize, scratch: &mut Vec<u32>, kept: &mut Vec<u32>) {
    let always = keys.iter().filter(|&&key| key == ALWAYS).count();
    let candidates = keys.len() - always;
    // The threshold: the smallest key kept. Keys above it are kept outright; the first
    // `ties` (lowest indices) of those equal to it fill the rest. [`ALWAYS`] keys sit above
    // every candidate, so the threshold is the `(len - always - k)`-th smallest of all keys.
    let (threshold, ties) = if k == 0 {
        (ALWAYS - 1, 0)
    } else if k >= candidates {
        (0, keys.len())
    } else {
        scratch.clear();
        scratch.extend_from_slice(keys);
        let t = *scratch.select_nth_unstable(candidates - k).1;
        let above = keys.iter().filter(|&&key| key > t).count();
        (t, always + k - above)
    };
    emit_kept(keys, threshold, ties, kept);
}

/// Push to `kept` the indices (ascending) of the keys above `threshold` and the first `ties`
/// keys equal to it. Eight keys at a time: a block entirely above the threshold (the common
/// case when most slots are kept) is eight consecutive indices; other blocks go key by key.
fn emit_kept(keys: &[u32], threshold: u32, mut ties: usize, kept: &mut Vec<u32>) {
    const LANES: usize = 8;
    let start = kept.len();
    kept.resize(start + keys.len(), 0);
    let out = &mut kept[start..];
    let mut taken = 0;
    let mut one = |out: &mut [u32], i: usize, key: u32, taken: &mut usize| {
        let tie = key == threshold && ties > 0;
        ties -= tie as usize;
        out[*taken] = i as u32;
        *taken += (key > threshold || tie) as usize;
    };
    let blocks = keys.chunks_exact(LANES);
    let tail = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        let base = b * LANES;
        if block.iter().fold(true, |all, &key| all & (key > threshold)) {
            for (j, o) in out[taken..taken + LANES].iter_mut().enumerate() {
                *o = (base + j) as u32;
            }
            taken += LANES;
        } else {
            for (j, &key) in block.iter().enumerate() {
                one(out, base + j, key, &mut taken);
            }
        }
    }
    let base = keys.len() - tail.len();
    for (j, &key) in tail.iter().enumerate() {
        one(out, base + j, key, &mut taken);
    }
    kept.truncate(start + taken);
}

/// The `k` best of `candidates` by `scores[slot]`, ascending by slot.
pub fn top_k(scores: &[f32], candidates: &mut [u32], k: usize) -> Vec<u32> {
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    candidates.sort_unstable();
    let keys: Vec<u32> = candidates.iter().map(|&s| rank_key(scores[s as usize])).collect();
    let mut kept = Vec::with_capacity(k);
    keep_best(&keys, k, &mut Vec::with_capacity(keys.len()), &mut kept);
    for slot in &mut kept {
        *slot = candidates[*slot as usize];
    }
    kept
}

/// Keep every protected slot plus the best `budget - protected` others, ascending.
///
/// `protected(n)` marks slots that are always kept. The caller guarantees the protected count is
/// below `budget` (otherwise the round is skipped before selection).
pub fn select_row(scores: &[f32], protected: impl Fn(usize) -> bool, budget: usize) -> Vec<u32> {
    let n = scores.len();
    if n <= budget {
        return (0..n as u32).collect();
    }
    let mut keys: Vec<u32> = scores.iter().map(|&s| rank_key(s)).collect();
    for (slot, key) in keys.iter_mut().enumerate() {
        if protected(slot) {
            *key = ALWAYS;
        }
    }
    let guarded = keys.iter().filter(|&&key| key == ALWAYS).count();
    let mut kept = Vec::with_capacity(n);
    keep_best(&keys, budget.saturating_sub(guarded), &mut Vec::with_capacity(n), &mut kept);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_prefer_lower_index_and_nan_ranks_last() {
        let s = [1.0, 3.0, 3.0, f32::NAN, 2.0, 3.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&s, &mut (0..7).collect::<Vec<u32>>(), 2), vec![1, 2]);
        assert_eq!(top_k(&s, &mut (0..7).collect::<Vec<u32>>(), 6), vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(top_k(&s, &mut (0..7).collect::<Vec<u32>>(), 7), vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(top_k(&s, &mut [6, 3, 5, 2], 2), vec![2, 5]);
    }

    #[test]
    fn protected_slots_are_kept_and_counted() {
        let s = [0.0, 9.0, 8.0, 7.0, 1.0];
        assert_eq!(select_row(&s, |n| n == 0 || n == 4, 3), vec![0, 1, 4]);
    }

    #[test]
    fn rank_keys_order_as_rank_order() {
        let values = [
            f32::NAN,
            -f32::NAN,
            f32::NEG_INFINITY,
            -f32::MAX,
            -1.5,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            f32::MIN_POSITIVE,
            1.0,
            1.5,
            f32::MAX,
            f32::INFINITY,
        ];
        for &a in &values {
            for &b in &values {
                // Same slot: only the scores decide (Equal for ties).
                let want = rank_order(0, b, 0, a);
                assert_eq!(rank_key(a).cmp(&rank_key(b)), want, "{a} vs {b}");
            }
        }
    }

    /// A small deterministic generator (no dependency): scores with many ties, NaNs and signed
    /// zeros, so the threshold often falls inside a run of equal keys.
    fn scores(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match x % 11 {
                    0 => f32::NAN,
                    1 => -0.0,
                    2 => 0.0,
                    3 => f32::NEG_INFINITY,
                    _ => ((x >> 20) % 7) as f32 - 3.0,
                }
            })
            .collect()
    }

    #[test]
    fn select_row_equals_a_full_sort_by_rank_order() {
        for seed in 0..200u64 {
            let n = 1 + (seed as usize * 7) % 97;
            let s = scores(seed, n);
            let prefix = (seed as usize) % 5;
            let window = n - (seed as usize % 3).min(n);
            let protected = |slot: usize| slot < prefix || slot >= window;
            for budget in [0, 1, n / 3, n / 2, n.saturating_sub(1), n, n + 1] {
                let guarded = (0..n).filter(|&i| protected(i)).count();
                let mut order: Vec<u32> = (0..n as u32).filter(|&i| !protected(i as usize)).collect();
                order.sort_by(|&a, &b| rank_order(a, s[a as usize], b, s[b as usize]));
                let mut want: Vec<u32> = if n <= budget {
                    (0..n as u32).collect()
                } else {
                    let k = budget.saturating_sub(guarded);
                    let mut w: Vec<u32> = order[..k.min(order.len())].to_vec();
                    w.extend((0..n as u32).filter(|&i| protected(i as usize)));
                    w
                };
                want.sort_unstable();
                assert_eq!(select_row(&s, protected, budget), want, "seed {seed} n {n} budget {budget}");
            }
        }
    }
}
