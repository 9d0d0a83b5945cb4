//! Property tests of the CPU backend: permutation invariance, determinism, ties, NaN, and the
//! budget and protection invariants over simulated decodes of thousands of tokens.

use crate::common;

use common::{model, Rng};
use half::bf16;
use triattn::policy::{CompressionConfig, Normalization, PrefixProtection, Preset, RoundOutcome, SelectionMode};
use triattn::round::{run_cpu, Scorer};
use triattn::score::OffsetAggregation;
use triattn::stats::Stats;
use triattn::{Compressor, KvCache, LayerView, ModelConfig, PairingStyle, SequenceState};

fn random_stats(rng: &mut Rng, m: &ModelConfig, style: PairingStyle) -> Stats {
    let f = m.head_dim / 2;
    let count = m.num_layers * m.num_heads * f;
    let mut re = Vec::with_capacity(count);
    let mut im = Vec::with_capacity(count);
    let mut abs = Vec::with_capacity(count);
    for _ in 0..count {
        let (a, b) = (rng.normal() as f32, rng.normal() as f32);
        re.push(a);
        im.push(b);
        abs.push(a.hypot(b) + rng.uniform() as f32);
    }
    Stats {
        num_layers: m.num_layers,
        num_heads: m.num_heads,
        head_dim: m.head_dim,
        rope_style: style,
        q_mean_real: re,
        q_mean_imag: im,
        q_abs_mean: abs,
        sampled_heads: None,
        metadata: Default::default(),
    }
}

fn random_keys(rng: &mut Rng, layers: usize, len: usize) -> Vec<Vec<f32>> {
    (0..layers).map(|_| (0..len).map(|_| (rng.normal() * 2.0 + 0.5) as f32).collect()).collect()
}

fn scorer(rng: &mut Rng, m: &ModelConfig) -> Scorer {
    let stats = random_stats(rng, m, PairingStyle::Half);
    Scorer::new(m.clone(), stats, None).unwrap()
}

#[test]
fn scores_are_invariant_under_slot_permutation() {
    let mut rng = Rng(1);
    let m = model(2, 8, 2, 64);
    let sc = scorer(&mut rng, &m);
    let (hkv, n, d) = (2, 300, 64);
    let keys = random_keys(&mut rng, 2, hkv * n * d);
    // A random permutation of the slots, applied to every head of every layer.
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let permuted: Vec<Vec<f32>> = keys
        .iter()
        .map(|k| {
            let mut p = vec![0f32; k.len()];
            for g in 0..hkv {
                for (dst, &src) in perm.iter().enumerate() {
                    p[(g * n + dst) * d..(g * n + dst + 1) * d]
                        .copy_from_slice(&k[(g * n + src) * d..(g * n + src + 1) * d]);
                }
            }
            p
        })
        .collect();
    for agg in [OffsetAggregation::Mean, OffsetAggregation::Max] {
        let mut cfg = CompressionConfig { budget: 200, prefix: PrefixProtection::Unprotected, ..Default::default() };
        cfg.score.aggregation = agg;
        let views = |ks: &[Vec<f32>]| -> Vec<Vec<f32>> { ks.to_vec() };
        let a_keys = views(&keys);
        let b_keys = views(&permuted);
        let av: Vec<LayerView<f32>> =
            a_keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let bv: Vec<LayerView<f32>> =
            b_keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let a = run_cpu(&cfg, &sc, &av, 5000, 0).unwrap();
        let b = run_cpu(&cfg, &sc, &bv, 5000, 0).unwrap();
        for l in 0..2 {
            for h in 0..8 {
                for (dst, &src) in perm.iter().enumerate() {
                    assert_eq!(
                        a.raw[l][h * n + src].to_bits(),
                        b.raw[l][h * n + dst].to_bits(),
                        "raw must permute exactly"
                    );
                }
            }
        }
        for g in 0..hkv {
            let mut mapped: Vec<u32> = b.keep[g].iter().map(|&s| perm[s as usize] as u32).collect();
            mapped.sort_unstable();
            assert_eq!(mapped, a.keep[g], "keep sets must permute ({agg:?})");
        }
    }
}

