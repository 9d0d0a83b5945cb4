//! GPU scoring throughput against a device-to-device copy measured in the same run.
//!
//! `cargo bench --features cuda --bench score_gpu` (scripts/gpu-check.sh runs the built binary).
//! Shapes are Qwen3-8B-like (L = 36, H = 32, Hkv = 8, D = 128, bf16 keys). Each shape is checked
//! against the CPU backend on one layer before it is timed; times are CUDA-event device times,
//! the median of 5 batches of 10 launches after warm-up. Prints one table; exits 0 with a SKIP
//! line when there is no GPU (1 when `TRIATTN_REQUIRE_GPU` is set).

#[path = "../tests/common/mod.rs"]
mod common;

use common::Rng;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use triattn::cuda::CudaBackend;
use triattn::kernels::weight_levels;
use triattn::kernels::{
    KeyLayout, RowPartial, ScoreAddresses, ScoreShape, ScoreSpec, TrigAddresses, TrigSpec, WeightsScope,
};
use triattn::score::{NormTerm, OffsetAggregation, RoundWeights, ScoreConfig};
use triattn::{cpu, LayerView, PairingStyle, Stats};

fn main() {
    let gpu = match CudaBackend::probe(0) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP score_gpu: {e}");
            std::process::exit(if std::env::var_os("TRIATTN_REQUIRE_GPU").is_some() { 1 } else { 0 });
        }
    };
    let stream = gpu.context().default_stream();
    let (layers, heads, kv, d) = (36usize, 32usize, 8usize, 128usize);
    let f = d / 2;
    let mut rng = Rng(42);
    let n_stats = layers * heads * f;
    let qr: Vec<f32> = (0..n_stats).map(|_| rng.unit()).collect();
    let qi: Vec<f32> = (0..n_stats).map(|_| rng.unit()).collect();
    let qa: Vec<f32> = (0..n_stats).map(|i| (qr[i] * qr[i] + qi[i] * qi[i]).sqrt() + 0.3).collect();
    let stats = Stats {
        num_layers: layers,
        num_heads: heads,
        head_dim: d,
        rope_style: PairingStyle::Half,
        q_mean_real: qr,
        q_mean_imag: qi,
        q_abs_mean: qa,
        sampled_heads: None,
        metadata: Default::default(),
    };
    let omega: Vec<f64> = (0..f).map(|i| 1e6f64.powf(-2.0 * i as f64 / d as f64)).collect();
    println!("device sm_{}; median of 5 x 10 launches; bandwidth = bytes moved / device time", gpu.arch());
    println!("{:<34} {:>10} {:>10} {:>10} {:>10} {:>8}", "case", "MB", "time_us", "GB/s", "copy_GB/s", "ratio");
    for n in [2176usize, 4096, 8192] {
        let per_layer = kv * n * d;
        let host: Vec<bf16> = (0..per_layer).map(|i| bf16::from_f32((i % d) as f32 * 0.01 + rng.unit())).collect();
        let layer_keys: Vec<CudaSlice<bf16>> = (0..layers).map(|_| stream.clone_htod(&host).unwrap()).collect();
        let addrs: Vec<u64> = layer_keys.iter().map(|k| k.device_ptr(&stream).0).collect();
        let key_table = stream.clone_htod(&addrs).unwrap();
        let key_bytes = (layers * per_layer * 2) as f64;

        // Copy ceiling: read + write of the same bytes, one layer buffer at a time.
        let mut copies: Vec<CudaSlice<bf16>> = (0..layers).map(|_| stream.alloc_zeros(per_layer).unwrap()).collect();
        let copy_ms = common::gpu_time_ms(&stream, || {
            for (src, dst) in layer_keys.iter().zip(copies.iter_mut()) {
                stream.memcpy_dtod(src, dst).unwrap();
            }
        });
        let copy_gbs = 2.0 * key_bytes / (copy_ms * 1e-3) / 1e9;
        drop(copies);

        for aggregation in [OffsetAggregation::Mean, OffsetAggregation::Max] {
            let cfg = ScoreConfig { aggregation, ..ScoreConfig::default() };
            let w = RoundWeights::build(&stats, PairingStyle::Half, &omega, 1.0, n as u64 + 100, &cfg).unwrap();
            let spec = ScoreSpec::new(ScoreShape {
                dtype: triattn::DType::Bf16,
                head_dim: d,
                num_layers: layers,
                num_heads: heads,
                num_kv_heads: kv,
                num_seqs: 1,
                max_len: n,
                vectors: w.vectors_per_head,
                aggregation,
                style: PairingStyle::Half,
                layout: KeyLayout::Contiguous { head_stride: n * d, row_stride: d },
                weights: WeightsScope::Shared,
            })
            .unwrap();
            let weights = stream.clone_htod(&w.weights).unwrap();
            let levels = stream.clone_htod(&weight_levels(&w.weights, w.vectors_per_head, d)).unwrap();
            let norm = stream.clone_htod(&w.norm).unwrap();
            let seq_lens = stream.clone_htod(&[n as i32]).unwrap();
            let mut raw = stream.alloc_zeros::<f32>(spec.raw_len()).unwrap();
            let mut partials = stream.alloc_zeros::<RowPartial>(spec.partials_len()).unwrap();
            let at = ScoreAddresses {
                keys: key_table.device_ptr(&stream).0,
                weights: if spec.weights_are_levels() {
                    levels.device_ptr(&stream).0
                } else {
                    weights.device_ptr(&stream).0
                },
                norm: norm.device_ptr(&stream).0,
                block_table: 0,
                seq_lens: seq_lens.device_ptr(&stream).0,
                stat_start: 0,
                stat_end: 0,
                raw: raw.device_ptr_mut(&stream).0,
                partials: partials.device_ptr_mut(&stream).0,
            };
            let launch = || {
                // SAFETY: every address comes from a live buffer of the length the spec needs;
                // all work is on `stream`.
                unsafe { gpu.launch_score_raw(&spec, &at, stream.cu_stream()).unwrap() }
            };
            // Answer check: layer 7 against the CPU backend.
            launch();
            let got = stream.clone_dtoh(&raw).unwrap();
            let view = LayerView::contiguous("k", &host, kv, n, d).unwrap();
            let mut want = vec![0f32; heads * n];
            cpu::score::score_layer(&w, 7, &view, PairingStyle::Half, &mut want).unwrap();
            let got7 = &got[7 * heads * n..8 * heads * n];
            let sd = {
                let m = want.iter().map(|&x| x as f64).sum::<f64>() / want.len() as f64;
                (want.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / want.len() as f64).sqrt()
            };
            let worst = got7.iter().zip(&want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max) / sd;
            assert!(worst < 1e-5, "score_gpu: {aggregation:?} N={n}: |cuda - cpu| = {worst:.2e} std");

            let ms = common::gpu_time_ms(&stream, launch);
            let bytes = key_bytes + (spec.raw_len() * 4 + spec.partials_len() * 16) as f64;
            let gbs = bytes / (ms * 1e-3) / 1e9;
            println!(
                "{:<34} {:>10.1} {:>10.1} {:>10.0} {:>10.0} {:>8.3}",
                format!("score/cuda/bf16/{aggregation:?}/n{n}"),
                bytes / 1e6,
                ms * 1e3,
                gbs,
                copy_gbs,
                gbs / copy_gbs
            );
        }
    }

    // The trig kernel (one round, mean and max weights).
    for (vectors, name) in [(1usize, "mean"), (17, "max")] {
        let spec = TrigSpec {
            num_layers: layers,
            num_heads: heads,
            head_dim: d,
            num_seqs: 1,
            num_offsets: 17,
            vectors,
            style: PairingStyle::Half,
            sigma: 1.0,
            norm: NormTerm::MeanResidual,
        };
        let qr = stream.clone_htod(&stats.q_mean_real).unwrap();
        let qi = stream.clone_htod(&stats.q_mean_imag).unwrap();
        let qa = stream.clone_htod(&stats.q_abs_mean).unwrap();
        let om = stream.clone_htod(&omega).unwrap();
        let r = stream.clone_htod(&[30_000i64]).unwrap();
        // Mean: f32 vectors; max: the u16 level image (same byte budget either way here).
        let mut weights = stream.alloc_zeros::<u16>(2 * spec.weights_len()).unwrap();
        let mut norm = stream.alloc_zeros::<f32>(spec.stats_len()).unwrap();
        let at = TrigAddresses {
            q_mean_real: qr.device_ptr(&stream).0,
            q_mean_imag: qi.device_ptr(&stream).0,
            q_abs_mean: qa.device_ptr(&stream).0,
            omega: om.device_ptr(&stream).0,
            round_start: r.device_ptr(&stream).0,
            weights: weights.device_ptr_mut(&stream).0,
            norm: norm.device_ptr_mut(&stream).0,
        };
        // SAFETY: live buffers of the lengths TrigSpec documents, all on `stream`.
        let ms =
            common::gpu_time_ms(&stream, || unsafe { gpu.launch_trig_raw(&spec, &at, stream.cu_stream()).unwrap() });
        println!("{:<34} {:>10} {:>10.1}", format!("score_trig/cuda/f64/{name}"), "-", ms * 1e3);
    }
}
