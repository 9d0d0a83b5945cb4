//! CUDA against the CPU backend, every variant, on a real GPU (`scripts/gpu-check.sh`).
//!
//! Without a GPU these tests skip loudly; with `TRIATTN_REQUIRE_GPU` set a skip is a failure.
#![cfg(feature = "cuda")]

use crate::common;

use std::sync::Arc;

use common::{gpu_or_skip, omega, random_stats, std_dev, Rng};
use half::{bf16, f16};
use triattn::cpu;
use triattn::cuda::{CudaBackend, PageOrder};
use triattn::kernels::variant::{self, Kernel, HEAD_DIMS};
use triattn::kernels::{weight_levels, weights_from_levels};
use triattn::kernels::{KeyLayout, RowPartial, ScoreShape, ScoreSpec, TrigAddresses, TrigSpec, WeightsScope};
use triattn::kernels::{ScoreBuffers, WeightsBuffer};
use triattn::score::{OffsetAggregation, RoundWeights, ScoreConfig};
use triattn::ErrorKind;
use triattn::{Element, LayerView, PairingStyle};

#[test]
fn probe_without_gpu_is_an_error_not_a_panic() {
    match CudaBackend::probe(0) {
        Ok(b) => eprintln!("GPU present: sm_{}", b.arch()),
        Err(e) => assert!(matches!(e.kind(), ErrorKind::NoDevice | ErrorKind::Driver), "{e}"),
    }
}

