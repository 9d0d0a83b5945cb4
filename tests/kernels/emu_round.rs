//! Whole device rounds (`RoundPlan` run on the emu backend) against the CPU backend: keep sets
//! exact, scores within 1e-5 of the row std, compacted rows bit-exact, for every preset,
//! selection mode, aggregation and dtype; the run path itself allocates nothing.
#![cfg(feature = "emu")]

use crate::common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{dense_strides as strides, model, random_keys, random_stats, Rng};
use half::bf16;
use triattn::cuda::{CacheAddresses, CacheLayout, Compaction, Launcher, RoundAddresses, RoundPlan, RoundShape, Stage};
use triattn::kernels::variant::{CompactMode, Variant};
use triattn::policy::{CompressionConfig, Preset, RoundOutcome, SelectionMode};
use triattn::round::{run_cpu, Scorer};
use triattn::score::OffsetAggregation;
use triattn::{Element, LayerView};

/// Counts heap allocations per thread (other tests run on other threads meanwhile).
struct Counting;
static TOTAL: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count() {
    TOTAL.fetch_add(1, Ordering::Relaxed);
    ALLOCATIONS.with(|c| c.set(c.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(|c| c.get())
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Case {
    name: &'static str,
    config: CompressionConfig,
    n: usize,
    prefix: usize,
}

fn cases() -> Vec<Case> {
    let paper = CompressionConfig { budget: 96, divide_length: 32, ..CompressionConfig::preset(Preset::Paper) };
    let vllm =
        CompressionConfig { budget: 96, divide_length: 32, window: 16, ..CompressionConfig::preset(Preset::Vllm) };
    vec![
        Case { name: "paper per-head", config: paper, n: 128, prefix: 20 },
        Case {
            name: "paper union window",
            config: CompressionConfig { mode: SelectionMode::Union, window: 8, ..paper },
            n: 130,
            prefix: 7,
        },
        Case {
            name: "paper max plph",
            config: CompressionConfig {
                mode: SelectionMode::PerLayerPerHead,
                score: triattn::score::ScoreConfig { aggregation: OffsetAggregation::Max, ..paper.score },
                ..paper
            },
            n: 128,
            prefix: 0,
        },
        Case {
            name: "vllm plph window",
            config: CompressionConfig { mode: SelectionMode::PerLayerPerHead, ..vllm },
            n: 127,
            prefix: 5,
        },
        Case { name: "within budget", config: paper, n: 90, prefix: 4 },
        Case { name: "protected reach budget", config: paper, n: 128, prefix: 100 },
    ]
}

/// Run `case` on the CPU and as one emu round with in-place compaction in `mode`; compare.
fn check<T: Element>(case: &Case, mode: CompactMode, seed: u64) {
    let m = model(2, 8, 2, 64);
    let (l, hkv, d, dv, n) = (2, 2, 64, 64, case.n);
    let scorer = Scorer::new(m.clone(), random_stats(2, 8, 64, seed), None).unwrap();
    let keys: Vec<Vec<T>> = (0..l).map(|i| random_keys::<T>(hkv * n * d, d, seed * 10 + i as u64)).collect();
    let values: Vec<Vec<T>> = (0..l).map(|i| random_keys::<T>(hkv * n * dv, dv, seed * 20 + i as u64)).collect();
    let round_start = n as u64 + 1000;
    let views: Vec<LayerView<'_, T>> = keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
    let want = run_cpu(&case.config, &scorer, &views, round_start, case.prefix).unwrap();

    let shape = RoundShape {
        dtype: T::DTYPE,
        len: n,
        prefix_len: case.prefix,
        value_dim: dv,
        layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, dv) },
        compaction: Compaction::InPlace(mode),
        positions: None,
    };
    let plan = RoundPlan::new(&scorer, &case.config, shape).unwrap();
    assert_eq!(plan.outcome(), want.outcome, "{}", case.name);
    let mut k_dev = keys.clone();
    let mut v_dev = values.clone();
    let got = {
        let mut k: Vec<&mut [T]> = k_dev.iter_mut().map(Vec::as_mut_slice).collect();
        let mut v: Vec<&mut [T]> = v_dev.iter_mut().map(Vec::as_mut_slice).collect();
        triattn::Backend::Emu.round_in_place(&plan, &mut k, &mut v, &[round_start]).unwrap()
    };
    let out = &got.outputs[0];
    // The emu runs the kernels with the CPU's arithmetic: exact, no swap even at the boundary.
    let swaps = common::assert_keep_sets_match(case.name, &want.score, &want.keep, &out.keep, 0.0);
    assert_eq!(swaps, 0, "{}: keep sets", case.name);
    for (layer, (g, w)) in out.raw.iter().zip(&want.raw).enumerate() {
        for (row, (gr, wr)) in g.chunks(n).zip(w.chunks(n)).enumerate() {
            let std = common::std_dev(wr).max(1e-6);
            for (a, b) in gr.iter().zip(wr) {
                assert!(((a - b) as f64).abs() <= 1e-5 * std, "{}: raw l{layer} r{row}: {a} vs {b}", case.name);
            }
        }
    }
    for (a, b) in out.score.iter().zip(&want.score) {
        assert!(a == b || ((a - b) as f64).abs() <= 2e-5 * (1.0 + b.abs() as f64), "{}: score {a} vs {b}", case.name);
    }
    // Compacted rows: the CPU compaction of the same keep sets, bit for bit.
    let kept = plan.kept();
    if let RoundOutcome::Compressed { .. } = want.outcome {
        for layer in 0..l {
            for g in 0..hkv {
                let keep = &want.keep[case.config.mode.set_index(layer, g, hkv)];
                let slot_of = |i: usize| -> usize {
                    let map = &out.slot_map[case.config.mode.set_index(layer, g, hkv)];
                    map[i] as usize
                };
                for i in 0..kept {
                    let src = slot_of(i);
                    assert!(keep.contains(&(src as u32)), "{}: slot map holds an evicted slot", case.name);
                    let at = |t: &Vec<T>, slot: usize, dim: usize| {
                        t[(g * n + slot) * dim..(g * n + slot + 1) * dim].to_vec()
                    };
                    assert!(at(&k_dev[layer], i, d) == at(&keys[layer], src, d), "{}: K row {i}", case.name);
                    assert!(at(&v_dev[layer], i, dv) == at(&values[layer], src, dv), "{}: V row {i}", case.name);
                }
                if mode == CompactMode::OrderPreserving {
                    let map: Vec<u32> = (0..kept).map(|i| slot_of(i) as u32).collect();
                    assert_eq!(&map, keep, "{}: order-preserving slot map", case.name);
                }
            }
        }
    } else {
        assert!(k_dev == keys && v_dev == values, "{}: a round that evicts nothing leaves the cache alone", case.name);
    }
}

#[test]
fn emu_rounds_match_the_cpu_backend() {
    for (i, case) in cases().iter().enumerate() {
        check::<f32>(case, CompactMode::OrderPreserving, 1 + i as u64);
        check::<bf16>(case, CompactMode::HoleFilling, 100 + i as u64);
    }
    check::<half::f16>(&cases()[0], CompactMode::HoleFilling, 7);
}

/// One plan, several rounds: `round_start` is read from memory at run time, so a replay with a
/// new value scores with the new round's weights (what a replayed CUDA graph relies on).
#[test]
fn one_plan_serves_rounds_with_different_round_starts() {
    let m = model(2, 8, 2, 64);
    let (hkv, d, n) = (2, 64, 128);
    let scorer = Scorer::new(m, random_stats(2, 8, 64, 5), None).unwrap();
    let config = CompressionConfig { budget: 96, ..CompressionConfig::preset(Preset::Paper) };
    let keys: Vec<Vec<f32>> = (0..2).map(|i| random_keys::<f32>(hkv * n * d, d, 50 + i)).collect();
    let views: Vec<LayerView<'_, f32>> =
        keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
    let shape = RoundShape {
        dtype: triattn::DType::F32,
        len: n,
        prefix_len: 0,
        value_dim: d,
        layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
        compaction: Compaction::KeepSetsOnly,
        positions: None,
    };
    let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
    let tensors: Vec<&[f32]> = keys.iter().map(Vec::as_slice).collect();
    let mut distinct = std::collections::BTreeSet::new();
    for r in [128u64, 4096, 70_000] {
        let want = run_cpu(&config, &scorer, &views, r, 0).unwrap();
        let got = triattn::Backend::Emu.round_keys(&plan, &tensors, &[r]).unwrap();
        assert_eq!(got.outputs[0].keep, want.keep, "round_start {r}");
        distinct.insert(got.outputs[0].keep.clone());
    }
    assert!(distinct.len() > 1, "different rounds should select differently");
}

/// One recorded launch: stage, variant id, grid.
type Recorded = (Stage, u16, (u32, u32, u32));

/// Records launches into a fixed array: no allocation of its own.
struct Recorder {
    stages: [Option<Recorded>; 8],
    count: usize,
}

impl Launcher for Recorder {
    unsafe fn launch<P: Copy>(
        &mut self,
        stage: Stage,
        variant: Variant,
        _params: &P,
        grid: (u32, u32, u32),
        _dynamic_smem: usize,
    ) -> triattn::Result<()> {
        self.stages[self.count] = Some((stage, variant.id.0, grid));
        self.count += 1;
        Ok(())
    }
}

/// `run` builds params on the stack and launches: no heap allocation, in every configuration.
#[test]
fn the_run_path_allocates_nothing() {
    let m = model(2, 8, 2, 64);
    let scorer = Scorer::new(m, random_stats(2, 8, 64, 9), None).unwrap();
    let mut rng = Rng(3);
    for case in cases() {
        for compaction in [
            Compaction::KeepSetsOnly,
            Compaction::InPlace(CompactMode::HoleFilling),
            Compaction::OutOfPlace { keys: strides(rng.below(8) + 96, 64), values: strides(128, 64) },
        ] {
            let shape = RoundShape {
                dtype: triattn::DType::Bf16,
                len: case.n,
                prefix_len: case.prefix,
                value_dim: 64,
                layout: CacheLayout::Contiguous { keys: strides(case.n, 64), values: strides(case.n, 64) },
                compaction,
                positions: Some(triattn::cuda::PositionType::I64),
            };
            let plan = RoundPlan::new(&scorer, &case.config, shape).unwrap();
            let cache = CacheAddresses {
                keys: vec![16; 2],
                values: vec![32; 2],
                keys_out: vec![48; 2],
                values_out: vec![64; 2],
                positions: 80,
                positions_out: 96,
                ..Default::default()
            };
            let _ = plan.workspace_image(&cache);
            let mut rec = Recorder { stages: [None; 8], count: 0 };
            let before = allocations();
            // SAFETY: the recorder launches nothing; the addresses are never dereferenced.
            let at = RoundAddresses::bound(1 << 20, 1 << 12, &cache);
            unsafe { plan.run(&mut rec, &at) }.unwrap();
            let after = allocations();
            assert_eq!(after - before, 0, "{}: run allocated", case.name);
            let stages: Vec<Stage> = rec.stages[..rec.count].iter().map(|s| s.unwrap().0).collect();
            assert_eq!(stages, plan.stages(), "{}", case.name);
            let ids: Vec<u16> = rec.stages[..rec.count].iter().map(|s| s.unwrap().1).collect();
            assert_eq!(ids, plan.variants().iter().map(|v| v.id.0).collect::<Vec<_>>());
        }
    }
    // A batch of four sequences: still launches only.
    let config = CompressionConfig { budget: 96, ..CompressionConfig::preset(Preset::Paper) };
    let shape = RoundShape {
        dtype: triattn::DType::Bf16,
        len: 128,
        prefix_len: 0,
        value_dim: 64,
        layout: CacheLayout::Contiguous { keys: strides(128, 64), values: strides(128, 64) },
        compaction: Compaction::InPlace(CompactMode::HoleFilling),
        positions: None,
    };
    let plan = RoundPlan::new_batch(&scorer, &config, shape, &[0, 3, 9, 27]).unwrap();
    let mut rec = Recorder { stages: [None; 8], count: 0 };
    let at = RoundAddresses { workspace: 1 << 20, round_start: 1 << 12, ..Default::default() };
    let before = allocations();
    // SAFETY: the recorder launches nothing; the addresses are never dereferenced.
    unsafe { plan.run(&mut rec, &at) }.unwrap();
    assert_eq!(allocations() - before, 0, "a batched run allocated");
    assert_eq!(rec.count, plan.stages().len());
}

#[test]
fn plans_refuse_bad_shapes_by_name() {
    let m = model(2, 8, 2, 64);
    let scorer = Scorer::new(m, random_stats(2, 8, 64, 9), None).unwrap();
    let config = CompressionConfig { budget: 96, ..CompressionConfig::preset(Preset::Paper) };
    let good = RoundShape {
        dtype: triattn::DType::Bf16,
        len: 128,
        prefix_len: 0,
        value_dim: 64,
        layout: CacheLayout::Contiguous { keys: strides(128, 64), values: strides(128, 64) },
        compaction: Compaction::InPlace(CompactMode::HoleFilling),
        positions: None,
    };
    let err = |s: RoundShape| RoundPlan::new(&scorer, &config, s).unwrap_err().to_string();
    assert!(err(RoundShape { len: 0, ..good }).contains("slots"));
    assert!(err(RoundShape { prefix_len: 129, ..good }).contains("prefix_len"));
    assert!(err(RoundShape { value_dim: 3, ..good }).contains("value row"));
    let plan = RoundPlan::new(&scorer, &config, good).unwrap();
    let e = plan.workspace_image(&CacheAddresses { keys: vec![16], values: vec![16, 32], ..Default::default() });
    assert!(e.unwrap_err().to_string().contains("K layer addresses"));
    let keys = vec![bf16::ZERO; 10];
    let e = triattn::Backend::Emu.round_keys(&plan, &[&keys, &keys], &[200]).unwrap_err().to_string();
    assert!(e.contains("KeepSetsOnly"), "{e}");
}

/// A prompt-length round (N above the single-block select limit) takes the multi-block select
/// inside the plan and still equals the CPU backend.
#[test]
fn long_rounds_take_the_multi_block_select() {
    let m = model(1, 2, 1, 32);
    let (hkv, d, n) = (1, 32, triattn::kernels::SELECT_SINGLE_MAX_LEN + 3001);
    let scorer = Scorer::new(m, random_stats(1, 2, 32, 17), None).unwrap();
    for config in [
        CompressionConfig { budget: 2048, ..CompressionConfig::preset(Preset::Paper) },
        CompressionConfig { budget: 4000, window: 64, ..CompressionConfig::preset(Preset::Vllm) },
    ] {
        let keys = random_keys::<bf16>(hkv * n * d, d, 77);
        let views = [LayerView::contiguous("k", &keys, hkv, n, d).unwrap()];
        let want = run_cpu(&config, &scorer, &views, n as u64 + 5, 1000).unwrap();
        let shape = RoundShape {
            dtype: triattn::DType::Bf16,
            len: n,
            prefix_len: 1000,
            value_dim: d,
            layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
            compaction: Compaction::KeepSetsOnly,
            positions: None,
        };
        let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
        let select_launches = plan.variants().iter().filter(|v| v.op() == "select").count();
        assert!(select_launches > 1, "expected the multi-block select, got {select_launches} select launch(es)");
        let got = triattn::Backend::Emu.round_keys(&plan, &[&keys], &[n as u64 + 5]).unwrap();
        assert_eq!(got.outputs[0].keep, want.keep);
    }
}

/// A paged cache (vLLM's NHD and FlashInfer's HND pools, a shuffled block-table row): keep sets
/// equal the CPU backend's over the same rows, and an in-place compaction moves the rows between
/// the sequence's blocks exactly as the CPU compaction of the dense cache.
#[test]
fn paged_rounds_match_the_cpu_backend() {
    use triattn::cuda::PageOrder;
    let m = model(2, 8, 2, 64);
    let (l, hkv, d, n, bs) = (2, 2, 64, 150, 16);
    let scorer = Scorer::new(m, random_stats(2, 8, 64, 23), None).unwrap();
    let config = CompressionConfig { budget: 96, ..CompressionConfig::preset(Preset::Paper) };
    let mut rng = Rng(8);
    for (order, mode) in [(PageOrder::Nhd, CompactMode::HoleFilling), (PageOrder::Hnd, CompactMode::OrderPreserving)] {
        let keys: Vec<Vec<bf16>> = (0..l).map(|i| random_keys(hkv * n * d, d, 300 + i as u64)).collect();
        let values: Vec<Vec<bf16>> = (0..l).map(|i| random_keys(hkv * n * d, d, 400 + i as u64)).collect();
        let (num_blocks, max_blocks) = (24, 12);
        // A shuffled choice of distinct blocks for the sequence.
        let mut blocks: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.below(i + 1));
        }
        let table: Vec<i32> = blocks[..max_blocks].to_vec();
        let at = |slot: usize, g: usize| -> usize {
            let block = table[slot / bs] as usize;
            let within = slot % bs;
            match order {
                PageOrder::Nhd => ((block * bs + within) * hkv + g) * d,
                PageOrder::Hnd => ((block * hkv + g) * bs + within) * d,
            }
        };
        let pool = |dense: &Vec<bf16>| {
            let mut p = vec![bf16::from_f32(-7.0); num_blocks * bs * hkv * d];
            for g in 0..hkv {
                for slot in 0..n {
                    p[at(slot, g)..at(slot, g) + d].copy_from_slice(&dense[(g * n + slot) * d..(g * n + slot + 1) * d]);
                }
            }
            p
        };
        let mut k_pools: Vec<Vec<bf16>> = keys.iter().map(pool).collect();
        let mut v_pools: Vec<Vec<bf16>> = values.iter().map(pool).collect();
        let views: Vec<LayerView<'_, bf16>> =
            keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let want = run_cpu(&config, &scorer, &views, 5000, 10).unwrap();
        let shape = RoundShape {
            dtype: triattn::DType::Bf16,
            len: n,
            prefix_len: 10,
            value_dim: d,
            layout: CacheLayout::Paged { block_size: bs, order, num_blocks, max_blocks },
            compaction: Compaction::InPlace(mode),
            positions: None,
        };
        let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
        let got = {
            let mut k: Vec<&mut [bf16]> = k_pools.iter_mut().map(Vec::as_mut_slice).collect();
            let mut v: Vec<&mut [bf16]> = v_pools.iter_mut().map(Vec::as_mut_slice).collect();
            triattn::Backend::Emu.round_paged(&plan, &mut k, &mut v, &table, &[5000]).unwrap()
        };
        assert_eq!(got.outputs[0].keep, want.keep, "{order:?}: keep sets");
        for layer in 0..l {
            for g in 0..hkv {
                let map = &got.outputs[0].slot_map[config.mode.set_index(layer, g, hkv)];
                for (i, &src) in map.iter().enumerate() {
                    let src = src as usize;
                    assert_eq!(
                        &k_pools[layer][at(i, g)..at(i, g) + d],
                        &keys[layer][(g * n + src) * d..(g * n + src + 1) * d],
                        "{order:?}: K row {i} of layer {layer} head {g}"
                    );
                    assert_eq!(
                        &v_pools[layer][at(i, g)..at(i, g) + d],
                        &values[layer][(g * n + src) * d..(g * n + src + 1) * d],
                        "{order:?}: V row {i}"
                    );
                }
            }
        }
        // A block table that repeats a block is refused by name.
        let mut bad = table.clone();
        bad[3] = bad[1];
        let mut k: Vec<&mut [bf16]> = k_pools.iter_mut().map(Vec::as_mut_slice).collect();
        let mut v: Vec<&mut [bf16]> = v_pools.iter_mut().map(Vec::as_mut_slice).collect();
        let e = triattn::Backend::Emu.round_paged(&plan, &mut k, &mut v, &bad, &[5000]).unwrap_err().to_string();
        assert!(e.contains("block table [3]"), "{e}");
    }
}

