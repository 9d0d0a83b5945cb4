//! Sharded rounds for tensor- and pipeline-parallel engines.
//!
//! An engine running tensor parallelism (attention heads split over `tp` ranks) and pipeline
//! parallelism (layers split over `pp` stages) runs a round on each rank over the heads and
//! layers that rank holds. Every stage of a round is local to a (layer, head) row except the
//! reductions of §3.4 that cross ranks; those are handed to the engine's collective:
//!
//! | selection mode | when | reduction | op | elements per rank |
//! |---|---|---|---|---|
//! | per-head | a KV head's query heads span ranks (`tp > Hkv`) | [`ReductionKind::GroupMax`] per layer | max | `L_stage * N` |
//! | per-head | `pp > 1` | [`ReductionKind::LayerSum`]: the sum over layers before the mean | sum | `Hkv_rank * N` |
//! | per-layer-per-head | `tp > Hkv`, group max | [`ReductionKind::GroupMax`] | max | `L_stage * N` |
//! | per-layer-per-head | `tp > Hkv`, group mean | [`ReductionKind::GroupSum`] | sum | `L_stage * N` |
//! | union | more than one rank | [`ReductionKind::UnionMax`] | max | `N` |
//!
//! Nothing else crosses ranks: scoring reads one head's statistics and keys, the z-score is per
//! (layer, head) row, protection and the round's outcome depend only on the cache length and the
//! prompt, and selection ranks one reduced row that every rank sharing it holds whole after the
//! collective. Each rank selects its own keep sets; ranks that replicate a KV head compute the
//! same set.
//!
//! **Exactness.** A max is exposed as order-preserving `i32` keys ([`max_key`]): an integer max
//! over keys is the crate's NaN-propagating float max whatever the collective does with NaN or
//! signed zeros, so a group or union max across ranks is bit-identical to one rank's. A sum is
//! exposed in `f64` (the precision the single-rank reduction accumulates in) and rounded once
//! to f32 after the collective: splitting it reassociates f64 additions only, which moves a
//! reduced score by at most one f32 rounding.
//!
//! Rank numbering follows Megatron, vLLM and SGLang: `rank = pp_rank * tp_size + tp_rank`.
//! Tensor parallelism splits the query heads evenly; when `tp <= Hkv` it splits the KV heads
//! too, when `tp > Hkv` each KV head is replicated on `tp / Hkv` consecutive ranks, each holding
//! some of its query heads. Pipeline stages hold consecutive layers, evenly or as the engine
//! says ([`ShardLayout::with_stage_layers`]).

mod collective;
mod round;

use std::ops::Range;

pub use collective::{all_reduce_in_process, key_to_max, max_key};
pub use round::{ReductionBuffer, ReductionData, ShardRound};

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::policy::{CompressionConfig, GroupAggregation, SelectionMode};
use crate::round::Scorer;

/// How a model's heads and layers are split over `tp_size * pp_size` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    /// Tensor-parallel ranks.
    pub tp_size: usize,
    /// Layers of each pipeline stage, in order.
    pub stages: Vec<Range<usize>>,
    /// Query heads of the model (H).
    pub num_heads: usize,
    /// KV heads of the model (Hkv).
    pub num_kv_heads: usize,
    /// Layers of the model (L).
    pub num_layers: usize,
}

