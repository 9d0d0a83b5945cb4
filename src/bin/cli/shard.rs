//! `triattn compress --tp-size R --pp-size P`: the round as `R x P` rank-local rounds in one
//! process, joined only through the exposed reductions, an in-process all-reduce standing in
//! for the engine's collective; the rank results are assembled into one rank's outputs.

use std::collections::BTreeMap;
use std::time::Instant;

use triattn::policy::CompressionConfig;
use triattn::round::{RoundResult, Scorer, StageTimes};
use triattn::shard::{all_reduce_in_process, ReduceOp, Reduction, ReductionBuffer, ShardLayout, ShardRound};
use triattn::{Element, Error, ErrorKind, LayerView, Result};

use super::{Compressed, DumpedCache};
use crate::CompressArgs;

/// The layout the flags ask for, or `None` for one rank.
pub(super) fn layout(a: &CompressArgs, model: &triattn::ModelConfig) -> Result<Option<ShardLayout>> {
    let layout = match &a.pp_layers {
        Some(layers) => ShardLayout::with_stage_layers(model, a.tp_size, layers),
        None => ShardLayout::new(model, a.tp_size, a.pp_size),
    }
    .map_err(|e| {
        // The library names its fields; the command line names its flags.
        let message = e.message().replacen("tp_size", "--tp-size", 1).replacen("pp_size", "--pp-size", 1);
        Error::new(e.kind(), message.replacen("stage_layers", "--pp-layers", 1))
    })?;
    Ok((layout.ranks() > 1).then_some(layout))
}

/// One line per collective for `--verbose`: kind, dtype and op, groups, elements and bytes.
fn describe(r: &Reduction, ranks: usize, ms: Option<f64>) -> String {
    let groups = ranks / r.ranks.len();
    format!(
        "{} ({:?} {}, {groups} group{} of {} ranks, {} elements = {} bytes per rank{})",
        r.kind.name(),
        r.kind.dtype(),
        match r.kind.op() {
            ReduceOp::Max => "max",
            ReduceOp::Sum => "sum",
        },
        if groups == 1 { "" } else { "s" },
        r.ranks.len(),
        r.len,
        r.bytes(),
        ms.map(|t| format!(", {t:.3} ms")).unwrap_or_default(),
    )
}

/// Each rank's slice of a dumped tensor: its KV heads of one layer, decoded.
fn rank_rows<T: Element>(t: &triattn::io::Tensor, heads: &std::ops::Range<usize>, n: usize, dim: usize) -> Vec<T> {
    let row = n * dim * T::DTYPE.size();
    T::decode_le(&t.data[heads.start * row..heads.end * row])
}

