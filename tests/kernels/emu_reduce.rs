//! The `reduce` kernel on the emu backend against `cpu::reduce::reduce` plus the round's `+inf`
//! guards, bit for bit: every mode and group aggregation, GQA groups, NaN and ±inf inputs,
//! strided rows, protected prefix and window, N not a multiple of the block.
#![cfg(feature = "emu")]

use crate::common;

use common::Rng;
use triattn::cpu::reduce::reduce;
use triattn::kernels::emu;
use triattn::kernels::ReduceSpec;
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
        num_seqs: 1,
        z_seq_stride: 0,
        out_seq_stride: 0,
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
        num_seqs: 1,
        z_seq_stride: 0,
        out_seq_stride: 0,
    };
    assert!(ok.validate().is_ok());
    assert!(ReduceSpec { num_heads: 7, ..ok }.validate().is_err());
    assert!(ReduceSpec { head_stride: 9, ..ok }.validate().is_err());
    assert!(ReduceSpec { layer_stride: 79, ..ok }.validate().is_err());
    assert!(ReduceSpec { window_start: 11, ..ok }.validate().is_err());
    assert!(ReduceSpec { len: 0, ..ok }.validate().is_err());
}

#[test]
fn batched_sequences_match_single_sequence_reductions() {
    let mut rng = Rng(31);
    for mode in [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union] {
        for group in [GroupAggregation::Max, GroupAggregation::Mean] {
            for (layers, heads, kv, n) in [(3, 8, 2, 257), (2, 4, 4, 40), (1, 1, 1, 1)] {
                let seqs = 3;
                let (head_stride, out_stride) = (n + 1, n + 2);
                let layer_stride = heads * head_stride + 3;
                let z_seq_stride = layers * layer_stride + 5;
                let spec = ReduceSpec {
                    num_layers: layers,
                    num_heads: heads,
                    num_kv_heads: kv,
                    len: n,
                    layer_stride,
                    head_stride,
                    out_stride,
                    mode,
                    group,
                    prefix: 0,
                    window_start: n - n / 5,
                    num_seqs: seqs,
                    z_seq_stride,
                    out_seq_stride: mode.num_sets(layers, kv) * out_stride + 1,
                };
                let prefixes: Vec<i32> = [0, n / 3, n / 7 + 1].iter().map(|&p| p.min(n) as i32).collect();
                let z: Vec<f32> = (0..spec.z_len()).map(|_| value(&mut rng)).collect();
                let mut out = vec![7.0f32; spec.out_len() + 1];
                emu::reduce_batch(&spec, &z, Some(&prefixes), &mut out).unwrap();
                for (s, &prefix) in prefixes.iter().enumerate() {
                    let base = s * z_seq_stride;
                    let dense: Vec<Vec<f32>> = (0..layers)
                        .map(|l| {
                            (0..heads)
                                .flat_map(|h| z[base + l * layer_stride + h * head_stride..][..n].to_vec())
                                .collect()
                        })
                        .collect();
                    let want = reduce(&dense, heads, kv, n, mode, group);
                    for set in 0..spec.sets() {
                        for slot in 0..n {
                            let w = if slot < prefix as usize || slot >= spec.window_start {
                                f32::INFINITY
                            } else {
                                want[set * n + slot]
                            };
                            let g = out[s * spec.out_seq_stride + set * out_stride + slot];
                            assert!(same(g, w), "{mode:?} {group:?} seq {s} set {set} slot {slot}: {g} vs {w}");
                        }
                        assert_eq!(out[s * spec.out_seq_stride + set * out_stride + n], 7.0, "wrote past the row");
                    }
                }
                // The scalar prefix for every sequence when no list is given.
                let mut scalar = vec![7.0f32; spec.out_len()];
                let spec0 = ReduceSpec { prefix: n / 2, ..spec };
                emu::reduce_batch(&spec0, &z, None, &mut scalar).unwrap();
                let same_prefix = vec![(n / 2) as i32; seqs];
                let mut listed = vec![7.0f32; spec.out_len()];
                emu::reduce_batch(&spec, &z, Some(&same_prefix), &mut listed).unwrap();
                assert!(scalar.iter().zip(&listed).all(|(a, b)| same(*a, *b)));
            }
        }
    }
    let bad = ReduceSpec {
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        len: 10,
        layer_stride: 10,
        head_stride: 10,
        out_stride: 10,
        mode: SelectionMode::Union,
        group: GroupAggregation::Max,
        prefix: 0,
        window_start: 10,
        num_seqs: 2,
        z_seq_stride: 9,
        out_seq_stride: 10,
    };
    assert!(bad.validate().is_err());
    assert!(ReduceSpec { z_seq_stride: 10, ..bad }.validate().is_ok());
    assert!(ReduceSpec { z_seq_stride: 10, out_seq_stride: 9, ..bad }.validate().is_err());
    assert!(ReduceSpec { num_seqs: 0, ..bad }.validate().is_err());
}