/// Random rounds: shapes, dtypes, presets, knobs, layouts (padded strides, NHD/HND pools) and
/// compactions drawn at random; every plan either refuses by name or runs on emu to the CPU
/// backend's outcome and keep sets, with rows moved exactly as the keep sets say.
#[test]
fn random_rounds_match_the_cpu_backend() {
    use triattn::cuda::PageOrder;
    use triattn::policy::{GroupAggregation, Normalization, PrefixProtection};
    use triattn::score::{NormTerm, ScoreConfig, TrigTerm};
    let mut rng = Rng(2026);
    let mut ran = 0;
    let mut compressed = [0usize; 2]; // contiguous, paged
    for case in 0..60 {
        let (l, hkv, g) = (1 + rng.below(2), 1 + rng.below(2), [1, 2, 4][rng.below(3)]);
        let d = [32, 64, 128][rng.below(3)];
        let n = 1 + rng.below(260);
        let prefix = rng.below(n + 1);
        let budget = 1 + rng.below(200);
        let preset = if rng.below(2) == 0 { Preset::Paper } else { Preset::Vllm };
        let config = CompressionConfig {
            budget,
            window: rng.below(budget.min(40)),
            mode: [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union][rng.below(3)],
            group_aggregation: if rng.below(2) == 0 { GroupAggregation::Max } else { GroupAggregation::Mean },
            normalization: if rng.below(4) == 0 { Normalization::Off } else { Normalization::ZScore },
            prefix: if rng.below(2) == 0 { PrefixProtection::Protected } else { PrefixProtection::Unprotected },
            score: ScoreConfig {
                offset_max_length: [1, 64, 65536][rng.below(3)],
                aggregation: if rng.below(2) == 0 { OffsetAggregation::Mean } else { OffsetAggregation::Max },
                norm: if rng.below(2) == 0 { NormTerm::MeanResidual } else { NormTerm::MeanModulus },
                trig: if rng.below(5) == 0 { TrigTerm::Excluded } else { TrigTerm::Included },
            },
            ..CompressionConfig::preset(preset)
        };
        let scorer = Scorer::new(model(l, hkv * g, hkv, d), random_stats(l, hkv * g, d, case), None).unwrap();
        let dense: Vec<Vec<f32>> = (0..l).map(|i| random_keys::<f32>(hkv * n * d, d, case * 7 + i as u64)).collect();
        let views: Vec<LayerView<'_, f32>> =
            dense.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let round_start = n as u64 + rng.below(100_000) as u64;
        let want = run_cpu(&config, &scorer, &views, round_start, prefix).unwrap();
        let mode = if rng.below(2) == 0 { CompactMode::OrderPreserving } else { CompactMode::HoleFilling };
        let paged = rng.below(3) == 0;
        let what = format!("case {case} (L{l} Hkv{hkv} G{g} D{d} N{n} P{prefix} {config:?}, paged {paged})");
        if paged {
            let bs = [16, 32][rng.below(2)];
            let order = if rng.below(2) == 0 { PageOrder::Nhd } else { PageOrder::Hnd };
            let max_blocks = n.div_ceil(bs) + rng.below(3);
            let num_blocks = max_blocks + rng.below(4);
            let mut blocks: Vec<i32> = (0..num_blocks as i32).collect();
            for i in (1..blocks.len()).rev() {
                blocks.swap(i, rng.below(i + 1));
            }
            let table = blocks[..max_blocks].to_vec();
            let at = |slot: usize, h: usize| -> usize {
                let (b, w) = (table[slot / bs] as usize, slot % bs);
                match order {
                    PageOrder::Nhd => ((b * bs + w) * hkv + h) * d,
                    PageOrder::Hnd => ((b * hkv + h) * bs + w) * d,
                }
            };
            let mut pools: Vec<Vec<f32>> = dense
                .iter()
                .map(|k| {
                    let mut p = vec![f32::NAN; num_blocks * bs * hkv * d];
                    for h in 0..hkv {
                        for s in 0..n {
                            p[at(s, h)..at(s, h) + d].copy_from_slice(&k[(h * n + s) * d..(h * n + s + 1) * d]);
                        }
                    }
                    p
                })
                .collect();
            let mut vpools = pools.clone();
            let shape = RoundShape {
                dtype: triattn::DType::F32,
                len: n,
                prefix_len: prefix,
                value_dim: d,
                layout: CacheLayout::Paged { block_size: bs, order, num_blocks, max_blocks },
                compaction: Compaction::InPlace(mode),
                positions: None,
            };
            let plan = match RoundPlan::new(&scorer, &config, shape) {
                Ok(p) => p,
                Err(e) => panic!("{what}: a valid paged shape was refused: {e}"),
            };
            let got = {
                let mut k: Vec<&mut [f32]> = pools.iter_mut().map(Vec::as_mut_slice).collect();
                let mut v: Vec<&mut [f32]> = vpools.iter_mut().map(Vec::as_mut_slice).collect();
                triattn::Backend::Emu.round_paged(&plan, &mut k, &mut v, &table, &[round_start]).unwrap()
            };
            assert_eq!(plan.outcome(), want.outcome, "{what}");
            assert_eq!(got.outputs[0].keep, want.keep, "{what}");
            if let RoundOutcome::Compressed { kept, .. } = want.outcome {
                for layer in 0..l {
                    for h in 0..hkv {
                        let map = &got.outputs[0].slot_map[config.mode.set_index(layer, h, hkv)];
                        assert_eq!(map.len(), kept, "{what}");
                        for (i, &src) in map.iter().enumerate() {
                            let src = src as usize;
                            let row = &pools[layer][at(i, h)..at(i, h) + d];
                            assert!(row == &dense[layer][(h * n + src) * d..(h * n + src + 1) * d], "{what}: row {i}");
                        }
                    }
                }
            }
        } else {
            // Rows padded by 0..2 chunks of 4 f32 (16 bytes) and heads by a few rows.
            let row_stride = d + 4 * rng.below(3);
            let head_stride = (n + rng.below(3)) * row_stride;
            let st = triattn::cuda::RowStrides { head_stride, row_stride };
            let padded = |k: &Vec<f32>| {
                let mut p = vec![f32::NAN; (hkv - 1) * head_stride + (n - 1) * row_stride + d];
                for h in 0..hkv {
                    for s in 0..n {
                        let at = h * head_stride + s * row_stride;
                        p[at..at + d].copy_from_slice(&k[(h * n + s) * d..(h * n + s + 1) * d]);
                    }
                }
                p
            };
            let mut k: Vec<Vec<f32>> = dense.iter().map(padded).collect();
            let mut v = k.clone();
            let shape = RoundShape {
                dtype: triattn::DType::F32,
                len: n,
                prefix_len: prefix,
                value_dim: d,
                layout: CacheLayout::Contiguous { keys: st, values: st },
                compaction: Compaction::InPlace(mode),
                positions: None,
            };
            let plan = RoundPlan::new(&scorer, &config, shape).unwrap_or_else(|e| panic!("{what}: refused: {e}"));
            let got = {
                let mut kr: Vec<&mut [f32]> = k.iter_mut().map(Vec::as_mut_slice).collect();
                let mut vr: Vec<&mut [f32]> = v.iter_mut().map(Vec::as_mut_slice).collect();
                triattn::Backend::Emu.round_in_place(&plan, &mut kr, &mut vr, &[round_start]).unwrap()
            };
            assert_eq!(plan.outcome(), want.outcome, "{what}");
            assert_eq!(got.outputs[0].keep, want.keep, "{what}");
            if let RoundOutcome::Compressed { kept, .. } = want.outcome {
                for layer in 0..l {
                    for h in 0..hkv {
                        let map = &got.outputs[0].slot_map[config.mode.set_index(layer, h, hkv)];
                        assert_eq!(map.len(), kept, "{what}");
                        for (i, &src) in map.iter().enumerate() {
                            let src = src as usize;
                            let at = h * head_stride + i * row_stride;
                            assert!(
                                k[layer][at..at + d] == dense[layer][(h * n + src) * d..(h * n + src + 1) * d],
                                "{what}: row {i}"
                            );
                        }
                    }
                }
            }
        }
        if matches!(want.outcome, RoundOutcome::Compressed { .. }) {
            compressed[usize::from(paged)] += 1;
        }
        ran += 1;
    }
    assert_eq!(ran, 60);
    assert!(compressed[0] >= 5 && compressed[1] >= 3, "too few evicting rounds drawn: {compressed:?}");
}