impl ShardLayout {
    /// `tp_size` tensor-parallel ranks and `pp_size` pipeline stages of equal layer counts.
    ///
    /// # Errors
    /// `InvalidArgument` naming `tp_size` or `pp_size` when the split is impossible or uneven
    /// (an uneven pipeline takes [`ShardLayout::with_stage_layers`]).
    pub fn new(model: &ModelConfig, tp_size: usize, pp_size: usize) -> Result<Self> {
        let l = model.num_layers;
        if pp_size == 0 || pp_size > l.max(1) {
            return Err(Error::invalid_argument("pp_size", format!("1..={l} (the model's layers)"), pp_size));
        }
        if !l.is_multiple_of(pp_size) {
            let (q, r) = (l / pp_size, l % pp_size);
            let example: Vec<String> = (0..pp_size).map(|s| (q + usize::from(s >= pp_size - r)).to_string()).collect();
            return Err(Error::invalid_argument(
                "pp_size",
                format!(
                    "a divisor of the {l} layers for an even split (give an uneven one as layers per stage, e.g. {})",
                    example.join(",")
                ),
                pp_size,
            ));
        }
        Self::with_stage_layers(model, tp_size, &vec![l / pp_size; pp_size])
    }

    /// `tp_size` tensor-parallel ranks and pipeline stages of `stage_layers[s]` consecutive layers.
    ///
    /// # Errors
    /// `InvalidArgument` naming `tp_size` (query heads not a multiple, KV heads neither a
    /// multiple nor a divisor) or `stage_layers` (a stage without layers, a sum other than L).
    pub fn with_stage_layers(model: &ModelConfig, tp_size: usize, stage_layers: &[usize]) -> Result<Self> {
        let (h, hkv, l) = (model.num_heads, model.num_kv_heads, model.num_layers);
        if tp_size == 0 || h % tp_size != 0 {
            return Err(Error::invalid_argument("tp_size", format!("a divisor of the {h} query heads"), tp_size));
        }
        if tp_size <= hkv && hkv % tp_size != 0 {
            return Err(Error::invalid_argument(
                "tp_size",
                format!("a divisor of the {hkv} KV heads (or a multiple of them, replicating each)"),
                tp_size,
            ));
        }
        if tp_size > hkv && !tp_size.is_multiple_of(hkv) {
            return Err(Error::invalid_argument(
                "tp_size",
                format!("a multiple of the {hkv} KV heads when above them (each KV head replicated on tp / Hkv ranks)"),
                tp_size,
            ));
        }
        let sum: usize = stage_layers.iter().sum();
        if stage_layers.is_empty() || stage_layers.contains(&0) || sum != l {
            return Err(Error::invalid_argument(
                "stage_layers",
                format!("one or more stages of at least one layer summing to the {l} layers"),
                format!("{stage_layers:?} (sum {sum})"),
            ));
        }
        let mut start = 0;
        let stages = stage_layers
            .iter()
            .map(|&n| {
                start += n;
                start - n..start
            })
            .collect();
        Ok(Self { tp_size, stages, num_heads: h, num_kv_heads: hkv, num_layers: l })
    }

    /// Pipeline stages.
    pub fn pp_size(&self) -> usize {
        self.stages.len()
    }

    /// Ranks in all: `tp_size * pp_size`.
    pub fn ranks(&self) -> usize {
        self.tp_size * self.pp_size()
    }

    /// Ranks holding each KV head: `tp / Hkv` when `tp > Hkv`, else 1.
    pub fn kv_replicas(&self) -> usize {
        (self.tp_size / self.num_kv_heads).max(1)
    }

    /// The heads and layers of `rank` (`pp_rank * tp_size + tp_rank`).
    ///
    /// # Errors
    /// `InvalidArgument` for a rank outside the layout.
    pub fn shard(&self, rank: usize) -> Result<Shard> {
        if rank >= self.ranks() {
            return Err(Error::invalid_argument("rank", format!("< {} ranks", self.ranks()), rank));
        }
        let (tp_rank, pp_rank) = (rank % self.tp_size, rank / self.tp_size);
        let heads_per_rank = self.num_heads / self.tp_size;
        let replicas = self.kv_replicas();
        let kv_heads = if replicas > 1 {
            tp_rank / replicas..tp_rank / replicas + 1
        } else {
            let per = self.num_kv_heads / self.tp_size;
            tp_rank * per..(tp_rank + 1) * per
        };
        Ok(Shard {
            rank,
            tp_rank,
            pp_rank,
            layers: self.stages[pp_rank].clone(),
            heads: tp_rank * heads_per_rank..(tp_rank + 1) * heads_per_rank,
            kv_heads,
            layout: self.clone(),
        })
    }

