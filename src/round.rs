//! One compression round as stages: `score -> normalize -> reduce -> select` (then `compact`).
//!
//! [`Scorer`] holds what does not change between rounds (model RoPE, statistics, pairing style);
//! [`run_cpu`] runs the stages on the CPU backend and returns every intermediate the CLI reports.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::cache::LayerView;
use crate::cpu;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::model::{ModelConfig, PairingStyle};
use crate::policy::{CompressionConfig, Preset, RoundOutcome};
use crate::score::{RoundWeights, ScoreConfig};
use crate::stats::Stats;

/// Model RoPE plus statistics, checked against each other: everything scoring needs but `r`.
#[derive(Clone, Debug)]
pub struct Scorer {
    /// The model.
    pub model: ModelConfig,
    /// The statistics.
    pub stats: Stats,
    /// Pairing style used to read keys and statistics.
    pub style: PairingStyle,
    /// RoPE frequencies, f64.
    pub omega: Vec<f64>,
    /// `σ = s²`.
    pub sigma: f64,
}

impl Scorer {
    /// Check `stats` against `model`; the pairing style is the statistics' unless overridden.
    ///
    /// # Errors
    /// `ShapeMismatch` naming the quantity on which they disagree.
    pub fn new(model: ModelConfig, stats: Stats, style: Option<PairingStyle>) -> Result<Self> {
        stats.check_model(&model)?;
        let style = style.unwrap_or(stats.rope_style);
        let omega = model.omega();
        let s = model.attention_scaling();
        Ok(Self { model, stats, style, omega, sigma: s * s })
    }

    /// The weights of the round starting at `round_start`.
    ///
    /// # Errors
    /// `InvalidArgument` for bad offsets.
    pub fn weights(&self, round_start: u64, config: &ScoreConfig) -> Result<RoundWeights> {
        RoundWeights::build(&self.stats, self.style, &self.omega, self.sigma, round_start, config)
    }
}

/// Where the stages of a round run.
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// The CPU backend (the specification).
    #[default]
    Cpu,
    /// Every stage on the CUDA kernels executed on the CPU by the SIMT layer (feature `emu`):
    /// the plan/run path a GPU round takes.
    #[cfg(feature = "emu")]
    Emu,
    /// Every stage on a GPU (feature `cuda`). Host buffers are copied to the device and back;
    /// engines with device-resident caches use [`crate::cuda::RoundPlan`] directly.
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::cuda::CudaDevice>),
}

impl Backend {
    /// The tuning tables plans on this backend consult by default: the shipped table of the
    /// GPU's arch over the built-in rule (`cuda`), the built-in rule (`cpu`, `emu`).
    pub fn dispatch(&self) -> crate::tuning::Dispatch {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => crate::tuning::Dispatch::new(None, Some(device.backend().arch())),
            _ => crate::tuning::Dispatch::built_in(),
        }
    }

    /// `cpu`, `emu` or `cuda`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            #[cfg(feature = "emu")]
            Backend::Emu => "emu",
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => "cuda",
        }
    }

    /// Whether rounds run on the CPU backend.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Backend::Cpu)
    }
}

/// Wall time of each stage of a round.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    /// Building weights and scoring every key.
    pub score: Duration,
    /// Of `score`, building the round's weights.
    pub weights: Duration,
    /// z-score.
    pub normalize: Duration,
    /// Group and layer reduction (and guards).
    pub reduce: Duration,
    /// Top-k.
    pub select: Duration,
}

/// Everything a round computed.
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// Slots in the cache.
    pub n: usize,
    /// Raw scores per layer, `[H, N]` each.
    pub raw: Vec<Vec<f32>>,
    /// The reduced scores the selection ranked, `[sets, N]`; protected slots are `+inf`.
    pub score: Vec<f32>,
    /// Keep sets (ascending slot indices), indexed by [`crate::policy::SelectionMode::set_index`].
    pub keep: Vec<Vec<u32>>,
    /// What happened.
    pub outcome: RoundOutcome,
    /// Stage times.
    pub times: StageTimes,
}

