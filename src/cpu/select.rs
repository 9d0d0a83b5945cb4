//! Top-k selection with the crate's deterministic order (ALGORITHM.md §3.6, DESIGN.md).
//!
//! Order: the larger score wins; on equal scores the lower slot index wins; NaN ranks below every
//! number (including `-inf`), NaNs among themselves by slot index. Output is ascending.

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

/// The `k` best of `candidates` by `scores[slot]`, ascending by slot.
pub fn top_k(scores: &[f32], candidates: &mut [u32], k: usize) -> Vec<u32> {
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    if k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |&a, &b| rank_order(a, scores[a as usize], b, scores[b as usize]));
    }
    let mut kept = candidates[..k].to_vec();
    kept.sort_unstable();
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
    let mut guarded = Vec::new();
    let mut candidates = Vec::with_capacity(n);
    for slot in 0..n {
        if protected(slot) {
            guarded.push(slot as u32);
        } else {
            candidates.push(slot as u32);
        }
    }
    let k = budget.saturating_sub(guarded.len());
    let mut kept = top_k(scores, &mut candidates, k);
    kept.extend_from_slice(&guarded);
    kept.sort_unstable();
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
    }

    #[test]
    fn protected_slots_are_kept_and_counted() {
        let s = [0.0, 9.0, 8.0, 7.0, 1.0];
        assert_eq!(select_row(&s, |n| n == 0 || n == 4, 3), vec![0, 1, 4]);
    }
}
