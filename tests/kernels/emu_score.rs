//! Every scoring variant on the emu backend against the CPU backend (the specification).
//!
//! Shapes cover N not a multiple of the tile, N = 1, every compiled head_dim, both pairing
//! styles, every key dtype, mean and max aggregation, GQA groups larger than one head chunk,
//! several layers and sequences in one launch, and paged caches (NHD and HND, block sizes 16 to
//! 256). Scores must agree within a small multiple of 1e-6 of the row's standard deviation.
#![cfg(feature = "emu")]

use crate::common;

use common::{max_rel_err, omega, random_keys, random_stats, std_dev};
use half::{bf16, f16};
use triattn::cpu;
use triattn::cuda::PageOrder;
use triattn::kernels::emu;
use triattn::kernels::variant::{self, Kernel, Variant, HEAD_DIMS};
use triattn::kernels::{KeyLayout, RowPartial, ScoreShape, ScoreSpec, WeightsScope};
use triattn::score::{NormTerm, OffsetAggregation, RoundWeights, ScoreConfig, TrigTerm};
use triattn::tuning::Dispatch;
use triattn::{DType, Element, LayerView, PairingStyle};

fn config(aggregation: OffsetAggregation) -> ScoreConfig {
    ScoreConfig { aggregation, ..ScoreConfig::default() }
}

/// Max over rows of |a - b| / std(row of b); rows of `n`.
fn worst_relative(a: &[f32], b: &[f32], n: usize) -> f64 {
    let mut worst = 0f64;
    for (ra, rb) in a.chunks(n).zip(b.chunks(n)) {
        // A row of a few slots has a tiny or zero spread: fall back to its magnitude.
        let magnitude = rb.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
        let scale = if rb.len() < 8 { magnitude.max(1e-30) } else { std_dev(rb).max(1e-30) };
        for (x, y) in ra.iter().zip(rb) {
            assert!(x.is_finite() && y.is_finite(), "non-finite score: {x} vs {y}");
            worst = worst.max((*x as f64 - *y as f64).abs() / scale);
        }
    }
    worst
}

/// Tolerance in units of the row's standard deviation. These keys share a centre, so a score is
/// ~15x its row's spread and rounding the stored f32 score alone costs ~1e-6 std: both backends
/// sit at that floor against an f64 evaluation (`TRIATTN_EMU_REPORT=1` prints it), mean mode as
/// f32 GEMV in another order, max mode through bf16 levels on (emulated) tensor cores.
fn tolerance(_aggregation: OffsetAggregation, _n: usize) -> f64 {
    4e-6
}

fn check_layer<T: Element>(
    d: usize,
    heads: usize,
    kv_heads: usize,
    n: usize,
    style: PairingStyle,
    aggregation: OffsetAggregation,
    seed: u64,
) -> f64 {
    check_layer_with::<T>(d, heads, kv_heads, n, style, aggregation, seed, &Dispatch::built_in())
}

/// [`check_layer`] on the variant `dispatch` picks.
#[allow(clippy::too_many_arguments)]
fn check_layer_with<T: Element>(
    d: usize,
    heads: usize,
    kv_heads: usize,
    n: usize,
    style: PairingStyle,
    aggregation: OffsetAggregation,
    seed: u64,
    dispatch: &Dispatch,
) -> f64 {
    let st = random_stats(2, heads, d, seed);
    let w = RoundWeights::build(&st, style, &omega(d), 1.21, 31_337, &config(aggregation)).unwrap();
    let data = random_keys::<T>(kv_heads * n * d, d, seed ^ 0x55);
    let view = LayerView::contiguous("k", &data, kv_heads, n, d).unwrap();
    let mut cpu_out = vec![0f32; heads * n];
    let mut emu_out = vec![f32::NAN; heads * n];
    cpu::score::score_layer(&w, 1, &view, style, &mut cpu_out).unwrap();
    emu::score_layer_tuned(&w, 1, &view, style, &mut emu_out, dispatch).unwrap();
    let worst = worst_relative(&emu_out, &cpu_out, n);
    let tol = tolerance(aggregation, n);
    if std::env::var_os("TRIATTN_EMU_REPORT").is_some() {
        let exact = exact_layer(&w, 1, &view, style);
        let cpu_err = worst_relative(&cpu_out, &exact, n);
        let emu_err = worst_relative(&emu_out, &exact, n);
        eprintln!(
            "{} d{d} H{heads}/Hkv{kv_heads} N{n} {style} {aggregation:?}: emu-cpu {worst:.2e}  cpu-exact {cpu_err:.2e}  emu-exact {emu_err:.2e}",
            T::DTYPE
        );
    }
    assert!(
        worst <= tol,
        "{} d{d} H{heads}/Hkv{kv_heads} N{n} {style} {aggregation:?}: worst |emu - cpu| = {worst:.3e} std > {tol:.0e}",
        T::DTYPE
    );
    worst
}