/// Run one round on the CPU over the keys of every layer (`[Hkv, N, D]` views, equal N).
///
/// # Errors
/// `InvalidArgument` for a bad configuration or `round_start < N`; `ShapeMismatch` for keys
/// that do not fit the scorer.
pub fn run_cpu<T: Element>(
    config: &CompressionConfig,
    scorer: &Scorer,
    keys: &[LayerView<'_, T>],
    round_start: u64,
    prefix_len: usize,
) -> Result<RoundResult> {
    run(config, scorer, keys, round_start, prefix_len, Backend::Cpu)
}

/// Run one round with every stage on `backend` (see [`run_cpu`]).
///
/// # Errors
/// As [`run_cpu`]; `Unsupported` if `backend` has no kernel for the shape.
pub fn run<T: Element>(
    config: &CompressionConfig,
    scorer: &Scorer,
    keys: &[LayerView<'_, T>],
    round_start: u64,
    prefix_len: usize,
    backend: Backend,
) -> Result<RoundResult> {
    config.validate()?;
    let model = &scorer.model;
    let n = check_keys(model, keys, round_start, prefix_len)?;
    let (layers, heads, kv_heads) = (model.num_layers, model.num_heads, model.num_kv_heads);

    #[cfg(any(feature = "emu", feature = "cuda"))]
    if !backend.is_cpu() {
        return run_device(config, scorer, keys, round_start, prefix_len, &backend);
    }
    #[cfg(not(any(feature = "emu", feature = "cuda")))]
    let _ = backend;
    let (raw, z, mut times) = score_and_normalize(config, scorer, keys, round_start, prefix_len)?;

    let t = Instant::now();
    let mut score = cpu::reduce::reduce(&z, heads, kv_heads, n, config.mode, config.group_aggregation);
    z_scratch::give_back(z);
    guard_protected(config, &mut score, n, prefix_len);
    times.reduce = t.elapsed();

    let t = Instant::now();
    let (keep, outcome) = select_sets(config, &score, n, prefix_len, config.mode.num_sets(layers, kv_heads));
    times.select = t.elapsed();

    Ok(RoundResult { n, raw, score, keep, outcome, times })
}

/// Check the keys of every layer against `model` (`[Hkv, N, D]`, equal N) and the round's
/// offsets; returns N.
pub(crate) fn check_keys<T: Element>(
    model: &ModelConfig,
    keys: &[LayerView<'_, T>],
    round_start: u64,
    prefix_len: usize,
) -> Result<usize> {
    if keys.len() != model.num_layers || keys.is_empty() {
        return Err(Error::shape("key layers", model.num_layers, keys.len()));
    }
    let n = keys[0].len;
    for (l, k) in keys.iter().enumerate() {
        if k.num_kv_heads != model.num_kv_heads {
            return Err(Error::shape(format!("k.{l} KV heads"), model.num_kv_heads, k.num_kv_heads));
        }
        if k.dim != model.head_dim {
            return Err(Error::shape(format!("k.{l} head_dim"), model.head_dim, k.dim));
        }
        if k.len != n {
            return Err(Error::shape(format!("k.{l} slots"), format!("{n} (as k.0)"), k.len));
        }
    }
    if round_start < n as u64 {
        return Err(Error::invalid_argument("round_start", format!(">= the {n} cached slots"), round_start));
    }
    if prefix_len > n {
        return Err(Error::invalid_argument("prefix_len", format!("<= the {n} cached slots"), prefix_len));
    }
    Ok(n)
}

/// `+inf` on the protected slots of every reduced row (`N` slots each).
pub(crate) fn guard_protected(config: &CompressionConfig, score: &mut [f32], n: usize, prefix_len: usize) {
    let protection = config.protection(n, prefix_len);
    if n > 0 {
        for row in score.chunks_mut(n) {
            for (slot, s) in row.iter_mut().enumerate() {
                if protection.is_protected(slot) {
                    *s = f32::INFINITY;
                }
            }
        }
    }
}

/// The keep set of each reduced row and the round's outcome (`sets` rows of `N`).
pub(crate) fn select_sets(
    config: &CompressionConfig,
    score: &[f32],
    n: usize,
    prefix_len: usize,
    sets: usize,
) -> (Vec<Vec<u32>>, RoundOutcome) {
    let protection = config.protection(n, prefix_len);
    let outcome = config.outcome(n, prefix_len);
    let keep = match outcome {
        RoundOutcome::Compressed { kept, .. } => score
            .par_chunks(n)
            .map(|row| cpu::select::select_row(row, |slot| protection.is_protected(slot), kept))
            .collect(),
        RoundOutcome::WithinBudget | RoundOutcome::Skipped(_) => vec![(0..n as u32).collect(); sets],
    };
    (keep, outcome)
}

/// Raw scores, their z-scores (`[H, N]` per layer) and the stage times.
pub(crate) type RowStages = (Vec<Vec<f32>>, Vec<Vec<f32>>, StageTimes);

/// The row-local stages of a round on the CPU: raw scores and their z-scores (a copy when
/// normalisation is off), `[H, N]` per layer, with their times. The caller has checked the keys.
pub(crate) fn score_and_normalize<T: Element>(
    config: &CompressionConfig,
    scorer: &Scorer,
    keys: &[LayerView<'_, T>],
    round_start: u64,
    prefix_len: usize,
) -> Result<RowStages> {
    let (heads, n) = (scorer.model.num_heads, keys.first().map_or(0, |k| k.len));
    let mut times = StageTimes::default();
    let t = Instant::now();
    let weights = scorer.weights(round_start, &config.score)?;
    times.weights = t.elapsed();
    let mut raw = vec![vec![0f32; heads * n]; keys.len()];
    cpu::score::score_layers(&weights, keys, scorer.style, &mut raw)?;
    times.score = t.elapsed();

    let protection = config.protection(n, prefix_len);
    let t = Instant::now();
    let z = match config.zscore() {
        None => raw.clone(),
        Some(flavour) => {
            // The candidates are one range: past the protected prompt, before the window.
            let candidates = match config.preset {
                Preset::Paper => protection.prefix..protection.window_start.max(protection.prefix),
                Preset::Vllm => 0..n,
            };
            let mut z = z_scratch::take(raw.len(), heads * n);
            z.par_iter_mut().zip(raw.par_iter()).for_each(|(z, raw)| {
                cpu::normalize::zscore_range_into(raw, z, n, candidates.clone(), flavour);
            });
            z
        }
    };
    times.normalize = t.elapsed();
    Ok((raw, z, times))
}

/// The round on a kernel backend: one [`crate::cuda::RoundPlan`] ending with keep sets.
#[cfg(any(feature = "emu", feature = "cuda"))]
fn run_device<T: Element>(
    config: &CompressionConfig,
    scorer: &Scorer,
    keys: &[LayerView<'_, T>],
    round_start: u64,
    prefix_len: usize,
    backend: &Backend,
) -> Result<RoundResult> {
    use crate::cuda::{CacheLayout, Compaction, RoundPlan, RoundShape, RowStrides};
    let n = keys[0].len;
    if n == 0 {
        // Nothing to launch over: the CPU path reports the empty round.
        return run(config, scorer, keys, round_start, prefix_len, Backend::Cpu);
    }
    let (hkv, d) = (scorer.model.num_kv_heads, scorer.model.head_dim);
    let first = &keys[0];
    let uniform = keys.iter().all(|k| k.head_stride == first.head_stride && k.row_stride == first.row_stride);
    // Layers with different strides are scored from dense copies (one plan has one stride).
    let dense: Vec<Vec<T>>;
    let (tensors, strides): (Vec<&[T]>, RowStrides) = if uniform {
        (
            keys.iter().map(|k| k.data).collect(),
            RowStrides { head_stride: first.head_stride, row_stride: first.row_stride },
        )
    } else {
        dense = keys
            .iter()
            .map(|k| (0..hkv).flat_map(|g| (0..n).flat_map(move |r| k.row(g, r).iter().copied())).collect())
            .collect();
        (dense.iter().map(Vec::as_slice).collect(), RowStrides { head_stride: n * d, row_stride: d })
    };
    let plan = RoundPlan::tuned(
        scorer,
        config,
        RoundShape {
            dtype: T::DTYPE,
            len: n,
            prefix_len,
            value_dim: d,
            layout: CacheLayout::Contiguous { keys: strides, values: strides },
            compaction: Compaction::KeepSetsOnly,
            positions: None,
        },
        &backend.dispatch(),
    )?;
    let mut out = backend.round_keys(&plan, &tensors, &[round_start])?;
    Ok(RoundResult::from_outputs(&plan, out.outputs.swap_remove(0), StageTimes::of(&out.timings)))
}

/// Run `$call` with `$dev` bound to the kernel device of `$backend` (an error for the CPU).
#[cfg(any(feature = "emu", feature = "cuda"))]
macro_rules! on_kernel_device {
    ($backend:expr, $dev:ident => $call:expr) => {
        match $backend {
            Backend::Cpu => Err(Error::invalid_argument("backend", "a kernel backend (emu or cuda)", "cpu")),
            #[cfg(feature = "emu")]
            Backend::Emu => {
                let $dev = &crate::emu::EmuDevice;
                $call
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => {
                let $dev = &**device;
                $call
            }
        }
    };
}

/// Rounds of a [`crate::cuda::RoundPlan`] over host buffers on a kernel backend: the tensors
/// are staged in the backend's memory (copied to the GPU; aligned host copies under emu), a
/// fresh workspace runs every stage, and compacted tensors are copied back. One `round_start`
/// per sequence of the plan. Engines whose caches live on the device bind a workspace instead
/// (`cuda::RoundPlan::run`, `cuda::DeviceRound`, or the C ABI's bindings).
///
/// # Errors
/// `InvalidArgument` on the CPU backend, for a plan of another compaction or layout, or a
/// `round_start` below the cached slots; `ShapeMismatch` for tensors that do not hold the
/// planned shape; what the backend reports (`Driver`, `KernelsUnavailable`).
#[cfg(any(feature = "emu", feature = "cuda"))]
impl Backend {
    /// A keep-sets-only plan over the keys of every layer (`S * L` tensors, sequence-major).
    pub fn round_keys<T: Element>(
        &self,
        plan: &crate::cuda::RoundPlan,
        keys: &[&[T]],
        round_starts: &[u64],
    ) -> Result<crate::cuda::HostRound> {
        use crate::cuda::host_round::round_keys;
        on_kernel_device!(self, dev => round_keys(dev, plan, keys, round_starts))
    }

    /// An in-place plan over contiguous K and V (`S * L` tensors each), compacted in place.
    pub fn round_in_place<T: Element>(
        &self,
        plan: &crate::cuda::RoundPlan,
        keys: &mut [&mut [T]],
        values: &mut [&mut [T]],
        round_starts: &[u64],
    ) -> Result<crate::cuda::HostRound> {
        use crate::cuda::host_round::round_in_place;
        on_kernel_device!(self, dev => round_in_place(dev, plan, keys, values, round_starts))
    }

    /// An out-of-place plan: the kept rows of K and V, in slot order, into `keys_out` /
    /// `values_out` (strides of the plan's destination).
    pub fn round_out_of_place<T: Element>(
        &self,
        plan: &crate::cuda::RoundPlan,
        keys: &[&[T]],
        values: &[&[T]],
        keys_out: &mut [&mut [T]],
        values_out: &mut [&mut [T]],
        round_starts: &[u64],
    ) -> Result<crate::cuda::HostRound> {
        use crate::cuda::host_round::round_out_of_place;
        on_kernel_device!(self, dev => round_out_of_place(dev, plan, keys, values, keys_out, values_out, round_starts))
    }

    /// Every rank of a sharded out-of-place round in one process (one plan per rank of the
    /// layout, [`crate::cuda::RoundPlan::new_shard`], in rank order), joined between parts by an
    /// in-process all-reduce of the exposed buffers: what `triattn compress --tp-size` runs on a
    /// kernel backend.
    pub fn round_out_of_place_sharded<T: Element>(
        &self,
        plans: &[crate::cuda::RoundPlan],
        ranks: &mut [crate::cuda::RankTensors<'_, T>],
        round_starts: &[u64],
    ) -> Result<Vec<crate::cuda::HostRound>> {
        use crate::cuda::host_round::round_out_of_place_sharded;
        on_kernel_device!(self, dev => round_out_of_place_sharded(dev, plans, ranks, round_starts))
    }

    /// A paged plan over per-layer K and V block pools and the block table `i32[S, max_blocks]`
    /// (distinct blocks across the batch): keep sets only, or compaction in place.
    pub fn round_paged<T: Element>(
        &self,
        plan: &crate::cuda::RoundPlan,
        key_pools: &mut [&mut [T]],
        value_pools: &mut [&mut [T]],
        block_table: &[i32],
        round_starts: &[u64],
    ) -> Result<crate::cuda::HostRound> {
        use crate::cuda::host_round::round_paged;
        on_kernel_device!(self, dev => round_paged(dev, plan, key_pools, value_pools, block_table, round_starts))
    }

    /// Sparse decode attention over host buffers: layers `first_layer..first_layer + layers`
    /// of `plan`, every input staged in the backend's memory, one decode launch (and a combine
    /// when split).
    pub fn decode<T: Element, Q: Element>(
        &self,
        plan: &crate::cuda::DecodePlan,
        inputs: &crate::cuda::DecodeInputs<'_, T, Q>,
        first_layer: usize,
        layers: usize,
    ) -> Result<crate::cuda::HostDecode> {
        use crate::cuda::host_round::decode;
        on_kernel_device!(self, dev => decode(dev, plan, inputs, first_layer, layers))
    }

    /// A plan over a cache already in this backend's memory (device addresses on a GPU, host
    /// addresses under emu: tensors or pools, block table, positions), with a fresh workspace.
    ///
    /// # Safety
    /// The addresses in `cache` are memory of this backend that holds the planned shape (and
    /// destinations of `kept` slots out of place, disjoint from the source; a paged plan's
    /// block table of distinct in-range blocks; positions of the planned type and size);
    /// nothing else accesses them until the call returns.
    pub unsafe fn round_on_addresses(
        &self,
        plan: &crate::cuda::RoundPlan,
        cache: &crate::cuda::CacheAddresses,
        round_starts: &[u64],
    ) -> Result<crate::cuda::HostRound> {
        use crate::cuda::host_round::round_on_addresses;
        // SAFETY: forwarded caller contract.
        on_kernel_device!(self, dev => unsafe { round_on_addresses(dev, plan, cache, round_starts) })
    }
}

impl StageTimes {
    /// The stage times of a device round (its weights launch counted as scoring; compaction is
    /// reported apart, as [`crate::cuda::StageTimings::get`] of `Stage::Compact`).
    pub fn of(t: &crate::cuda::StageTimings) -> Self {
        use crate::cuda::Stage;
        StageTimes {
            score: t.get(Stage::Weights) + t.get(Stage::Score),
            weights: t.get(Stage::Weights),
            normalize: t.get(Stage::Normalize),
            reduce: t.get(Stage::Reduce),
            select: t.get(Stage::Select),
        }
    }
}

impl RoundResult {
    /// The result of a device round from its outputs.
    #[cfg(any(feature = "emu", feature = "cuda"))]
    pub(crate) fn from_outputs(
        plan: &crate::cuda::RoundPlan,
        out: crate::cuda::RoundOutputs,
        times: StageTimes,
    ) -> Self {
        RoundResult {
            n: plan.shape().len,
            raw: out.raw,
            score: out.score,
            keep: out.keep,
            outcome: plan.outcome(),
            times,
        }
    }
}

/// The z-score rows of CPU rounds, reused from one round to the next: a fresh buffer per round
/// (10 MB at Qwen3-8B shapes and N = 2176) cost more in page faults than normalising into it
/// (`triattn bench --round`: normalize 8.8 ms with fresh buffers, 4.4-4.8 ms without the faults).
/// Every row handed out is overwritten whole before it is read.
mod z_scratch {
    use std::sync::Mutex;

    /// Rows handed back, kept for the next round (at most [`KEEP`] of them).
    static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
    /// The most rows kept: two rounds of a 128-layer model, whatever their length.
    const KEEP: usize = 256;

    /// `count` rows of `len` values each (contents unspecified: the caller overwrites them).
    pub(super) fn take(count: usize, len: usize) -> Vec<Vec<f32>> {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        (0..count)
            .map(|_| match pool.pop() {
                Some(mut row) => {
                    row.resize(len, 0.0);
                    row
                }
                None => vec![0f32; len],
            })
            .collect()
    }

    /// Keep `rows` for later rounds.
    pub(super) fn give_back(rows: Vec<Vec<f32>>) {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        let room = KEEP.saturating_sub(pool.len());
        pool.extend(rows.into_iter().take(room));
    }
}
