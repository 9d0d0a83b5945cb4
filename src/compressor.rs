//! [`Compressor`]: the policy driving rounds over a sequence's cache, on any backend with the same
//! calls (the CPU, or every stage on the kernels: emu, or a GPU).

use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::cache::KvCache;
use crate::cpu;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::policy::{CompressionConfig, RoundOutcome};
use crate::round::{self, Backend, RoundResult, Scorer};

/// Per-sequence bookkeeping: positions seen and the position held by every slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceState {
    /// Tokens written so far (prompt and generated): the next round's `round_start`.
    pub round_start: u64,
    /// Prompt length.
    pub prompt_len: usize,
    /// Absolute position held by each slot, per (layer, KV head) (`[L * Hkv][len]`).
    pub positions: Vec<Vec<u64>>,
}

impl SequenceState {
    /// A new sequence of a model with `layers` x `kv_heads` KV rows.
    pub fn new(layers: usize, kv_heads: usize, prompt_len: usize) -> Self {
        Self { round_start: 0, prompt_len, positions: vec![Vec::new(); layers * kv_heads] }
    }

    /// Record `count` tokens written to every (layer, KV head) at the next positions.
    pub fn advance(&mut self, count: usize) {
        for p in self.positions.iter_mut() {
            p.extend(self.round_start..self.round_start + count as u64);
        }
        self.round_start += count as u64;
    }

    /// Slots in use (the same for every row).
    pub fn len(&self) -> usize {
        self.positions.first().map_or(0, Vec::len)
    }

    /// Whether no slot is in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompt slots still at the front of the cache (all of them while the prompt is protected).
    pub fn prompt_slots(&self) -> usize {
        self.positions.first().map_or(0, |p| p.iter().take_while(|&&x| x < self.prompt_len as u64).count())
    }
}

/// What one [`Compressor::compress`] call did.
#[derive(Clone, Debug)]
pub struct RoundReport {
    /// Scores, keep sets, outcome, stage times.
    pub round: RoundResult,
    /// Time spent compacting K and V.
    pub compact: Duration,
}

/// Owns the policy and the model/statistics; runs rounds over [`KvCache`]s.
#[derive(Clone, Debug)]
pub struct Compressor {
    config: CompressionConfig,
    scorer: Scorer,
    backend: Backend,
    dispatch: crate::tuning::Dispatch,
}

