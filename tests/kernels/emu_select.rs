//! Every `select` variant on the emu backend against `cpu::select::select_row` (the
//! specification): the same kept slots, exactly.
//!
//! Rows: random values, many exact ties, NaN and ±inf (and -0 next to +0), N = 1, N not a
//! multiple of the block, N at and just past the register-cached length (16 * NT), K = N - 1,
//! K = 1, K = protected (no candidate kept), K = N, protected prefix and window (overlapping
//! too), strided rows, and N up to 16K.
//!
//! The multi-block path (rows longer than `SELECT_SINGLE_MAX_LEN`, or forced on short rows): rows
//! of 20K to 130K slots with the same value families, budgets from the protected count to N, and
//! the same output run after run.
#![cfg(feature = "emu")]

use crate::common;

use common::Rng;
use triattn::cpu::select::select_row;
use triattn::kernels::emu;
use triattn::kernels::variant::{self, Kernel, Variant};
use triattn::kernels::SELECT_SINGLE_MAX_LEN;
use triattn::kernels::{SelectShape, SelectSpec};

#[derive(Clone, Copy, Debug)]
enum Values {
    /// Distinct-ish uniform values.
    Random,
    /// A handful of distinct values: long runs of exact ties.
    Ties,
    /// Ties plus NaN, ±inf, ±0, subnormals, extremes.
    Special,
    /// Every value equal.
    Constant,
}

fn row(rng: &mut Rng, n: usize, values: Values) -> Vec<f32> {
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE / 4.0,
        -f32::MIN_POSITIVE / 4.0,
        f32::MAX,
        f32::MIN,
        1.0,
        -1.0,
    ];
    (0..n)
        .map(|_| match values {
            Values::Random => rng.unit() * 100.0,
            Values::Ties => (rng.below(5) as f32) - 2.0,
            Values::Special => {
                if rng.below(3) == 0 {
                    specials[rng.below(specials.len())]
                } else {
                    (rng.below(7) as f32) * 0.5 - 1.5
                }
            }
            Values::Constant => 0.25,
        })
        .collect()
}

fn select_variants() -> Vec<Variant> {
    let v: Vec<Variant> = variant::table().into_iter().filter(|v| matches!(v.kernel, Kernel::Select { .. })).collect();
    assert!(!v.is_empty());
    v
}

/// How a test builds its spec.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// One single-block variant.
    Single(Variant),
    /// The multi-block path whatever the length.
    Multi,
    /// What `SelectSpec::new` picks.
    Auto,
}

/// One launch of `variant` over `rows` rows (stride `len + pad`), checked row by row.
#[allow(clippy::too_many_arguments)]
fn check(
    variant: Variant,
    rng: &mut Rng,
    rows: usize,
    len: usize,
    prefix: usize,
    window_start: usize,
    budget: usize,
    values: Values,
) {
    check_path(Path::Single(variant), rng, rows, len, prefix, window_start, budget, values);
}

/// One select over `rows` rows (stride `len + pad`), checked row by row; returns the output.
#[allow(clippy::too_many_arguments)]
fn check_path(
    path: Path,
    rng: &mut Rng,
    rows: usize,
    len: usize,
    prefix: usize,
    window_start: usize,
    budget: usize,
    values: Values,
) -> Vec<i32> {
    let pad = rng.below(3);
    let stride = len + pad;
    let mut scores = vec![f32::NAN; rows * stride];
    let mut expected = Vec::new();
    for r in 0..rows {
        let x = row(rng, len, values);
        scores[r * stride..r * stride + len].copy_from_slice(&x);
        let want = select_row(&x, |s| s < prefix || s >= window_start, budget);
        assert_eq!(want.len(), budget);
        expected.push(want);
    }
    let keep_stride = budget + 1;
    let shape =
        SelectShape { rows, len, prefix, window_start, budget, score_stride: stride, keep_stride, rows_per_seq: 0 };
    let spec = match path {
        Path::Single(variant) => SelectSpec::with_variant(shape, variant).unwrap(),
        Path::Multi => SelectSpec::multi_block(shape).unwrap(),
        Path::Auto => SelectSpec::new(shape).unwrap(),
    };
    let variant = spec.variant();
    let mut keep = vec![-7i32; rows * keep_stride];
    emu::select(&spec, &scores, &mut keep).unwrap();
    for (r, want) in expected.iter().enumerate() {
        let got: Vec<u32> = keep[r * keep_stride..r * keep_stride + budget].iter().map(|&s| s as u32).collect();
        assert_eq!(
            &got,
            want,
            "{} row {r}: N {len} P {prefix} W {window_start} K {budget} {values:?}",
            variant.symbol()
        );
        assert_eq!(keep[r * keep_stride + budget], -7, "{} wrote past the budget", variant.symbol());
    }
    keep
}