/// Positions `[sets, N]` compacted with the rows (i32 and i64, in place in both modes and out of
/// place): each kept slot carries the position of the slot it came from.
#[test]
fn positions_follow_their_rows() {
    use triattn::cuda::PositionType;
    let (l, hkv, d, n) = (2, 2, 64, 140);
    let scorer = Scorer::new(model(l, 8, hkv, d), random_stats(l, 8, d, 31), None).unwrap();
    for (mode_name, config) in [
        ("per-head", CompressionConfig { budget: 96, ..CompressionConfig::preset(Preset::Paper) }),
        (
            "per-layer-per-head",
            CompressionConfig {
                budget: 100,
                mode: SelectionMode::PerLayerPerHead,
                window: 16,
                ..CompressionConfig::preset(Preset::Vllm)
            },
        ),
    ] {
        let sets = config.mode.num_sets(l, hkv);
        for (ty, compaction) in [
            (PositionType::I64, Compaction::InPlace(CompactMode::OrderPreserving)),
            (PositionType::I32, Compaction::InPlace(CompactMode::HoleFilling)),
            (PositionType::I64, Compaction::OutOfPlace { keys: strides(100, d), values: strides(100, d) }),
        ] {
            let keys: Vec<Vec<f32>> = (0..l).map(|i| random_keys::<f32>(hkv * n * d, d, 60 + i as u64)).collect();
            let mut k = keys.clone();
            let mut v = keys.clone();
            // The out-of-place destination starts poisoned (NaN): every kept row must be written.
            let mut k_out = vec![vec![f32::NAN; hkv * 100 * d]; l];
            let mut v_out = k_out.clone();
            let original: Vec<i64> = (0..sets * n).map(|i| 10_000 + 7 * i as i64).collect();
            let mut pos64 = original.clone();
            let mut pos32: Vec<i32> = original.iter().map(|&p| p as i32).collect();
            let mut pos_out = vec![-1i64; sets * 100];
            let shape = RoundShape {
                dtype: triattn::DType::F32,
                len: n,
                prefix_len: 12,
                value_dim: d,
                layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
                compaction,
                positions: Some(ty),
            };
            let plan = RoundPlan::new(&scorer, &config, shape).unwrap();
            let out_of_place = matches!(compaction, Compaction::OutOfPlace { .. });
            let cache = CacheAddresses {
                keys: k.iter_mut().map(|x| x.as_mut_ptr() as u64).collect(),
                values: v.iter_mut().map(|x| x.as_mut_ptr() as u64).collect(),
                keys_out: if out_of_place { k_out.iter_mut().map(|x| x.as_mut_ptr() as u64).collect() } else { vec![] },
                values_out: if out_of_place {
                    v_out.iter_mut().map(|x| x.as_mut_ptr() as u64).collect()
                } else {
                    vec![]
                },
                positions: match ty {
                    PositionType::I64 => pos64.as_mut_ptr() as u64,
                    PositionType::I32 => pos32.as_mut_ptr() as u64,
                },
                positions_out: if out_of_place { pos_out.as_mut_ptr() as u64 } else { 0 },
                ..Default::default()
            };
            // SAFETY: every buffer above holds the planned shape and outlives the call.
            let got = unsafe { triattn::Backend::Emu.round_on_addresses(&plan, &cache, &[4000]) }.unwrap();
            let kept = plan.kept();
            let what = format!("{mode_name} {ty:?} {compaction:?}");
            for set in 0..sets {
                let from = if out_of_place { &got.outputs[0].keep[set] } else { &got.outputs[0].slot_map[set] };
                for i in 0..kept {
                    let want = original[set * n + from[i] as usize];
                    let have = match (out_of_place, ty) {
                        (true, _) => pos_out[set * kept + i],
                        (false, PositionType::I64) => pos64[set * n + i],
                        (false, PositionType::I32) => pos32[set * n + i] as i64,
                    };
                    assert_eq!(have, want, "{what}: set {set} slot {i}");
                }
            }
            if out_of_place {
                for layer in 0..l {
                    for g in 0..hkv {
                        let set = if config.mode == SelectionMode::PerLayerPerHead { layer * hkv + g } else { g };
                        for (i, &from) in got.outputs[0].keep[set][..kept].iter().enumerate() {
                            let src = &keys[layer][(g * n + from as usize) * d..][..d];
                            for (name, out) in [("K", &k_out), ("V", &v_out)] {
                                let row = &out[layer][(g * 100 + i) * d..][..d];
                                assert!(row == src, "{what}: {name} layer {layer} head {g} row {i}: {:?}", &row[..4]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One plan, one launch per stage, for three sequences with their own prompts and round starts:
/// each sequence's keep sets, scores and compacted rows equal its own CPU round.
#[test]
fn batched_rounds_match_each_sequence_alone() {
    let (l, hkv, d, n) = (2, 2, 64, 160);
    let scorer = Scorer::new(model(l, 8, hkv, d), random_stats(l, 8, d, 41), None).unwrap();
    for (config, mode) in [
        (CompressionConfig { budget: 120, ..CompressionConfig::preset(Preset::Paper) }, CompactMode::OrderPreserving),
        (
            CompressionConfig {
                budget: 100,
                window: 12,
                mode: SelectionMode::PerLayerPerHead,
                score: triattn::score::ScoreConfig {
                    aggregation: OffsetAggregation::Max,
                    ..CompressionConfig::default().score
                },
                ..CompressionConfig::preset(Preset::Paper)
            },
            CompactMode::HoleFilling,
        ),
        (
            CompressionConfig {
                budget: 90,
                window: 16,
                mode: SelectionMode::Union,
                ..CompressionConfig::preset(Preset::Vllm)
            },
            CompactMode::HoleFilling,
        ),
    ] {
        let prefixes = [0usize, 17, 60];
        let starts = [n as u64, 5_000, 123_456];
        let keys: Vec<Vec<bf16>> = (0..3 * l).map(|i| random_keys(hkv * n * d, d, 700 + i as u64)).collect();
        let values: Vec<Vec<bf16>> = (0..3 * l).map(|i| random_keys(hkv * n * d, d, 800 + i as u64)).collect();
        let shape = RoundShape {
            dtype: triattn::DType::Bf16,
            len: n,
            prefix_len: 0,
            value_dim: d,
            layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
            compaction: Compaction::InPlace(mode),
            positions: None,
        };
        let plan = RoundPlan::new_batch(&scorer, &config, shape, &prefixes).unwrap();
        assert_eq!(plan.num_seqs(), 3);
        let mut k = keys.clone();
        let mut v = values.clone();
        let got = {
            let mut kr: Vec<&mut [bf16]> = k.iter_mut().map(Vec::as_mut_slice).collect();
            let mut vr: Vec<&mut [bf16]> = v.iter_mut().map(Vec::as_mut_slice).collect();
            triattn::Backend::Emu.round_in_place(&plan, &mut kr, &mut vr, &starts).unwrap()
        };
        for seq in 0..3 {
            let views: Vec<LayerView<'_, bf16>> = keys[seq * l..(seq + 1) * l]
                .iter()
                .map(|t| LayerView::contiguous("k", t, hkv, n, d).unwrap())
                .collect();
            let want = run_cpu(&config, &scorer, &views, starts[seq], prefixes[seq]).unwrap();
            let out = &got.outputs[seq];
            let what = format!("{:?} sequence {seq}", config.mode);
            assert_eq!(want.outcome, plan.outcome(), "{what}");
            assert_eq!(out.keep, want.keep, "{what}: keep sets");
            for (a, b) in out.score.iter().zip(&want.score) {
                assert!(a == b || ((a - b) as f64).abs() <= 2e-5 * (1.0 + b.abs() as f64), "{what}: score {a} vs {b}");
            }
            for layer in 0..l {
                for g in 0..hkv {
                    let map = &out.slot_map[config.mode.set_index(layer, g, hkv)];
                    for (i, &src) in map.iter().enumerate() {
                        let src = src as usize;
                        let t = seq * l + layer;
                        assert!(
                            k[t][(g * n + i) * d..(g * n + i + 1) * d]
                                == keys[t][(g * n + src) * d..(g * n + src + 1) * d],
                            "{what}: K row {i}"
                        );
                        assert!(
                            v[t][(g * n + i) * d..(g * n + i + 1) * d]
                                == values[t][(g * n + src) * d..(g * n + src + 1) * d],
                            "{what}: V row {i}"
                        );
                    }
                }
            }
        }
    }
    // A batch member whose protected prompt reaches the budget is refused by name.
    let config = CompressionConfig { budget: 50, ..CompressionConfig::preset(Preset::Paper) };
    let shape = RoundShape {
        dtype: triattn::DType::Bf16,
        len: n,
        prefix_len: 0,
        value_dim: d,
        layout: CacheLayout::Contiguous { keys: strides(n, d), values: strides(n, d) },
        compaction: Compaction::KeepSetsOnly,
        positions: None,
    };
    let e = RoundPlan::new_batch(&scorer, &config, shape, &[3, 70]).unwrap_err().to_string();
    assert!(e.contains("sequence 1"), "{e}");
}

/// A paged batch: two sequences sharing the layers' pools, each with its own block-table row
/// (distinct blocks across the batch), compacted in place in one launch per stage.
#[test]
fn paged_batches_match_each_sequence_alone() {
    use triattn::cuda::PageOrder;
    let (l, hkv, d, n, bs) = (2, 2, 64, 100, 16);
    let scorer = Scorer::new(model(l, 8, hkv, d), random_stats(l, 8, d, 43), None).unwrap();
    let config = CompressionConfig { budget: 70, ..CompressionConfig::preset(Preset::Paper) };
    let (num_blocks, max_blocks) = (20, 8);
    let table: Vec<i32> = vec![3, 9, 0, 14, 7, 1, 18, 12, /* seq 1 */ 5, 2, 16, 8, 11, 19, 4, 6];
    let keys: Vec<Vec<bf16>> = (0..2 * l).map(|i| random_keys(hkv * n * d, d, 900 + i as u64)).collect();
    let at = |seq: usize, slot: usize, g: usize| {
        ((table[seq * max_blocks + slot / bs] as usize * bs + slot % bs) * hkv + g) * d
    };
    let mut pools: Vec<Vec<bf16>> = (0..l)
        .map(|layer| {
            let mut p = vec![bf16::from_f32(-3.0); num_blocks * bs * hkv * d];
            for seq in 0..2 {
                let dense = &keys[seq * l + layer];
                for g in 0..hkv {
                    for s in 0..n {
                        p[at(seq, s, g)..at(seq, s, g) + d]
                            .copy_from_slice(&dense[(g * n + s) * d..(g * n + s + 1) * d]);
                    }
                }
            }
            p
        })
        .collect();
    let mut vpools = pools.clone();
    let shape = RoundShape {
        dtype: triattn::DType::Bf16,
        len: n,
        prefix_len: 0,
        value_dim: d,
        layout: CacheLayout::Paged { block_size: bs, order: PageOrder::Nhd, num_blocks, max_blocks },
        compaction: Compaction::InPlace(CompactMode::HoleFilling),
        positions: None,
    };
    let prefixes = [5usize, 30];
    let starts = [500u64, 8000];
    let plan = RoundPlan::new_batch(&scorer, &config, shape, &prefixes).unwrap();
    let cache = CacheAddresses {
        keys: pools.iter_mut().map(|p| p.as_mut_ptr() as u64).collect(),
        values: vpools.iter_mut().map(|p| p.as_mut_ptr() as u64).collect(),
        block_table: table.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the pools hold every block, the table names distinct blocks, all alive for the call.
    let got = unsafe { triattn::Backend::Emu.round_on_addresses(&plan, &cache, &starts) }.unwrap();
    for seq in 0..2 {
        let views: Vec<LayerView<'_, bf16>> =
            keys[seq * l..(seq + 1) * l].iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let want = run_cpu(&config, &scorer, &views, starts[seq], prefixes[seq]).unwrap();
        assert_eq!(got.outputs[seq].keep, want.keep, "sequence {seq}");
        for layer in 0..l {
            for g in 0..hkv {
                let map = &got.outputs[seq].slot_map[config.mode.set_index(layer, g, hkv)];
                for (i, &src) in map.iter().enumerate() {
                    let dense = &keys[seq * l + layer];
                    assert!(
                        pools[layer][at(seq, i, g)..at(seq, i, g) + d]
                            == dense[(g * n + src as usize) * d..(g * n + src as usize + 1) * d],
                        "sequence {seq} layer {layer} head {g} row {i}"
                    );
                }
            }
        }
    }
}