#[test]
fn rounds_are_bit_identical_run_after_run() {
    let mut rng = Rng(2);
    let m = model(3, 8, 4, 128);
    let sc = scorer(&mut rng, &m);
    let (hkv, n, d) = (4, 777, 128);
    let keys: Vec<Vec<bf16>> = random_keys(&mut rng, 3, hkv * n * d)
        .into_iter()
        .map(|k| k.into_iter().map(bf16::from_f32).collect())
        .collect();
    let views: Vec<LayerView<bf16>> = keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
    for mode in [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union] {
        let mut cfg = CompressionConfig { budget: 500, mode, ..CompressionConfig::preset(Preset::Vllm) };
        cfg.score.aggregation = OffsetAggregation::Max;
        let a = run_cpu(&cfg, &sc, &views, 9000, 20).unwrap();
        let b = run_cpu(&cfg, &sc, &views, 9000, 20).unwrap();
        assert_eq!(a.keep, b.keep);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.score), bits(&b.score));
        for l in 0..3 {
            assert_eq!(bits(&a.raw[l]), bits(&b.raw[l]));
        }
    }
}

#[test]
fn identical_keys_tie_and_the_lower_slot_wins() {
    let mut rng = Rng(3);
    let m = model(1, 4, 1, 32);
    let sc = scorer(&mut rng, &m);
    let (n, d) = (64, 32);
    let mut keys = random_keys(&mut rng, 1, n * d).pop().unwrap();
    // Slots 10, 40 and 63 hold the same key; with every other key made much worse, a budget that
    // keeps exactly two of the three must keep 10 and 40.
    let good: Vec<f32> = keys[10 * d..11 * d].to_vec();
    for s in [40, 63] {
        keys[s * d..(s + 1) * d].copy_from_slice(&good);
    }
    let raw = {
        let v = vec![LayerView::contiguous("k", &keys, 1, n, d).unwrap()];
        run_cpu(&CompressionConfig { budget: n - 1, ..Default::default() }, &sc, &v, 1000, 0).unwrap().raw
    };
    for h in 0..4 {
        assert_eq!(raw[0][h * n + 10].to_bits(), raw[0][h * n + 40].to_bits());
        assert_eq!(raw[0][h * n + 10].to_bits(), raw[0][h * n + 63].to_bits());
    }
    // Scale every other key so that the three copies outrank or tie with them predictably:
    // rank them by their reduced score and pick a budget at the tie.
    let v = vec![LayerView::contiguous("k", &keys, 1, n, d).unwrap()];
    let cfg = CompressionConfig { budget: 1, normalization: Normalization::Off, ..Default::default() };
    let r = run_cpu(&cfg, &sc, &v, 1000, 0).unwrap();
    let tied = r.score[10];
    let above = r.score.iter().filter(|&&s| s > tied).count();
    let cfg = CompressionConfig { budget: above + 2, ..cfg };
    let r = run_cpu(&cfg, &sc, &v, 1000, 0).unwrap();
    assert!(r.keep[0].contains(&10) && r.keep[0].contains(&40) && !r.keep[0].contains(&63), "{:?}", r.keep[0]);
}

#[test]
fn nan_keys_rank_last() {
    let mut rng = Rng(4);
    let m = model(1, 2, 1, 32);
    let sc = scorer(&mut rng, &m);
    let (n, d) = (50, 32);
    let mut keys = random_keys(&mut rng, 1, n * d).pop().unwrap();
    keys[7 * d] = f32::NAN;
    let v = vec![LayerView::contiguous("k", &keys, 1, n, d).unwrap()];
    let r = run_cpu(&CompressionConfig { budget: n - 1, ..Default::default() }, &sc, &v, 100, 0).unwrap();
    assert!(r.score[7].is_nan());
    assert!(!r.keep[0].contains(&7));
    assert!(r.score.iter().enumerate().all(|(i, s)| i == 7 || s.is_finite()), "NaN must not leak into the z-score");
}

/// Simulated decode: every round leaves exactly `budget` slots, the cache never exceeds
/// `budget + divide_length`, protected slots survive, positions stay unique and ascending.
fn simulate(preset: Preset, mode: SelectionMode, tokens: usize, seed: u64) {
    let mut rng = Rng(seed);
    let m = model(2, 4, 2, 32);
    let sc = scorer(&mut rng, &m);
    let (budget, divide, prompt) = (96, 32, 40);
    let cfg = CompressionConfig {
        budget,
        divide_length: divide,
        mode,
        window: if preset == Preset::Vllm { 16 } else { 0 },
        ..CompressionConfig::preset(preset)
    };
    let comp = Compressor::new(cfg, sc).unwrap();
    let mut cache = KvCache::<f32>::new(2, 2, 32, 8, budget + divide + 1);
    let mut seq = SequenceState::new(2, 2, prompt);
    let mut rounds = 0;
    for t in 0..prompt + tokens {
        // vllm: the round runs before the step that writes token t.
        if preset == Preset::Vllm && t >= prompt && comp.round_due(&seq, 1) {
            check_round(&comp, &mut cache, &mut seq, &mut rounds);
        }
        let k: Vec<f32> = (0..2 * 2 * 32).map(|_| rng.normal() as f32).collect();
        // Values carry their position so that compaction can be checked against the positions.
        let v: Vec<f32> = vec![t as f32; 2 * 2 * 8];
        cache.push(&k, &v).unwrap();
        seq.advance(1);
        assert!(cache.len <= budget + divide, "cache grew past budget + divide_length");
        // paper: after the forward, never after the prompt.
        if preset == Preset::Paper && t >= prompt && comp.round_due(&seq, 0) {
            check_round(&comp, &mut cache, &mut seq, &mut rounds);
        }
    }
    assert!(rounds >= tokens / divide - 2, "only {rounds} rounds in {tokens} tokens");
}