    /// Every shard, in rank order.
    pub fn shards(&self) -> Vec<Shard> {
        (0..self.ranks()).map(|r| self.shard(r).expect("rank in range")).collect()
    }
}

/// The heads and layers one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// `pp_rank * tp_size + tp_rank`.
    pub rank: usize,
    /// Rank within the tensor-parallel group.
    pub tp_rank: usize,
    /// Pipeline stage.
    pub pp_rank: usize,
    /// Layers of the model this rank holds.
    pub layers: Range<usize>,
    /// Query heads of the model this rank holds.
    pub heads: Range<usize>,
    /// KV heads of the model this rank holds (one, replicated, when `tp > Hkv`).
    pub kv_heads: Range<usize>,
    /// The layout the shard belongs to.
    pub layout: ShardLayout,
}

impl Shard {
    /// The model as this rank sees it: its layers, query heads and KV heads.
    pub fn model(&self, model: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_layers: self.layers.len(),
            num_heads: self.heads.len(),
            num_kv_heads: self.kv_heads.len(),
            ..model.clone()
        }
    }

    /// The scorer of this rank: the model sliced as [`Shard::model`] and the statistics of its
    /// layers and query heads.
    ///
    /// # Errors
    /// `ShapeMismatch` when `scorer` is not of the layout's model.
    pub fn scorer(&self, scorer: &Scorer) -> Result<Scorer> {
        let m = &scorer.model;
        let l = &self.layout;
        if (m.num_layers, m.num_heads, m.num_kv_heads) != (l.num_layers, l.num_heads, l.num_kv_heads) {
            return Err(Error::shape(
                "scorer model (layers, heads, KV heads)",
                format!("({}, {}, {}) of the shard layout", l.num_layers, l.num_heads, l.num_kv_heads),
                format!("({}, {}, {})", m.num_layers, m.num_heads, m.num_kv_heads),
            ));
        }
        let stats = scorer.stats.slice(self.layers.clone(), self.heads.clone(), self.kv_heads.len())?;
        Ok(Scorer { model: self.model(m), stats, ..scorer.clone() })
    }

    /// Check that `scorer` is this rank's ([`Shard::scorer`]): its layers, query heads and KV
    /// heads.
    ///
    /// # Errors
    /// `ShapeMismatch` naming the rank, expected vs got.
    pub fn check_scorer(&self, scorer: &Scorer) -> Result<()> {
        let m = &scorer.model;
        let want = (self.layers.len(), self.heads.len(), self.kv_heads.len());
        if (m.num_layers, m.num_heads, m.num_kv_heads) != want {
            return Err(Error::shape(
                format!("rank {} scorer (layers, heads, KV heads)", self.rank),
                format!("{want:?} of the shard (Shard::scorer)"),
                format!("({}, {}, {})", m.num_layers, m.num_heads, m.num_kv_heads),
            ));
        }
        Ok(())
    }

    /// Whether a KV head's query heads span several ranks (`tp > Hkv`).
    pub fn group_split(&self) -> bool {
        self.layout.kv_replicas() > 1
    }

    /// Keep sets this rank selects: its KV heads (`per-head`), its layers times its KV heads
    /// (`per-layer-per-head`) or one (`union`).
    pub fn num_sets(&self, mode: SelectionMode) -> usize {
        mode.num_sets(self.layers.len(), self.kv_heads.len())
    }

    /// The collectives a round of `config` over `len` slots needs on this rank, in the order
    /// they run. Empty when the shard's round runs whole.
    pub fn reductions(&self, config: &CompressionConfig, len: usize) -> Vec<Reduction> {
        let layout = &self.layout;
        let replicas = layout.kv_replicas();
        // Ranks of this stage holding this rank's KV head (tp > Hkv).
        let group_ranks = || {
            let first = self.tp_rank / replicas * replicas;
            (first..first + replicas).map(|t| self.pp_rank * layout.tp_size + t).collect::<Vec<_>>()
        };
        let group = |kind: ReductionKind| Reduction { kind, len: self.layers.len() * len, ranks: group_ranks() };
        let mut out = Vec::new();
        match config.mode {
            SelectionMode::PerHead => {
                if self.group_split() {
                    out.push(group(ReductionKind::GroupMax));
                }
                if layout.pp_size() > 1 {
                    out.push(Reduction {
                        kind: ReductionKind::LayerSum,
                        len: self.kv_heads.len() * len,
                        ranks: (0..layout.pp_size()).map(|p| p * layout.tp_size + self.tp_rank).collect(),
                    });
                }
            }
            SelectionMode::PerLayerPerHead if self.group_split() => out.push(group(match config.group_aggregation {
                GroupAggregation::Max => ReductionKind::GroupMax,
                GroupAggregation::Mean => ReductionKind::GroupSum,
            })),
            SelectionMode::PerLayerPerHead => {}
            SelectionMode::Union => {
                if layout.ranks() > 1 {
                    out.push(Reduction { kind: ReductionKind::UnionMax, len, ranks: (0..layout.ranks()).collect() });
                }
            }
        }
        out
    }
}

