//! Compaction of cached K and V rows after selection.
//!
//! Order-preserving: kept rows move to the front in ascending slot order (slot order stays
//! position order). Hole-filling: only kept rows beyond the new length move, each into the lowest
//! free slot, so at most the evicted count of rows is copied; the resulting slot-to-source map is
//! reported so that callers can track positions.

use crate::error::{Error, Result};

/// Gather `keep` (ascending) rows of one head: `dst[i] = src[keep[i]]`, `dim` elements per row.
/// Runs of consecutive slots are copied as one block when the rows are packed.
pub fn gather_rows<T: Copy>(src: &[T], row_stride: usize, dim: usize, keep: &[u32], dst: &mut [T]) {
    for (i, first, run) in runs(keep, 0, row_stride == dim) {
        let s = first * row_stride;
        dst[i * dim..(i + run) * dim].copy_from_slice(&src[s..s + (run - 1) * row_stride + dim]);
    }
}

/// Compact one head in place, order-preserving: row `i` receives row `keep[i]`.
///
/// Kept rows before the first evicted one stay where they are; after it, each run of
/// consecutive kept slots moves as one block when the rows are packed (`row_stride == dim`),
/// row by row otherwise (the bytes between strided rows are not the head's to overwrite).
///
/// # Errors
/// `InvalidArgument` if `keep` is not strictly ascending or exceeds the rows present.
pub fn compact_in_place<T: Copy>(rows: &mut [T], row_stride: usize, dim: usize, keep: &[u32]) -> Result<()> {
    check_keep(keep, rows.len().div_ceil(row_stride.max(1)))?;
    let settled = keep.iter().enumerate().take_while(|&(i, &s)| s as usize == i).count();
    for (i, first, run) in runs(keep, settled, row_stride == dim) {
        let s = first * row_stride;
        rows.copy_within(s..s + (run - 1) * row_stride + dim, i * row_stride);
    }
    Ok(())
}

/// `(i, keep[i], run)` for the runs of `keep` from index `from`: `run` consecutive slots
/// starting at `keep[i]` (always 1 unless `coalesce`).
fn runs(keep: &[u32], from: usize, coalesce: bool) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let mut i = from;
    std::iter::from_fn(move || {
        let first = *keep.get(i)? as usize;
        let mut run = 1;
        while coalesce && keep.get(i + run).is_some_and(|&s| s as usize == first + run) {
            run += 1;
        }
        let at = i;
        i += run;
        Some((at, first, run))
    })
}

/// Moves `(from, to)` that hole-filling performs, and the slot map it leaves.
///
/// For `n` slots and ascending `keep` of length `k`: holes are evicted slots below `k`, movers
/// are kept slots at or above `k`; the i-th mover fills the i-th hole. `map[i]` is the original
/// slot now held by slot `i` (`i < k`).
pub fn hole_filling_plan(keep: &[u32]) -> (Vec<(u32, u32)>, Vec<u32>) {
    let k = keep.len();
    let mut kept_below = vec![false; k];
    let mut movers = Vec::new();
    for &s in keep {
        if (s as usize) < k {
            kept_below[s as usize] = true;
        } else {
            movers.push(s);
        }
    }
    let holes = (0..k as u32).filter(|&i| !kept_below[i as usize]);
    let moves: Vec<(u32, u32)> = movers.iter().copied().zip(holes).collect();
    let mut map: Vec<u32> = (0..k as u32).collect();
    for &(from, to) in &moves {
        map[to as usize] = from;
    }
    (moves, map)
}

/// Compact one head in place by hole-filling; returns the slot map (see [`hole_filling_plan`]).
///
/// # Errors
/// `InvalidArgument` if `keep` is not strictly ascending or exceeds the rows present.
pub fn hole_fill_in_place<T: Copy>(rows: &mut [T], row_stride: usize, dim: usize, keep: &[u32]) -> Result<Vec<u32>> {
    check_keep(keep, rows.len().div_ceil(row_stride.max(1)))?;
    let (moves, map) = hole_filling_plan(keep);
    for (from, to) in moves {
        let (from, to) = (from as usize, to as usize);
        rows.copy_within(from * row_stride..from * row_stride + dim, to * row_stride);
    }
    Ok(map)
}

fn check_keep(keep: &[u32], n: usize) -> Result<()> {
    for w in keep.windows(2) {
        if w[0] >= w[1] {
            return Err(Error::invalid_argument(
                "keep",
                "strictly ascending slot indices",
                format!("{} before {}", w[0], w[1]),
            ));
        }
    }
    if let Some(&last) = keep.last() {
        if last as usize >= n {
            return Err(Error::invalid_argument("keep", format!("slots < {n}"), last));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_filling_moves_only_tail_survivors() {
        // 8 slots, keep 5: slots 1 and 3 are evicted below 5, 6 and 7 survive above.
        let keep = [0, 2, 4, 6, 7];
        let (moves, map) = hole_filling_plan(&keep);
        assert_eq!(moves, vec![(6, 1), (7, 3)]);
        assert_eq!(map, vec![0, 6, 2, 7, 4]);
        let mut rows: Vec<u32> = (0..8).collect();
        assert_eq!(hole_fill_in_place(&mut rows, 1, 1, &keep).unwrap(), map);
        assert_eq!(&rows[..5], &[0, 6, 2, 7, 4]);
        let mut rows: Vec<u32> = (0..8).collect();
        compact_in_place(&mut rows, 1, 1, &keep).unwrap();
        assert_eq!(&rows[..5], &keep);
    }

    /// Packed and strided rows, runs of every length: in place and gathered, each row equals the
    /// row-by-row rule, and the bytes between strided rows are left alone.
    #[test]
    fn compaction_moves_runs_as_the_row_by_row_rule() {
        let keeps: [&[u32]; 5] = [&[0, 1, 2, 5, 6, 7, 9], &[3, 4, 5, 6], &[0, 1, 2, 3], &[1, 3, 5, 7, 9], &[9]];
        for keep in keeps {
            for (stride, dim) in [(3, 3), (4, 3)] {
                let n = 10;
                let src: Vec<u32> = (0..(n * stride) as u32).collect();
                let mut want = src.clone();
                for (i, &s) in keep.iter().enumerate() {
                    for e in 0..dim {
                        want[i * stride + e] = src[s as usize * stride + e];
                    }
                }
                let mut rows = src.clone();
                compact_in_place(&mut rows, stride, dim, keep).unwrap();
                assert_eq!(rows, want, "in place, keep {keep:?}, stride {stride}, dim {dim}");
                let mut dst = vec![0u32; keep.len() * dim];
                gather_rows(&src, stride, dim, keep, &mut dst);
                let gathered: Vec<u32> =
                    (0..keep.len()).flat_map(|i| want[i * stride..i * stride + dim].to_vec()).collect();
                assert_eq!(dst, gathered, "gather, keep {keep:?}, stride {stride}, dim {dim}");
            }
        }
    }
}
