//! Criterion benchmark of CPU scoring (`cpu::score::score_layer`) on Qwen3-8B shapes.
//!
//! Four layers of Qwen3-8B (32 heads, 8 KV heads, head_dim 128, N = 2176 slots, bf16 keys) scored
//! with the real statistics, mean and max aggregation, plus a memcpy of the same number of bytes
//! in the same group as the bandwidth ceiling (one thread, and rayon chunks on every thread). Throughput is the key bytes read per iteration.
//! Before timing, one small case is checked against a plain f64 computation of the score.
//!
//! `cargo bench --bench score` (short by default: 10 samples, 3 s each); `triattn bench` reports
//! the same measurement for all 36 layers with ratios.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use triattn::io::TensorFile;
use triattn::round::Scorer;
use triattn::score::{OffsetAggregation, RoundWeights, ScoreConfig};
use triattn::stats::Stats;
use triattn::LayerView;
use triattn::ModelConfig;

const STATS: &[u8] = include_bytes!("../data/qwen3_8b.safetensors");
const CONFIG: &str = include_str!("../data/qwen3_8b.config.json");

const LAYERS: usize = 4;
const N: usize = 2176;
const ROUND_START: u64 = 32_768;

fn scorer() -> Scorer {
    let model = ModelConfig::from_json_str(CONFIG).expect("embedded config");
    let stats = Stats::from_tensor_file(&TensorFile::parse(STATS).expect("embedded stats")).expect("stats");
    Scorer::new(model, stats, None).expect("stats match the model")
}

/// splitmix64 noise in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// `[Hkv, n, D]` keys per layer: a centre per (layer, KV head) plus noise.
fn keys(layers: usize, hkv: usize, n: usize, d: usize) -> Vec<Vec<bf16>> {
    let mut rng = Rng(0x5c0e);
    (0..layers)
        .map(|_| {
            let mut k = Vec::with_capacity(hkv * n * d);
            for _ in 0..hkv {
                let centre: Vec<f32> = (0..d).map(|_| 2.0 * rng.next()).collect();
                for _ in 0..n {
                    k.extend(centre.iter().map(|c| bf16::from_f32(c + 0.5 * rng.next())));
                }
            }
            k
        })
        .collect()
}

/// The raw score of one key for one head, in f64, straight from the weights (§9.1, §9.2).
fn plain_score(w: &RoundWeights, layer: usize, head: usize, k: &[f64]) -> f64 {
    let (d, f) = (w.head_dim, w.head_dim / 2);
    let c = w.head_norm(layer, head);
    // Half pairing (Qwen3): pair p is (k[p], k[p + F]).
    let e: f64 = (0..f).map(|p| (k[p] * k[p] + k[p + f] * k[p + f]).sqrt() * c[p] as f64).sum();
    let ws = w.head_weights(layer, head);
    let trig = (0..w.vectors_per_head)
        .map(|j| (0..d).map(|i| k[i] * ws[j * d + i] as f64).sum::<f64>())
        .fold(f64::NEG_INFINITY, f64::max);
    trig + e
}

/// A small case (2 layers, 37 slots) against [`plain_score`], mean and max.
fn check(s: &Scorer) {
    let m = &s.model;
    let (h, hkv, d, n) = (m.num_heads, m.num_kv_heads, m.head_dim, 37);
    let ks = keys(2, hkv, n, d);
    for agg in [OffsetAggregation::Mean, OffsetAggregation::Max] {
        let w = s.weights(ROUND_START, &ScoreConfig { aggregation: agg, ..ScoreConfig::default() }).unwrap();
        for (layer, k) in ks.iter().enumerate() {
            let view = LayerView::contiguous("k", k, hkv, n, d).unwrap();
            let mut out = vec![0f32; h * n];
            triattn::cpu::score::score_layer(&w, layer, &view, s.style, &mut out).unwrap();
            for head in 0..h {
                let g = head / (h / hkv);
                for slot in 0..n {
                    let row: Vec<f64> = view.row(g, slot).iter().map(|x| x.to_f32() as f64).collect();
                    let want = plain_score(&w, layer, head, &row);
                    let got = out[head * n + slot] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{agg:?} layer {layer} head {head} slot {slot}: got {got}, want {want}"
                    );
                }
            }
        }
    }
}

fn bench_score(c: &mut Criterion) {
    let s = scorer();
    check(&s);
    let m = &s.model;
    let (h, hkv, d) = (m.num_heads, m.num_kv_heads, m.head_dim);
    let ks = keys(LAYERS, hkv, N, d);
    let views: Vec<LayerView<'_, bf16>> =
        ks.iter().map(|k| LayerView::contiguous("k", k, hkv, N, d).unwrap()).collect();
    let bytes = LAYERS * hkv * N * d * std::mem::size_of::<bf16>();
    let mut raw = vec![vec![0f32; h * N]; LAYERS];

    let mut group = c.benchmark_group(format!("score_qwen3_8b_{LAYERS}layers_n{N}_bf16"));
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, agg) in [("mean", OffsetAggregation::Mean), ("max", OffsetAggregation::Max)] {
        let w = s.weights(ROUND_START, &ScoreConfig { aggregation: agg, ..ScoreConfig::default() }).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                for (layer, (k, out)) in views.iter().zip(raw.iter_mut()).enumerate() {
                    triattn::cpu::score::score_layer(&w, layer, k, s.style, out).unwrap();
                }
                black_box(&mut raw);
            })
        });
    }
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    let threads = rayon::current_num_threads();
    let chunk = bytes.div_ceil(threads).div_ceil(64) * 64;
    group.bench_function(format!("memcpy_{threads}threads"), |b| {
        use rayon::prelude::*;
        b.iter(|| {
            dst.par_chunks_mut(chunk).zip(black_box(&src).par_chunks(chunk)).for_each(|(o, i)| o.copy_from_slice(i));
            black_box(&mut dst);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_score);
criterion_main!(benches);