/// Which cross-rank reduction a buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReductionKind {
    /// Per layer and slot, the max over a KV group's query heads (`[L_stage, N]`), across the
    /// tensor-parallel ranks holding the group's heads.
    GroupMax,
    /// Per layer and slot, the sum over a KV group's query heads before their mean
    /// (`per-layer-per-head` with group mean), across the ranks holding the group's heads.
    GroupSum,
    /// Per KV head and slot, the sum over layers before their mean (`per-head`), across the
    /// pipeline stages.
    LayerSum,
    /// Per slot, the max over every layer and head (`union`), across every rank.
    UnionMax,
}

impl ReductionKind {
    /// `group-max`, `group-sum`, `layer-sum` or `union-max`.
    pub fn name(self) -> &'static str {
        match self {
            ReductionKind::GroupMax => "group-max",
            ReductionKind::GroupSum => "group-sum",
            ReductionKind::LayerSum => "layer-sum",
            ReductionKind::UnionMax => "union-max",
        }
    }

    /// The collective's operation.
    pub fn op(self) -> ReduceOp {
        match self {
            ReductionKind::GroupMax | ReductionKind::UnionMax => ReduceOp::Max,
            ReductionKind::GroupSum | ReductionKind::LayerSum => ReduceOp::Sum,
        }
    }

    /// The buffer's element type.
    pub fn dtype(self) -> ReduceDType {
        match self.op() {
            ReduceOp::Max => ReduceDType::I32,
            ReduceOp::Sum => ReduceDType::F64,
        }
    }
}

/// The operation of an all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise max (`ncclMax`).
    Max,
    /// Element-wise sum (`ncclSum`).
    Sum,
}

/// The element type of a reduction buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceDType {
    /// Order-preserving keys of f32 values ([`max_key`]; `ncclInt32`).
    I32,
    /// f64 partial sums (`ncclFloat64`).
    F64,
}

impl ReduceDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ReduceDType::I32 => 4,
            ReduceDType::F64 => 8,
        }
    }
}

/// One collective of a sharded round: what to all-reduce and among which ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reduction {
    /// What the buffer holds (and so its op and dtype).
    pub kind: ReductionKind,
    /// Elements in the buffer (equal on every participating rank).
    pub len: usize,
    /// The ranks that all-reduce it together, ascending; this rank is one of them.
    pub ranks: Vec<usize>,
}

impl Reduction {
    /// Bytes of the buffer on one rank.
    pub fn bytes(&self) -> usize {
        self.len * self.kind.dtype().size()
    }
}