/// One (dtype, head_dim, aggregation, style) case: CUDA raw scores and partials vs the CPU.
fn check<T: Element + cudarc::driver::DeviceRepr>(
    gpu: &CudaBackend,
    stream: &Arc<cudarc::driver::CudaStream>,
    d: usize,
    aggregation: OffsetAggregation,
    style: PairingStyle,
    layout: Option<(usize, PageOrder)>,
) -> f64 {
    let (layers, heads, kv, n) = (2, 8, 2, 515);
    let st = random_stats(layers, heads, d, d as u64);
    let cfg = ScoreConfig { aggregation, ..ScoreConfig::default() };
    let w = RoundWeights::build(&st, style, &omega(d), 1.21, 31_337, &cfg).unwrap();
    let mut rng = Rng(7 + d as u64);
    let centre: Vec<f32> = (0..d).map(|_| rng.unit() * 3.0).collect();
    let dense: Vec<Vec<T>> =
        (0..layers).map(|_| (0..kv * n * d).map(|i| T::from_f32(centre[i % d] + rng.unit())).collect()).collect();
    let (spec_layout, host_keys, table) = match layout {
        None => (KeyLayout::Contiguous { head_stride: n * d, row_stride: d }, dense.clone(), vec![]),
        Some((bs, order)) => {
            let max_blocks = n.div_ceil(bs);
            let num_blocks = max_blocks + 1;
            let table: Vec<i32> = (0..max_blocks).map(|b| ((b * 5 + 1) % num_blocks) as i32).collect();
            let pools = dense
                .iter()
                .map(|k| {
                    let mut pool = vec![T::from_f32(0.0); num_blocks * bs * kv * d];
                    for g in 0..kv {
                        for r in 0..n {
                            let blk = table[r / bs] as usize;
                            let at = match order {
                                PageOrder::Nhd => ((blk * bs + r % bs) * kv + g) * d,
                                PageOrder::Hnd => ((blk * kv + g) * bs + r % bs) * d,
                            };
                            pool[at..at + d].copy_from_slice(&k[(g * n + r) * d..][..d]);
                        }
                    }
                    pool
                })
                .collect();
            (KeyLayout::Paged { block_size: bs, order, num_blocks, max_blocks }, pools, table)
        }
    };
    let spec = ScoreSpec::new(ScoreShape {
        dtype: T::DTYPE,
        head_dim: d,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        num_seqs: 1,
        max_len: n,
        vectors: w.vectors_per_head,
        aggregation,
        style,
        layout: spec_layout,
        weights: WeightsScope::Shared,
    })
    .unwrap();
    let dev_keys: Vec<_> = host_keys.iter().map(|k| stream.clone_htod(k).unwrap()).collect();
    let addrs: Vec<u64> = dev_keys
        .iter()
        .map(|k| {
            use cudarc::driver::DevicePtr;
            k.device_ptr(stream).0
        })
        .collect();
    let key_table = stream.clone_htod(&addrs).unwrap();
    let weights = stream.clone_htod(if w.weights.is_empty() { &[0f32][..] } else { &w.weights[..] }).unwrap();
    let levels = stream.clone_htod(&weight_levels(&w.weights, w.vectors_per_head.max(1), d)).unwrap();
    let norm = stream.clone_htod(&w.norm).unwrap();
    let seq_lens = stream.clone_htod(&[n as i32]).unwrap();
    let bt = if table.is_empty() { None } else { Some(stream.clone_htod(&table).unwrap()) };
    let mut raw = stream.alloc_zeros::<f32>(spec.raw_len()).unwrap();
    let mut partials = stream.alloc_zeros::<RowPartial>(spec.partials_len()).unwrap();
    // SAFETY: the key table holds the addresses of `dev_keys`, which hold every row reached.
    unsafe {
        gpu.score(
            stream,
            &spec,
            ScoreBuffers {
                keys: &key_table,
                weights: if spec.weights_are_levels() {
                    WeightsBuffer::Levels(&levels)
                } else {
                    WeightsBuffer::Vectors(&weights)
                },
                norm: &norm,
                block_table: bt.as_ref(),
                seq_lens: &seq_lens,
                stat_start: None,
                stat_end: None,
                raw: &mut raw,
                partials: Some(&mut partials),
            },
        )
        .unwrap();
    }
    let got = stream.clone_dtoh(&raw).unwrap();
    let parts = stream.clone_dtoh(&partials).unwrap();
    let mut worst = 0f64;
    for l in 0..layers {
        let view = LayerView::contiguous("k", &dense[l], kv, n, d).unwrap();
        let mut want = vec![0f32; heads * n];
        cpu::score::score_layer(&w, l, &view, style, &mut want).unwrap();
        for h in 0..heads {
            let (g_row, w_row) = (&got[(l * heads + h) * n..][..n], &want[h * n..][..n]);
            let sd = std_dev(w_row);
            for (a, b) in g_row.iter().zip(w_row) {
                worst = worst.max((*a as f64 - *b as f64).abs() / sd);
            }
            let tiles = spec.num_tiles();
            let c = RowPartial::combine(&parts[(l * heads + h) * tiles..][..tiles]);
            assert_eq!(c.count as usize, n);
            assert!(((c.m2 / c.count).sqrt() - sd).abs() <= 1e-4 * sd);
        }
    }
    worst
}

#[test]
fn cuda_score_every_variant_matches_cpu() {
    let Some(gpu) = gpu_or_skip("cuda_score_every_variant_matches_cpu") else { return };
    let stream = gpu.context().default_stream();
    for v in variant::table() {
        let Kernel::Score { dtype, head_dim, algo, .. } = v.kernel else { continue };
        let aggregation = match algo {
            variant::ScoreAlgo::Mean => OffsetAggregation::Mean,
            variant::ScoreAlgo::Max => OffsetAggregation::Max,
        };
        let mut worst = 0f64;
        for style in [PairingStyle::Half, PairingStyle::Interleaved] {
            worst = worst.max(match dtype {
                triattn::DType::F32 => check::<f32>(&gpu, &stream, head_dim, aggregation, style, None),
                triattn::DType::F16 => check::<f16>(&gpu, &stream, head_dim, aggregation, style, None),
                triattn::DType::Bf16 => check::<bf16>(&gpu, &stream, head_dim, aggregation, style, None),
            });
        }
        println!("parity {:<48} worst |cuda - cpu| = {worst:.2e} std", v.symbol());
        assert!(worst <= 8e-6, "{}: {worst:.3e} std", v.symbol());
    }
    assert!(HEAD_DIMS.contains(&128));
}

