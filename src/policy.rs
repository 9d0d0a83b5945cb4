//! Compression policy: presets, knobs, triggers, budgets and per-sequence state.
//!
//! A [`Preset`] fixes the *semantics* (which slots are candidates, the z-score flavour, when a
//! round is due); every other knob of [`CompressionConfig`] has a preset default and can be set
//! alone. The semantics table is `shared/data/golden/README.md`:
//!
//! | | `paper` (default) | `vllm` |
//! |---|---|---|
//! | defaults | per-head, normalize, protect prefix, window 0 | per-head, normalize, prefix unprotected, window 128 |
//! | candidates | every slot except the protected prompt and the window | every slot |
//! | z-score | per (layer, head) over candidates, population std, floor 1e-6 | per row over all slots, unbiased std; std < 1e-8 only centres |
//! | trigger | after the forward, when the cache holds `budget + divide_length` | before the step, when cache + the step's token reach it |
//!
//! In both, `budget` counts every kept slot, protected ones included; if the protected slots alone
//! reach the budget the round is skipped and [`RoundOutcome::Skipped`] says why.

use crate::error::{Error, Result};
use crate::score::ScoreConfig;

/// Which official code path's semantics to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Preset {
    /// The paper's runner (HF reference, experiment defaults).
    #[default]
    Paper,
    /// The official vLLM plugin.
    Vllm,
}

impl Preset {
    /// `paper` or `vllm`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Vllm => "vllm",
        }
    }
}

/// How per-(layer, head) scores become keep sets (§3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SelectionMode {
    /// One set per KV head shared by all layers: max over the group, mean over layers.
    #[default]
    PerHead,
    /// One set per (layer, KV head), the group reduced with [`GroupAggregation`].
    PerLayerPerHead,
    /// One set for everything: max over all (layer, head) rows.
    Union,
}

impl SelectionMode {
    /// `per-head`, `per-layer-per-head` or `union`.
    pub fn name(self) -> &'static str {
        match self {
            SelectionMode::PerHead => "per-head",
            SelectionMode::PerLayerPerHead => "per-layer-per-head",
            SelectionMode::Union => "union",
        }
    }

    /// Number of keep sets for `layers` layers and `kv_heads` KV heads.
    pub fn num_sets(self, layers: usize, kv_heads: usize) -> usize {
        match self {
            SelectionMode::PerHead => kv_heads,
            SelectionMode::PerLayerPerHead => layers * kv_heads,
            SelectionMode::Union => 1,
        }
    }

    /// Index of the keep set that applies to `(layer, kv_head)`.
    pub fn set_index(self, layer: usize, kv_head: usize, kv_heads: usize) -> usize {
        match self {
            SelectionMode::PerHead => kv_head,
            SelectionMode::PerLayerPerHead => layer * kv_heads + kv_head,
            SelectionMode::Union => 0,
        }
    }
}

/// Reduction over the query heads of a KV group in `per-layer-per-head` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GroupAggregation {
    /// Max over the group (default).
    #[default]
    Max,
    /// Mean over the group.
    Mean,
}

/// Whether raw scores are z-scored per row before reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Normalization {
    /// z-score with the preset's flavour (default).
    #[default]
    ZScore,
    /// Rank raw scores.
    Off,
}

/// The two z-score flavours (§3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ZScore {
    /// Population std with a 1e-6 floor (paper).
    PopulationFloor,
    /// Unbiased std; a row with std < 1e-8 is only centred (vllm).
    UnbiasedCentreFlat,
}

/// Whether the prompt is always kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrefixProtection {
    /// Prompt slots are always kept (and count toward the budget).
    Protected,
    /// Prompt slots compete like any other.
    Unprotected,
}