#[test]
fn edge_shapes_match_the_cpu() {
    let mut rng = Rng(1);
    for v in select_variants() {
        let nt = v.threads();
        for values in [Values::Random, Values::Ties, Values::Special, Values::Constant] {
            for len in [1, 2, 3, 31, 33, nt - 1, nt, nt + 1, 2 * nt + 17, 1000, 16 * nt, 16 * nt + 1] {
                let mut budgets = vec![1, len - 1, len, len / 2];
                budgets.retain(|&k| k >= 1 && k <= len);
                budgets.dedup();
                for budget in budgets {
                    check(v, &mut rng, 3, len, 0, len, budget, values);
                }
            }
        }
    }
}

#[test]
fn protection_matches_the_cpu() {
    let mut rng = Rng(2);
    for v in select_variants() {
        for values in [Values::Random, Values::Ties, Values::Special] {
            for len in [5, 100, 777, 2100] {
                // Prefix only, window only, both, overlapping, everything protected.
                let cases = [
                    (len / 4, len),
                    (0, len - len / 5),
                    (len / 8, len - len / 6),
                    (len / 2, len / 3),
                    (len, len),
                    (0, 0),
                ];
                for (prefix, window_start) in cases {
                    let shape = SelectShape {
                        rows: 1,
                        len,
                        prefix,
                        window_start,
                        budget: 0,
                        score_stride: len,
                        keep_stride: len,
                        rows_per_seq: 0,
                    };
                    let protected = shape.protected();
                    let mut budgets = vec![protected, protected + 1, (protected + len) / 2, len - 1, len];
                    budgets.retain(|&k| k >= protected && k <= len && k >= 1);
                    budgets.dedup();
                    for budget in budgets {
                        check(v, &mut rng, 2, len, prefix, window_start, budget, values);
                    }
                }
            }
        }
    }
}

#[test]
fn random_shapes_match_the_cpu() {
    let mut rng = Rng(3);
    for v in select_variants() {
        for _ in 0..40 {
            let len = 1 + rng.below(3000);
            let prefix = if rng.below(2) == 0 { 0 } else { rng.below(len + 1) };
            let window_start = if rng.below(2) == 0 { len } else { len - rng.below(len / 4 + 1) };
            let protected = SelectShape {
                rows: 1,
                len,
                prefix,
                window_start,
                budget: 0,
                score_stride: len,
                keep_stride: 0,
                rows_per_seq: 0,
            }
            .protected();
            let budget = protected + rng.below(len - protected + 1);
            let values = [Values::Random, Values::Ties, Values::Special][rng.below(3)];
            if budget >= 1 {
                let rows = 1 + rng.below(4);
                check(v, &mut rng, rows, len, prefix, window_start, budget, values);
            }
        }
    }
}

#[test]
fn long_rows_match_the_cpu() {
    let mut rng = Rng(4);
    for v in select_variants() {
        for (len, values) in [(16384, Values::Random), (16384, Values::Ties), (12345, Values::Special)] {
            // The decode-time shape: evict about 128 of budget + 128, a prompt and a window kept.
            check(v, &mut rng, 2, len, 64, len - 128, len - 128, values);
            check(v, &mut rng, 1, len, 0, len, len / 3, values);
        }
    }
}

