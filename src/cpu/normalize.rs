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