/// The scores of one layer in f64 from the same f32 weights (report only).
fn exact_layer<T: Element>(w: &RoundWeights, layer: usize, keys: &LayerView<'_, T>, style: PairingStyle) -> Vec<f32> {
    let (h, n, d) = (w.num_heads, keys.len, w.head_dim);
    let group = h / keys.num_kv_heads;
    let mut out = vec![0f32; h * n];
    for hd in 0..h {
        let (wv, c) = (w.head_weights(layer, hd), w.head_norm(layer, hd));
        for r in 0..n {
            let k: Vec<f64> = keys.row(hd / group, r).iter().map(|x| x.to_f32() as f64).collect();
            let e: f64 = (0..d / 2)
                .map(|f| {
                    let (a, b) = style.dims(f, d);
                    (k[a] * k[a] + k[b] * k[b]).sqrt() * c[f] as f64
                })
                .sum();
            let trig = (0..w.vectors_per_head)
                .map(|j| (0..d).map(|i| k[i] * wv[j * d + i] as f64).sum::<f64>())
                .fold(f64::NEG_INFINITY, f64::max);
            let trig = if w.vectors_per_head == 0 { 0.0 } else { trig };
            out[hd * n + r] = (trig + e) as f32;
        }
    }
    out
}

fn block_keys(v: Variant) -> usize {
    match v.kernel {
        Kernel::Score { block_keys, .. } => block_keys,
        _ => unreachable!(),
    }
}

/// Every variant of every scoring family of `T` (the tuning candidates too), each forced through
/// the planning path with [`Dispatch::forcing`].
fn every_variant_of<T: Element>() {
    for d in HEAD_DIMS {
        for (aggregation, algo) in
            [(OffsetAggregation::Mean, variant::ScoreAlgo::Mean), (OffsetAggregation::Max, variant::ScoreAlgo::Max)]
        {
            let family = variant::score_variant(T::DTYPE, d, algo).unwrap().family();
            let members = variant::family_members(&family);
            assert!(!members.is_empty());
            for v in members {
                let forced = Dispatch::forcing(&[v]);
                let bn = block_keys(v);
                let mut worst = 0f64;
                for style in [PairingStyle::Half, PairingStyle::Interleaved] {
                    // Two tiles, the second partial; GQA group of 4 over 2 KV heads.
                    worst = worst.max(check_layer_with::<T>(
                        d,
                        8,
                        2,
                        bn + 3,
                        style,
                        aggregation,
                        d as u64 * 7 + 1,
                        &forced,
                    ));
                }
                // N = 1, one KV head serving all heads.
                worst = worst.max(check_layer_with::<T>(d, 4, 1, 1, PairingStyle::Half, aggregation, 99, &forced));
                eprintln!("{}: worst {worst:.2e} std", v.symbol());
            }
        }
    }
}

#[test]
fn score_every_variant_f32_matches_cpu() {
    every_variant_of::<f32>();
}