#[test]
fn cuda_score_paged_matches_cpu() {
    let Some(gpu) = gpu_or_skip("cuda_score_paged_matches_cpu") else { return };
    let stream = gpu.context().default_stream();
    for (bs, order) in [(16, PageOrder::Nhd), (256, PageOrder::Hnd), (64, PageOrder::Nhd)] {
        let a = check::<bf16>(&gpu, &stream, 128, OffsetAggregation::Mean, PairingStyle::Half, Some((bs, order)));
        let b = check::<f16>(&gpu, &stream, 128, OffsetAggregation::Max, PairingStyle::Half, Some((bs, order)));
        println!("parity paged bs{bs} {order:?}: mean {a:.2e} max {b:.2e} std");
        assert!(a <= 8e-6 && b <= 8e-6);
    }
}

#[test]
fn cuda_trig_reads_round_start_from_device_memory() {
    let Some(gpu) = gpu_or_skip("cuda_trig_reads_round_start_from_device_memory") else { return };
    let stream = gpu.context().default_stream();
    let (layers, heads, d) = (3, 4, 128);
    let st = random_stats(layers, heads, d, 3);
    for aggregation in [OffsetAggregation::Mean, OffsetAggregation::Max] {
        let cfg = ScoreConfig { aggregation, ..ScoreConfig::default() };
        let vectors = if aggregation == OffsetAggregation::Mean { 1 } else { 17 };
        let spec = TrigSpec {
            num_layers: layers,
            num_heads: heads,
            head_dim: d,
            num_seqs: 1,
            num_offsets: 17,
            vectors,
            style: PairingStyle::Half,
            sigma: 1.44,
            norm: cfg.norm,
        };
        let qr = stream.clone_htod(&st.q_mean_real).unwrap();
        let qi = stream.clone_htod(&st.q_mean_imag).unwrap();
        let qa = stream.clone_htod(&st.q_abs_mean).unwrap();
        let om = stream.clone_htod(&omega(d)).unwrap();
        let mut r = stream.clone_htod(&[30_000i64]).unwrap();
        let mut weights = stream.alloc_zeros::<f32>(if vectors == 1 { spec.weights_len() } else { 1 }).unwrap();
        let mut image = stream.alloc_zeros::<u16>(if vectors > 1 { spec.weights_len() } else { 1 }).unwrap();
        let mut norm = stream.alloc_zeros::<f32>(spec.stats_len()).unwrap();
        for round_start in [30_000i64, 30_128, 1_000_000] {
            stream.memcpy_htod(&[round_start], &mut r).unwrap();
            use cudarc::driver::{DevicePtr, DevicePtrMut};
            let at = TrigAddresses {
                q_mean_real: qr.device_ptr(&stream).0,
                q_mean_imag: qi.device_ptr(&stream).0,
                q_abs_mean: qa.device_ptr(&stream).0,
                omega: om.device_ptr(&stream).0,
                round_start: r.device_ptr(&stream).0,
                weights: if vectors == 1 { weights.device_ptr_mut(&stream).0 } else { image.device_ptr_mut(&stream).0 },
                norm: norm.device_ptr_mut(&stream).0,
            };
            // SAFETY: every buffer has the length TrigSpec documents, on this context.
            unsafe { gpu.launch_trig_raw(&spec, &at, stream.cu_stream()).unwrap() };
            let got = if vectors == 1 {
                stream.clone_dtoh(&weights).unwrap()
            } else {
                weights_from_levels(&stream.clone_dtoh(&image).unwrap(), vectors, d)
            };
            let host = RoundWeights::build(&st, PairingStyle::Half, &omega(d), 1.44, round_start as u64, &cfg).unwrap();
            let scale = host.weights.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(&host.weights) {
                assert!((a - b).abs() <= 1e-6 * scale, "r {round_start}: {a} vs {b}");
            }
            assert_eq!(stream.clone_dtoh(&norm).unwrap(), host.norm);
        }
    }
}