/// Every knob of a compression round and of the trigger.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CompressionConfig {
    /// Semantics (candidates, z-score flavour, trigger).
    pub preset: Preset,
    /// Slots kept per set after a round, protected ones included.
    pub budget: usize,
    /// Slack above the budget before a round is due.
    pub divide_length: usize,
    /// Selection mode.
    pub mode: SelectionMode,
    /// Score formula knobs (offsets, aggregation, MLR, trig).
    pub score: ScoreConfig,
    /// Group reduction for `per-layer-per-head`.
    pub group_aggregation: GroupAggregation,
    /// Most recent slots always kept.
    pub window: usize,
    /// z-score on or off.
    pub normalization: Normalization,
    /// Prompt protection.
    pub prefix: PrefixProtection,
}

impl CompressionConfig {
    /// The defaults of `preset` with `budget` 2048.
    pub fn preset(preset: Preset) -> Self {
        let base = Self {
            preset,
            budget: 2048,
            divide_length: 128,
            mode: SelectionMode::PerHead,
            score: ScoreConfig::default(),
            group_aggregation: GroupAggregation::Max,
            window: 0,
            normalization: Normalization::ZScore,
            prefix: PrefixProtection::Protected,
        };
        match preset {
            Preset::Paper => base,
            Preset::Vllm => Self { window: 128, prefix: PrefixProtection::Unprotected, ..base },
        }
    }

    /// Check the knobs against each other.
    ///
    /// # Errors
    /// `InvalidArgument` naming the knob: budget 0, window >= budget, divide_length 0,
    /// offset_max_length 0.
    pub fn validate(&self) -> Result<()> {
        if self.budget == 0 {
            return Err(Error::invalid_argument("budget", ">= 1", 0));
        }
        if self.window >= self.budget {
            return Err(Error::invalid_argument("window", format!("< budget ({})", self.budget), self.window));
        }
        if self.divide_length == 0 {
            return Err(Error::invalid_argument("divide_length", ">= 1", 0));
        }
        crate::score::geometric_offsets(self.score.offset_max_length)?;
        Ok(())
    }

    /// The z-score flavour of the preset.
    pub fn zscore(&self) -> Option<ZScore> {
        match (self.normalization, self.preset) {
            (Normalization::Off, _) => None,
            (Normalization::ZScore, Preset::Paper) => Some(ZScore::PopulationFloor),
            (Normalization::ZScore, Preset::Vllm) => Some(ZScore::UnbiasedCentreFlat),
        }
    }

    /// Protected slot ranges of a cache of `n` slots whose first `prefix_len` slots are the prompt.
    pub fn protection(&self, n: usize, prefix_len: usize) -> Protection {
        let prefix = match self.prefix {
            PrefixProtection::Protected => prefix_len.min(n),
            PrefixProtection::Unprotected => 0,
        };
        Protection { n, prefix, window_start: n - self.window.min(n) }
    }

    /// What a round over `n` slots whose first `prefix_len` are the prompt does: the shape alone
    /// decides (within budget, skipped because the protected slots reach the budget, or
    /// compressed to the budget).
    pub fn outcome(&self, n: usize, prefix_len: usize) -> RoundOutcome {
        let protected = self.protection(n, prefix_len).count();
        if n <= self.budget {
            RoundOutcome::WithinBudget
        } else if protected >= self.budget {
            RoundOutcome::Skipped(SkipReason::ProtectedReachBudget { protected, budget: self.budget })
        } else {
            RoundOutcome::Compressed { kept: self.budget, evicted: n - self.budget }
        }
    }

    /// Whether a round is due for a cache of `cache_len` slots.
    ///
    /// `paper`: evaluated after a forward, with the new token already cached:
    /// `cache_len >= budget + divide_length`. `vllm`: evaluated before a step that will write
    /// `scheduled` tokens: `cache_len + scheduled >= budget + divide_length` (and the cache must
    /// exceed the budget for the round to evict anything).
    pub fn round_due(&self, cache_len: usize, scheduled: usize) -> bool {
        let threshold = self.budget + self.divide_length;
        match self.preset {
            Preset::Paper => cache_len >= threshold,
            Preset::Vllm => cache_len + scheduled >= threshold && cache_len > self.budget,
        }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self::preset(Preset::Paper)
    }
}

