//! Group and layer reductions from per-(layer, head) rows to the rows selection ranks (§3.4).
//!
//! NaN propagates through every reduction (a NaN contribution makes the reduced score NaN), and
//! selection ranks NaN below every number.

use crate::policy::{GroupAggregation, SelectionMode};

#[inline(always)]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

/// `acc[slot] = nan_max(acc[slot], row[slot])` for every slot.
#[inline(always)]
fn max_into(acc: &mut [f32], row: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(row) {
        *a = nan_max(*a, x);
    }
}

/// The group max of KV head `g` of one layer, `[N]`: heads folded in order from `-inf`.
#[inline(always)]
fn group_max_row(layer: &[f32], g: usize, g_size: usize, n: usize, out: &mut [f32]) {
    out.fill(f32::NEG_INFINITY);
    for h in g * g_size..(g + 1) * g_size {
        max_into(out, &layer[h * n..(h + 1) * n]);
    }
}

/// `sum[n] = sum_l max_{h in g} z[l, h, n]` in f64, layers in order from `+0.0` (the per-head
/// score before its mean over layers).
pub(crate) fn layer_sum_row(z: &[Vec<f32>], g: usize, g_size: usize, n: usize, sum: &mut [f64]) {
    sum.fill(0.0);
    let mut m = vec![0f32; n];
    for layer in z {
        group_max_row(layer, g, g_size, n, &mut m);
        sum.iter_mut().zip(&m).for_each(|(s, &x)| *s += x as f64);
    }
}

/// `sum[n] = sum_{h in g} z[h, n]` of one layer in f64, heads in order from `-0.0` (as
/// `Iterator::sum` of f64; the group mean before its division).
pub(crate) fn group_sum_row(layer: &[f32], g: usize, g_size: usize, n: usize, sum: &mut [f64]) {
    sum.fill(-0.0);
    for h in g * g_size..(g + 1) * g_size {
        sum.iter_mut().zip(&layer[h * n..(h + 1) * n]).for_each(|(s, &x)| *s += x as f64);
    }
}

/// Reduce `z[l]` (`[H, N]` per layer) for `mode`; returns `rows x N` (rows: Hkv, L*Hkv or 1).
///
/// * `PerHead`: `S[g, n] = mean_l max_{h in g} z[l, h, n]`.
/// * `PerLayerPerHead`: `S[l, g, n] = agg_{h in g} z[l, h, n]` with `group`.
/// * `Union`: `S[n] = max_{l, h} z[l, h, n]`.
///
/// Rows are reduced a whole row at a time, in parallel over output rows (or slot ranges for
/// `Union`); every slot sees its operations in the order of the formula (heads ascending inside
/// a layer, layers ascending), so results do not depend on the parallel split.
pub fn reduce(
    z: &[Vec<f32>],
    num_heads: usize,
    num_kv_heads: usize,
    n: usize,
    mode: SelectionMode,
    group: GroupAggregation,
) -> Vec<f32> {
    use rayon::prelude::*;
    let g_size = num_heads / num_kv_heads;
    let layers = z.len();
    let rows = mode.num_sets(layers, num_kv_heads);
    let mut out = vec![0f32; rows * n];
    if n == 0 {
        return out;
    }
    match mode {
        SelectionMode::PerHead => out.par_chunks_mut(n).enumerate().for_each(|(g, row)| {
            let mut sum = vec![0f64; n];
            layer_sum_row(z, g, g_size, n, &mut sum);
            row.iter_mut().zip(&sum).for_each(|(o, &s)| *o = (s / layers as f64) as f32);
        }),
        SelectionMode::PerLayerPerHead => out.par_chunks_mut(n).enumerate().for_each(|(set, row)| {
            let (layer, g) = (&z[set / num_kv_heads], set % num_kv_heads);
            match group {
                GroupAggregation::Max => group_max_row(layer, g, g_size, n, row),
                GroupAggregation::Mean => {
                    let mut sum = vec![0f64; n];
                    group_sum_row(layer, g, g_size, n, &mut sum);
                    row.iter_mut().zip(&sum).for_each(|(o, &s)| *o = (s / g_size as f64) as f32);
                }
            }
        }),
        SelectionMode::Union => {
            const SLOTS_PER_TASK: usize = 512;
            out.par_chunks_mut(SLOTS_PER_TASK).enumerate().for_each(|(c, acc)| {
                let first = c * SLOTS_PER_TASK;
                acc.fill(f32::NEG_INFINITY);
                for layer in z {
                    for h in 0..num_heads {
                        max_into(acc, &layer[h * n + first..h * n + first + acc.len()]);
                    }
                }
            });
        }
    }
    out
}
