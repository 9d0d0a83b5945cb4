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

/// Reduce `z[l]` (`[H, N]` per layer) for `mode`; returns `rows x N` (rows: Hkv, L*Hkv or 1).
///
/// * `PerHead`: `S[g, n] = mean_l max_{h in g} z[l, h, n]`.
/// * `PerLayerPerHead`: `S[l, g, n] = agg_{h in g} z[l, h, n]` with `group`.
/// * `Union`: `S[n] = max_{l, h} z[l, h, n]`.
pub fn reduce(
    z: &[Vec<f32>],
    num_heads: usize,
    num_kv_heads: usize,
    n: usize,
    mode: SelectionMode,
    group: GroupAggregation,
) -> Vec<f32> {
    let g_size = num_heads / num_kv_heads;
    let layers = z.len();
    let group_reduce = |layer: &[f32], g: usize, slot: usize, agg: GroupAggregation| -> f32 {
        let heads = (g * g_size..(g + 1) * g_size).map(|h| layer[h * n + slot]);
        match agg {
            GroupAggregation::Max => heads.fold(f32::NEG_INFINITY, nan_max),
            GroupAggregation::Mean => (heads.map(|x| x as f64).sum::<f64>() / g_size as f64) as f32,
        }
    };
    match mode {
        SelectionMode::PerHead => {
            let mut out = vec![0f32; num_kv_heads * n];
            for g in 0..num_kv_heads {
                for slot in 0..n {
                    let mut sum = 0f64;
                    for layer in z {
                        sum += group_reduce(layer, g, slot, GroupAggregation::Max) as f64;
                    }
                    out[g * n + slot] = (sum / layers as f64) as f32;
                }
            }
            out
        }
        SelectionMode::PerLayerPerHead => {
            let mut out = vec![0f32; layers * num_kv_heads * n];
            for (l, layer) in z.iter().enumerate() {
                for g in 0..num_kv_heads {
                    for slot in 0..n {
                        out[(l * num_kv_heads + g) * n + slot] = group_reduce(layer, g, slot, group);
                    }
                }
            }
            out
        }
        SelectionMode::Union => {
            let mut out = vec![f32::NEG_INFINITY; n];
            for layer in z {
                for h in 0..num_heads {
                    for slot in 0..n {
                        out[slot] = nan_max(out[slot], layer[h * n + slot]);
                    }
                }
            }
            out
        }
    }
}
