//! The `reduce` kernel on the emu backend against `cpu::reduce::reduce` plus the round's `+inf`
//! guards, bit for bit: every mode and group aggregation, GQA groups, NaN and ±inf inputs,
//! strided rows, protected prefix and window, N not a multiple of the block.
#![cfg(feature = "emu")]

mod common;

use common::Rng;
use triattn::cpu::reduce::reduce;
use triattn::cuda::ReduceSpec;
use triattn::emu;
use triattn::policy::{GroupAggregation, SelectionMode};

/// Mostly small integers (ties) and uniform values, a few NaN, ±inf and -0.
fn value(rng: &mut Rng) -> f32 {
    match rng.next_u64() % 101 {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => -0.0,
        4..=30 => (rng.next_u64() % 5) as f32 - 2.0,
        _ => (rng.next_u64() >> 40) as f32 / (1u64 << 22) as f32 - 2.0,
    }
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[allow(clippy::too_many_arguments)]
fn check(
    rng: &mut Rng,
    layers: usize,
    heads: usize,
    kv: usize,
    n: usize,
    mode: SelectionMode,
    group: GroupAggregation,
    prot: (usize, usize),
) {
    let head_stride = n + (rng.next_u64() % 3) as usize;
    let layer_stride = heads * head_stride + (rng.next_u64() % 5) as usize;
    let z: Vec<f32> = (0..layers * layer_stride).map(|_| value(rng)).collect();
    let dense: Vec<Vec<f32>> = (0..layers)
        .map(|l| (0..heads).flat_map(|h| z[l * layer_stride + h * head_stride..][..n].to_vec()).collect())
        .collect();
    let mut want = reduce(&dense, heads, kv, n, mode, group);
    for row in want.chunks_mut(n) {
        for (slot, s) in row.iter_mut().enumerate() {
            if slot < prot.0 || slot >= prot.1 {
                *s = f32::INFINITY;
            }
        }
    }
    let spec = ReduceSpec {
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        len: n,
        layer_stride,
        head_stride,
        out_stride: n + 1,
        mode,
        group,
        prefix: prot.0,
        window_start: prot.1,
    };
    let mut out = vec![7.0f32; spec.sets() * (n + 1)];
    emu::reduce(&spec, &z, &mut out).unwrap();
    for set in 0..spec.sets() {
        for slot in 0..n {
            let (g, w) = (out[set * (n + 1) + slot], want[set * n + slot]);
            assert!(same(g, w), "{mode:?} {group:?} L{layers} H{heads} Hkv{kv} N{n} set {set} slot {slot}: {g} vs {w}");
        }
        assert_eq!(out[set * (n + 1) + n], 7.0, "wrote past the row");
    }
}

#[test]
fn every_mode_matches_the_cpu_bit_for_bit() {
    let mut rng = Rng(9);
    for mode in [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union] {
        for group in [GroupAggregation::Max, GroupAggregation::Mean] {
            for (layers, heads, kv) in [(1, 1, 1), (3, 8, 2), (5, 12, 4), (2, 32, 8)] {
                for n in [1, 7, 255, 256, 257, 1000] {
                    check(&mut rng, layers, heads, kv, n, mode, group, (0, n));
                    check(&mut rng, layers, heads, kv, n, mode, group, (n / 4, n - n / 5));
                }
            }
        }
    }
}

#[test]
fn spec_refuses_bad_shapes() {
    let ok = ReduceSpec {
        num_layers: 2,
        num_heads: 8,
        num_kv_heads: 2,
        len: 10,
        layer_stride: 80,
        head_stride: 10,
        out_stride: 10,
        mode: SelectionMode::PerHead,
        group: GroupAggregation::Max,
        prefix: 0,
        window_start: 10,
    };
    assert!(ok.validate().is_ok());
    assert!(ReduceSpec { num_heads: 7, ..ok }.validate().is_err());
    assert!(ReduceSpec { head_stride: 9, ..ok }.validate().is_err());
    assert!(ReduceSpec { layer_stride: 79, ..ok }.validate().is_err());
    assert!(ReduceSpec { window_start: 11, ..ok }.validate().is_err());
    assert!(ReduceSpec { len: 0, ..ok }.validate().is_err());
}