#[test]
fn score_every_variant_f16_matches_cpu() {
    every_variant_of::<f16>();
}

#[test]
fn score_every_variant_bf16_matches_cpu() {
    every_variant_of::<bf16>();
}

#[test]
fn score_large_groups_span_head_chunks() {
    // G = 12 > the 8 heads whose weights sit in shared memory at once; odd N.
    for aggregation in [OffsetAggregation::Mean, OffsetAggregation::Max] {
        check_layer::<bf16>(128, 24, 2, 77, PairingStyle::Half, aggregation, 5);
    }
}

#[test]
fn score_without_trig_term_matches_cpu() {
    let d = 64;
    let st = random_stats(1, 4, d, 3);
    let cfg = ScoreConfig { trig: TrigTerm::Excluded, norm: NormTerm::MeanModulus, ..ScoreConfig::default() };
    let w = RoundWeights::build(&st, PairingStyle::Half, &omega(d), 1.0, 5000, &cfg).unwrap();
    assert_eq!(w.vectors_per_head, 0);
    let data = random_keys::<f16>(2 * 100 * d, d, 4);
    let view = LayerView::contiguous("k", &data, 2, 100, d).unwrap();
    // The kernel's output starts poisoned (NaN), as raw memory would: every slot must be written.
    let (mut a, mut b) = (vec![0f32; 400], vec![f32::NAN; 400]);
    cpu::score::score_layer(&w, 0, &view, PairingStyle::Half, &mut a).unwrap();
    emu::score_layer(&w, 0, &view, PairingStyle::Half, &mut b).unwrap();
    assert!(worst_relative(&b, &a, 100) < 4e-6);
}

#[test]
fn score_strided_view_matches_cpu() {
    // Row stride not a multiple of 16 bytes: the emu entry scores a dense copy.
    let (d, n, hkv) = (32, 40, 2);
    let st = random_stats(1, 2, d, 11);
    let w = RoundWeights::build(&st, PairingStyle::Half, &omega(d), 1.0, 4096, &ScoreConfig::default()).unwrap();
    let data = random_keys::<bf16>(hkv * n * (d + 3), d, 12);
    let view = LayerView::strided("k", &data, hkv, n, d, n * (d + 3), d + 3).unwrap();
    let (mut a, mut b) = (vec![0f32; 2 * n], vec![f32::NAN; 2 * n]);
    cpu::score::score_layer(&w, 0, &view, PairingStyle::Half, &mut a).unwrap();
    emu::score_layer(&w, 0, &view, PairingStyle::Half, &mut b).unwrap();
    assert!(worst_relative(&b, &a, n) < 4e-6);
}

/// Tile partials as raw memory may hold them: NaN in every field, so a partial the kernel does
/// not write shows (`RowPartial::combine` skips a NaN count silently).
fn poisoned_partials(n: usize) -> Vec<RowPartial> {
    vec![RowPartial { count: f32::NAN, mean: f32::NAN, m2: f32::NAN, pad: f32::NAN }; n]
}

/// Every tile partial written: a count, mean and M2 that are numbers (empty tiles included).
fn assert_partials_written(partials: &[RowPartial]) {
    for (i, p) in partials.iter().enumerate() {
        assert!(p.count >= 0.0 && !p.mean.is_nan() && !p.m2.is_nan(), "tile partial {i} not written: {p:?}");
    }
}

