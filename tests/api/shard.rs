//! Sharded rounds (tensor and pipeline parallelism): every golden case split over ranks through
//! the CLI equals the single-rank outputs, property tests over random shapes and splits against
//! `round::run_cpu`, and the refusals of impossible splits.

use crate::common;

use std::path::Path;

use common::{golden_cases, model, Rng};
use triattn::io::TensorFile;
use triattn::policy::{CompressionConfig, GroupAggregation, Normalization, PrefixProtection, Preset, SelectionMode};
use triattn::round::{run_cpu, RoundResult, Scorer};
use triattn::shard::{all_reduce_in_process, ReductionKind, ShardLayout, ShardRound};
use triattn::stats::Stats;
use triattn::{LayerView, ModelConfig, PairingStyle};

use crate::golden::{check_case, run_compress};

/// (layers, heads, KV heads) of a case's config.json.
fn dims(case: &Path) -> (usize, usize, usize) {
    let m = ModelConfig::from_file(case.join("config.json")).unwrap();
    (m.num_layers, m.num_heads, m.num_kv_heads)
}

/// The splits a model fits: tp 2 and 4, a tp replicating each KV head, pp 2 even and uneven,
/// and tp with pp together; as CLI flags.
fn splits(l: usize, h: usize, hkv: usize) -> Vec<Vec<String>> {
    let fits =
        |tp: usize| h.is_multiple_of(tp) && if tp <= hkv { hkv.is_multiple_of(tp) } else { tp.is_multiple_of(hkv) };
    let mut tps: Vec<usize> = [2, 4, 2 * hkv].into_iter().filter(|&t| fits(t)).collect();
    tps.dedup();
    let mut pps: Vec<Vec<String>> = Vec::new();
    if l.is_multiple_of(2) {
        pps.push(vec!["--pp-size".into(), "2".into()]);
    }
    if l >= 3 {
        pps.push(vec!["--pp-layers".into(), format!("1,{}", l - 1)]);
    }
    let mut out: Vec<Vec<String>> = tps.iter().map(|t| vec!["--tp-size".into(), t.to_string()]).collect();
    out.extend(pps.iter().cloned());
    if let (Some(&tp), Some(pp)) = (tps.last(), pps.last()) {
        out.push([vec!["--tp-size".to_string(), tp.to_string()], pp.clone()].concat());
    }
    out
}

fn same_scores(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        // Equal as numbers (a max may pick +0 where one rank kept -0), NaN where NaN.
        assert!(x == y || (x.is_nan() && y.is_nan()), "{what}[{i}]: {x} vs {y}");
    }
}

/// Every golden case under every split that fits, on `backend`: the case passes, and the outputs
/// equal one rank's on the same backend.
fn golden_cases_split_on(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = 0;
    for case in golden_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let single = dir.path().join(format!("{name}.safetensors"));
        let o = run_compress(&case, &single, &["--backend", backend]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let single = TensorFile::read(&single).unwrap();
        let (l, h, hkv) = dims(&case);
        for split in splits(l, h, hkv) {
            let what = format!("{name} {} on {backend}", split.join(" "));
            let out = dir.path().join(format!("{name}-split.safetensors"));
            let flags: Vec<&str> =
                split.iter().map(String::as_str).chain(["--verbose", "--backend", backend]).collect();
            let o = run_compress(&case, &out, &flags);
            assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.lines().any(|x| x.starts_with("shards: tp ")), "{what}: no shards line in\n{err}");
            let got = TensorFile::read(&out).unwrap();
            check_case(&case, &got);
            // Against one rank: keep sets and compacted rows bit for bit, raw rows bit for bit,
            // reduced scores equal as numbers.
            for (key, tensor) in &single.tensors {
                let g = got.get(key).unwrap();
                assert_eq!(g.shape, tensor.shape, "{what}: {key} shape");
                if key == "score" {
                    same_scores(&format!("{what}: score"), &g.to_f32_vec(), &tensor.to_f32_vec());
                } else {
                    assert!(g.data == tensor.data, "{what}: {key} differs from one rank's");
                }
            }
            runs += 1;
        }
    }
    assert!(runs >= 20, "only {runs} split runs");
}

#[test]
fn golden_cases_split_over_ranks_equal_one_rank() {
    golden_cases_split_on("cpu");
}