fn check_round(comp: &Compressor, cache: &mut KvCache<f32>, seq: &mut SequenceState, rounds: &mut usize) {
    let cfg = *comp.config();
    let before = seq.positions.clone();
    let report = comp.compress(cache, seq).unwrap();
    *rounds += 1;
    assert!(matches!(report.round.outcome, RoundOutcome::Compressed { .. }), "{:?}", report.round.outcome);
    assert_eq!(cache.len, cfg.budget);
    for (row, (pos, old)) in seq.positions.iter().zip(&before).enumerate() {
        assert_eq!(pos.len(), cfg.budget);
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "row {row}: positions must stay ascending and unique");
        if cfg.prefix == PrefixProtection::Protected {
            assert!((0..seq.prompt_len as u64).all(|p| pos.contains(&p)), "row {row}: prompt evicted");
        }
        for p in &old[old.len() - cfg.window..] {
            assert!(pos.contains(p), "row {row}: window position {p} evicted");
        }
    }
    // K and V moved with their positions: slot i of every row holds the value written at its position.
    let (hkv, cap, dv) = (cache.num_kv_heads, cache.capacity, cache.value_dim);
    for l in 0..cache.num_layers {
        for g in 0..hkv {
            for (i, &p) in seq.positions[l * hkv + g].iter().enumerate() {
                assert_eq!(cache.v[l][(g * cap + i) * dv], p as f32, "layer {l} head {g} slot {i}");
            }
        }
    }
}

#[test]
fn decode_invariants_paper_per_head() {
    simulate(Preset::Paper, SelectionMode::PerHead, 3000, 10);
}

#[test]
fn decode_invariants_vllm_per_layer_per_head() {
    simulate(Preset::Vllm, SelectionMode::PerLayerPerHead, 3000, 11);
}

#[test]
fn decode_invariants_paper_union() {
    simulate(Preset::Paper, SelectionMode::Union, 2000, 12);
}

#[test]
fn protected_slots_reaching_the_budget_skip_the_round() {
    let mut rng = Rng(5);
    let m = model(1, 2, 1, 32);
    let sc = scorer(&mut rng, &m);
    let (n, d) = (80, 32);
    let keys = random_keys(&mut rng, 1, n * d).pop().unwrap();
    let v = vec![LayerView::contiguous("k", &keys, 1, n, d).unwrap()];
    let r = run_cpu(&CompressionConfig { budget: 50, ..Default::default() }, &sc, &v, 100, 50).unwrap();
    assert!(matches!(r.outcome, RoundOutcome::Skipped(_)));
    assert_eq!(r.keep[0].len(), n);
}

