//! CPU scoring: raw per-attention-head scores of every cached key (ALGORITHM.md §2.2, §9).
//!
//! One pass over each (layer, KV head) serves the `G` query heads of its group: a key row is
//! widened to f32 once, its pair moduli computed once, then dotted with each head's weights.
//! Mean aggregation is one dot product per head; max is `J` per head followed by a max.

use rayon::prelude::*;

use crate::cache::LayerView;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::model::PairingStyle;
use crate::score::{OffsetAggregation, RoundWeights};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 256;
/// Partial sums per dot product (a fixed association order, so results never depend on position).
const LANES: usize = 8;

/// Dot product with `LANES` partial sums in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (&a[c * LANES..c * LANES + LANES], &b[c * LANES..c * LANES + LANES]);
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for i in chunks * LANES..a.len() {
        acc[i % LANES] += a[i] * b[i];
    }
    let s4 = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Widen a row to f32.
#[inline(always)]
fn widen<T: Element>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Pair moduli `|k̃_f| = sqrt(re² + im²)`.
#[inline(always)]
fn moduli(style: PairingStyle, k: &[f32], out: &mut [f32]) {
    let f_count = out.len();
    match style {
        PairingStyle::Half => {
            let (re, im) = k.split_at(f_count);
            for f in 0..f_count {
                out[f] = (re[f] * re[f] + im[f] * im[f]).sqrt();
            }
        }
        PairingStyle::Interleaved => {
            for f in 0..f_count {
                let (re, im) = (k[2 * f], k[2 * f + 1]);
                out[f] = (re * re + im * im).sqrt();
            }
        }
    }
}

/// Score rows `rows` of KV head `g`; `out[i][r]` receives head `i` of the group for row `r`.
#[inline(always)]
fn score_rows<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    g: usize,
    first_row: usize,
    out: &mut [&mut [f32]],
) {
    let d = weights.head_dim;
    let f_count = d / 2;
    let group = out.len();
    let vectors = weights.vectors_per_head;
    let mut k = vec![0f32; d];
    let mut m = vec![0f32; f_count];
    for r in 0..out[0].len() {
        widen(keys.row(g, first_row + r), &mut k);
        moduli(style, &k, &mut m);
        for (i, o) in out.iter_mut().enumerate().take(group) {
            let h = g * group + i;
            let e = dot(&m, weights.head_norm(layer, h));
            let w = weights.head_weights(layer, h);
            let trig = match (vectors, weights.aggregation) {
                (0, _) => 0.0,
                (_, OffsetAggregation::Mean) => dot(&k, w),
                (_, OffsetAggregation::Max) => {
                    // NaN keys give NaN through `e`; the comparison below never selects NaN.
                    let mut best = f32::NEG_INFINITY;
                    for j in 0..vectors {
                        let t = dot(&k, &w[j * d..(j + 1) * d]);
                        if t > best {
                            best = t;
                        }
                    }
                    best
                }
            };
            o[r] = trig + e;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
// SAFETY (for callers): only call after `is_x86_feature_detected!("avx2")`.
unsafe fn score_rows_avx2<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    g: usize,
    first_row: usize,
    out: &mut [&mut [f32]],
) {
    score_rows(weights, layer, keys, style, g, first_row, out)
}

fn score_rows_dispatch<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    g: usize,
    first_row: usize,
    out: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); the function is otherwise safe.
        // Without fused multiply-add the AVX2 code performs the same IEEE operations in the
        // same order as the portable path, so results do not depend on which one runs.
        unsafe { score_rows_avx2(weights, layer, keys, style, g, first_row, out) };
        return;
    }
    score_rows(weights, layer, keys, style, g, first_row, out)
}

/// Raw scores of one layer: `out[h * N + n]` for every attention head `h` and slot `n`.
///
/// # Errors
/// `ShapeMismatch` if `keys` or `out` do not match the weights' heads and head_dim.
pub fn score_layer<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    out: &mut [f32],
) -> Result<()> {
    let (h, n) = (weights.num_heads, keys.len);
    if keys.dim != weights.head_dim {
        return Err(Error::shape("keys head_dim", weights.head_dim, keys.dim));
    }
    if keys.num_kv_heads == 0 || h % keys.num_kv_heads != 0 {
        return Err(Error::shape(
            "keys KV heads",
            format!("a divisor of the statistics' {h} attention heads"),
            keys.num_kv_heads,
        ));
    }
    if layer >= weights.num_layers {
        return Err(Error::invalid_argument("layer", format!("< {}", weights.num_layers), layer));
    }
    if out.len() != h * n {
        return Err(Error::shape("raw score buffer", format!("{h} x {n} = {}", h * n), out.len()));
    }
    if n == 0 {
        return Ok(());
    }
    let group = h / keys.num_kv_heads;
    // One task per (KV head, block of rows); each writes the G head rows of its block.
    let mut tasks: Vec<(usize, usize, Vec<&mut [f32]>)> = Vec::new();
    for (g, block) in out.chunks_mut(group * n).enumerate() {
        let mut rows: Vec<std::slice::ChunksMut<'_, f32>> =
            block.chunks_mut(n).map(|row| row.chunks_mut(ROWS_PER_TASK)).collect();
        let mut first = 0;
        loop {
            let parts: Vec<&mut [f32]> = rows.iter_mut().filter_map(|it| it.next()).collect();
            if parts.len() < group {
                break;
            }
            let len = parts[0].len();
            tasks.push((g, first, parts));
            first += len;
        }
    }
    tasks.into_par_iter().for_each(|(g, first, mut parts)| {
        score_rows_dispatch(weights, layer, keys, style, g, first, &mut parts);
    });
    Ok(())
}
