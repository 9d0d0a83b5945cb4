//! One rank's round on the CPU backend, in parts around the cross-rank reductions.
//!
//! [`ShardRound::start`] scores and normalises the rank's rows and runs the reduction up to the
//! first collective; while [`ShardRound::pending`] exposes a buffer, the engine all-reduces it
//! in place across [`Reduction::ranks`] and calls [`ShardRound::resume`]; [`ShardRound::finish`]
//! guards, selects and returns the rank's [`RoundResult`].

use std::time::Instant;

use super::{key_to_max, max_key, Reduction, ReductionKind, Shard};
use crate::cache::LayerView;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::policy::{CompressionConfig, GroupAggregation, SelectionMode};
use crate::round::{self, RoundResult, Scorer, StageTimes};

/// The buffer of a pending reduction, to all-reduce in place across `reduction.ranks`.
#[derive(Debug)]
pub struct ReductionBuffer<'a> {
    /// The rank that exposes it.
    pub rank: usize,
    /// What it holds, its op, and which ranks share it.
    pub reduction: Reduction,
    /// The elements.
    pub data: ReductionData<'a>,
}

/// The elements of a [`ReductionBuffer`].
#[derive(Debug)]
pub enum ReductionData<'a> {
    /// Order-preserving keys ([`super::max_key`]): all-reduce with max over `i32`.
    MaxKeys(&'a mut [i32]),
    /// Partial sums: all-reduce with sum over `f64`.
    Sums(&'a mut [f64]),
}

/// One rank's round, run in parts (see the module docs).
#[derive(Debug)]
pub struct ShardRound {
    config: CompressionConfig,
    shard: Shard,
    n: usize,
    prefix_len: usize,
    raw: Vec<Vec<f32>>,
    z: Vec<Vec<f32>>,
    reductions: Vec<Reduction>,
    /// Index of the next reduction to expose (`reductions.len()` when none is left).
    next: usize,
    keys: Vec<i32>,
    sums: Vec<f64>,
    times: StageTimes,
}

impl ShardRound {
    /// Score and normalise the rank's rows and reduce up to the first collective.
    ///
    /// `scorer` is the rank's ([`Shard::scorer`]); `keys` holds its layers, `[Hkv_rank, N, D]`
    /// each.
    ///
    /// # Errors
    /// As [`crate::round::run`]; `ShapeMismatch` when `scorer` is not the shard's.
    pub fn start<T: Element>(
        config: &CompressionConfig,
        shard: &Shard,
        scorer: &Scorer,
        keys: &[LayerView<'_, T>],
        round_start: u64,
        prefix_len: usize,
    ) -> Result<Self> {
        config.validate()?;
        shard.check_scorer(scorer)?;
        let m = &scorer.model;
        let n = round::check_keys(m, keys, round_start, prefix_len)?;
        let (raw, z, times) = round::score_and_normalize(config, scorer, keys, round_start, prefix_len)?;
        let mut round = ShardRound {
            config: *config,
            shard: shard.clone(),
            n,
            prefix_len,
            raw,
            z,
            reductions: shard.reductions(config, n),
            next: 0,
            keys: Vec::new(),
            sums: Vec::new(),
            times,
        };
        let t = Instant::now();
        round.reduce_locally();
        round.times.reduce += t.elapsed();
        Ok(round)
    }

    /// The shard this round runs on.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Every collective of this round, in order.
    pub fn reductions(&self) -> &[Reduction] {
        &self.reductions
    }

    /// The buffer to all-reduce now, or `None` when the round can finish.
    pub fn pending(&mut self) -> Option<ReductionBuffer<'_>> {
        let reduction = self.reductions.get(self.next)?.clone();
        let data = match reduction.kind.op() {
            super::ReduceOp::Max => ReductionData::MaxKeys(&mut self.keys),
            super::ReduceOp::Sum => ReductionData::Sums(&mut self.sums),
        };
        Some(ReductionBuffer { rank: self.shard.rank, reduction, data })
    }

    /// Continue after the pending buffer was all-reduced, up to the next collective.
    ///
    /// # Errors
    /// `InvalidArgument` when nothing is pending.
    pub fn resume(&mut self) -> Result<()> {
        let Some(done) = self.reductions.get(self.next).map(|r| r.kind) else {
            return Err(Error::invalid_argument("resume", "a pending reduction", "none (finish the round)"));
        };
        self.next += 1;
        let t = Instant::now();
        if done == ReductionKind::GroupMax && self.config.mode == SelectionMode::PerHead {
            // Group maxima of every layer of the stage are whole: sum them over the layers.
            let n = self.n;
            self.sums = (0..n)
                .map(|slot| {
                    let mut sum = 0f64;
                    for l in 0..self.shard.layers.len() {
                        sum += key_to_max(self.keys[l * n + slot]) as f64;
                    }
                    sum
                })
                .collect();
        }
        self.times.reduce += t.elapsed();
        Ok(())
    }

    /// Guard the protected slots, select, and return the rank's result: its layers' raw scores
    /// (`[H_rank, N]` each), its reduced rows and keep sets ([`Shard::num_sets`], in the
    /// order of [`SelectionMode::set_index`] over the rank's layers and KV heads).
    ///
    /// # Errors
    /// `InvalidArgument` while a reduction is pending.
    pub fn finish(self) -> Result<RoundResult> {
        if let Some(r) = self.reductions.get(self.next) {
            return Err(Error::invalid_argument(
                "finish",
                "every reduction all-reduced and resumed",
                format!("{} pending on rank {}", r.kind.name(), self.shard.rank),
            ));
        }
        let ShardRound { config, shard, n, prefix_len, raw, keys, sums, mut times, .. } = self;
        let t = Instant::now();
        let global = &shard.layout;
        let mut score: Vec<f32> = match config.mode {
            SelectionMode::PerHead => {
                let layers = global.num_layers as f64;
                sums.iter().map(|&s| (s / layers) as f32).collect()
            }
            SelectionMode::PerLayerPerHead if config.group_aggregation == GroupAggregation::Mean => {
                let group = (global.num_heads / global.num_kv_heads) as f64;
                sums.iter().map(|&s| (s / group) as f32).collect()
            }
            SelectionMode::PerLayerPerHead | SelectionMode::Union => keys.iter().map(|&k| key_to_max(k)).collect(),
        };
        round::guard_protected(&config, &mut score, n, prefix_len);
        times.reduce += t.elapsed();
        let t = Instant::now();
        let (keep, outcome) = round::select_sets(&config, &score, n, prefix_len, shard.num_sets(config.mode));
        times.select = t.elapsed();
        Ok(RoundResult { n, raw, score, keep, outcome, times })
    }

    /// The reduction's first part, from the rank's z-scores: group maxima or sums per layer
    /// (`keys` / `sums`), or the rank's share of the layer sum or union max.
    fn reduce_locally(&mut self) {
        use crate::cpu::reduce::{group_sum_row, layer_sum_row, reduce};
        let (n, hkv, heads) = (self.n, self.shard.kv_heads.len(), self.shard.heads.len());
        let group = heads / hkv;
        let z = &self.z;
        // Maxima: the reduction itself (with one KV head when the group is split, so that each
        // layer keeps its group max), as keys.
        let keys_of =
            |mode, kv| reduce(z, heads, kv, n, mode, GroupAggregation::Max).into_iter().map(max_key).collect();
        match self.config.mode {
            SelectionMode::PerHead if self.shard.group_split() => {
                self.keys = keys_of(SelectionMode::PerLayerPerHead, hkv);
            }
            SelectionMode::PerHead => {
                self.sums = vec![0f64; hkv * n];
                for (g, row) in self.sums.chunks_mut(n).enumerate() {
                    layer_sum_row(z, g, group, n, row);
                }
            }
            SelectionMode::PerLayerPerHead => match self.config.group_aggregation {
                GroupAggregation::Max => self.keys = keys_of(SelectionMode::PerLayerPerHead, hkv),
                GroupAggregation::Mean => {
                    self.sums = vec![0f64; z.len() * hkv * n];
                    for (set, row) in self.sums.chunks_mut(n).enumerate() {
                        group_sum_row(&z[set / hkv], set % hkv, group, n, row);
                    }
                }
            },
            SelectionMode::Union => self.keys = keys_of(SelectionMode::Union, hkv),
        }
    }
}
