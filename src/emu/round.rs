//! Whole rounds on the emu backend: a [`RoundPlan`] run by the SIMT layer over host memory, the
//! same launches a GPU run makes, with the workspace in a host buffer.

use std::time::Instant;

use crate::cuda::plan::{
    check_block_table, check_layers, CacheAddresses, Compaction, Launcher, LayerTensors, RoundAddresses, RoundOutputs,
    RoundPlan, Stage, StageTimings, WORKSPACE_ALIGN,
};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::variant::Variant;

/// Runs launches synchronously on the SIMT layer, timing each stage.
#[derive(Debug, Default)]
pub struct EmuLauncher {
    /// Accumulated time per stage.
    pub timings: StageTimings,
}

impl Launcher for EmuLauncher {
    unsafe fn launch<P: Copy>(
        &mut self,
        stage: Stage,
        variant: Variant,
        params: &P,
        grid: (u32, u32, u32),
        dynamic_smem: usize,
    ) -> Result<()> {
        let t = Instant::now();
        // SAFETY: forwarded from the caller (the plan's run contract).
        let r = unsafe { super::launch(variant, params, grid, dynamic_smem) };
        self.timings.add(stage, t.elapsed());
        r
    }
}

/// What an emu round computed, and how long each stage took.
#[derive(Clone, Debug)]
pub struct EmuRound {
    /// The outputs read from the workspace.
    pub outputs: RoundOutputs,
    /// Time per stage.
    pub timings: StageTimings,
}

/// Run `plan` over the cache at `cache` (host addresses: tensors or pools, the block table, the
/// positions) with a fresh host workspace: the raw entry the safe wrappers below check for.
///
/// # Errors
/// `InvalidArgument` for `round_start < N` or addresses the plan refuses; `Driver` if the SIMT
/// layer fails.
///
/// # Safety
/// The addresses in `cache` are host tensors that hold the planned shape (and destinations that
/// hold `kept` slots, out of place, disjoint from the source; a paged plan's block table and
/// positions of the planned type and size); nothing else accesses them during the call.
pub unsafe fn round_raw(plan: &RoundPlan, cache: &CacheAddresses, round_start: u64) -> Result<EmuRound> {
    // SAFETY: forwarded.
    let mut batch = unsafe { round_raw_batch(plan, cache, &[round_start])? };
    Ok(EmuRound { outputs: batch.outputs.swap_remove(0), timings: batch.timings })
}

/// What an emu round of a batch plan computed, per sequence, and how long each stage took.
#[derive(Clone, Debug)]
pub struct EmuBatch {
    /// The outputs of each sequence.
    pub outputs: Vec<RoundOutputs>,
    /// Time per stage (the whole batch).
    pub timings: StageTimings,
}

/// [`round_raw`] for a batch plan: one `round_start` per sequence.
///
/// # Errors
/// As [`round_raw`]; `ShapeMismatch` when `round_starts` does not have one entry per sequence.
///
/// # Safety
/// As [`round_raw`], for every sequence's tensors.
pub unsafe fn round_raw_batch(plan: &RoundPlan, cache: &CacheAddresses, round_starts: &[u64]) -> Result<EmuBatch> {
    let n = plan.shape().len;
    if round_starts.len() != plan.num_seqs() {
        return Err(Error::shape("round_start values", plan.num_seqs(), round_starts.len()));
    }
    let starts = round_starts
        .iter()
        .map(|&r| {
            if r < n as u64 {
                return Err(Error::invalid_argument("round_start", format!(">= the {n} cached slots"), r));
            }
            i64::try_from(r).map_err(|_| Error::invalid_argument("round_start", "<= 2^63-1", r))
        })
        .collect::<Result<Vec<i64>>>()?;
    let image = plan.workspace_image(cache)?;
    // A u128 buffer over-allocated by one alignment unit, so the base can be aligned.
    let words = plan.workspace_bytes().div_ceil(16) + WORKSPACE_ALIGN / 16;
    let mut buffer = vec![0u128; words];
    let raw_base = buffer.as_mut_ptr() as usize;
    let skip = (WORKSPACE_ALIGN - raw_base % WORKSPACE_ALIGN) % WORKSPACE_ALIGN;
    // SAFETY: `skip < WORKSPACE_ALIGN` and the buffer has WORKSPACE_ALIGN spare bytes; u128 has
    // no invalid bit patterns and the view ends with the borrow of `buffer`.
    let ws: &mut [u8] = unsafe { std::slice::from_raw_parts_mut((raw_base + skip) as *mut u8, plan.workspace_bytes()) };
    ws[..image.len()].copy_from_slice(&image);
    let mut launcher = EmuLauncher::default();
    let at = RoundAddresses::bound(ws.as_mut_ptr() as u64, starts.as_ptr() as u64, cache);
    // SAFETY: the workspace is aligned, sized and initialised as `run` requires; the cache is
    // the caller's contract; `starts` outlives the synchronous launches.
    unsafe { plan.run(&mut launcher, &at)? };
    let outputs = (0..plan.num_seqs()).map(|seq| plan.read_outputs_of(ws, seq)).collect::<Result<_>>()?;
    Ok(EmuBatch { outputs, timings: launcher.timings })
}

