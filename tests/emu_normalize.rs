//! The `normalize` kernel on the emu backend: bit for bit against the host reference
//! (`moments_from_partials`, i.e. `RowPartial::combine` and the flavour's divisor), and within
//! f32 rounding of the partials against `cpu::normalize` (the CPU backend's own statistics).
//! Both flavours; candidate-only statistics (a protected prefix left out, the paper preset);
//! empty and single-candidate rows; flat rows; N not a multiple of the block; several tiles.
#![cfg(feature = "emu")]

mod common;

use common::Rng;
use triattn::cpu::normalize::row_moments;
use triattn::cuda::{moments_from_partials, NormalizeSpec, RowPartial};
use triattn::emu;
use triattn::policy::ZScore;

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
