//! Whole rounds on a GPU (`DeviceRound` / `CudaBackend::run_round`) against the CPU backend, a
//! CUDA graph captured once and replayed with new `round_start` values, no device memory taken by
//! a run, and per-stage times (CUDA events) against a device copy of the same bytes.
//!
//! Keys are random, so a selection boundary may fall between two slots whose scores differ by
//! less than the last-bit differences of device arithmetic (FMA contraction, device `sincos`,
//! tensor-core order): keep sets are compared with `common::assert_keep_sets_match`, which
//! accepts swaps only within `KEEP_SWAP_TOL` of the CPU's boundary and prints them.
//! Skips loudly without a GPU; fails when `TRIATTN_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

use crate::common;

use std::sync::Arc;

use common::{
    assert_keep_sets_match, dense_strides as strides, gpu_or_skip, model, random_keys, random_stats, KEEP_SWAP_TOL,
};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use triattn::cuda::{
    CacheAddresses, CacheLayout, Compaction, DeviceRound, RoundPlan, RoundShape, Stage, TimedLauncher,
};
use triattn::kernels::variant::CompactMode;
use triattn::policy::{CompressionConfig, Preset, RoundOutcome, SelectionMode};
use triattn::round::{run_cpu, Scorer};
use triattn::score::OffsetAggregation;
use triattn::LayerView;

struct Cache {
    keys: Vec<CudaSlice<bf16>>,
    values: Vec<CudaSlice<bf16>>,
}

impl Cache {
    fn upload(stream: &Arc<CudaStream>, keys: &[Vec<bf16>], values: &[Vec<bf16>]) -> Self {
        Self {
            keys: keys.iter().map(|k| stream.clone_htod(k).unwrap()).collect(),
            values: values.iter().map(|v| stream.clone_htod(v).unwrap()).collect(),
        }
    }
    fn addresses(&self, stream: &Arc<CudaStream>) -> CacheAddresses {
        CacheAddresses {
            keys: self.keys.iter().map(|k| k.device_ptr(stream).0).collect(),
            values: self.values.iter().map(|v| v.device_ptr(stream).0).collect(),
            ..Default::default()
        }
    }
}