/// A multi-layer, multi-sequence round in one launch, contiguous or paged, checked slot by slot
/// against the CPU on each (sequence, layer), and the z-score partials against a direct pass.
fn check_round<T: Element>(aggregation: OffsetAggregation, layout: Option<(usize, PageOrder)>, style: PairingStyle) {
    let (layers, heads, kv, d) = (2, 4, 2, 64);
    let lens = [150usize, 37, 0];
    let seqs = lens.len();
    let max_len = 160;
    let starts = [40_000u64, 41_000, 123];
    let st = random_stats(layers, heads, d, 21);
    let cfg = config(aggregation);
    let per_seq: Vec<RoundWeights> =
        starts.iter().map(|&r| RoundWeights::build(&st, style, &omega(d), 1.0, r, &cfg).unwrap()).collect();
    let vectors = per_seq[0].vectors_per_head;
    let weights: Vec<f32> = per_seq.iter().flat_map(|w| w.weights.iter().copied()).collect();
    // Dense keys per (s, l): [Hkv, len, D].
    let dense: Vec<Vec<T>> =
        (0..seqs * layers).map(|i| random_keys::<T>(kv * lens[i / layers] * d, d, 1000 + i as u64)).collect();

    let mut raw = vec![f32::NAN; seqs * layers * heads * max_len];
    let seq_lens: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
    // Candidates [stat_start, stat_end): an end below the length, one past it (clamped), none.
    let stat_start = [10i32, 0, 0];
    let stat_end = [143i32, 100, 0];
    let spec_layout;
    let mut pools: Vec<Vec<T>> = Vec::new();
    let mut table = Vec::new();
    match layout {
        None => spec_layout = KeyLayout::Contiguous { head_stride: max_len * d, row_stride: d },
        Some((bs, order)) => {
            let max_blocks = max_len.div_ceil(bs);
            let num_blocks = seqs * max_blocks + 3;
            spec_layout = KeyLayout::Paged { block_size: bs, order, num_blocks, max_blocks };
            // A scrambled block table: sequence s block b lives at a permuted pool block.
            table = (0..seqs * max_blocks).map(|i| ((i * 7 + 3) % num_blocks) as i32).collect();
            for l in 0..layers {
                let mut pool = vec![T::from_f32(f32::NAN); num_blocks * bs * kv * d];
                for s in 0..seqs {
                    for g in 0..kv {
                        for n in 0..lens[s] {
                            let blk = table[s * max_blocks + n / bs] as usize;
                            let at = match order {
                                PageOrder::Nhd => ((blk * bs + n % bs) * kv + g) * d,
                                PageOrder::Hnd => ((blk * kv + g) * bs + n % bs) * d,
                            };
                            let src = &dense[s * layers + l][(g * lens[s] + n) * d..][..d];
                            pool[at..at + d].copy_from_slice(src);
                        }
                    }
                }
                pools.push(pool);
            }
        }
    }
    // Contiguous tensors padded to max_len rows per head (head stride max_len * D).
    let padded: Vec<Vec<T>> = dense
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let len = lens[i / layers];
            let mut p = vec![T::from_f32(0.0); kv * max_len * d];
            for g in 0..kv {
                p[g * max_len * d..][..len * d].copy_from_slice(&k[g * len * d..][..len * d]);
            }
            p
        })
        .collect();
    let key_refs: Vec<&[T]> = match layout {
        None => padded.iter().map(|v| &v[..]).collect(),
        Some(_) => pools.iter().map(|v| &v[..]).collect(),
    };
    let spec = ScoreSpec::new(ScoreShape {
        dtype: T::DTYPE,
        head_dim: d,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        num_seqs: seqs,
        max_len,
        vectors,
        aggregation,
        style,
        layout: spec_layout,
        weights: WeightsScope::PerSequence,
    })
    .unwrap();
    let mut partials = poisoned_partials(spec.partials_len());
    let inputs = emu::ScoreInputs {
        keys: &key_refs,
        weights: &weights,
        norm: &per_seq[0].norm,
        block_table: layout.map(|_| &table[..]),
        seq_lens: &seq_lens,
        stat_start: Some(&stat_start),
        stat_end: Some(&stat_end),
    };
    emu::score(&spec, &inputs, &mut raw, Some(&mut partials)).unwrap();
    assert_partials_written(&partials);

    let tiles = spec.num_tiles();
    for s in 0..seqs {
        let n = lens[s];
        for l in 0..layers {
            let row0 = (s * layers + l) * heads;
            let mut cpu_out = vec![0f32; heads * n];
            if n > 0 {
                let view = LayerView::contiguous("k", &dense[s * layers + l], kv, n, d).unwrap();
                cpu::score::score_layer(&per_seq[s], l, &view, style, &mut cpu_out).unwrap();
            }
            for h in 0..heads {
                let got = &raw[(row0 + h) * max_len..][..n];
                let want = &cpu_out[h * n..][..n];
                if n > 0 {
                    let worst = worst_relative(got, want, n);
                    assert!(worst <= tolerance(aggregation, n), "s{s} l{l} h{h}: {worst:.3e}");
                }
                let parts = &partials[(row0 + h) * tiles..][..tiles];
                let lo = (stat_start[s] as usize).min(n);
                let cand = &got[lo..(stat_end[s] as usize).clamp(lo, n)];
                let combined = RowPartial::combine(parts);
                assert_eq!(combined.count, cand.len() as f64, "s{s} l{l} h{h} count");
                if !cand.is_empty() {
                    let m = cand.iter().map(|&x| x as f64).sum::<f64>() / cand.len() as f64;
                    let var = cand.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / cand.len() as f64;
                    assert!(
                        (combined.mean - m).abs() <= 1e-5 * (var.sqrt() + m.abs()),
                        "mean {} vs {m}",
                        combined.mean
                    );
                    assert!((combined.m2 / combined.count - var).abs() <= 1e-4 * var + 1e-12, "var");
                }
            }
        }
    }
}

