//! The `normalize` kernel on the emu backend: bit for bit against the host reference
//! (`moments_from_partials`, i.e. `RowPartial::combine` and the flavour's divisor), and within
//! f32 rounding of the partials against `cpu::normalize` (the CPU backend's own statistics).
//! Both flavours; candidate-only statistics (a protected prefix left out, the paper preset);
//! empty and single-candidate rows; flat rows; N not a multiple of the block; several tiles.
#![cfg(feature = "emu")]

use crate::common;

use common::{omega, random_keys, random_stats, Rng};
use triattn::cpu::normalize::{row_moments, zscore_rows};
use triattn::kernels::emu;
use triattn::kernels::{
    moments_from_partials, KeyLayout, NormalizeSpec, RowPartial, ScoreShape, ScoreSpec, WeightsScope,
};
use triattn::policy::ZScore;
use triattn::score::{RoundWeights, ScoreConfig};
use triattn::PairingStyle;

/// Tile partials of one row as the scorer writes them (f32 mean and M2 of the tile's candidate
/// slots `>= start`, computed here in f64 and rounded).
fn partials(row: &[f32], tile: usize, start: usize) -> Vec<RowPartial> {
    row.chunks(tile)
        .enumerate()
        .map(|(t, c)| {
            let lo = start.saturating_sub(t * tile).min(c.len());
            let xs = &c[lo..];
            if xs.is_empty() {
                return RowPartial::default();
            }
            let n = xs.len() as f64;
            let m = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
            let m2 = xs.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>();
            RowPartial { count: n as f32, mean: m as f32, m2: m2 as f32, pad: 0.0 }
        })
        .collect()
}

fn check(rng: &mut Rng, rows: usize, len: usize, tile: usize, start: usize, flavour: ZScore, flat: bool) {
    let stride = len + (rng.next_u64() % 3) as usize;
    let tiles = len.div_ceil(tile);
    let mut raw = vec![f32::NAN; rows * stride];
    let mut parts = Vec::new();
    for r in 0..rows {
        let centre = rng.unit() * 50.0;
        for n in 0..len {
            raw[r * stride + n] = if flat { centre } else { centre + rng.unit() * (1 + r) as f32 };
        }
        parts.extend(partials(&raw[r * stride..r * stride + len], tile, start));
    }
    let spec = NormalizeSpec { rows, len, num_tiles: tiles, raw_stride: stride, out_stride: stride, flavour };
    let mut out = raw.clone();
    emu::normalize(&spec, &parts, &mut out).unwrap();
    for r in 0..rows {
        let row = &raw[r * stride..r * stride + len];
        let (mean, div) = moments_from_partials(&parts[r * tiles..(r + 1) * tiles], flavour);
        let (cm, cd) = row_moments(row, |n| n >= start, flavour);
        for n in 0..len {
            let got = out[r * stride + n];
            let exact = ((row[n] as f64 - mean) / div) as f32;
            assert_eq!(got.to_bits(), exact.to_bits(), "{flavour:?} row {r} slot {n}: {got} vs {exact}");
            let cpu = ((row[n] as f64 - cm) / cd) as f32;
            assert!((got - cpu).abs() <= 1e-4 * (1.0 + cpu.abs()), "{flavour:?} row {r} slot {n}: {got} vs cpu {cpu}");
        }
        if stride > len {
            assert!(out[r * stride + len].is_nan(), "wrote past the row");
        }
    }
}

#[test]
fn both_flavours_match() {
    let mut rng = Rng(5);
    for flavour in [ZScore::PopulationFloor, ZScore::UnbiasedCentreFlat] {
        for (len, tile) in [(1, 96), (2, 96), (255, 64), (257, 96), (1000, 128), (4099, 96)] {
            for start in [0, 1, len / 3, len] {
                for flat in [false, true] {
                    check(&mut rng, 3, len, tile, start.min(len), flavour, flat);
                }
            }
        }
    }
}