#[test]
fn rows_helper_and_variant_choice() {
    let scores = [3.0, 1.0, f32::NAN, 3.0, 2.0, -1.0, 0.5, 7.0];
    let got = emu::select_rows(&scores, 4, 0, 4, 2).unwrap();
    assert_eq!(got, vec![vec![0, 3], vec![0, 3]]);
    assert!(matches!(variant::select_variant(100).kernel, Kernel::Select { threads: 256 }));
    assert!(matches!(variant::select_variant(16384).kernel, Kernel::Select { threads: 512 }));
}

#[test]
fn multi_block_edge_shapes_match_the_cpu() {
    // Forced on short rows: one chunk, a chunk boundary, no candidate kept, all kept.
    let mut rng = Rng(5);
    for values in [Values::Random, Values::Ties, Values::Special, Values::Constant] {
        for len in [1, 2, 300, 2047, 2048, 2049, 5000] {
            for (prefix, window_start) in [(0, len), (len / 4, len - len / 5), (len / 2, len / 3)] {
                let shape = SelectShape {
                    rows: 1,
                    len,
                    prefix,
                    window_start,
                    budget: 0,
                    score_stride: len,
                    keep_stride: len,
                    rows_per_seq: 0,
                };
                let protected = shape.protected();
                let mut budgets = vec![protected, protected + 1, (protected + len) / 2, len - 1, len];
                budgets.retain(|&k| k >= protected && k <= len && k >= 1);
                budgets.dedup();
                for budget in budgets {
                    check_path(Path::Multi, &mut rng, 2, len, prefix, window_start, budget, values);
                }
            }
        }
    }
}

#[test]
fn multi_block_long_rows_match_the_cpu() {
    let mut rng = Rng(6);
    let cases = [
        // (len, prefix, window_start, budget, values)
        (20_000, 0, 20_000, 1, Values::Random),
        (20_000, 64, 19_872, 19_872, Values::Ties),
        (33_333, 100, 33_000, 4096, Values::Special),
        (65_536, 0, 65_536, 65_535, Values::Ties),
        (70_001, 4, 69_000, 2009, Values::Constant),
        (131_072, 1000, 130_000, 4096, Values::Special),
        (130_000, 0, 130_000, 65_000, Values::Random),
    ];
    for (len, prefix, window_start, budget, values) in cases {
        assert!(len > SELECT_SINGLE_MAX_LEN);
        check_path(Path::Auto, &mut rng, 1, len, prefix, window_start, budget, values);
    }
    // Two rows in one launch, and every slot protected or kept.
    check_path(Path::Auto, &mut rng, 2, 24_577, 24_577, 24_577, 24_577, Values::Special);
    check_path(Path::Auto, &mut rng, 2, 40_000, 17, 39_000, 20_000, Values::Ties);
}

#[test]
fn multi_block_is_deterministic() {
    let first = check_path(Path::Auto, &mut Rng(7), 2, 50_000, 32, 49_500, 7777, Values::Ties);
    let second = check_path(Path::Auto, &mut Rng(7), 2, 50_000, 32, 49_500, 7777, Values::Ties);
    assert_eq!(first, second);
}

#[test]
fn path_choice_by_length() {
    let shape = |len| SelectShape {
        rows: 3,
        len,
        prefix: 0,
        window_start: len,
        budget: 1,
        score_stride: len,
        keep_stride: 1,
        rows_per_seq: 0,
    };
    let single = SelectSpec::new(shape(SELECT_SINGLE_MAX_LEN)).unwrap();
    assert!(!single.is_multi_block());
    assert_eq!(single.scratch_bytes(), 0);
    assert_eq!(single.launches(&Default::default()).iter().flatten().count(), 1);
    let multi = SelectSpec::new(shape(SELECT_SINGLE_MAX_LEN + 1)).unwrap();
    assert!(multi.is_multi_block());
    assert!(multi.scratch_bytes() > 0);
    let launches = multi.launches(&Default::default());
    assert_eq!(launches.iter().flatten().count(), launches.len());
    assert!(launches.iter().flatten().all(|l| matches!(l.0.kernel, Kernel::SelectPass { .. })));
    assert_eq!(launches[0].unwrap().0, multi.variant());
}