/// Rounds of every preset and mode on the GPU match the CPU backend (keep sets up to swaps at the
/// boundary, compacted rows bit-exact to the kernel's own slot map), and a graph captured once
/// replays later rounds correctly.
#[test]
fn cuda_rounds_match_cpu_and_replay_as_graphs() {
    let Some(gpu) = gpu_or_skip("cuda_rounds_match_cpu_and_replay_as_graphs") else { return };
    // Graph capture needs a stream of its own (the legacy default stream cannot be captured).
    let stream = gpu.context().new_stream().unwrap();
    let (l, h, hkv, d, n) = (4, 32, 8, 128, 1152);
    let scorer = Scorer::new(model(l, h, hkv, d), random_stats(l, h, d, 11), None).unwrap();
    let paper = CompressionConfig { budget: 1024, ..CompressionConfig::preset(Preset::Paper) };
    let configs = [
        ("paper per-head", paper, 64),
        (
            "paper union max",
            CompressionConfig {
                mode: SelectionMode::Union,
                score: triattn::score::ScoreConfig { aggregation: OffsetAggregation::Max, ..paper.score },
                ..paper
            },
            0,
        ),
        (
            "vllm plph",
            CompressionConfig {
                budget: 1024,
                mode: SelectionMode::PerLayerPerHead,
                ..CompressionConfig::preset(Preset::Vllm)
            },
            0,
        ),
    ];
    for (name, config, prefix) in configs {
        for mode in [CompactMode::OrderPreserving, CompactMode::HoleFilling] {
            let keys: Vec<Vec<bf16>> = (0..l).map(|i| random_keys(hkv * n * d, d, 70 + i as u64)).collect();
            let values: Vec<Vec<bf16>> = (0..l).map(|i| random_keys(hkv * n * d, d, 90 + i as u64)).collect();
            let cache = Cache::upload(&stream, &keys, &values);
            let shape = RoundShape {
                dtype: triattn::DType::Bf16,
                len: n,
                prefix_len: prefix,
                value_dim: d,
                layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
                compaction: Compaction::KeepSetsOnly,
                positions: None,
            };
            // Scores and keep sets over three rounds of one captured graph.
            let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
            let mut round = DeviceRound::new(&gpu, &stream, plan, &cache.addresses(&stream)).unwrap();
            round.set_round_start(&stream, n as u64).unwrap();
            stream.synchronize().unwrap();
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            // SAFETY: the cache buffers live to the end of this iteration.
            let captured = unsafe { round.run(&gpu, &stream) };
            let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
            captured.unwrap();
            let views: Vec<LayerView<'_, bf16>> =
                keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
            for r in [n as u64, 5000, 90_000] {
                round.set_round_start(&stream, r).unwrap();
                graph.launch().unwrap();
                let got = round.read_outputs(&stream).unwrap();
                let want = run_cpu(&config, &scorer, &views, r, prefix).unwrap();
                let what = format!("{name}: keep sets, replayed graph, round_start {r}");
                let swaps = assert_keep_sets_match(&what, &want.score, &want.keep, &got.keep, KEEP_SWAP_TOL);
                let std = common::std_dev(&want.raw[0][..n]);
                let err = got.raw[0][..n]
                    .iter()
                    .zip(&want.raw[0][..n])
                    .map(|(a, b)| (a - b).abs() as f64)
                    .fold(0.0, f64::max);
                println!(
                    "parity round {name} ({mode:?}) r={r}: keep {swaps} swaps, raw err {:.2e} of row std",
                    err / std
                );
                assert!(err <= 1e-5 * std, "{name}: raw scores");
            }
            // In-place compaction of the same cache: rows bit-exact against the CPU gather.
            let plan = RoundPlan::new(&scorer, &config, RoundShape { compaction: Compaction::InPlace(mode), ..shape })
                .unwrap();
            let mut round = DeviceRound::new(&gpu, &stream, plan, &cache.addresses(&stream)).unwrap();
            round.set_round_start(&stream, 4096).unwrap();
            // SAFETY: as above.
            unsafe { round.run(&gpu, &stream) }.unwrap();
            let got = round.read_outputs(&stream).unwrap();
            let want = run_cpu(&config, &scorer, &views, 4096, prefix).unwrap();
            assert_keep_sets_match(&format!("{name}: keep sets"), &want.score, &want.keep, &got.keep, KEEP_SWAP_TOL);
            if let RoundOutcome::Compressed { kept, .. } = want.outcome {
                for (layer, before) in keys.iter().enumerate() {
                    let k_after = stream.clone_dtoh(&cache.keys[layer]).unwrap();
                    for g in 0..hkv {
                        let map = &got.slot_map[config.mode.set_index(layer, g, hkv)];
                        for i in 0..kept {
                            let src = map[i] as usize;
                            assert_eq!(
                                &k_after[(g * n + i) * d..(g * n + i + 1) * d],
                                &before[(g * n + src) * d..(g * n + src + 1) * d],
                                "{name}: K row {i} of layer {layer} head {g}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A run takes no device memory, copies nothing and waits for nothing: captured on a stream of its
/// own in thread-local mode (where a `cuMemAlloc`, a synchronisation or any other capture-unsafe
/// call on this thread fails the capture), its graph holds kernel nodes only — at least one per
/// stage — and no memory-allocation, copy or memset node. Free device memory (`cuMemGetInfo`)
/// would say the same only on a GPU no other process uses; this cannot be disturbed by them.
fn assert_run_only_launches(gpu: &triattn::cuda::CudaBackend, round: &mut DeviceRound, stages: usize) {
    use cudarc::driver::sys::{cuGraphGetNodes, cuGraphNodeGetType, CUgraphNodeType};
    let stream = gpu.context().new_stream().unwrap();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    // SAFETY: the caller's cache outlives the capture; a captured run executes nothing.
    let captured = unsafe { round.run(gpu, &stream) };
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
    captured.expect("a run must be capturable: no allocation, copy or synchronisation");
    let mut count = 0usize;
    // SAFETY: a null node array asks only for the count; the graph lives to the end of the scope.
    unsafe { cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut count) }.result().unwrap();
    let mut nodes = vec![std::ptr::null_mut(); count];
    // SAFETY: `nodes` holds `count` entries.
    unsafe { cuGraphGetNodes(graph.cu_graph(), nodes.as_mut_ptr(), &mut count) }.result().unwrap();
    for &node in &nodes[..count] {
        let mut kind = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: `node` is a node of the live graph.
        unsafe { cuGraphNodeGetType(node, &mut kind) }.result().unwrap();
        assert_eq!(kind, CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL, "a run queued something other than a kernel");
    }
    assert!(count >= stages, "{count} kernel nodes for {stages} stages");
    println!("round run: {count} kernel launches, nothing else (captured graph)");
}

/// Per-stage times of a Qwen3-8B-shaped round (36 layers, N = budget + 128) next to a device copy
/// of the same key bytes, and a run that only launches kernels ([`assert_run_only_launches`]).
#[test]
fn cuda_round_stage_times() {
    let Some(gpu) = gpu_or_skip("cuda_round_stage_times") else { return };
    let stream = gpu.context().default_stream();
    let (l, h, hkv, d) = (36, 32, 8, 128);
    let scorer = Scorer::new(model(l, h, hkv, d), random_stats(l, h, d, 3), None).unwrap();
    for (budget, mode) in [(2048, CompactMode::HoleFilling), (2048, CompactMode::OrderPreserving)] {
        let n = budget + 128;
        let config = CompressionConfig { budget, ..CompressionConfig::preset(Preset::Paper) };
        let keys: Vec<Vec<bf16>> = (0..l).map(|i| random_keys(hkv * n * d, d, 500 + i as u64)).collect();
        let cache = Cache::upload(&stream, &keys, &keys);
        let shape = RoundShape {
            dtype: triattn::DType::Bf16,
            len: n,
            prefix_len: 0,
            value_dim: d,
            layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
            compaction: Compaction::InPlace(mode),
            positions: None,
        };
        let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
        let key_bytes = plan.key_bytes();
        let mut round = DeviceRound::new(&gpu, &stream, plan.clone(), &cache.addresses(&stream)).unwrap();
        round.set_round_start(&stream, 100_000).unwrap();
        // Warm up.
        // SAFETY: the cache lives to the end of the loop body.
        unsafe { round.run(&gpu, &stream) }.unwrap();
        stream.synchronize().unwrap();
        let stages = round.plan().stages().len();
        assert_run_only_launches(&gpu, &mut round, stages);
        let mut total = std::collections::BTreeMap::<Stage, f32>::new();
        let reps = 20;
        for _ in 0..reps {
            let mut timed = TimedLauncher::new(&gpu, &stream);
            // SAFETY: as above.
            unsafe { round.run_with(&mut timed) }.unwrap();
            stream.synchronize().unwrap();
            let timings = timed.timings().unwrap();
            for stage in round.plan().stages() {
                *total.entry(stage).or_default() += timings.get(stage).as_secs_f32() * 1e3;
            }
        }
        // Device copy ceiling over the same key bytes.
        let src = stream.alloc_zeros::<u8>(key_bytes).unwrap();
        let mut dst = stream.alloc_zeros::<u8>(key_bytes).unwrap();
        stream.memcpy_dtod(&src, &mut dst).unwrap();
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let s = stream.record_event(flags).unwrap();
        for _ in 0..reps {
            stream.memcpy_dtod(&src, &mut dst).unwrap();
        }
        let e = stream.record_event(flags).unwrap();
        stream.synchronize().unwrap();
        let copy_ms = s.elapsed_ms(&e).unwrap() / reps as f32;
        let copy_gbs = 2.0 * key_bytes as f64 / (copy_ms as f64 * 1e6);
        println!("round L={l} Hkv={hkv} N={n} budget={budget} {mode:?}: {:.1} MB of keys; device copy {copy_ms:.4} ms ({copy_gbs:.0} GB/s read+write)", key_bytes as f64 / 1e6);
        for (stage, ms) in &total {
            let ms = ms / reps as f32;
            let note = match stage {
                Stage::Score => format!(
                    ", {:.0}% of copy read bandwidth",
                    100.0 * (key_bytes as f64 / (ms as f64 * 1e6)) / (copy_gbs / 2.0)
                ),
                _ => String::new(),
            };
            println!("stage {:<9} {ms:.4} ms{note}", stage.name());
        }
    }
}

/// A paged (NHD) cache on the GPU: keep sets equal the CPU backend's; the block-table row is read
/// at run time, so a captured graph follows an engine that rewrites it between rounds.
#[test]
fn cuda_paged_round_matches_cpu() {
    let Some(gpu) = gpu_or_skip("cuda_paged_round_matches_cpu") else { return };
    let stream = gpu.context().default_stream();
    let (l, h, hkv, d, n, bs) = (4, 32, 8, 128, 1152, 16);
    let scorer = Scorer::new(model(l, h, hkv, d), random_stats(l, h, d, 21), None).unwrap();
    let config = CompressionConfig { budget: 1024, ..CompressionConfig::preset(Preset::Paper) };
    let (num_blocks, max_blocks) = (96, 72);
    let table: Vec<i32> = (0..max_blocks as i32).map(|i| (i * 37 + 5) % num_blocks as i32).collect();
    let keys: Vec<Vec<bf16>> = (0..l).map(|i| random_keys(hkv * n * d, d, 900 + i as u64)).collect();
    let at = |slot: usize, g: usize| ((table[slot / bs] as usize * bs + slot % bs) * hkv + g) * d;
    let pools: Vec<Vec<bf16>> = keys
        .iter()
        .map(|dense| {
            let mut p = vec![bf16::ZERO; num_blocks * bs * hkv * d];
            for g in 0..hkv {
                for slot in 0..n {
                    p[at(slot, g)..at(slot, g) + d].copy_from_slice(&dense[(g * n + slot) * d..(g * n + slot + 1) * d]);
                }
            }
            p
        })
        .collect();
    let dev_pools: Vec<CudaSlice<bf16>> = pools.iter().map(|p| stream.clone_htod(p).unwrap()).collect();
    let dev_table = stream.clone_htod(&table).unwrap();
    let shape = RoundShape {
        dtype: triattn::DType::Bf16,
        len: n,
        prefix_len: 0,
        value_dim: d,
        layout: CacheLayout::Paged { block_size: bs, order: triattn::cuda::PageOrder::Nhd, num_blocks, max_blocks },
        compaction: Compaction::KeepSetsOnly,
        positions: None,
    };
    let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
    let cache = CacheAddresses {
        keys: dev_pools.iter().map(|p| p.device_ptr(&stream).0).collect(),
        block_table: dev_table.device_ptr(&stream).0,
        ..Default::default()
    };
    let mut round = DeviceRound::new(&gpu, &stream, plan, &cache).unwrap();
    round.set_round_start(&stream, 7000).unwrap();
    // SAFETY: the pools and the table live to the end of the test.
    unsafe { round.run(&gpu, &stream) }.unwrap();
    let got = round.read_outputs(&stream).unwrap();
    let views: Vec<LayerView<'_, bf16>> =
        keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
    let want = run_cpu(&config, &scorer, &views, 7000, 0).unwrap();
    let swaps = assert_keep_sets_match("paged keep sets", &want.score, &want.keep, &got.keep, KEEP_SWAP_TOL);
    println!("parity round paged NHD: keep {swaps} swaps");
}

/// A batch of three sequences in one plan on the GPU (one launch per stage): each sequence's keep
/// sets equal its own CPU round (up to swaps at the boundary).
#[test]
fn cuda_batched_round_matches_each_sequence() {
    let Some(gpu) = gpu_or_skip("cuda_batched_round_matches_each_sequence") else { return };
    let stream = gpu.context().default_stream();
    let (l, h, hkv, d, n) = (4, 32, 8, 128, 1152);
    let scorer = Scorer::new(model(l, h, hkv, d), random_stats(l, h, d, 31), None).unwrap();
    let config = CompressionConfig { budget: 1024, ..CompressionConfig::preset(Preset::Paper) };
    let prefixes = [0usize, 40, 300];
    let starts = [n as u64, 9_000, 70_000];
    let keys: Vec<Vec<bf16>> = (0..3 * l).map(|i| random_keys(hkv * n * d, d, 1200 + i as u64)).collect();
    let cache = Cache::upload(&stream, &keys, &keys);
    let shape = RoundShape {
        dtype: triattn::DType::Bf16,
        len: n,
        prefix_len: 0,
        value_dim: d,
        layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
        compaction: Compaction::InPlace(CompactMode::HoleFilling),
        positions: None,
    };
    let plan = RoundPlan::new_batch(&scorer, &config, shape, &prefixes).unwrap();
    let mut round = DeviceRound::new(&gpu, &stream, plan, &cache.addresses(&stream)).unwrap();
    round.set_round_starts(&stream, &starts).unwrap();
    // SAFETY: the cache lives to the end of the test.
    unsafe { round.run(&gpu, &stream) }.unwrap();
    let got = round.read_batch_outputs(&stream).unwrap();
    for seq in 0..3 {
        let views: Vec<LayerView<'_, bf16>> =
            keys[seq * l..(seq + 1) * l].iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let want = run_cpu(&config, &scorer, &views, starts[seq], prefixes[seq]).unwrap();
        assert_keep_sets_match(&format!("sequence {seq}"), &want.score, &want.keep, &got[seq].keep, KEEP_SWAP_TOL);
    }
    println!("parity round batch of 3 (one launch per stage): keep sets match");
}