/// The same on the kernels (emu): sharded plans run in parts around the exposed buffers.
#[cfg(feature = "emu")]
#[test]
fn golden_cases_split_over_ranks_equal_one_rank_on_emu() {
    golden_cases_split_on("emu");
}

/// The same on a GPU (each rank's plan on the one device; skips loudly without one).
#[cfg(feature = "cuda")]
#[test]
fn golden_cases_split_over_ranks_equal_one_rank_on_cuda() {
    if common::gpu_or_skip("golden_cases_split_over_ranks_equal_one_rank_on_cuda").is_some() {
        golden_cases_split_on("cuda");
    }
}

/// The README's table of bytes per rank at a round (N = 2048 + 128 slots), from the layouts.
#[test]
fn collective_bytes_of_the_readme_table() {
    let n = 2048 + 128;
    let config = |mode| CompressionConfig { mode, ..CompressionConfig::default() };
    let bytes = |m: &ModelConfig, tp: usize, pp: usize, mode: SelectionMode| -> Vec<(ReductionKind, usize)> {
        let shard = ShardLayout::new(m, tp, pp).unwrap().shard(0).unwrap();
        shard.reductions(&config(mode), n).iter().map(|r| (r.kind, r.bytes())).collect()
    };
    let (qwen, llama) = (model(36, 32, 8, 128), model(80, 64, 8, 128));
    use ReductionKind::*;
    use SelectionMode::*;
    assert_eq!(bytes(&qwen, 8, 1, PerHead), vec![]);
    assert_eq!(bytes(&qwen, 8, 1, Union), vec![(UnionMax, 8704)]);
    assert_eq!(bytes(&qwen, 4, 2, PerHead), vec![(LayerSum, 34816)]);
    assert_eq!(bytes(&qwen, 4, 2, PerLayerPerHead), vec![]);
    assert_eq!(bytes(&qwen, 8, 2, PerHead), vec![(LayerSum, 17408)]);
    assert_eq!(bytes(&qwen, 16, 1, PerHead), vec![(GroupMax, 313344)]);
    assert_eq!(bytes(&qwen, 16, 1, PerLayerPerHead), vec![(GroupMax, 313344)]);
    assert_eq!(bytes(&qwen, 16, 2, PerHead), vec![(GroupMax, 156672), (LayerSum, 17408)]);
    assert_eq!(bytes(&qwen, 16, 2, PerLayerPerHead), vec![(GroupMax, 156672)]);
    assert_eq!(bytes(&llama, 8, 2, PerHead), vec![(LayerSum, 17408)]);
    assert_eq!(bytes(&llama, 16, 1, PerHead), vec![(GroupMax, 696320)]);
    assert_eq!(bytes(&llama, 16, 2, PerHead), vec![(GroupMax, 348160), (LayerSum, 17408)]);
    assert_eq!(bytes(&llama, 16, 2, PerLayerPerHead), vec![(GroupMax, 348160)]);
    assert_eq!(bytes(&llama, 32, 1, PerHead), vec![(GroupMax, 696320)]);
    assert_eq!(bytes(&llama, 32, 1, Union), vec![(UnionMax, 8704)]);
    let group = ShardLayout::new(&llama, 32, 1).unwrap().shard(5).unwrap().reductions(&config(PerHead), n);
    assert_eq!(group[0].ranks, vec![4, 5, 6, 7], "tp 32 over 8 KV heads: 4 ranks per group");
}