/// The rank-local rounds of `layout` on the CPU: [`ShardRound`]s joined by the in-process
/// all-reduce; the rank results and a line per collective.
fn rounds_on_cpu<T: Element>(
    shards: &[triattn::shard::Shard],
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<(Vec<RoundResult>, Vec<String>)> {
    let (n, d) = (cache.n, cache.head_dim);
    let rank_keys: Vec<Vec<Vec<T>>> = shards
        .iter()
        .map(|s| s.layers.clone().map(|l| rank_rows::<T>(cache.k[l], &s.kv_heads, n, d)).collect())
        .collect();
    let mut rounds = Vec::with_capacity(shards.len());
    for (s, keys) in shards.iter().zip(&rank_keys) {
        let views: Vec<LayerView<'_, T>> = keys
            .iter()
            .zip(s.layers.clone())
            .map(|(k, l)| LayerView::contiguous(&format!("rank {} k.{l}", s.rank), k, s.kv_heads.len(), n, d))
            .collect::<Result<_>>()?;
        rounds.push(ShardRound::start(config, s, &s.scorer(scorer)?, &views, round_start, prefix_len)?);
    }
    // Each collective: every rank's pending buffer, all-reduced within the ranks that share it.
    let mut notes = Vec::new();
    while let Some(reduction) = rounds[0].reductions().get(notes.len()).cloned() {
        let t = Instant::now();
        let mut groups: BTreeMap<Vec<usize>, Vec<ReductionBuffer<'_>>> = BTreeMap::new();
        for round in rounds.iter_mut() {
            let buffer = round.pending().expect("every rank has the same collectives");
            groups.entry(buffer.reduction.ranks.clone()).or_default().push(buffer);
        }
        for buffers in groups.values_mut() {
            all_reduce_in_process(buffers)?;
        }
        drop(groups);
        notes.push(describe(&reduction, shards.len(), Some(super::ms(t.elapsed()))));
        for round in rounds.iter_mut() {
            round.resume()?;
        }
    }
    let results = rounds.into_iter().map(ShardRound::finish).collect::<Result<_>>()?;
    Ok((results, notes))
}

/// The rank results and compacted rows (`[L_rank]` tensors `[Hkv_rank, kept, dim]` of K, then
/// of V, encoded) of a sharded round.
type RankRounds = (Vec<RoundResult>, Vec<(Vec<Vec<u8>>, Vec<Vec<u8>>)>, Vec<String>);

/// The rank-local rounds of `layout` as sharded out-of-place plans on a kernel backend, run part
/// by part with the in-process all-reduce between parts.
#[cfg(any(feature = "emu", feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
fn rounds_on_kernels<T: Element>(
    backend: &triattn::round::Backend,
    dispatch: &triattn::tuning::Dispatch,
    shards: &[triattn::shard::Shard],
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<RankRounds> {
    use triattn::cuda::{CacheLayout, Compaction, RankTensors, RoundPlan, RoundShape, RowStrides};
    let (n, d, dv) = (cache.n, cache.head_dim, cache.value_dim);
    let kept = config.outcome(n, prefix_len.min(n)).kept(n);
    let mut plans = Vec::with_capacity(shards.len());
    for s in shards {
        let strides = |dim: usize, slots: usize| RowStrides { head_stride: slots * dim, row_stride: dim };
        let shape = RoundShape {
            dtype: T::DTYPE,
            len: n,
            prefix_len,
            value_dim: dv,
            layout: CacheLayout::Contiguous { keys: strides(d, n), values: strides(dv, n) },
            compaction: Compaction::OutOfPlace { keys: strides(d, kept), values: strides(dv, kept) },
            positions: None,
        };
        plans.push(RoundPlan::new_shard(&s.scorer(scorer)?, s, config, shape, &[prefix_len], dispatch)?);
    }
    let notes: Vec<String> = plans[0].reductions().iter().map(|r| describe(r, shards.len(), None)).collect();
    let keys: Vec<Vec<Vec<T>>> = shards
        .iter()
        .map(|s| s.layers.clone().map(|l| rank_rows::<T>(cache.k[l], &s.kv_heads, n, d)).collect())
        .collect();
    let values: Vec<Vec<Vec<T>>> = shards
        .iter()
        .map(|s| s.layers.clone().map(|l| rank_rows::<T>(cache.v[l], &s.kv_heads, n, dv)).collect())
        .collect();
    let zero = T::from_f32(0.0);
    let mut k_out: Vec<Vec<Vec<T>>> =
        shards.iter().map(|s| s.layers.clone().map(|_| vec![zero; s.kv_heads.len() * kept * d]).collect()).collect();
    let mut v_out: Vec<Vec<Vec<T>>> =
        shards.iter().map(|s| s.layers.clone().map(|_| vec![zero; s.kv_heads.len() * kept * dv]).collect()).collect();
    let host = {
        let mut ranks: Vec<RankTensors<'_, T>> = keys
            .iter()
            .zip(&values)
            .zip(k_out.iter_mut().zip(v_out.iter_mut()))
            .map(|((k, v), (ko, vo))| RankTensors {
                keys: k.iter().map(Vec::as_slice).collect(),
                values: v.iter().map(Vec::as_slice).collect(),
                keys_out: ko.iter_mut().map(Vec::as_mut_slice).collect(),
                values_out: vo.iter_mut().map(Vec::as_mut_slice).collect(),
            })
            .collect();
        backend.round_out_of_place_sharded(&plans, &mut ranks, &[round_start])?
    };
    let results = host
        .into_iter()
        .zip(&plans)
        .map(|(mut h, plan)| {
            let o = h.outputs.swap_remove(0);
            let times = triattn::round::StageTimes::of(&h.timings);
            RoundResult { n, raw: o.raw, score: o.score, keep: o.keep, outcome: plan.outcome(), times }
        })
        .collect();
    let encode = |t: Vec<Vec<T>>| t.iter().map(|x| T::encode_le(x)).collect::<Vec<_>>();
    let rows = k_out.into_iter().zip(v_out).map(|(k, v)| (encode(k), encode(v))).collect();
    Ok((results, rows, notes))
}

/// The rank-local rounds of `layout` and their compaction, assembled as one rank's.
#[allow(clippy::too_many_arguments)]
pub(super) fn compress_sharded<T: Element>(
    backend: &triattn::round::Backend,
    dispatch: &triattn::tuning::Dispatch,
    layout: &ShardLayout,
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<Compressed> {
    let (n, d, dv, es) = (cache.n, cache.head_dim, cache.value_dim, cache.dtype.size());
    let shards = layout.shards();
    let (results, rank_rows, notes): RankRounds = if backend.is_cpu() {
        let _ = dispatch;
        let (results, notes) = rounds_on_cpu::<T>(&shards, config, scorer, cache, round_start, prefix_len)?;
        (results, Vec::new(), notes)
    } else {
        #[cfg(any(feature = "emu", feature = "cuda"))]
        {
            rounds_on_kernels::<T>(backend, dispatch, &shards, config, scorer, cache, round_start, prefix_len)?
        }
        #[cfg(not(any(feature = "emu", feature = "cuda")))]
        unreachable!("a build without kernels has only the CPU backend")
    };

    // One rank's outputs: raw rows by (layer, head); each set from the first rank holding it,
    // every replica checked against it.
    let model = &scorer.model;
    let (l_all, h, hkv) = (model.num_layers, model.num_heads, model.num_kv_heads);
    let mode = config.mode;
    let sets = mode.num_sets(l_all, hkv);
    let mut raw = vec![Vec::new(); l_all];
    let mut score: Vec<Option<&[f32]>> = vec![None; sets];
    let mut keep: Vec<Option<&Vec<u32>>> = vec![None; sets];
    let mut times = StageTimes::default();
    for (s, r) in shards.iter().zip(&results) {
        for (i, l) in s.layers.clone().enumerate() {
            if raw[l].is_empty() {
                raw[l] = vec![0f32; h * n];
            }
            raw[l][s.heads.start * n..s.heads.end * n].copy_from_slice(&r.raw[i]);
        }
        let (local_l, local_kv) = (s.layers.len(), s.kv_heads.len());
        for ll in 0..local_l {
            for lg in 0..local_kv {
                let local = mode.set_index(ll, lg, local_kv);
                let global = mode.set_index(s.layers.start + ll, s.kv_heads.start + lg, hkv);
                let row = &r.score[local * n..(local + 1) * n];
                match keep[global] {
                    None => {
                        keep[global] = Some(&r.keep[local]);
                        score[global] = Some(row);
                    }
                    Some(k) if k != &r.keep[local] || score[global].is_some_and(|x| x != row) => {
                        return Err(Error::new(
                            ErrorKind::ShapeMismatch,
                            format!("sharded round: rank {} disagrees with another rank on keep set {global}", s.rank),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        times.score = times.score.max(r.times.score);
        times.normalize = times.normalize.max(r.times.normalize);
        times.reduce = times.reduce.max(r.times.reduce);
        times.select = times.select.max(r.times.select);
    }
    let keep: Vec<Vec<u32>> = keep.into_iter().map(|k| k.expect("every set has a rank").clone()).collect();
    let score: Vec<f32> = score.into_iter().flat_map(|s| s.expect("every set has a rank").iter().copied()).collect();
    let result = RoundResult { n, raw, score, keep, outcome: results[0].outcome, times };

    // Each rank compacts its KV heads of its layers with its own sets (on a kernel backend its
    // plan did; on the CPU the gather runs here); a replicated KV head lands once.
    let t0 = Instant::now();
    let kept = result.keep[0].len();
    let mut k: Vec<Vec<u8>> = (0..l_all).map(|_| vec![0u8; hkv * kept * d * es]).collect();
    let mut v: Vec<Vec<u8>> = (0..l_all).map(|_| vec![0u8; hkv * kept * dv * es]).collect();
    let mut done = vec![false; l_all * hkv];
    for (r, (s, res)) in shards.iter().zip(&results).enumerate() {
        for (ll, l) in s.layers.clone().enumerate() {
            for (lg, g) in s.kv_heads.clone().enumerate() {
                if std::mem::replace(&mut done[l * hkv + g], true) {
                    continue;
                }
                let set = &res.keep[mode.set_index(ll, lg, s.kv_heads.len())];
                for (which, dst, dim) in [(0, &mut k[l], d), (1, &mut v[l], dv)] {
                    let row = dim * es;
                    let dst = &mut dst[g * kept * row..(g + 1) * kept * row];
                    match rank_rows.get(r) {
                        Some((k_rank, v_rank)) => {
                            let src = if which == 0 { &k_rank[ll] } else { &v_rank[ll] };
                            dst.copy_from_slice(&src[lg * kept * row..(lg + 1) * kept * row]);
                        }
                        None => {
                            let src = if which == 0 { &cache.k[l].data } else { &cache.v[l].data };
                            triattn::cpu::compact::gather_rows(
                                &src[g * n * row..(g + 1) * n * row],
                                row,
                                row,
                                set,
                                dst,
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(Compressed { result, k, v, compact: t0.elapsed(), kernels: Vec::new(), reductions: notes })
}