impl Compressor {
    /// A compressor with validated `config`.
    ///
    /// # Errors
    /// `InvalidArgument` naming the bad knob.
    pub fn new(config: CompressionConfig, scorer: Scorer) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, scorer, backend: Backend::Cpu, dispatch: crate::tuning::Dispatch::built_in() })
    }

    /// The same compressor running its rounds on `backend`: on the kernels (emu, or a GPU via
    /// `cuda::CudaDevice`) every stage runs as one planned device round and K and V are
    /// compacted by the kernel (order-preserving, in place); keep sets equal the CPU backend's.
    ///
    /// Kernel variants come from the shipped tuning table of the GPU's arch over the built-in
    /// rule ([`Backend::dispatch`]); [`Self::with_dispatch`] adds a user table.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.dispatch = backend.dispatch();
        self.backend = backend;
        self
    }

    /// The same compressor choosing kernel variants through `dispatch` (after
    /// [`Self::with_backend`], which sets the backend's default).
    pub fn with_dispatch(mut self, dispatch: crate::tuning::Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// The tables its plans choose kernel variants from.
    pub fn dispatch(&self) -> &crate::tuning::Dispatch {
        &self.dispatch
    }

    /// The backend rounds run on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The configuration.
    pub fn config(&self) -> &CompressionConfig {
        &self.config
    }

    /// The scorer (model and statistics).
    pub fn scorer(&self) -> &Scorer {
        &self.scorer
    }

    /// Whether a round is due (see [`CompressionConfig::round_due`]); `scheduled` is the number of
    /// tokens the next step writes (vllm preset), ignored by the paper preset.
    pub fn round_due(&self, seq: &SequenceState, scheduled: usize) -> bool {
        self.config.round_due(seq.len(), scheduled)
    }

    /// Whether a round is due for `seq` under a per-sequence `budget` (`None`: the compressor's),
    /// with the compressor's `divide_length` and trigger; `scheduled` as in [`Compressor::round_due`].
    pub fn round_due_with(&self, seq: &SequenceState, budget: Option<usize>, scheduled: usize) -> bool {
        let config = CompressionConfig { budget: budget.unwrap_or(self.config.budget), ..self.config };
        config.round_due(seq.len(), scheduled)
    }

    /// The compressor's configuration with a per-sequence `budget` and `window` (`None`: the
    /// compressor's own), validated.
    ///
    /// # Errors
    /// `InvalidArgument` naming the knob: budget 0, window >= budget.
    pub fn config_with(&self, budget: Option<usize>, window: Option<usize>) -> Result<CompressionConfig> {
        let config = CompressionConfig {
            budget: budget.unwrap_or(self.config.budget),
            window: window.unwrap_or(self.config.window),
            ..self.config
        };
        config.validate()?;
        Ok(config)
    }

    /// Check that `cache` fits the model and agrees with `seq`.
    ///
    /// # Errors
    /// `ShapeMismatch` naming what disagrees.
    pub fn check_sequence<T: Element>(&self, cache: &KvCache<T>, seq: &SequenceState) -> Result<()> {
        let m = &self.scorer.model;
        if cache.num_layers != m.num_layers || cache.num_kv_heads != m.num_kv_heads || cache.head_dim != m.head_dim {
            return Err(Error::shape(
                "cache [L, Hkv, D]",
                format!("[{}, {}, {}]", m.num_layers, m.num_kv_heads, m.head_dim),
                format!("[{}, {}, {}]", cache.num_layers, cache.num_kv_heads, cache.head_dim),
            ));
        }
        if seq.len() != cache.len || seq.positions.len() != m.num_layers * m.num_kv_heads {
            return Err(Error::shape("sequence state slots", cache.len, seq.len()));
        }
        Ok(())
    }

    /// Run a round over `cache` and compact it in place (order-preserving).
    ///
    /// # Errors
    /// `ShapeMismatch` if the cache does not fit the model or disagrees with `seq`.
    pub fn compress<T: Element>(&self, cache: &mut KvCache<T>, seq: &mut SequenceState) -> Result<RoundReport> {
        self.check_sequence(cache, seq)?;
        self.compress_with(&self.config, cache, seq)
    }

    /// [`Compressor::compress`] under `config` (the compressor's with per-sequence overrides),
    /// for a cache already checked by [`Compressor::check_sequence`].
    pub(crate) fn compress_with<T: Element>(
        &self,
        config: &CompressionConfig,
        cache: &mut KvCache<T>,
        seq: &mut SequenceState,
    ) -> Result<RoundReport> {
        if !self.backend.is_cpu() {
            return self.compress_on_device(config, cache, seq);
        }
        let keys: Vec<_> = (0..cache.num_layers).map(|l| cache.keys(l)).collect();
        let result = round::run_cpu(config, &self.scorer, &keys, seq.round_start, seq.prompt_slots())?;
        let t = Instant::now();
        if let RoundOutcome::Compressed { kept, .. } = result.outcome {
            let (hkv, cap, d, dv) = (cache.num_kv_heads, cache.capacity, cache.head_dim, cache.value_dim);
            // Every (layer, KV head) of K and of V compacts on its own, in parallel.
            let keep_of = |l: usize, g: usize| &result.keep[config.mode.set_index(l, g, hkv)];
            let compact = |tensors: &mut Vec<Vec<T>>, dim: usize| -> Result<()> {
                tensors.par_iter_mut().enumerate().try_for_each(|(l, layer)| {
                    layer[..hkv * cap * dim]
                        .par_chunks_mut(cap * dim)
                        .enumerate()
                        .try_for_each(|(g, head)| cpu::compact::compact_in_place(head, dim, dim, keep_of(l, g)))
                })
            };
            compact(&mut cache.k, d)?;
            compact(&mut cache.v, dv)?;
            update_positions(config, cache.num_layers, hkv, &result.keep, seq);
            cache.len = kept;
        }
        Ok(RoundReport { round: result, compact: t.elapsed() })
    }

    /// A round as one device plan compacting the cache in place (order-preserving).
    #[cfg(any(feature = "emu", feature = "cuda"))]
    fn compress_on_device<T: Element>(
        &self,
        config: &CompressionConfig,
        cache: &mut KvCache<T>,
        seq: &mut SequenceState,
    ) -> Result<RoundReport> {
        use crate::cuda::{CacheLayout, Compaction, RoundPlan, RoundShape, RowStrides};
        use crate::variant::CompactMode;
        let n = cache.len;
        if n == 0 {
            return Err(Error::invalid_argument("cache slots", ">= 1 for a device round", 0));
        }
        let (cap, d, dv) = (cache.capacity, cache.head_dim, cache.value_dim);
        let shape = RoundShape {
            dtype: T::DTYPE,
            len: n,
            prefix_len: seq.prompt_slots(),
            value_dim: dv,
            layout: CacheLayout::Contiguous {
                keys: RowStrides { head_stride: cap * d, row_stride: d },
                values: RowStrides { head_stride: cap * dv, row_stride: dv },
            },
            compaction: Compaction::InPlace(CompactMode::OrderPreserving),
            positions: None,
        };
        let plan = RoundPlan::tuned(&self.scorer, config, shape, &self.dispatch)?;
        let mut k: Vec<&mut [T]> = cache.k.iter_mut().map(Vec::as_mut_slice).collect();
        let mut v: Vec<&mut [T]> = cache.v.iter_mut().map(Vec::as_mut_slice).collect();
        let mut out = self.backend.round_in_place(&plan, &mut k, &mut v, &[seq.round_start])?;
        let result = RoundResult::from_outputs(&plan, out.outputs.swap_remove(0), round::StageTimes::of(&out.timings));
        let compact = out.timings.get(crate::cuda::Stage::Compact);
        if let RoundOutcome::Compressed { kept, .. } = result.outcome {
            update_positions(config, cache.num_layers, cache.num_kv_heads, &result.keep, seq);
            cache.len = kept;
        }
        Ok(RoundReport { round: result, compact })
    }

    #[cfg(not(any(feature = "emu", feature = "cuda")))]
    fn compress_on_device<T: Element>(
        &self,
        _config: &CompressionConfig,
        _cache: &mut KvCache<T>,
        _seq: &mut SequenceState,
    ) -> Result<RoundReport> {
        Err(Error::unsupported("device rounds need the emu or cuda feature"))
    }
}