/// Rows of several sequences with their own prefixes in one select, single-block (every variant)
/// and multi-block: each row equals `select_row` with its sequence's prefix.
#[test]
fn batched_prefixes_match_the_cpu_per_row() {
    let mut rng = Rng(77);
    let (seqs, sets) = (3, 4);
    let rows = seqs * sets;
    let mut paths: Vec<Path> = select_variants().into_iter().map(Path::Single).collect();
    paths.push(Path::Multi);
    for path in paths {
        for len in [1usize, 37, 300, 5000] {
            for values in [Values::Random, Values::Ties, Values::Special] {
                let window_start = len - len / 6;
                let prefixes: Vec<i32> = [0, len / 3, len / 9 + 1].iter().map(|&p| p.min(len) as i32).collect();
                let max_protected =
                    prefixes.iter().map(|&p| p as usize + len - window_start.max(p as usize)).max().unwrap();
                let mut budgets = vec![max_protected, (max_protected + len) / 2, len];
                budgets.retain(|&k| k >= 1);
                budgets.dedup();
                for budget in budgets {
                    let stride = len + 2;
                    let mut scores = vec![f32::NAN; rows * stride];
                    let mut expected = Vec::new();
                    for r in 0..rows {
                        let x = row(&mut rng, len, values);
                        scores[r * stride..r * stride + len].copy_from_slice(&x);
                        let prefix = prefixes[r / sets] as usize;
                        expected.push(select_row(&x, |s| s < prefix || s >= window_start, budget));
                    }
                    let keep_stride = budget + 1;
                    let shape = SelectShape {
                        rows,
                        len,
                        prefix: 0,
                        window_start,
                        budget,
                        score_stride: stride,
                        keep_stride,
                        rows_per_seq: sets,
                    };
                    let spec = match path {
                        Path::Single(v) => SelectSpec::with_variant(shape, v).unwrap(),
                        Path::Multi => SelectSpec::multi_block(shape).unwrap(),
                        Path::Auto => SelectSpec::new(shape).unwrap(),
                    };
                    let mut keep = vec![-7i32; rows * keep_stride];
                    emu::select_batch(&spec, &scores, Some(&prefixes), &mut keep).unwrap();
                    for (r, want) in expected.iter().enumerate() {
                        let got: Vec<u32> =
                            keep[r * keep_stride..r * keep_stride + budget].iter().map(|&s| s as u32).collect();
                        assert_eq!(&got, want, "{path:?} row {r}: N {len} P {prefixes:?} K {budget} {values:?}");
                        assert_eq!(keep[r * keep_stride + budget], -7, "{path:?} wrote past the budget");
                    }
                }
            }
        }
    }
    // Host checks of the emu entry: one prefix per sequence, each leaving <= budget protected.
    let shape = SelectShape {
        rows: 6,
        len: 10,
        prefix: 0,
        window_start: 10,
        budget: 4,
        score_stride: 10,
        keep_stride: 4,
        rows_per_seq: 2,
    };
    let spec = SelectSpec::new(shape).unwrap();
    let scores = vec![0.5f32; 60];
    let mut keep = vec![-7i32; 24];
    assert!(emu::select_batch(&spec, &scores, Some(&[0, 4, 2]), &mut keep).is_ok());
    // All ties: every row keeps its four lowest slots (protected or not).
    assert_eq!(keep, [0, 1, 2, 3].repeat(6));
    assert!(emu::select_batch(&spec, &scores, Some(&[0, 5, 2]), &mut keep).is_err());
    assert!(emu::select_batch(&spec, &scores, Some(&[0, 4]), &mut keep).is_err());
    assert!(SelectSpec::new(SelectShape { rows_per_seq: 4, ..shape }).is_err());
}
