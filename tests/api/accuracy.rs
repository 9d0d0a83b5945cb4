//! CPU scores against a direct float64 transcription of ALGORITHM.md §2.2 (the K_rot form,
//! per-pair trigonometry, no folding), on real Qwen3-8B statistics at a large `round_start`.

use crate::common;

use common::Rng;
use half::bf16;
use triattn::cpu::score::score_layer;
use triattn::score::{geometric_offsets, OffsetAggregation, ScoreConfig};
use triattn::{LayerView, ModelConfig, PairingStyle, Stats};

#[allow(clippy::too_many_arguments)]
/// score(k̃) = AGG_j Σ_f σ (A_f cos(t_j ω_f) − B_f sin(t_j ω_f)) + Σ_f σ c_f |k̃_f|, in f64.
fn reference(
    stats: &Stats,
    omega: &[f64],
    sigma: f64,
    layer: usize,
    head: usize,
    key: &[f64],
    r: u64,
    agg: OffsetAggregation,
) -> f64 {
    let f_count = stats.freq_count();
    let base = stats.offset(layer, head);
    let offsets = geometric_offsets(65536).unwrap();
    let mut trig = Vec::new();
    let mut norm = 0f64;
    for f in 0..f_count {
        let (kr, ki) = (key[f], key[f + f_count]);
        let (qr, qi) = (stats.q_mean_real[base + f] as f64, stats.q_mean_imag[base + f] as f64);
        norm += sigma * (stats.q_abs_mean[base + f] as f64 - qr.hypot(qi)) * kr.hypot(ki);
    }
    for &o in &offsets {
        let t = (r + o) as f64;
        let mut s = 0f64;
        for f in 0..f_count {
            let (kr, ki) = (key[f], key[f + f_count]);
            let (qr, qi) = (stats.q_mean_real[base + f] as f64, stats.q_mean_imag[base + f] as f64);
            let (a, b) = (qr * kr + qi * ki, qi * kr - qr * ki);
            s += sigma * (a * (t * omega[f]).cos() - b * (t * omega[f]).sin());
        }
        trig.push(s);
    }
    let agg = match agg {
        OffsetAggregation::Mean => trig.iter().sum::<f64>() / trig.len() as f64,
        OffsetAggregation::Max => trig.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    };
    agg + norm
}

#[test]
fn cpu_scores_match_float64_within_a_few_millionths_of_the_row_std() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    let model = ModelConfig::from_file(dir.join("qwen3_8b.config.json")).unwrap();
    let stats = Stats::load(dir.join("qwen3_8b.safetensors")).unwrap();
    let omega = model.omega();
    let (hkv, n, d, layer) = (8, 257, 128, 17);
    let mut rng = Rng(99);
    // Concentrated keys: a common centre per head plus noise, stored as bf16.
    let centre: Vec<f64> = (0..hkv * d).map(|_| rng.normal() * 3.0).collect();
    let keys: Vec<bf16> =
        (0..hkv * n * d).map(|i| bf16::from_f64(centre[(i / (n * d)) * d + i % d] + rng.normal())).collect();
    let view = LayerView::contiguous("k", &keys, hkv, n, d).unwrap();
    for agg in [OffsetAggregation::Mean, OffsetAggregation::Max] {
        let config = ScoreConfig { aggregation: agg, ..Default::default() };
        let r = 31_337;
        let weights = triattn::score::RoundWeights::build(&stats, PairingStyle::Half, &omega, 1.0, r, &config).unwrap();
        let mut out = vec![0f32; 32 * n];
        score_layer(&weights, layer, &view, PairingStyle::Half, &mut out).unwrap();
        let mut worst = 0f64;
        for h in 0..32 {
            let g = h / 4;
            let exact: Vec<f64> = (0..n)
                .map(|s| {
                    let key: Vec<f64> = keys[(g * n + s) * d..(g * n + s + 1) * d].iter().map(|x| x.to_f64()).collect();
                    reference(&stats, &omega, 1.0, layer, h, &key, r, agg)
                })
                .collect();
            let mean = exact.iter().sum::<f64>() / n as f64;
            let std = (exact.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
            for s in 0..n {
                worst = worst.max((out[h * n + s] as f64 - exact[s]).abs() / std);
            }
        }
        eprintln!("{agg:?}: max |cpu - f64| = {worst:.2e} of the row std");
        assert!(worst < 1e-5, "{agg:?}: {worst:.2e} of the row std");
    }
}
