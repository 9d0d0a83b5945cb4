//! GPU sparse decode throughput against a device-to-device copy measured in the same run.
//!
//! `cargo bench --features cuda --bench decode_gpu` (scripts/gpu-check.sh runs the built
//! binary). One layer of Qwen3-8B-like heads (H = 32, Hkv = 8, D = Dv = 128, bf16 cache of 32K
//! slots per sequence, one query per head), lists of 2048 kept slots per KV head, batches of
//! 1, 16 and 64 sequences, on the engine path (`DecodePlan` bound once, `run_decode` on a
//! stream). The first sequence is checked against the formula in f64 before timing. Reports,
//! per batch: the sparse decode time, listed K+V bytes / time against the copy bandwidth of the
//! same bytes, batch 1 against (launch floor + bytes / copy bandwidth), and the speed-up over a
//! dense decode of the full cache. CUDA-event times, the median of 5 batches of 10 runs after
//! warm-up. Exits 0 with a SKIP line without a GPU (1 when `TRIATTN_REQUIRE_GPU` is set).

#[path = "../tests/common/mod.rs"]
mod common;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use triattn::cuda::{
    CacheLayout, CudaBackend, DecodeCache, DecodePlan, DecodeRun, DecodeShape, ListLengths, RowStrides, SplitPolicy,
};
use triattn::decode::{DecodeOptions, ListLayout};
use triattn::DType;

const H: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const N: usize = 32 * 1024;
const KEPT: usize = 2048;

fn shape(seqs: usize, lists: ListLayout, sm_count: usize) -> DecodeShape {
    let strides = RowStrides { head_stride: N * D, row_stride: D };
    DecodeShape {
        dtype: DType::Bf16,
        query_dtype: DType::Bf16,
        num_seqs: seqs,
        num_layers: 1,
        num_heads: H,
        num_kv_heads: HKV,
        head_dim: D,
        value_dim: D,
        num_queries: 1,
        len: N,
        layout: CacheLayout::Contiguous { keys: strides, values: strides },
        lists,
        list_capacity: KEPT,
        list_lengths: ListLengths::Full,
        sinks: false,
        options: DecodeOptions::default(),
        splits: SplitPolicy::Auto { sm_count },
    }
}

