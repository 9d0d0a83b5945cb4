//! Sparse decode attention ("virtual eviction"): decode over each KV head's list of kept slots
//! instead of compacting the cache. The description every backend shares: which list a
//! (layer, KV head) reads ([`ListLayout`]) and the logit options ([`DecodeOptions`]).
//!
//! For each layer `l`, query head `h` (reading KV head `g = h / G`, `G = H / Hkv`), query `t`,
//! with `J` the visible slots of `(l, g)`'s list:
//!
//! ```text
//! s_j = softcap(scale * q[h,t] . k[g,j])            j in J
//! m   = max(max_j s_j, sink[h])                     (sink term only with sinks)
//! den = sum_j exp(s_j - m) + exp(sink[h] - m)
//! o   = sum_j exp(s_j - m) v[g,j] / den
//! lse = m + ln(den)
//! ```
//!
//! An empty list gives `o = 0` and `lse = -inf` (`lse = sink[h]` with a sink). Every query sees
//! every visible slot (no causal mask among the `T` queries of a step).

use crate::error::{Error, Result};
use crate::policy::SelectionMode;

/// Which slot list each (layer, KV head) reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListLayout {
    /// No lists: every slot `0..len` is visible (dense decode of a compacted cache).
    Dense,
    /// One list for every layer and KV head (a `union` round's keep set).
    Shared,
    /// One list per KV head, for every layer (a `per-head` round's keep sets).
    PerKvHead,
    /// One list per (layer, KV head) (a `per-layer-per-head` round's keep sets).
    PerLayerKvHead,
}

impl ListLayout {
    /// The layout of the keep sets a round of `mode` writes.
    pub fn of_selection(mode: SelectionMode) -> Self {
        match mode {
            SelectionMode::Union => ListLayout::Shared,
            SelectionMode::PerHead => ListLayout::PerKvHead,
            SelectionMode::PerLayerPerHead => ListLayout::PerLayerKvHead,
        }
    }

    /// Lists of a model with `layers` layers and `kv_heads` KV heads (0 when dense).
    pub fn num_lists(self, layers: usize, kv_heads: usize) -> usize {
        match self {
            ListLayout::Dense => 0,
            ListLayout::Shared => 1,
            ListLayout::PerKvHead => kv_heads,
            ListLayout::PerLayerKvHead => layers * kv_heads,
        }
    }

    /// The list `(layer, kv_head)` reads (`None` when dense).
    pub fn list_index(self, layer: usize, kv_head: usize, kv_heads: usize) -> Option<usize> {
        match self {
            ListLayout::Dense => None,
            ListLayout::Shared => Some(0),
            ListLayout::PerKvHead => Some(kv_head),
            ListLayout::PerLayerKvHead => Some(layer * kv_heads + kv_head),
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ListLayout::Dense => "dense",
            ListLayout::Shared => "shared",
            ListLayout::PerKvHead => "per-kv-head",
            ListLayout::PerLayerKvHead => "per-layer-kv-head",
        }
    }
}

/// The logit options of a decode.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeOptions {
    /// Logit scale; `None`: `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Soft-capping `C`: logits become `C * tanh(s / C)` after scaling (Gemma 2); `None`: off.
    pub softcap: Option<f32>,
}

impl DecodeOptions {
    /// Check the options: a scale or softcap must be a positive finite number.
    ///
    /// # Errors
    /// `InvalidArgument` naming `scale` or `softcap`.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [("scale", self.scale), ("softcap", self.softcap)] {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return Err(Error::invalid_argument(what, "a positive finite number", x));
                }
            }
        }
        Ok(())
    }

    /// The logit scale for head_dim `d`.
    pub fn scale_for(&self, d: usize) -> f32 {
        self.scale.unwrap_or_else(|| (1.0 / (d as f64).sqrt()) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_layouts_map_like_keep_sets() {
        for mode in [SelectionMode::Union, SelectionMode::PerHead, SelectionMode::PerLayerPerHead] {
            let layout = ListLayout::of_selection(mode);
            assert_eq!(layout.num_lists(3, 4), mode.num_sets(3, 4));
            for (l, g) in [(0, 0), (2, 3), (1, 2)] {
                assert_eq!(layout.list_index(l, g, 4), Some(mode.set_index(l, g, 4)));
            }
        }
        assert_eq!((ListLayout::Dense.num_lists(3, 4), ListLayout::Dense.list_index(1, 1, 4)), (0, None));
    }

    #[test]
    fn options_are_checked() {
        assert!(DecodeOptions { scale: Some(0.0), softcap: None }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("scale"));
        let e = DecodeOptions { scale: None, softcap: Some(f32::NAN) }.validate().unwrap_err().to_string();
        assert!(e.contains("softcap"), "{e}");
        assert_eq!(DecodeOptions::default().scale_for(64), 0.125);
    }
}