/// Each (layer, KV head) keeps the positions of its kept slots.
/// Evict by a selection made elsewhere: keep, for every (layer, KV head) row `r = l * Hkv + g`,
/// the slots `keep[r]` (strictly ascending, all of one length K <= `cache.len`), compacting K
/// and V in place in slot order and updating the positions of `seq`. This is the selection input
/// of a round: any scorer (H2O's accumulated attention, SnapKV's observation window, a recency
/// rule) can drive the same compaction as TriAttention's own rounds.
///
/// # Errors
/// `ShapeMismatch` for a wrong number of rows or rows of different lengths (nothing is moved);
/// `InvalidArgument` naming the row for a slot out of range or out of order.
pub fn evict<T: Element>(cache: &mut KvCache<T>, seq: &mut SequenceState, keep: &[Vec<u32>]) -> Result<()> {
    let (layers, hkv) = (cache.num_layers, cache.num_kv_heads);
    if keep.len() != layers * hkv {
        return Err(Error::shape("keep rows", format!("{layers} x {hkv} (layers x KV heads)"), keep.len()));
    }
    if seq.positions.len() != layers * hkv || seq.len() != cache.len {
        return Err(Error::shape("sequence state", format!("{} rows of {} slots", layers * hkv, cache.len), seq.len()));
    }
    let k = keep[0].len();
    for (r, row) in keep.iter().enumerate() {
        if row.len() != k {
            return Err(Error::shape(format!("keep row {r}"), k, row.len()));
        }
        if row.windows(2).any(|w| w[0] >= w[1]) || row.last().is_some_and(|&s| s as usize >= cache.len) {
            return Err(Error::invalid_argument(
                format!("keep row {r}"),
                format!("strictly ascending slots below {}", cache.len),
                format!("{row:?}"),
            ));
        }
    }
    let (cap, d, dv) = (cache.capacity, cache.head_dim, cache.value_dim);
    for l in 0..layers {
        for g in 0..hkv {
            let row = &keep[l * hkv + g];
            cpu::compact::compact_in_place(&mut cache.k[l][g * cap * d..(g + 1) * cap * d], d, d, row)?;
            cpu::compact::compact_in_place(&mut cache.v[l][g * cap * dv..(g + 1) * cap * dv], dv, dv, row)?;
            let pos = &mut seq.positions[l * hkv + g];
            *pos = row.iter().map(|&s| pos[s as usize]).collect();
        }
    }
    cache.len = k;
    Ok(())
}

pub(crate) fn update_positions(
    config: &CompressionConfig,
    layers: usize,
    kv_heads: usize,
    keep: &[Vec<u32>],
    seq: &mut SequenceState,
) {
    for l in 0..layers {
        for g in 0..kv_heads {
            let keep = &keep[config.mode.set_index(l, g, kv_heads)];
            let pos = &mut seq.positions[l * kv_heads + g];
            *pos = keep.iter().map(|&s| pos[s as usize]).collect();
        }
    }
}
