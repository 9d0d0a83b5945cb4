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
        let m = &scorer.model;
        let want = (shard.layers.len(), shard.heads.len(), shard.kv_heads.len());
        if (m.num_layers, m.num_heads, m.num_kv_heads) != want {
            return Err(Error::shape(
                format!("rank {} scorer (layers, heads, KV heads)", shard.rank),
                format!("{want:?} of the shard (Shard::scorer)"),
                format!("({}, {}, {})", m.num_layers, m.num_heads, m.num_kv_heads),
            ));
        }
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
        let (n, hkv) = (self.n, self.shard.kv_heads.len());
        let group = self.shard.heads.len() / hkv;
        let z = &self.z;
        let group_max = |l: usize, g: usize, slot: usize| {
            (g * group..(g + 1) * group).fold(f32::NEG_INFINITY, |m, h| nan_max(m, z[l][h * n + slot]))
        };
        match self.config.mode {
            SelectionMode::PerHead if self.shard.group_split() => {
                self.keys = (0..self.shard.layers.len() * n).map(|i| max_key(group_max(i / n, 0, i % n))).collect();
            }
            SelectionMode::PerHead => {
                self.sums = (0..hkv * n)
                    .map(|i| {
                        let mut sum = 0f64;
                        for l in 0..z.len() {
                            sum += group_max(l, i / n, i % n) as f64;
                        }
                        sum
                    })
                    .collect();
            }
            SelectionMode::PerLayerPerHead => match self.config.group_aggregation {
                GroupAggregation::Max => {
                    self.keys =
                        (0..z.len() * hkv * n).map(|i| max_key(group_max(i / (hkv * n), i / n % hkv, i % n))).collect();
                }
                GroupAggregation::Mean => {
                    self.sums = (0..z.len() * hkv * n)
                        .map(|i| {
                            let (l, g, slot) = (i / (hkv * n), i / n % hkv, i % n);
                            (g * group..(g + 1) * group).map(|h| z[l][h * n + slot] as f64).sum::<f64>()
                        })
                        .collect();
                }
            },
            SelectionMode::Union => {
                self.keys = (0..n)
                    .map(|slot| {
                        let rows =
                            z.iter().flat_map(|layer| (0..layer.len() / n.max(1)).map(move |h| layer[h * n + slot]));
                        max_key(rows.fold(f32::NEG_INFINITY, nan_max))
                    })
                    .collect();
            }
        }
    }
}

/// NaN if either is NaN, else the larger (the CPU reduction's max).
#[inline]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}