#[test]
fn score_round_contiguous_multi_layer_multi_sequence() {
    check_round::<bf16>(OffsetAggregation::Mean, None, PairingStyle::Half);
    check_round::<f32>(OffsetAggregation::Max, None, PairingStyle::Interleaved);
}

#[test]
fn score_round_paged_nhd_and_hnd() {
    for (bs, order) in [(16, PageOrder::Nhd), (32, PageOrder::Hnd), (256, PageOrder::Nhd), (64, PageOrder::Hnd)] {
        check_round::<bf16>(OffsetAggregation::Mean, Some((bs, order)), PairingStyle::Half);
    }
    check_round::<f16>(OffsetAggregation::Max, Some((16, PageOrder::Hnd)), PairingStyle::Interleaved);
    check_round::<f32>(OffsetAggregation::Mean, Some((128, PageOrder::Nhd)), PairingStyle::Interleaved);
}

/// Count, mean and M2 in f64 of the non-NaN values of `xs` (the CPU's `row_moments` rule).
fn host_moments(xs: &[f32]) -> (usize, f64, f64) {
    let vals: Vec<f64> = xs.iter().filter(|x| !x.is_nan()).map(|&x| x as f64).collect();
    if vals.is_empty() {
        return (0, 0.0, 0.0);
    }
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    (vals.len(), mean, vals.iter().map(|x| (x - mean).powi(2)).sum())
}