/// The protected slots of a round: the first `prefix` slots and slots `window_start..n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    /// Slots in the cache.
    pub n: usize,
    /// Protected prompt slots `0..prefix`.
    pub prefix: usize,
    /// First slot of the protected recent window.
    pub window_start: usize,
}

impl Protection {
    /// Whether slot `slot` is always kept.
    #[inline]
    pub fn is_protected(&self, slot: usize) -> bool {
        slot < self.prefix || slot >= self.window_start
    }

    /// Number of protected slots (prompt and window may overlap).
    pub fn count(&self) -> usize {
        self.prefix + (self.n - self.window_start.max(self.prefix))
    }
}

/// Why a due round did not evict anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The protected slots alone reach the budget.
    ProtectedReachBudget {
        /// Protected slots.
        protected: usize,
        /// The budget.
        budget: usize,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::ProtectedReachBudget { protected, budget } => {
                write!(f, "the {protected} protected slots (prompt and recent window) reach the budget of {budget}")
            }
        }
    }
}

/// What a round did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundOutcome {
    /// Each set now holds `kept` slots; `evicted` were dropped.
    Compressed {
        /// Slots kept per set.
        kept: usize,
        /// Slots evicted per set.
        evicted: usize,
    },
    /// The cache holds no more than the budget: nothing to evict.
    WithinBudget,
    /// The round was skipped.
    Skipped(SkipReason),
}

impl RoundOutcome {
    /// Slots each keep set holds after the round over `n` slots: the budget when it compressed,
    /// else every slot.
    pub fn kept(&self, n: usize) -> usize {
        match *self {
            RoundOutcome::Compressed { kept, .. } => kept,
            RoundOutcome::WithinBudget | RoundOutcome::Skipped(_) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_counts_overlap_once() {
        let c = CompressionConfig { window: 4, ..CompressionConfig::preset(Preset::Paper) };
        let p = c.protection(10, 8);
        assert_eq!(p.count(), 10);
        let p = c.protection(20, 3);
        assert_eq!(p.count(), 7);
        assert!(p.is_protected(2) && !p.is_protected(3) && p.is_protected(16));
    }

    #[test]
    fn triggers() {
        let paper = CompressionConfig { budget: 100, divide_length: 10, ..Default::default() };
        assert!(!paper.round_due(109, 1) && paper.round_due(110, 1));
        let vllm = CompressionConfig { budget: 100, divide_length: 10, ..CompressionConfig::preset(Preset::Vllm) };
        assert!(vllm.round_due(109, 1) && !vllm.round_due(108, 1));
    }

    #[test]
    fn outcome_is_fixed_by_the_shape() {
        let c = CompressionConfig { budget: 100, ..Default::default() };
        assert_eq!(c.outcome(100, 0), RoundOutcome::WithinBudget);
        assert_eq!(c.outcome(130, 10), RoundOutcome::Compressed { kept: 100, evicted: 30 });
        let skipped = c.outcome(130, 100);
        assert_eq!(skipped, RoundOutcome::Skipped(SkipReason::ProtectedReachBudget { protected: 100, budget: 100 }));
        assert_eq!((skipped.kept(130), c.outcome(130, 10).kept(130), c.outcome(60, 0).kept(60)), (130, 100, 60));
        let vllm = CompressionConfig { budget: 100, window: 16, ..CompressionConfig::preset(Preset::Vllm) };
        assert!(
            matches!(vllm.outcome(130, 120), RoundOutcome::Compressed { .. }),
            "vllm leaves the prompt unprotected"
        );
    }

    #[test]
    fn window_must_be_below_budget() {
        let c = CompressionConfig { budget: 128, window: 128, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("window"));
        assert!(CompressionConfig { budget: 0, ..Default::default() }.validate().is_err());
    }
}
