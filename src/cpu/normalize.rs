//! z-score normalisation of raw score rows (ALGORITHM.md §3.1).
//!
//! Statistics are taken in f64 over the row's candidate slots, NaN left out; every slot of the
//! row is then normalised with them (non-candidates are overwritten later by the guards).

use rayon::prelude::*;

use crate::policy::ZScore;

/// Mean and divisor of one row under `flavour`, over slots where `candidate(n)` holds.
pub fn row_moments(row: &[f32], candidate: impl Fn(usize) -> bool, flavour: ZScore) -> (f64, f64) {
    let mut count = 0usize;
    let mut sum = 0f64;
    for (n, &x) in row.iter().enumerate() {
        if candidate(n) && !x.is_nan() {
            count += 1;
            sum += x as f64;
        }
    }
    if count == 0 {
        return (0.0, 1.0);
    }
    let mean = sum / count as f64;
    let mut sq = 0f64;
    for (n, &x) in row.iter().enumerate() {
        if candidate(n) && !x.is_nan() {
            let d = x as f64 - mean;
            sq += d * d;
        }
    }
    finish(count, mean, sq, flavour)
}

/// Normalise each row of `rows` (`N` slots each) in place.
pub fn zscore_rows(rows: &mut [f32], n: usize, candidate: &(dyn Fn(usize) -> bool + Sync), flavour: ZScore) {
    if n == 0 {
        return;
    }
    rows.par_chunks_mut(n).for_each(|row| {
        let (mean, divisor) = row_moments(row, candidate, flavour);
        for x in row.iter_mut() {
            *x = ((*x as f64 - mean) / divisor) as f32;
        }
    });
}

/// Rows whose moments are accumulated together: independent f64 chains side by side (each row's
/// additions stay in index order, so every row's result is bit-identical to [`row_moments`]).
const ROWS_TOGETHER: usize = 4;

/// Count, sum and sum of squared deviations of `ROWS_TOGETHER` rows over `range`, NaN left out,
/// each accumulated in index order exactly as [`row_moments`] does. Adding `0.0` in place of a
/// NaN leaves a sum unchanged (a sum that starts at `+0.0` is never `-0.0`), so the loop has no
/// branch and the rows run in parallel lanes.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // the rows advance in lockstep: one index, several rows
fn moments_together(rows: [&[f32]; ROWS_TOGETHER], flavour: ZScore) -> [(f64, f64); ROWS_TOGETHER] {
    let len = rows[0].len();
    let mut sum = [0f64; ROWS_TOGETHER];
    let mut count = [0usize; ROWS_TOGETHER];
    for i in 0..len {
        for r in 0..ROWS_TOGETHER {
            let x = rows[r][i];
            let keep = !x.is_nan();
            sum[r] += if keep { x as f64 } else { 0.0 };
            count[r] += usize::from(keep);
        }
    }
    let mean: [f64; ROWS_TOGETHER] =
        std::array::from_fn(|r| if count[r] == 0 { 0.0 } else { sum[r] / count[r] as f64 });
    let mut sq = [0f64; ROWS_TOGETHER];
    for i in 0..len {
        for r in 0..ROWS_TOGETHER {
            let x = rows[r][i];
            let d = x as f64 - mean[r];
            sq[r] += if x.is_nan() { 0.0 } else { d * d };
        }
    }
    std::array::from_fn(|r| finish(count[r], mean[r], sq[r], flavour))
}

/// Mean and divisor from the count, mean and squared deviations (as [`row_moments`]).
#[inline(always)]
fn finish(count: usize, mean: f64, sq: f64, flavour: ZScore) -> (f64, f64) {
    if count == 0 {
        return (0.0, 1.0);
    }
    let divisor = match flavour {
        ZScore::PopulationFloor => (sq / count as f64).sqrt().max(1e-6),
        ZScore::UnbiasedCentreFlat => {
            let std = if count > 1 { (sq / (count - 1) as f64).sqrt() } else { 0.0 };
            if std < 1e-8 || !std.is_finite() {
                1.0
            } else {
                std
            }
        }
    };
    (mean, divisor)
}

/// `z = (x - mean) / divisor` for a whole row, f64 arithmetic rounded once to f32.
#[inline(always)]
fn write_row(raw: &[f32], z: &mut [f32], (mean, divisor): (f64, f64)) {
    for (o, &x) in z.iter_mut().zip(raw) {
        *o = ((x as f64 - mean) / divisor) as f32;
    }
}

/// Normalise every row of `raw` (`N` slots each) into `z` with moments over the candidate slots
/// `candidates` (a range: the round's unprotected slots), in parallel over rows: bit-identical
/// to [`zscore_rows`] on a copy of `raw` with `candidate(n) = candidates.contains(&n)`, one pass
/// over `raw` for the moments of four rows at a time and one to write.
pub fn zscore_range_into(raw: &[f32], z: &mut [f32], n: usize, candidates: std::ops::Range<usize>, flavour: ZScore) {
    if n == 0 {
        return;
    }
    debug_assert_eq!(raw.len(), z.len());
    let (lo, hi) = (candidates.start.min(n), candidates.end.min(n).max(candidates.start.min(n)));
    z.par_chunks_mut(ROWS_TOGETHER * n).zip(raw.par_chunks(ROWS_TOGETHER * n)).for_each(|(zb, rb)| {
        let rows = rb.len() / n;
        if rows == ROWS_TOGETHER {
            let parts: [&[f32]; ROWS_TOGETHER] = std::array::from_fn(|r| &rb[r * n + lo..r * n + hi]);
            let moments = moments_together(parts, flavour);
            for (r, m) in moments.into_iter().enumerate() {
                write_row(&rb[r * n..(r + 1) * n], &mut zb[r * n..(r + 1) * n], m);
            }
        } else {
            for r in 0..rows {
                let row = &rb[r * n..(r + 1) * n];
                let m = row_moments(row, |s| (lo..hi).contains(&s), flavour);
                write_row(row, &mut zb[r * n..(r + 1) * n], m);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_path_is_bit_identical_to_the_rule() {
        let n = 37;
        let mut raw: Vec<f32> = (0..11 * n).map(|i| ((i * 7919) % 101) as f32 * 0.37 - 15.0).collect();
        raw[5] = f32::NAN;
        raw[n + 3] = f32::NAN;
        raw[2 * n..3 * n].iter_mut().for_each(|x| *x = f32::NAN);
        raw[3 * n..4 * n].iter_mut().for_each(|x| *x = 2.5);
        raw[4 * n + 1] = f32::INFINITY;
        raw[5 * n + 7] = -0.0;
        for flavour in [ZScore::PopulationFloor, ZScore::UnbiasedCentreFlat] {
            for (lo, hi) in [(0, n), (3, 30), (10, 10), (0, 1), (36, 37)] {
                let mut want = raw.clone();
                zscore_rows(&mut want, n, &|s| (lo..hi).contains(&s), flavour);
                let mut got = vec![0f32; raw.len()];
                zscore_range_into(&raw, &mut got, n, lo..hi, flavour);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{flavour:?} {lo}..{hi}");
            }
        }
    }
}