/// z-score partials over `[stat_start, stat_end)` with NaN scores (keys holding a NaN element)
/// left out: combined partials against a direct f64 pass over the same slots of the raw output,
/// and the raw scores against the CPU (NaN exactly where the CPU has NaN).
fn check_nan_partials<T: Element>(aggregation: OffsetAggregation, style: PairingStyle) {
    let (layers, heads, kv, d) = (2, 4, 2, 64);
    let lens = [150usize, 97, 20, 50];
    let seqs = lens.len();
    let max_len = 160;
    // An end below the length (0), at it (1), past it (2, clamped), below the start (3, empty).
    let stat_start = [10i32, 0, 5, 30];
    let stat_end = [120i32, 97, 200, 20];
    let st = random_stats(layers, heads, d, 77);
    let w = RoundWeights::build(&st, style, &omega(d), 1.0, 12_345, &config(aggregation)).unwrap();
    let nan = T::from_f32(f32::NAN);
    // Dense keys per (s, l): [Hkv, len, D]; some rows hold a NaN element, and in sequence 2 every
    // row of KV head 0 does (a whole group of heads with no finite candidate).
    let dense: Vec<Vec<T>> = (0..seqs * layers)
        .map(|i| {
            let (s, l) = (i / layers, i % layers);
            let n = lens[s];
            let mut k = random_keys::<T>(kv * n * d, d, 500 + i as u64);
            for g in 0..kv {
                for r in 0..n {
                    if (r * 7 + g * 3 + l) % 13 == 5 || (s == 2 && g == 0) {
                        k[(g * n + r) * d + (r + g) % d] = nan;
                    }
                }
            }
            k
        })
        .collect();
    let padded: Vec<Vec<T>> = dense
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let len = lens[i / layers];
            let mut p = vec![T::from_f32(0.0); kv * max_len * d];
            for g in 0..kv {
                p[g * max_len * d..][..len * d].copy_from_slice(&k[g * len * d..][..len * d]);
            }
            p
        })
        .collect();
    let key_refs: Vec<&[T]> = padded.iter().map(|v| &v[..]).collect();
    let spec = ScoreSpec::new(ScoreShape {
        dtype: T::DTYPE,
        head_dim: d,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        num_seqs: seqs,
        max_len,
        vectors: w.vectors_per_head,
        aggregation,
        style,
        layout: KeyLayout::Contiguous { head_stride: max_len * d, row_stride: d },
        weights: WeightsScope::Shared,
    })
    .unwrap();
    let seq_lens: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
    // Poisoned outputs (NaN scores, NaN partials), as raw memory would be.
    let mut raw = vec![f32::NAN; spec.raw_len()];
    let mut partials = poisoned_partials(spec.partials_len());
    let inputs = emu::ScoreInputs {
        keys: &key_refs,
        weights: &w.weights,
        norm: &w.norm,
        block_table: None,
        seq_lens: &seq_lens,
        stat_start: Some(&stat_start),
        stat_end: Some(&stat_end),
    };
    emu::score(&spec, &inputs, &mut raw, Some(&mut partials)).unwrap();
    assert_partials_written(&partials);

    let tiles = spec.num_tiles();
    let mut nan_candidates = 0;
    for s in 0..seqs {
        let n = lens[s];
        for l in 0..layers {
            let row0 = (s * layers + l) * heads;
            let view = LayerView::contiguous("k", &dense[s * layers + l], kv, n, d).unwrap();
            let mut cpu_out = vec![0f32; heads * n];
            cpu::score::score_layer(&w, l, &view, style, &mut cpu_out).unwrap();
            for h in 0..heads {
                let got = &raw[(row0 + h) * max_len..][..n];
                let want = &cpu_out[h * n..][..n];
                for (r, (a, b)) in got.iter().zip(want).enumerate() {
                    assert_eq!(a.is_nan(), b.is_nan(), "s{s} l{l} h{h} slot {r}: {a} vs cpu {b}");
                }
                if n > 0 {
                    let err = max_rel_err(&format!("s{s} l{l} h{h}"), got, want, n);
                    assert!(err <= tolerance(aggregation, n), "s{s} l{l} h{h}: {err:.3e} of the row std");
                }
                let lo = (stat_start[s] as usize).min(n);
                let cand = &got[lo..(stat_end[s] as usize).clamp(lo, n)];
                nan_candidates += cand.iter().filter(|x| x.is_nan()).count();
                let c = RowPartial::combine(&partials[(row0 + h) * tiles..][..tiles]);
                let (count, mean, m2) = host_moments(cand);
                let what = format!("{} {aggregation:?} s{s} l{l} h{h}", T::DTYPE);
                assert_eq!(c.count, count as f64, "{what}: count");
                if count == 0 {
                    continue;
                }
                let sd = (m2 / count as f64).sqrt();
                assert!((c.mean - mean).abs() <= 1e-5 * (mean.abs() + sd), "{what}: mean {} vs {mean}", c.mean);
                assert!((c.m2 - m2).abs() <= 1e-5 * m2 + 1e-12, "{what}: m2 {} vs {m2}", c.m2);
            }
        }
    }
    assert!(nan_candidates > 0, "the test must put NaN scores among the candidates");
}