/// `triattn::evict` (a selection made elsewhere) compacts every (layer, KV head) row by its own
/// keep list in slot order, updates the positions, and refuses bad lists by name with nothing
/// moved.
#[test]
fn evict_keeps_the_given_rows_and_refuses_bad_lists() {
    let (layers, hkv, d, n) = (2, 3, 4, 10);
    let mut cache = KvCache::<f32>::new(layers, hkv, d, d, 16);
    let mut seq = SequenceState::new(layers, hkv, 2);
    for t in 0..n {
        let k: Vec<f32> = (0..layers * hkv * d).map(|i| (t * 1000 + i) as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        cache.push(&k, &v).unwrap();
        seq.advance(1);
    }
    let before = cache.clone();
    let keep: Vec<Vec<u32>> = (0..layers * hkv).map(|r| vec![0, (r % 5) as u32 + 1, 7, 9]).collect();
    for (bad, what) in [
        (keep[..5].to_vec(), "keep rows"),
        (
            vec![vec![0, 1, 2]; 6].into_iter().enumerate().map(|(i, r)| if i == 4 { vec![0, 1] } else { r }).collect(),
            "keep row 4",
        ),
        (vec![vec![0, 3, 3, 9]; 6], "keep row 0"),
        (vec![vec![0, 3, 5, 10]; 6], "keep row 0"),
    ] {
        let e = triattn::evict(&mut cache, &mut seq, &bad).unwrap_err();
        assert!(e.message().starts_with(what), "{}", e.message());
        assert_eq!(cache.k, before.k, "nothing moved on {what}");
        assert_eq!(seq.len(), n);
    }
    triattn::evict(&mut cache, &mut seq, &keep).unwrap();
    assert_eq!(cache.len, 4);
    for l in 0..layers {
        for g in 0..hkv {
            let row = &keep[l * hkv + g];
            assert_eq!(seq.positions[l * hkv + g], row.iter().map(|&s| s as u64).collect::<Vec<_>>());
            for (i, &s) in row.iter().enumerate() {
                let src = &before.k[l][(g * 16 + s as usize) * d..][..d];
                assert_eq!(&cache.k[l][(g * 16 + i) * d..][..d], src, "layer {l} head {g} slot {i}");
                let src = &before.v[l][(g * 16 + s as usize) * d..][..d];
                assert_eq!(&cache.v[l][(g * 16 + i) * d..][..d], src);
            }
        }
    }
}

/// The CPU scoring kernels (portable, AVX2, AVX-512: whichever this CPU runs) give bit-identical
/// raw scores: every dtype, head_dim 64/96/128/256, both pairing styles, mean, max and no trig
/// term, row counts that leave a short last block, NaN and infinite keys.
#[test]
fn cpu_score_kernels_are_bit_identical() {
    use triattn::cpu::score::{score_layer_with, ScoreKernel};
    use triattn::score::{ScoreConfig, TrigTerm};
    fn run<T: triattn::Element>(rng: &mut Rng, d: usize, style: PairingStyle) -> usize {
        let available = ScoreKernel::available(d);
        let m = model(2, 8, 2, d);
        let scorer = Scorer::new(m.clone(), random_stats(rng, &m, style), Some(style)).unwrap();
        let n = 37 + rng.below(300);
        let mut keys: Vec<T> = (0..2 * n * d).map(|_| T::from_f32((rng.normal() * 3.0) as f32)).collect();
        keys[5] = T::from_f32(f32::NAN);
        keys[d * 7 + 3] = T::from_f32(f32::INFINITY);
        let view = LayerView::contiguous("k", &keys, 2, n, d).unwrap();
        let mut checked = 0;
        for config in [
            ScoreConfig { aggregation: OffsetAggregation::Mean, ..ScoreConfig::default() },
            ScoreConfig { aggregation: OffsetAggregation::Max, ..ScoreConfig::default() },
            ScoreConfig { trig: TrigTerm::Excluded, ..ScoreConfig::default() },
        ] {
            let w = scorer.weights(5000, &config).unwrap();
            let mut want = vec![0f32; 8 * n];
            score_layer_with(ScoreKernel::Portable, &w, 1, &view, style, &mut want).unwrap();
            for &k in &available {
                let mut got = vec![0f32; 8 * n];
                score_layer_with(k, &w, 1, &view, style, &mut got).unwrap();
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} vs portable: {} d{d} {style:?} {config:?}", k.name(), T::DTYPE);
                checked += 1;
            }
        }
        checked
    }
    let mut rng = Rng(99);
    let mut checked = 0;
    for d in [64, 96, 128, 256] {
        for style in [PairingStyle::Half, PairingStyle::Interleaved] {
            checked += run::<f32>(&mut rng, d, style);
            checked += run::<half::f16>(&mut rng, d, style);
            checked += run::<bf16>(&mut rng, d, style);
        }
    }
    eprintln!(
        "CPU score kernels on this machine: {:?}",
        ScoreKernel::available(128).iter().map(|k| k.name()).collect::<Vec<_>>()
    );
    assert!(checked >= 72, "{checked} comparisons");
    let w = {
        let m = model(1, 2, 1, 64);
        let s = Scorer::new(m.clone(), random_stats(&mut rng, &m, PairingStyle::Half), None).unwrap();
        s.weights(100, &ScoreConfig::default()).unwrap()
    };
    let keys = vec![0f32; 3 * 64];
    let view = LayerView::contiguous("k", &keys, 1, 3, 64).unwrap();
    for k in [ScoreKernel::Avx2, ScoreKernel::Avx512] {
        if !k.supports(64) {
            let e = score_layer_with(k, &w, 0, &view, PairingStyle::Half, &mut [0f32; 6]).unwrap_err().to_string();
            assert!(e.contains(k.name()), "{e}");
        }
    }
}