/// o of sequence 0 in f64: `[H, D]`.
fn reference(k: &[bf16], v: &[bf16], q: &[bf16], lists: &[i32]) -> Vec<f64> {
    let scale = 1.0 / (D as f64).sqrt();
    let mut o = vec![0f64; H * D];
    for h in 0..H {
        let g = h / (H / HKV);
        let slots = &lists[g * KEPT..(g + 1) * KEPT];
        let s: Vec<f64> = slots
            .iter()
            .map(|&j| {
                (0..D).map(|i| q[h * D + i].to_f64() * k[(g * N + j as usize) * D + i].to_f64()).sum::<f64>() * scale
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let den: f64 = w.iter().sum();
        for e in 0..D {
            o[h * D + e] =
                slots.iter().zip(&w).map(|(&j, w)| w * v[(g * N + j as usize) * D + e].to_f64()).sum::<f64>() / den;
        }
    }
    o
}

fn main() {
    let gpu = match CudaBackend::probe(0) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIP decode_gpu: {e}");
            std::process::exit(if std::env::var_os("TRIATTN_REQUIRE_GPU").is_some() { 1 } else { 0 });
        }
    };
    let stream = gpu.context().default_stream();
    let sms = gpu.sm_count();
    println!(
        "decode_gpu: {} SMs, sm_{}; one layer, H {H}, Hkv {HKV}, D {D}, bf16, {N} slots, lists of {KEPT}",
        sms,
        gpu.arch()
    );
    println!(
        "{:>5} {:>7} {:>10} {:>10} {:>11} {:>9} {:>10} {:>10} {:>8}",
        "batch", "splits", "sparse us", "list MB", "GB/s", "vs copy", "dense us", "speed-up", "vs floor"
    );
    let mut rng = common::Rng(7);
    let mut floor_us = 0.0;
    for batch in [1usize, 16, 64] {
        let per_seq = HKV * N * D;
        let host_k: Vec<bf16> = (0..per_seq).map(|_| bf16::from_f32(rng.unit())).collect();
        let host_v: Vec<bf16> = (0..per_seq).map(|_| bf16::from_f32(rng.unit())).collect();
        // Every sequence holds the same K/V values in its own tensors (the bytes read are real).
        let k: Vec<CudaSlice<bf16>> = (0..batch).map(|_| stream.clone_htod(&host_k).unwrap()).collect();
        let v: Vec<CudaSlice<bf16>> = (0..batch).map(|_| stream.clone_htod(&host_v).unwrap()).collect();
        let lists_host: Vec<i32> =
            (0..batch * HKV).flat_map(|i| common::random_keep_set(&mut common::Rng(100 + i as u64), N, KEPT)).collect();
        let lists = stream.clone_htod(&lists_host).unwrap();
        let q_host: Vec<bf16> = (0..batch * H * D).map(|_| bf16::from_f32(rng.unit())).collect();
        let q = stream.clone_htod(&q_host).unwrap();
        let out = stream.alloc_zeros::<f32>(batch * H * D).unwrap();
        let lse = stream.alloc_zeros::<f32>(batch * H).unwrap();
        let seq_lens = stream.clone_htod(&vec![N as i32; batch]).unwrap();
        let addr = |b: &CudaSlice<bf16>| b.device_ptr(&stream).0;
        let keys: Vec<u64> = k.iter().map(addr).collect();
        let values: Vec<u64> = v.iter().map(addr).collect();

        let run_of = |lists_layout: ListLayout| -> (f64, usize, Vec<f32>) {
            let plan = DecodePlan::new(shape(batch, lists_layout, sms)).unwrap();
            gpu.prepare_decode(&plan).unwrap();
            let cache = DecodeCache {
                keys: keys.clone(),
                values: values.clone(),
                lists: if lists_layout == ListLayout::Dense { 0 } else { lists.device_ptr(&stream).0 },
                seq_lens: if lists_layout == ListLayout::Dense { seq_lens.device_ptr(&stream).0 } else { 0 },
                ..Default::default()
            };
            let mut image = plan.workspace_image(&cache).unwrap();
            image.resize(plan.workspace_bytes(), 0);
            let ws = stream.clone_htod(&image).unwrap();
            let run = DecodeRun {
                workspace: ws.device_ptr(&stream).0,
                queries: q.device_ptr(&stream).0,
                out: out.device_ptr(&stream).0,
                lse: lse.device_ptr(&stream).0,
                first_layer: 0,
                layers: 1,
            };
            let cu = stream.cu_stream();
            // SAFETY: every buffer is device memory of this context of the planned shape, alive
            // until the timing (which synchronises) ends.
            let ms = common::gpu_time_ms(&stream, || unsafe { gpu.run_decode(&plan, &cache, &run, cu) }.unwrap());
            (ms, plan.spec().splits(), stream.clone_dtoh(&out).unwrap())
        };
        let (sparse_ms, splits, got) = run_of(ListLayout::PerKvHead);
        // Correctness of sequence 0 before reporting.
        let want = reference(&host_k, &host_v, &q_host[..H * D], &lists_host[..HKV * KEPT]);
        let worst = got[..H * D].iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 2e-5, "batch {batch}: o differs from the f64 reference by {worst:e}");
        let (dense_ms, _, _) = run_of(ListLayout::Dense);

        let bytes = batch * HKV * KEPT * D * 2 * 2;
        let copy_src = stream.alloc_zeros::<u8>(bytes).unwrap();
        let mut copy_dst = stream.alloc_zeros::<u8>(bytes).unwrap();
        let copy_ms = common::gpu_time_ms(&stream, || stream.memcpy_dtod(&copy_src, &mut copy_dst).unwrap());
        // A device copy reads and writes its bytes: its bandwidth counts both.
        let copy_gbps = 2.0 * bytes as f64 / (copy_ms * 1e6);
        let gbps = bytes as f64 / (sparse_ms * 1e6);
        if batch == 1 {
            floor_us = common::gpu_time_ms(&stream, || {
                stream.memcpy_dtod(&copy_src.slice(0..256), &mut copy_dst.slice_mut(0..256)).unwrap()
            }) * 1e3;
        }
        let ideal_us = floor_us + bytes as f64 / (copy_gbps * 1e3);
        println!(
            "{batch:>5} {splits:>7} {:>10.1} {:>10.1} {gbps:>11.1} {:>8.0}% {:>10.1} {:>9.1}x {:>7.2}x",
            sparse_ms * 1e3,
            bytes as f64 / 1e6,
            100.0 * gbps / copy_gbps,
            dense_ms * 1e3,
            dense_ms / sparse_ms,
            sparse_ms * 1e3 / ideal_us
        );
    }
    println!("(GB/s: listed K+V bytes / sparse time; vs copy: against a device copy's read+write bandwidth of the same bytes; vs floor: sparse time / (small-copy latency + bytes at copy bandwidth))");
}