#[test]
fn score_partials_use_candidate_range_and_skip_nan() {
    check_nan_partials::<f32>(OffsetAggregation::Mean, PairingStyle::Half);
    check_nan_partials::<bf16>(OffsetAggregation::Max, PairingStyle::Interleaved);
    check_nan_partials::<f16>(OffsetAggregation::Mean, PairingStyle::Interleaved);
}

#[test]
fn score_rejects_block_table_outside_the_pool() {
    let d = 32;
    let spec = ScoreSpec::new(ScoreShape {
        dtype: DType::F32,
        head_dim: d,
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        num_seqs: 1,
        max_len: 20,
        vectors: 1,
        aggregation: OffsetAggregation::Mean,
        style: PairingStyle::Half,
        layout: KeyLayout::Paged { block_size: 16, order: PageOrder::Nhd, num_blocks: 2, max_blocks: 2 },
        weights: WeightsScope::Shared,
    })
    .unwrap();
    let pool = vec![0f32; 2 * 16 * d];
    let keys = [&pool[..]];
    let (w, c) = (vec![0f32; d], vec![0f32; d / 2]);
    let mut raw = vec![0f32; 20];
    let inputs = emu::ScoreInputs {
        keys: &keys,
        weights: &w,
        norm: &c,
        block_table: Some(&[0, 2]),
        seq_lens: &[20],
        stat_start: None,
        stat_end: None,
    };
    let err = emu::score(&spec, &inputs, &mut raw, None).unwrap_err();
    assert!(err.to_string().contains("block table"), "{err}");
}

#[test]
fn trig_kernel_matches_host_weights() {
    for (aggregation, style) in [
        (OffsetAggregation::Mean, PairingStyle::Half),
        (OffsetAggregation::Max, PairingStyle::Interleaved),
        (OffsetAggregation::Mean, PairingStyle::Interleaved),
    ] {
        for d in [64, 96, 128] {
            let st = random_stats(2, 3, d, 8);
            let cfg = config(aggregation);
            let starts = [0u64, 31_337, 1_000_000_007];
            let dev = emu::round_weights(&st, style, &omega(d), 1.44, &starts, &cfg).unwrap();
            for (w, &r) in dev.iter().zip(&starts) {
                let host = RoundWeights::build(&st, style, &omega(d), 1.44, r, &cfg).unwrap();
                assert_eq!(w.norm, host.norm);
                assert_eq!(w.weights.len(), host.weights.len());
                let scale = host.weights.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in w.weights.iter().zip(&host.weights) {
                    assert!((a - b).abs() <= 1e-6 * scale, "d{d} r{r} {aggregation:?}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn trig_kernel_writes_the_exact_level_image() {
    // The image the max kernel copies into shared memory, padding included, bit for bit what the
    // host builds from its own weights (emu evaluates cos/sin with the host libm).
    use triattn::kernels::{weight_levels, weights_from_levels};
    for (d, style) in [(96, PairingStyle::Half), (32, PairingStyle::Interleaved)] {
        let st = random_stats(2, 3, d, 17);
        let cfg = config(OffsetAggregation::Max);
        let starts = [7_000u64, 65_537];
        let image = emu::round_weight_image(&st, style, &omega(d), 1.0, &starts, &cfg).unwrap();
        let mut want = Vec::new();
        for &r in &starts {
            let host = RoundWeights::build(&st, style, &omega(d), 1.0, r, &cfg).unwrap();
            let levels = weight_levels(&host.weights, host.vectors_per_head, d);
            assert_eq!(weights_from_levels(&levels, host.vectors_per_head, d), host.weights, "levels are exact");
            want.extend(levels);
        }
        assert_eq!(image.len(), want.len());
        let differ = image.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "d{d} {style}: {differ} of {} image entries differ", want.len());
    }
}