/// Run a batch plan over contiguous K and V (`S * L` tensors, sequence-major), compacting them in
/// place; one `round_start` per sequence.
///
/// # Errors
/// As [`round_in_place`].
pub fn round_in_place_batch<T: Element>(
    plan: &RoundPlan,
    keys: &mut [&mut [T]],
    values: &mut [&mut [T]],
    round_starts: &[u64],
) -> Result<EmuBatch> {
    let s = plan.shape();
    if !matches!(s.compaction, Compaction::InPlace(_)) {
        return Err(Error::invalid_argument("plan compaction", "InPlace", format!("{:?}", s.compaction)));
    }
    contiguous(plan)?;
    check_layers::<T>(plan, LayerTensors::Keys, &keys.iter().map(|k| k.len()).collect::<Vec<_>>())?;
    check_layers::<T>(plan, LayerTensors::Values, &values.iter().map(|v| v.len()).collect::<Vec<_>>())?;
    let cache = CacheAddresses {
        keys: keys.iter_mut().map(|k| k.as_mut_ptr() as u64).collect(),
        values: values.iter_mut().map(|v| v.as_mut_ptr() as u64).collect(),
        ..Default::default()
    };
    // SAFETY: K and V hold the planned rows of every sequence (checked), borrowed exclusively.
    unsafe { round_raw_batch(plan, &cache, round_starts) }
}

/// Run a round that ends with keep sets (a plan with [`Compaction::KeepSetsOnly`]) over the keys
/// of every layer.
///
/// # Errors
/// `InvalidArgument` for another compaction or `round_start < N`; `ShapeMismatch` for keys that
/// do not hold the planned shape; `Driver` if the SIMT layer fails.
pub fn round_keys<T: Element>(plan: &RoundPlan, keys: &[&[T]], round_start: u64) -> Result<EmuRound> {
    let s = plan.shape();
    if s.compaction != Compaction::KeepSetsOnly {
        return Err(Error::invalid_argument(
            "plan compaction",
            "KeepSetsOnly (no values given)",
            format!("{:?}", s.compaction),
        ));
    }
    contiguous(plan)?;
    check_layers::<T>(plan, LayerTensors::Keys, &keys.iter().map(|k| k.len()).collect::<Vec<_>>())?;
    let cache = CacheAddresses { keys: keys.iter().map(|k| k.as_ptr() as u64).collect(), ..Default::default() };
    // SAFETY: every key tensor holds the planned rows (checked); no values are read.
    unsafe { round_raw(plan, &cache, round_start) }
}

/// Run a round and compact K and V in place (a plan with [`Compaction::InPlace`]).
///
/// # Errors
/// As [`round_keys`]; `InvalidArgument` for another compaction.
pub fn round_in_place<T: Element>(
    plan: &RoundPlan,
    keys: &mut [&mut [T]],
    values: &mut [&mut [T]],
    round_start: u64,
) -> Result<EmuRound> {
    let mut batch = round_in_place_batch(plan, keys, values, &[round_start])?;
    Ok(EmuRound { outputs: batch.outputs.swap_remove(0), timings: batch.timings })
}