#[test]
fn nan_candidates_match_cpu_zscore() {
    // Scorer partials over [start, end) with NaN scores among the candidates (keys holding a NaN
    // element), then the normalize kernel: the CPU z-score of the same raw rows with the same
    // candidate predicate, NaN left out of the statistics and kept NaN in the output.
    let (heads, kv, d, len) = (4, 2, 64, 150);
    let (start, end) = (10usize, 130usize);
    let st = random_stats(1, heads, d, 9);
    let w = RoundWeights::build(&st, PairingStyle::Half, &omega(d), 1.0, 4321, &ScoreConfig::default()).unwrap();
    let mut keys = random_keys::<f32>(kv * len * d, d, 10);
    for g in 0..kv {
        for r in (3..len).step_by(11) {
            keys[(g * len + r) * d + r % d] = f32::NAN;
        }
    }
    let spec = ScoreSpec::new(ScoreShape {
        dtype: triattn::DType::F32,
        head_dim: d,
        num_layers: 1,
        num_heads: heads,
        num_kv_heads: kv,
        num_seqs: 1,
        max_len: len,
        vectors: w.vectors_per_head,
        aggregation: w.aggregation,
        style: PairingStyle::Half,
        layout: KeyLayout::Contiguous { head_stride: len * d, row_stride: d },
        weights: WeightsScope::Shared,
    })
    .unwrap();
    let key_refs = [&keys[..]];
    let (starts, ends) = ([start as i32], [end as i32]);
    let inputs = emu::ScoreInputs {
        keys: &key_refs,
        weights: &w.weights,
        norm: &w.norm,
        block_table: None,
        seq_lens: &[len as i32],
        stat_start: Some(&starts),
        stat_end: Some(&ends),
    };
    // The scorer's outputs start poisoned (NaN), as raw memory would: it must write them all.
    let mut raw = vec![f32::NAN; spec.raw_len()];
    let mut parts =
        vec![RowPartial { count: f32::NAN, mean: f32::NAN, m2: f32::NAN, pad: f32::NAN }; spec.partials_len()];
    emu::score(&spec, &inputs, &mut raw, Some(&mut parts)).unwrap();
    assert!(parts.iter().all(|p| p.count >= 0.0 && !p.mean.is_nan() && !p.m2.is_nan()), "a tile partial not written");
    for h in 0..heads {
        let row = &raw[h * len..][..len];
        for (n, x) in row.iter().enumerate() {
            let g = h / (heads / kv);
            let key_nan = keys[(g * len + n) * d..][..d].iter().any(|k| k.is_nan());
            assert_eq!(x.is_nan(), key_nan, "head {h} slot {n}: score {x}, key has NaN: {key_nan}");
        }
        assert!(row[start..end].iter().any(|x| x.is_nan()), "head {h}: no NaN candidate");
        assert!(row[start..end].iter().any(|x| !x.is_nan()), "head {h}: no finite candidate");
    }
    let candidate = |n: usize| (start..end).contains(&n);
    for flavour in [ZScore::PopulationFloor, ZScore::UnbiasedCentreFlat] {
        let nspec =
            NormalizeSpec { rows: heads, len, num_tiles: spec.num_tiles(), raw_stride: len, out_stride: len, flavour };
        let mut out = raw.clone();
        emu::normalize(&nspec, &parts, &mut out).unwrap();
        let mut cpu = raw.clone();
        zscore_rows(&mut cpu, len, &candidate, flavour);
        for h in 0..heads {
            // 1e-5 of the row's standard deviation: 1e-5 in z units.
            let tol = 1e-5;
            for n in 0..len {
                let (got, want) = (out[h * len + n], cpu[h * len + n]);
                if want.is_nan() {
                    assert!(got.is_nan(), "{flavour:?} head {h} slot {n}: {got} vs NaN");
                } else {
                    assert!(
                        (got as f64 - want as f64).abs() <= tol,
                        "{flavour:?} head {h} slot {n}: {got} vs cpu {want}"
                    );
                }
            }
        }
    }
}
