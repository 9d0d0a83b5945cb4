//! Every `select` variant on the emu backend against `cpu::select::select_row` (the
//! specification): the same kept slots, exactly.
//!
//! Rows: random values, many exact ties, NaN and ±inf (and -0 next to +0), N = 1, N not a
//! multiple of the block, N at and just past the register-cached length (16 * NT), K = N - 1,
//! K = 1, K = protected (no candidate kept), K = N, protected prefix and window (overlapping
//! too), strided rows, and N up to 16K.
#![cfg(feature = "emu")]

mod common;

use common::Rng;
use triattn::cpu::select::select_row;
use triattn::cuda::{SelectShape, SelectSpec};
use triattn::emu;
use triattn::variant::{self, Kernel, Variant};

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
    let shape = SelectShape { rows, len, prefix, window_start, budget, score_stride: stride, keep_stride };
    let spec = SelectSpec::with_variant(shape, variant).unwrap();
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
            let protected =
                SelectShape { rows: 1, len, prefix, window_start, budget: 0, score_stride: len, keep_stride: 0 }
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