#[test]
fn verbose_names_the_reductions_and_their_sizes() {
    let case = golden_cases().into_iter().find(|c| c.ends_with("qwen3-paper")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    // Qwen3-shaped: 32 heads, 8 KV heads, 4 layers; tp 16 replicates each KV head on 2 ranks.
    let o = run_compress(&case, &out, &["--tp-size", "16", "--pp-size", "2", "--verbose"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let n = 1152;
    assert!(err.contains("shards: tp 16 x pp 2 (layers per stage [2, 2]), 2 cross-rank reductions"), "{err}");
    assert!(
        err.contains(&format!("all-reduce: group-max (I32 max, 16 groups of 2 ranks, {} elements", 2 * n)),
        "{err}"
    );
    assert!(
        err.contains(&format!("all-reduce: layer-sum (F64 sum, 16 groups of 2 ranks, {n} elements = {} bytes", 8 * n)),
        "{err}"
    );
}

#[test]
fn impossible_splits_are_refused_by_name() {
    let case = golden_cases().into_iter().find(|c| c.ends_with("qwen3-paper")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    for (flags, needle) in [
        (&["--tp-size", "3"][..], "--tp-size: expected a divisor of the 32 query heads, got 3"),
        (&["--tp-size", "0"][..], "--tp-size"),
        (&["--tp-size", "32"][..], "--tp-size"), // 32 > 8 KV heads: fine; checked below it runs
        (&["--pp-size", "3"][..], "--pp-size: expected a divisor of the 4 layers for an even split"),
        (&["--pp-size", "5"][..], "--pp-size: expected 1..=4"),
        (&["--pp-layers", "1,2"][..], "--pp-layers: expected one or more stages"),
        (&["--pp-layers", "4,0"][..], "--pp-layers"),
    ] {
        let o = run_compress(&case, &out, flags);
        let err = String::from_utf8_lossy(&o.stderr);
        if flags == ["--tp-size", "32"] {
            assert!(o.status.success(), "tp 32 (one query head per rank): {err}");
            std::fs::remove_file(&out).unwrap();
            continue;
        }
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: one line expected, got\n{err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?}: output written");
    }
    let m = model(4, 48, 8, 64);
    let e = ShardLayout::new(&m, 12, 1).unwrap_err().to_string();
    assert!(e.contains("tp_size: expected a multiple of the 8 KV heads"), "{e}");
    let m = model(4, 12, 6, 64);
    let e = ShardLayout::new(&m, 4, 1).unwrap_err().to_string();
    assert!(e.contains("tp_size: expected a divisor of the 6 KV heads"), "{e}");
}

#[test]
fn shards_cover_every_head_and_layer_once() {
    let m = model(6, 12, 3, 64);
    for (tp, stages) in [(1, vec![6]), (3, vec![3, 3]), (6, vec![1, 2, 3]), (12, vec![6])] {
        let layout = ShardLayout::with_stage_layers(&m, tp, &stages).unwrap();
        let mut heads = vec![vec![0usize; 12]; 6];
        let mut kv = vec![vec![0usize; 3]; 6];
        for s in layout.shards() {
            assert_eq!(s.rank, s.pp_rank * tp + s.tp_rank);
            for l in s.layers.clone() {
                s.heads.clone().for_each(|h| heads[l][h] += 1);
                s.kv_heads.clone().for_each(|g| kv[l][g] += 1);
                // Every query head belongs to a KV head the rank holds.
                assert!(s.heads.clone().all(|h| s.kv_heads.contains(&(h / 4))), "tp {tp}: {s:?}");
            }
        }
        assert!(heads.iter().flatten().all(|&c| c == 1), "tp {tp}: query heads {heads:?}");
        assert!(kv.iter().flatten().all(|&c| c == (tp / 3).max(1)), "tp {tp}: KV heads {kv:?}");
    }
}

fn random_stats(rng: &mut Rng, m: &ModelConfig) -> Stats {
    let count = m.num_layers * m.num_heads * m.head_dim / 2;
    let mut draw = |f: &mut dyn FnMut(&mut Rng) -> f32| (0..count).map(|_| f(rng)).collect::<Vec<f32>>();
    let re = draw(&mut |r| r.normal() as f32);
    let im = draw(&mut |r| r.normal() as f32);
    let abs = draw(&mut |r| (r.normal().abs() + 1.0) as f32);
    Stats {
        num_layers: m.num_layers,
        num_heads: m.num_heads,
        head_dim: m.head_dim,
        rope_style: PairingStyle::Half,
        q_mean_real: re,
        q_mean_imag: im,
        q_abs_mean: abs,
        sampled_heads: None,
        metadata: Default::default(),
    }
}

/// Every rank's round of `layout`, joined by the in-process all-reduce; the rank results.
fn run_sharded(
    layout: &ShardLayout,
    config: &CompressionConfig,
    scorer: &Scorer,
    keys: &[Vec<f32>],
    n: usize,
    round_start: u64,
    prefix_len: usize,
) -> Vec<RoundResult> {
    let d = scorer.model.head_dim;
    let shards = layout.shards();
    let mut rounds: Vec<ShardRound> = shards
        .iter()
        .map(|s| {
            let views: Vec<LayerView<'_, f32>> = s
                .layers
                .clone()
                .map(|l| {
                    let part = &keys[l][s.kv_heads.start * n * d..s.kv_heads.end * n * d];
                    LayerView::contiguous("k", part, s.kv_heads.len(), n, d).unwrap()
                })
                .collect();
            ShardRound::start(config, s, &s.scorer(scorer).unwrap(), &views, round_start, prefix_len).unwrap()
        })
        .collect();
    let expected: Vec<ReductionKind> = rounds[0].reductions().iter().map(|r| r.kind).collect();
    for _ in 0..expected.len() {
        let mut buffers: Vec<_> = rounds.iter_mut().map(|r| r.pending().expect("a reduction pending")).collect();
        let mut groups: std::collections::BTreeMap<Vec<usize>, Vec<_>> = Default::default();
        for b in buffers.drain(..) {
            groups.entry(b.reduction.ranks.clone()).or_default().push(b);
        }
        for g in groups.values_mut() {
            all_reduce_in_process(g).unwrap();
        }
        drop(groups);
        rounds.iter_mut().for_each(|r| r.resume().unwrap());
    }
    assert!(rounds[0].pending().is_none());
    rounds.into_iter().map(|r| r.finish().unwrap()).collect()
}

#[test]
fn random_shapes_and_splits_equal_one_rank() {
    let mut rng = Rng(12);
    let mut cases = 0;
    while cases < 60 {
        let l = 1 + rng.below(5);
        let hkv = [1, 2, 4][rng.below(3)];
        let group = [1, 2, 4][rng.below(3)];
        let h = hkv * group;
        let tp = [1, 2, 4, 8][rng.below(4)];
        let fits = h % tp == 0 && if tp <= hkv { hkv % tp == 0 } else { tp % hkv == 0 };
        let pp = 1 + rng.below(l.min(3));
        if !fits || tp * pp == 1 {
            continue;
        }
        // Stages of random sizes summing to l.
        let mut stages = vec![1; pp];
        for _ in pp..l {
            stages[rng.below(pp)] += 1;
        }
        let d = 16;
        let m = model(l, h, hkv, d);
        let scorer = Scorer::new(m.clone(), random_stats(&mut rng, &m), None).unwrap();
        let n = 20 + rng.below(120);
        let prefix_len = rng.below(n / 4 + 1);
        let mode = [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union][rng.below(3)];
        let config = CompressionConfig {
            preset: if rng.below(2) == 0 { Preset::Paper } else { Preset::Vllm },
            budget: 8 + rng.below(n),
            mode,
            group_aggregation: if rng.below(2) == 0 { GroupAggregation::Max } else { GroupAggregation::Mean },
            window: rng.below(4),
            normalization: if rng.below(4) == 0 { Normalization::Off } else { Normalization::ZScore },
            prefix: if rng.below(2) == 0 { PrefixProtection::Protected } else { PrefixProtection::Unprotected },
            ..CompressionConfig::default()
        };
        // Keys with repeated rows (ties) and an occasional NaN.
        let mut keys: Vec<Vec<f32>> =
            (0..l).map(|_| (0..hkv * n * d).map(|_| (rng.normal() * 2.0) as f32).collect()).collect();
        for layer in keys.iter_mut() {
            for _ in 0..3 {
                let (a, b) = (rng.below(hkv * n), rng.below(hkv * n));
                let row: Vec<f32> = layer[a * d..(a + 1) * d].to_vec();
                layer[b * d..(b + 1) * d].copy_from_slice(&row);
            }
            if rng.below(6) == 0 {
                let i = rng.below(layer.len());
                layer[i] = f32::NAN;
            }
        }
        let round_start = (n + rng.below(500)) as u64;
        let views: Vec<LayerView<'_, f32>> =
            keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
        let one = run_cpu(&config, &scorer, &views, round_start, prefix_len).unwrap();
        let layout = ShardLayout::with_stage_layers(&m, tp, &stages).unwrap();
        let results = run_sharded(&layout, &config, &scorer, &keys, n, round_start, prefix_len);
        let what = format!("case {cases}: L{l} H{h} Hkv{hkv} tp {tp} stages {stages:?} {config:?}");
        for (s, r) in layout.shards().iter().zip(&results) {
            assert_eq!(r.outcome, one.outcome, "{what}");
            for (i, layer) in s.layers.clone().enumerate() {
                let want = &one.raw[layer][s.heads.start * n..s.heads.end * n];
                assert!(
                    r.raw[i].iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: raw of rank {} layer {layer}",
                    s.rank
                );
            }
            for ll in 0..s.layers.len() {
                for lg in 0..s.kv_heads.len() {
                    let local = mode.set_index(ll, lg, s.kv_heads.len());
                    let global = mode.set_index(s.layers.start + ll, s.kv_heads.start + lg, hkv);
                    assert_eq!(r.keep[local], one.keep[global], "{what}: rank {} set {global}", s.rank);
                    same_scores(
                        &format!("{what}: rank {} score {global}", s.rank),
                        &r.score[local * n..(local + 1) * n],
                        &one.score[global * n..(global + 1) * n],
                    );
                }
            }
        }
        cases += 1;
    }
}

#[test]
fn a_shard_round_refuses_out_of_order_calls() {
    let m = model(2, 4, 2, 16);
    let mut rng = Rng(3);
    let scorer = Scorer::new(m.clone(), random_stats(&mut rng, &m), None).unwrap();
    let layout = ShardLayout::new(&m, 1, 2).unwrap();
    let shard = layout.shard(0).unwrap();
    let keys: Vec<f32> = (0..2 * 40 * 16).map(|_| rng.normal() as f32).collect();
    let views = [LayerView::contiguous("k", &keys, 2, 40, 16).unwrap()];
    let config = CompressionConfig { budget: 16, ..CompressionConfig::default() };
    // The full scorer is not the rank's.
    let e = ShardRound::start(&config, &shard, &scorer, &views, 40, 0).unwrap_err().to_string();
    assert!(e.contains("rank 0 scorer"), "{e}");
    let round = ShardRound::start(&config, &shard, &shard.scorer(&scorer).unwrap(), &views, 40, 0).unwrap();
    assert_eq!(round.reductions().len(), 1);
    let e = round.finish().unwrap_err().to_string();
    assert!(e.contains("layer-sum pending on rank 0"), "{e}");
    let mut round = ShardRound::start(&config, &shard, &shard.scorer(&scorer).unwrap(), &views, 40, 0).unwrap();
    round.resume().unwrap();
    assert!(round.resume().unwrap_err().to_string().contains("resume: expected a pending reduction"));
    assert!(layout.shard(2).is_err());
}

/// Sharded plans on the kernels (emu), batches of two sequences with their own prompts and round
/// starts, random shapes and splits: keep sets and compacted rows equal one rank's plan, raw
/// scores bit for bit, reduced scores as numbers.
#[cfg(feature = "emu")]
#[test]
fn sharded_plans_on_emu_equal_one_plan_for_batches() {
    use triattn::cuda::{CacheLayout, Compaction, RankTensors, RoundPlan, RoundShape, RowStrides};
    use triattn::tuning::Dispatch;
    use triattn::Backend;
    let mut rng = Rng(77);
    let mut cases = 0;
    while cases < 12 {
        let l = 1 + rng.below(4);
        let hkv = [1, 2, 4][rng.below(3)];
        let h = hkv * [1, 2, 4][rng.below(3)];
        let tp = [1, 2, 4, 8][rng.below(4)];
        let pp = 1 + rng.below(l.min(3));
        let fits = h % tp == 0 && if tp <= hkv { hkv % tp == 0 } else { tp % hkv == 0 };
        if !fits || tp * pp == 1 {
            continue;
        }
        let mut stages = vec![1; pp];
        for _ in pp..l {
            stages[rng.below(pp)] += 1;
        }
        let (d, seqs) = (64, 2);
        let m = model(l, h, hkv, d);
        let scorer = Scorer::new(m.clone(), random_stats(&mut rng, &m), None).unwrap();
        let n = 40 + rng.below(200);
        let mode = [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union][rng.below(3)];
        let config = CompressionConfig {
            budget: 16 + rng.below(n / 2),
            mode,
            group_aggregation: if rng.below(2) == 0 { GroupAggregation::Max } else { GroupAggregation::Mean },
            ..CompressionConfig::default()
        };
        let prefix_lens = [rng.below(8), rng.below(8)];
        let round_starts = [(n + rng.below(300)) as u64, (n + rng.below(300)) as u64];
        let strides = |slots: usize| RowStrides { head_stride: slots * d, row_stride: d };
        let kept = config.budget;
        let shape = |_: usize| RoundShape {
            dtype: triattn::DType::F32,
            len: n,
            prefix_len: 0,
            value_dim: d,
            layout: CacheLayout::Contiguous { keys: strides(n), values: strides(n) },
            compaction: Compaction::OutOfPlace { keys: strides(kept), values: strides(kept) },
            positions: None,
        };
        // Sequence-major [S * L] tensors [Hkv, N, D] of keys; values the same rows negated.
        let keys: Vec<Vec<f32>> =
            (0..seqs * l).map(|_| (0..hkv * n * d).map(|_| rng.normal() as f32).collect()).collect();
        let values: Vec<Vec<f32>> = keys.iter().map(|k| k.iter().map(|x| -x).collect()).collect();
        let backend = Backend::Emu;
        let one = RoundPlan::new_batch(&scorer, &config, shape(0), &prefix_lens).unwrap();
        let mut k1: Vec<Vec<f32>> = (0..seqs * l).map(|_| vec![0f32; hkv * kept * d]).collect();
        let mut v1 = k1.clone();
        let whole = {
            let k: Vec<&[f32]> = keys.iter().map(Vec::as_slice).collect();
            let v: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let mut ko: Vec<&mut [f32]> = k1.iter_mut().map(Vec::as_mut_slice).collect();
            let mut vo: Vec<&mut [f32]> = v1.iter_mut().map(Vec::as_mut_slice).collect();
            backend.round_out_of_place(&one, &k, &v, &mut ko, &mut vo, &round_starts).unwrap()
        };
        let layout = ShardLayout::with_stage_layers(&m, tp, &stages).unwrap();
        let shards = layout.shards();
        let plans: Vec<RoundPlan> = shards
            .iter()
            .map(|s| {
                RoundPlan::new_shard(
                    &s.scorer(&scorer).unwrap(),
                    s,
                    &config,
                    shape(0),
                    &prefix_lens,
                    &Dispatch::built_in(),
                )
                .unwrap()
            })
            .collect();
        let what = format!("case {cases}: L{l} H{h} Hkv{hkv} tp {tp} stages {stages:?} {mode:?} n {n}");
        assert_eq!(plans[0].reductions().len(), shards[0].reductions(&config, n).len(), "{what}");
        // Each rank's tensors: its layers of each sequence, its KV heads.
        let slice =
            |t: &Vec<f32>, s: &triattn::shard::Shard| t[s.kv_heads.start * n * d..s.kv_heads.end * n * d].to_vec();
        let rank_k: Vec<Vec<Vec<f32>>> = shards
            .iter()
            .map(|s| {
                (0..seqs)
                    .flat_map(|q| s.layers.clone().map(move |ll| (q, ll)))
                    .map(|(q, ll)| slice(&keys[q * l + ll], s))
                    .collect()
            })
            .collect();
        let rank_v: Vec<Vec<Vec<f32>>> = shards
            .iter()
            .map(|s| {
                (0..seqs)
                    .flat_map(|q| s.layers.clone().map(move |ll| (q, ll)))
                    .map(|(q, ll)| slice(&values[q * l + ll], s))
                    .collect()
            })
            .collect();
        let mut rank_ko: Vec<Vec<Vec<f32>>> = shards
            .iter()
            .map(|s| (0..seqs * s.layers.len()).map(|_| vec![0f32; s.kv_heads.len() * kept * d]).collect())
            .collect();
        let mut rank_vo = rank_ko.clone();
        let parts = {
            let mut ranks: Vec<RankTensors<'_, f32>> = rank_k
                .iter()
                .zip(&rank_v)
                .zip(rank_ko.iter_mut().zip(rank_vo.iter_mut()))
                .map(|((k, v), (ko, vo))| RankTensors {
                    keys: k.iter().map(Vec::as_slice).collect(),
                    values: v.iter().map(Vec::as_slice).collect(),
                    keys_out: ko.iter_mut().map(Vec::as_mut_slice).collect(),
                    values_out: vo.iter_mut().map(Vec::as_mut_slice).collect(),
                })
                .collect();
            backend.round_out_of_place_sharded(&plans, &mut ranks, &round_starts).unwrap()
        };
        for (r, s) in shards.iter().enumerate() {
            let lr = s.layers.len();
            for q in 0..seqs {
                let (got, want) = (&parts[r].outputs[q], &whole.outputs[q]);
                for (ll, layer) in s.layers.clone().enumerate() {
                    let w = &want.raw[layer][s.heads.start * n..s.heads.end * n];
                    assert!(got.raw[ll].iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: raw");
                    for (lg, g) in s.kv_heads.clone().enumerate() {
                        let local = mode.set_index(ll, lg, s.kv_heads.len());
                        let global = mode.set_index(layer, g, hkv);
                        assert_eq!(got.keep[local], want.keep[global], "{what}: rank {r} seq {q} set {global}");
                        same_scores(
                            &format!("{what}: rank {r} seq {q} score {global}"),
                            &got.score[local * n..(local + 1) * n],
                            &want.score[global * n..(global + 1) * n],
                        );
                        let row = kept * d;
                        let (a, b) = (
                            &rank_ko[r][q * lr + ll][lg * row..(lg + 1) * row],
                            &k1[q * l + layer][g * row..(g + 1) * row],
                        );
                        assert!(a == b, "{what}: compacted K of rank {r} seq {q} layer {layer} head {g}");
                        let (a, b) = (
                            &rank_vo[r][q * lr + ll][lg * row..(lg + 1) * row],
                            &v1[q * l + layer][g * row..(g + 1) * row],
                        );
                        assert!(a == b, "{what}: compacted V");
                    }
                }
            }
        }
        cases += 1;
    }
}

/// A decode needs no collective: each rank decodes its query heads over its KV heads' kept
/// slots (the keep sets of its own round), and gets exactly the rows a single rank's decode gives
/// those heads. tp 4 over 2 KV heads (each replicated on 2 ranks) and pp 2.
#[test]
fn a_rank_decodes_its_heads_over_its_own_keep_sets() {
    use triattn::cpu::decode::{decode_layer, SlotLists};
    use triattn::decode::{DecodeOptions, ListLayout};
    let mut rng = Rng(31);
    let (l, h, hkv, d, n) = (2, 8, 2, 32, 90);
    let m = model(l, h, hkv, d);
    let scorer = Scorer::new(m.clone(), random_stats(&mut rng, &m), None).unwrap();
    let config = CompressionConfig { budget: 40, ..CompressionConfig::default() };
    let keys: Vec<Vec<f32>> = (0..l).map(|_| (0..hkv * n * d).map(|_| rng.normal() as f32).collect()).collect();
    let values: Vec<Vec<f32>> = (0..l).map(|_| (0..hkv * n * d).map(|_| rng.normal() as f32).collect()).collect();
    let queries: Vec<Vec<f32>> = (0..l).map(|_| (0..h * d).map(|_| rng.normal() as f32).collect()).collect();
    let views: Vec<LayerView<'_, f32>> =
        keys.iter().map(|k| LayerView::contiguous("k", k, hkv, n, d).unwrap()).collect();
    let one = run_cpu(&config, &scorer, &views, 500, 4).unwrap();
    let layout = ShardLayout::new(&m, 4, 2).unwrap();
    let ranks = run_sharded(&layout, &config, &scorer, &keys, n, 500, 4);
    let options = DecodeOptions::default();
    for layer in 0..l {
        let kv = LayerView::contiguous("k", &keys[layer], hkv, n, d).unwrap();
        let vv = LayerView::contiguous("v", &values[layer], hkv, n, d).unwrap();
        let lists = SlotLists::new(ListLayout::PerKvHead, one.keep.clone(), 1, hkv, n).unwrap();
        let whole = decode_layer(&queries[layer], 1, &kv, &vv, &lists, 0, None, &options).unwrap();
        for (s, r) in layout.shards().iter().zip(&ranks) {
            if !s.layers.contains(&layer) {
                continue;
            }
            let heads = s.kv_heads.clone();
            let part = |t: &[f32]| t[heads.start * n * d..heads.end * n * d].to_vec();
            let (k, v) = (part(&keys[layer]), part(&values[layer]));
            let kv = LayerView::contiguous("k", &k, heads.len(), n, d).unwrap();
            let vv = LayerView::contiguous("v", &v, heads.len(), n, d).unwrap();
            let lists = SlotLists::new(ListLayout::PerKvHead, r.keep.clone(), 1, heads.len(), n).unwrap();
            let q = &queries[layer][s.heads.start * d..s.heads.end * d];
            let got = decode_layer(q, 1, &kv, &vv, &lists, 0, None, &options).unwrap();
            let want = &whole.o[s.heads.start * d..s.heads.end * d];
            assert!(
                got.o.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {} layer {layer}: o",
                s.rank
            );
            let want = &whole.lse[s.heads.clone()];
            assert!(
                got.lse.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {} layer {layer}: lse",
                s.rank
            );
        }
    }
}