/// Run a round and copy the kept rows into `keys_out` / `values_out` (a plan with
/// [`Compaction::OutOfPlace`], whose destination strides describe them).
///
/// # Errors
/// As [`round_keys`]; `ShapeMismatch` for destinations that do not hold `kept` slots.
pub fn round_out_of_place<T: Element>(
    plan: &RoundPlan,
    keys: &[&[T]],
    values: &[&[T]],
    keys_out: &mut [&mut [T]],
    values_out: &mut [&mut [T]],
    round_start: u64,
) -> Result<EmuRound> {
    let s = plan.shape();
    if !matches!(s.compaction, Compaction::OutOfPlace { .. }) {
        return Err(Error::invalid_argument("plan compaction", "OutOfPlace", format!("{:?}", s.compaction)));
    }
    let lens = |t: &[&[T]]| t.iter().map(|x| x.len()).collect::<Vec<_>>();
    let lens_mut = |t: &[&mut [T]]| t.iter().map(|x| x.len()).collect::<Vec<_>>();
    check_layers::<T>(plan, LayerTensors::Keys, &lens(keys))?;
    check_layers::<T>(plan, LayerTensors::Values, &lens(values))?;
    check_layers::<T>(plan, LayerTensors::KeysOut, &lens_mut(keys_out))?;
    check_layers::<T>(plan, LayerTensors::ValuesOut, &lens_mut(values_out))?;
    let cache = CacheAddresses {
        keys: keys.iter().map(|k| k.as_ptr() as u64).collect(),
        values: values.iter().map(|v| v.as_ptr() as u64).collect(),
        keys_out: keys_out.iter_mut().map(|k| k.as_mut_ptr() as u64).collect(),
        values_out: values_out.iter_mut().map(|v| v.as_mut_ptr() as u64).collect(),
        ..Default::default()
    };
    // SAFETY: sources and destinations hold the planned rows (checked); the destinations are
    // exclusive borrows, so they do not overlap the shared sources.
    unsafe { round_raw(plan, &cache, round_start) }
}

fn contiguous(plan: &RoundPlan) -> Result<()> {
    match plan.contiguous_strides() {
        Some(_) => Ok(()),
        None => Err(Error::invalid_argument("plan layout", "contiguous (use round_paged for a paged cache)", "paged")),
    }
}

/// Run a round of a paged plan over per-layer K and V block pools and the sequence's block-table
/// row: keep sets only, or compaction in place (the rows move between the sequence's blocks).
///
/// # Errors
/// `InvalidArgument` for a contiguous or out-of-place plan or a bad block table; as
/// [`round_keys`] otherwise.
pub fn round_paged<T: Element>(
    plan: &RoundPlan,
    key_pools: &mut [&mut [T]],
    value_pools: &mut [&mut [T]],
    block_table: &[i32],
    round_start: u64,
) -> Result<EmuRound> {
    if plan.contiguous_strides().is_some() {
        return Err(Error::invalid_argument("plan layout", "paged", "contiguous"));
    }
    if matches!(plan.shape().compaction, Compaction::OutOfPlace { .. }) {
        return Err(Error::invalid_argument(
            "compaction of a paged cache",
            "in place or keep sets only",
            "out of place",
        ));
    }
    check_block_table(plan, block_table)?;
    check_layers::<T>(plan, LayerTensors::Keys, &key_pools.iter().map(|k| k.len()).collect::<Vec<_>>())?;
    let compacts = matches!(plan.shape().compaction, Compaction::InPlace(_));
    if compacts {
        check_layers::<T>(plan, LayerTensors::Values, &value_pools.iter().map(|v| v.len()).collect::<Vec<_>>())?;
    }
    let cache = CacheAddresses {
        keys: key_pools.iter_mut().map(|k| k.as_mut_ptr() as u64).collect(),
        values: if compacts { value_pools.iter_mut().map(|v| v.as_mut_ptr() as u64).collect() } else { Vec::new() },
        block_table: block_table.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: the pools hold every block (checked), the block table names distinct in-range
    // blocks covering N slots (checked); the pools are borrowed exclusively.
    unsafe { round_raw(plan, &cache, round_start) }
}
