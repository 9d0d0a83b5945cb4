//! `select` on the emu backend: the kernel of cuda/select/select.cuh run by the SIMT layer,
//! through the same [`SelectSpec`] and [`SelectParams`](crate::cuda::SelectParams) as the GPU.

use crate::cuda::select::{SelectAddresses, SelectShape, SelectSpec};
use crate::error::{Error, Result};

/// Launch a `select` over raw host addresses: every launch of [`SelectSpec::launches`], in order.
///
/// # Safety
/// `at.scores` must point to [`SelectSpec::scores_len`] f32 and `at.keep` to
/// [`SelectSpec::keep_len`] i32 of host memory that nothing else accesses meanwhile; when
/// [`SelectSpec::scratch_bytes`] is not 0, `at.scratch` to that many bytes of host memory,
/// 4-byte aligned (contents irrelevant), that nothing else accesses meanwhile.
///
/// # Errors
/// `InvalidArgument` for a null or misaligned scratch on the multi-block path; `Driver` if the
/// SIMT layer reports a divergent barrier.
pub unsafe fn launch_select(spec: &SelectSpec, at: &SelectAddresses) -> Result<()> {
    spec.check_scratch(at)?;
    for (variant, params, grid) in spec.launches(at).iter().flatten() {
        // SAFETY: the caller's contract; params from a validated spec for their variant.
        unsafe { super::launch(*variant, params, *grid, 0)? };
    }
    Ok(())
}

/// Select every row of `scores` into `keep` (layouts as [`SelectSpec`] documents): per row the
/// protected slots plus the best `budget - protected` others, ascending, as
/// [`crate::cpu::select::select_row`]. Output entries past `budget` in a row are left as they were.
/// The multi-block path's scratch is allocated here.
///
/// # Errors
/// `ShapeMismatch` when a buffer is shorter than the spec needs; `Driver` if the SIMT layer
/// reports a divergent barrier.
pub fn select(spec: &SelectSpec, scores: &[f32], keep: &mut [i32]) -> Result<()> {
    select_batch(spec, scores, None, keep)
}

/// [`select`] with a protected prefix per sequence: `prefixes[r / rows_per_seq]` for row `r`
/// (`spec.shape().rows_per_seq` must be set). Each prefix must lie in `0..=len` and leave at
/// most `budget` protected slots (checked here).
///
/// # Errors
/// As [`select`]; `ShapeMismatch` for a prefix list that is not one per sequence,
/// `InvalidArgument` for a prefix out of range or with too many protected slots.
pub fn select_batch(spec: &SelectSpec, scores: &[f32], prefixes: Option<&[i32]>, keep: &mut [i32]) -> Result<()> {
    let s = spec.shape();
    if let Some(p) = prefixes {
        let seqs = s.rows.checked_div(s.rows_per_seq).unwrap_or(0);
        if p.len() != seqs || seqs == 0 {
            return Err(Error::shape("select prefixes", format!("{seqs} (rows / rows_per_seq)"), p.len()));
        }
        for &x in p {
            let ok = x >= 0 && x as usize <= s.len && SelectShape { prefix: x as usize, ..*s }.protected() <= s.budget;
            if !ok {
                return Err(Error::invalid_argument(
                    "select prefix",
                    format!("0..={} with at most {} protected slots", s.len, s.budget),
                    x,
                ));
            }
        }
    }
    if scores.len() < spec.scores_len() {
        return Err(Error::shape("select scores", format!("at least {} f32", spec.scores_len()), scores.len()));
    }
    if keep.len() < spec.keep_len() {
        return Err(Error::shape("select output", format!("at least {} i32", spec.keep_len()), keep.len()));
    }
    // Not zeroed on purpose: the kernels write every scratch word before reading it.
    let mut scratch = vec![0xa5a5_a5a5u32; spec.scratch_bytes().div_ceil(4)];
    let at = SelectAddresses {
        scores: scores.as_ptr() as u64,
        keep: keep.as_mut_ptr() as u64,
        scratch: if scratch.is_empty() { 0 } else { scratch.as_mut_ptr() as u64 },
        prefixes: prefixes.map_or(0, |p| p.as_ptr() as u64),
    };
    // SAFETY: all lengths checked or sized above; the borrows outlive the synchronous launches
    // and `keep` and `scratch` are borrowed exclusively.
    unsafe { launch_select(spec, &at) }
}

/// Convenience: select dense rows `scores[rows, len]` with one protection range and budget,
/// returning the kept slots of each row (what [`crate::round`] feeds to `compact`).
///
/// # Errors
/// `InvalidArgument` for a shape [`SelectSpec::new`] refuses (`scores.len()` must be a multiple
/// of `len`); as [`select`] otherwise.
pub fn select_rows(
    scores: &[f32],
    len: usize,
    prefix: usize,
    window_start: usize,
    budget: usize,
) -> Result<Vec<Vec<u32>>> {
    if len == 0 || !scores.len().is_multiple_of(len) || scores.is_empty() {
        return Err(Error::shape("select scores", format!("a non-empty multiple of {len} slots"), scores.len()));
    }
    let rows = scores.len() / len;
    let spec = SelectSpec::new(SelectShape {
        rows,
        len,
        prefix,
        window_start,
        budget,
        score_stride: len,
        keep_stride: budget.max(1),
        rows_per_seq: 0,
    })?;
    let mut keep = vec![-1i32; spec.keep_len()];
    select(&spec, scores, &mut keep)?;
    Ok((0..rows)
        .map(|r| keep[r * budget.max(1)..r * budget.max(1) + budget].iter().map(|&s| s as u32).collect())
        .collect())
}
