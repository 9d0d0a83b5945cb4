//! `triattn compress --tp-size R --pp-size P`: the round as `R x P` rank-local rounds in one
//! process, joined only through the exposed reductions, an in-process all-reduce standing in
//! for the engine's collective; the rank results are assembled into one rank's outputs.

use std::collections::BTreeMap;
use std::time::Instant;

use triattn::policy::CompressionConfig;
use triattn::round::{RoundResult, Scorer, StageTimes};
use triattn::shard::{all_reduce_in_process, ReductionBuffer, ShardLayout, ShardRound};
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

/// The rank-local rounds of `layout` and their compaction, assembled as one rank's.
pub(super) fn compress_sharded<T: Element>(
    layout: &ShardLayout,
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<Compressed> {
    let (n, d, dv, es) = (cache.n, cache.head_dim, cache.value_dim, cache.dtype.size());
    let shards = layout.shards();
    // Each rank's keys: its layers, its KV heads, decoded from the dump.
    let rank_keys: Vec<Vec<Vec<T>>> = shards
        .iter()
        .map(|s| {
            s.layers
                .clone()
                .map(|l| T::decode_le(&cache.k[l].data[s.kv_heads.start * n * d * es..s.kv_heads.end * n * d * es]))
                .collect()
        })
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
    loop {
        let mut groups: BTreeMap<Vec<usize>, Vec<ReductionBuffer<'_>>> = BTreeMap::new();
        for round in rounds.iter_mut() {
            if let Some(buffer) = round.pending() {
                groups.entry(buffer.reduction.ranks.clone()).or_default().push(buffer);
            }
        }
        let Some(first) = groups.values().next().and_then(|g| g.first()) else { break };
        let (kind, len, group_size, bytes) =
            (first.reduction.kind, first.reduction.len, first.reduction.ranks.len(), first.reduction.bytes());
        let t = Instant::now();
        let count = groups.len();
        for buffers in groups.values_mut() {
            all_reduce_in_process(buffers)?;
        }
        notes.push(format!(
            "{} ({:?} {}, {count} group{} of {group_size} ranks, {len} elements = {bytes} bytes per rank, {:.3} ms)",
            kind.name(),
            kind.dtype(),
            match kind.op() {
                triattn::shard::ReduceOp::Max => "max",
                triattn::shard::ReduceOp::Sum => "sum",
            },
            if count == 1 { "" } else { "s" },
            super::ms(t.elapsed()),
        ));
        drop(groups);
        for round in rounds.iter_mut() {
            round.resume()?;
        }
    }
    let results: Vec<RoundResult> = rounds.into_iter().map(ShardRound::finish).collect::<Result<_>>()?;

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

    // Each rank compacts its KV heads of its layers with its own sets (a replicated KV head
    // once); the bytes land in one file.
    let t0 = Instant::now();
    let kept = result.keep[0].len();
    let mut k: Vec<Vec<u8>> = (0..l_all).map(|_| vec![0u8; hkv * kept * d * es]).collect();
    let mut v: Vec<Vec<u8>> = (0..l_all).map(|_| vec![0u8; hkv * kept * dv * es]).collect();
    let mut done = vec![false; l_all * hkv];
    for (s, r) in shards.iter().zip(&results) {
        for (ll, l) in s.layers.clone().enumerate() {
            for (lg, g) in s.kv_heads.clone().enumerate() {
                if std::mem::replace(&mut done[l * hkv + g], true) {
                    continue;
                }
                let set = &r.keep[mode.set_index(ll, lg, s.kv_heads.len())];
                for (src, dst, dim) in [(&cache.k[l].data, &mut k[l], d), (&cache.v[l].data, &mut v[l], dv)] {
                    let row = dim * es;
                    triattn::cpu::compact::gather_rows(
                        &src[g * n * row..(g + 1) * n * row],
                        row,
                        row,
                        set,
                        &mut dst[g * kept * row..(g + 1) * kept * row],
                    );
                }
            }
        }
    }
    Ok(Compressed { result, k, v, compact: t0.elapsed(), kernels: Vec::new(), reductions: notes })
}
