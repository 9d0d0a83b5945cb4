//! Rounds and decodes over host buffers on a kernel backend: the one execution path that emu and
//! the GPU share. A [`KernelDevice`] provides memory and a timed launcher; everything else — checking
//! the host tensors against the plan, staging them in the backend's memory, a fresh workspace
//! poisoned like the raw memory an engine hands in (0xff bytes), the launches of
//! [`RoundPlan::run`], reading the outputs and copying compacted tensors back — is written once
//! here. Engines with device-resident caches skip this layer: they bind a workspace to their
//! cache and only launch ([`RoundPlan::run`] on their own launcher, or the GPU runtime's
//! `run_round` and `DeviceRound`).
//!
//! The public entry points are the [`Backend`](crate::Backend) methods (`round_keys`,
//! `round_in_place`, `round_out_of_place`, `round_paged`, `round_on_addresses`).

use crate::dtype::Element;
use crate::error::{Error, Result};

use super::plan::{
    check_block_table, check_layers, CacheAddresses, Compaction, Launcher, LayerTensors, RoundAddresses, RoundOutputs,
    RoundPlan, StageTimings,
};

/// Memory and launches of one kernel backend: what a round over host buffers needs.
pub(crate) trait KernelDevice {
    /// A buffer of this backend's memory, its base aligned to
    /// [`WORKSPACE_ALIGN`](super::WORKSPACE_ALIGN).
    type Buffer;
    /// A launcher that times each stage.
    type Timed<'a>: Launcher
    where
        Self: 'a;

    /// A buffer holding `bytes`.
    fn upload(&self, what: &str, bytes: &[u8]) -> Result<Self::Buffer>;
    /// The buffer's base address (what the kernels read).
    fn address(&self, buffer: &Self::Buffer) -> u64;
    /// The buffer's contents (waits for every launch before it).
    fn download(&self, what: &str, buffer: &Self::Buffer) -> Result<Vec<u8>>;
    /// Overwrite `bytes.len()` bytes of the buffer at `offset` (ordered after every launch
    /// before it).
    fn write(&self, what: &str, buffer: &mut Self::Buffer, offset: usize, bytes: &[u8]) -> Result<()>;
    /// Load the kernels `plan` launches.
    fn prepare(&self, plan: &RoundPlan) -> Result<()> {
        self.prepare_variants(&plan.variants())
    }
    /// Load these kernels.
    fn prepare_variants(&self, variants: &[crate::variant::Variant]) -> Result<()>;
    /// A launcher that times each stage.
    fn timed(&self) -> Self::Timed<'_>;
    /// The stage times of a finished `launcher`.
    fn timings(&self, launcher: &Self::Timed<'_>) -> Result<StageTimings>;
}

/// What a round over host buffers computed, and how long each stage took.
#[derive(Clone, Debug)]
pub struct HostRound {
    /// The outputs of each sequence (one for a one-sequence plan).
    pub outputs: Vec<RoundOutputs>,
    /// Time per stage, the whole batch (wall time under emu, CUDA event time on a GPU).
    pub timings: StageTimings,
}

fn lens<T>(tensors: &[&[T]]) -> Vec<usize> {
    tensors.iter().map(|t| t.len()).collect()
}

fn lens_mut<T>(tensors: &[&mut [T]]) -> Vec<usize> {
    tensors.iter().map(|t| t.len()).collect()
}

fn upload_all<D: KernelDevice, T: Element>(dev: &D, what: &str, tensors: &[&[T]]) -> Result<Vec<D::Buffer>> {
    tensors.iter().map(|t| dev.upload(what, &T::encode_le(t))).collect()
}

fn upload_all_mut<D: KernelDevice, T: Element>(dev: &D, what: &str, tensors: &[&mut [T]]) -> Result<Vec<D::Buffer>> {
    tensors.iter().map(|t| dev.upload(what, &T::encode_le(t))).collect()
}

fn addresses<D: KernelDevice>(dev: &D, buffers: &[D::Buffer]) -> Vec<u64> {
    buffers.iter().map(|b| dev.address(b)).collect()
}

fn download_all<D: KernelDevice, T: Element>(
    dev: &D,
    what: &str,
    host: &mut [&mut [T]],
    buffers: &[D::Buffer],
) -> Result<()> {
    for (h, b) in host.iter_mut().zip(buffers) {
        h.copy_from_slice(&T::decode_le(&dev.download(what, b)?));
    }
    Ok(())
}

fn expect_compaction(plan: &RoundPlan, ok: bool, expected: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument("plan compaction", expected, format!("{:?}", plan.shape().compaction)))
    }
}

fn expect_contiguous(plan: &RoundPlan) -> Result<()> {
    match plan.contiguous_strides() {
        Some(_) => Ok(()),
        None => Err(Error::invalid_argument("plan layout", "contiguous (use round_paged for a paged cache)", "paged")),
    }
}

/// Run `plan` on `dev` over a cache already in its memory, with a fresh workspace: the image of
/// `cache` in its first bytes, the rest poisoned; one `round_start` per sequence.
///
/// # Safety
/// The addresses in `cache` are `dev` memory that holds the planned shape (and destinations of
/// `kept` slots, out of place, disjoint from the source; a paged plan's block table and the
/// positions of the planned type and size); nothing else accesses them until the call returns.
pub(crate) unsafe fn round_on_addresses<D: KernelDevice>(
    dev: &D,
    plan: &RoundPlan,
    cache: &CacheAddresses,
    round_starts: &[u64],
) -> Result<HostRound> {
    let n = plan.shape().len;
    if round_starts.len() != plan.num_seqs() {
        return Err(Error::shape("round_start values", plan.num_seqs(), round_starts.len()));
    }
    let starts = round_starts
        .iter()
        .map(|&r| {
            if r < n as u64 || r > i64::MAX as u64 {
                return Err(Error::invalid_argument("round_start", format!("{n}..=2^63-1 (>= the cached slots)"), r));
            }
            Ok(r as i64)
        })
        .collect::<Result<Vec<i64>>>()?;
    let mut image = plan.workspace_image(cache)?;
    image.resize(plan.workspace_bytes(), 0xff);
    dev.prepare(plan)?;
    let workspace = dev.upload("workspace", &image)?;
    let slots = dev.upload("round_start", &starts.iter().flat_map(|r| r.to_le_bytes()).collect::<Vec<u8>>())?;
    let at = RoundAddresses::bound(dev.address(&workspace), dev.address(&slots), cache);
    let mut launcher = dev.timed();
    // SAFETY: the workspace holds the plan's image (sized, aligned by the backend); the cache is
    // the caller's contract; `slots` holds one i64 >= N per sequence.
    unsafe { plan.run(&mut launcher, &at)? };
    let host = dev.download("workspace", &workspace)?;
    let timings = dev.timings(&launcher)?;
    let outputs = (0..plan.num_seqs()).map(|seq| plan.read_outputs_of(&host, seq)).collect::<Result<_>>()?;
    Ok(HostRound { outputs, timings })
}

/// Run a keep-sets-only plan over the keys of every layer (`S * L` tensors, sequence-major).
pub(crate) fn round_keys<D: KernelDevice, T: Element>(
    dev: &D,
    plan: &RoundPlan,
    keys: &[&[T]],
    round_starts: &[u64],
) -> Result<HostRound> {
    expect_compaction(plan, plan.shape().compaction == Compaction::KeepSetsOnly, "KeepSetsOnly (no values given)")?;
    expect_contiguous(plan)?;
    check_layers::<T>(plan, LayerTensors::Keys, &lens(keys))?;
    let k = upload_all(dev, "keys", keys)?;
    let cache = CacheAddresses { keys: addresses(dev, &k), ..Default::default() };
    // SAFETY: every key tensor holds the planned rows (checked) and was staged in `dev` memory.
    unsafe { round_on_addresses(dev, plan, &cache, round_starts) }
}

/// Run an in-place plan over contiguous K and V (`S * L` tensors each), compacting them.
pub(crate) fn round_in_place<D: KernelDevice, T: Element>(
    dev: &D,
    plan: &RoundPlan,
    keys: &mut [&mut [T]],
    values: &mut [&mut [T]],
    round_starts: &[u64],
) -> Result<HostRound> {
    expect_compaction(plan, matches!(plan.shape().compaction, Compaction::InPlace(_)), "InPlace")?;
    expect_contiguous(plan)?;
    check_layers::<T>(plan, LayerTensors::Keys, &lens_mut(keys))?;
    check_layers::<T>(plan, LayerTensors::Values, &lens_mut(values))?;
    let (k, v) = (upload_all_mut(dev, "keys", keys)?, upload_all_mut(dev, "values", values)?);
    let cache = CacheAddresses { keys: addresses(dev, &k), values: addresses(dev, &v), ..Default::default() };
    // SAFETY: K and V hold the planned rows (checked) and were staged in `dev` memory.
    let out = unsafe { round_on_addresses(dev, plan, &cache, round_starts)? };
    download_all(dev, "keys", keys, &k)?;
    download_all(dev, "values", values, &v)?;
    Ok(out)
}

/// The buffers of an out-of-place round staged in `dev` memory, and the cache they make.
struct OutOfPlace<B> {
    /// K and V sources: only held, so that the addresses in `cache` stay valid.
    _sources: (Vec<B>, Vec<B>),
    k_out: Vec<B>,
    v_out: Vec<B>,
    cache: CacheAddresses,
}

/// Check K, V and their destinations against `plan` and stage them in `dev` memory.
fn stage_out_of_place<D: KernelDevice, T: Element>(
    dev: &D,
    plan: &RoundPlan,
    keys: &[&[T]],
    values: &[&[T]],
    keys_out: &[&mut [T]],
    values_out: &[&mut [T]],
) -> Result<OutOfPlace<D::Buffer>> {
    check_layers::<T>(plan, LayerTensors::Keys, &lens(keys))?;
    check_layers::<T>(plan, LayerTensors::Values, &lens(values))?;
    check_layers::<T>(plan, LayerTensors::KeysOut, &lens_mut(keys_out))?;
    check_layers::<T>(plan, LayerTensors::ValuesOut, &lens_mut(values_out))?;
    let (k, v) = (upload_all(dev, "keys", keys)?, upload_all(dev, "values", values)?);
    let (k_out, v_out) = (upload_all_mut(dev, "keys_out", keys_out)?, upload_all_mut(dev, "values_out", values_out)?);
    let cache = CacheAddresses {
        keys: addresses(dev, &k),
        values: addresses(dev, &v),
        keys_out: addresses(dev, &k_out),
        values_out: addresses(dev, &v_out),
        ..Default::default()
    };
    Ok(OutOfPlace { _sources: (k, v), k_out, v_out, cache })
}

/// Run an out-of-place plan: the kept rows of K and V into `keys_out` / `values_out`.
pub(crate) fn round_out_of_place<D: KernelDevice, T: Element>(
    dev: &D,
    plan: &RoundPlan,
    keys: &[&[T]],
    values: &[&[T]],
    keys_out: &mut [&mut [T]],
    values_out: &mut [&mut [T]],
    round_starts: &[u64],
) -> Result<HostRound> {
    expect_compaction(plan, matches!(plan.shape().compaction, Compaction::OutOfPlace { .. }), "OutOfPlace")?;
    let staged = stage_out_of_place(dev, plan, keys, values, keys_out, values_out)?;
    // SAFETY: sources and destinations hold the planned rows (checked) in separate `dev` buffers.
    let out = unsafe { round_on_addresses(dev, plan, &staged.cache, round_starts)? };
    download_all(dev, "keys_out", keys_out, &staged.k_out)?;
    download_all(dev, "values_out", values_out, &staged.v_out)?;
    Ok(out)
}

/// Run a paged plan over per-layer K and V block pools and the block table `i32[S, max_blocks]`:
/// keep sets only, or compaction in place (the rows move between each sequence's blocks).
pub(crate) fn round_paged<D: KernelDevice, T: Element>(
    dev: &D,
    plan: &RoundPlan,
    key_pools: &mut [&mut [T]],
    value_pools: &mut [&mut [T]],
    block_table: &[i32],
    round_starts: &[u64],
) -> Result<HostRound> {
    if plan.contiguous_strides().is_some() {
        return Err(Error::invalid_argument("plan layout", "paged", "contiguous"));
    }
    expect_compaction(
        plan,
        !matches!(plan.shape().compaction, Compaction::OutOfPlace { .. }),
        "InPlace or KeepSetsOnly (a paged cache)",
    )?;
    check_block_table(plan, block_table)?;
    check_layers::<T>(plan, LayerTensors::Keys, &lens_mut(key_pools))?;
    let compacts = matches!(plan.shape().compaction, Compaction::InPlace(_));
    if compacts {
        check_layers::<T>(plan, LayerTensors::Values, &lens_mut(value_pools))?;
    }
    let k = upload_all_mut(dev, "key pools", key_pools)?;
    let v = if compacts { upload_all_mut(dev, "value pools", value_pools)? } else { Vec::new() };
    let table = dev.upload("block table", &block_table.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<u8>>())?;
    let cache = CacheAddresses {
        keys: addresses(dev, &k),
        values: addresses(dev, &v),
        block_table: dev.address(&table),
        ..Default::default()
    };
    // SAFETY: the pools hold every block (checked) and the table names distinct in-range blocks
    // covering N slots per sequence (checked), all staged in `dev` memory.
    let out = unsafe { round_on_addresses(dev, plan, &cache, round_starts)? };
    if compacts {
        download_all(dev, "key pools", key_pools, &k)?;
        download_all(dev, "value pools", value_pools, &v)?;
    }
    Ok(out)
}

/// Host buffers of a decode (see [`DecodeSpec`](super::DecodeSpec) for each layout).
#[derive(Clone, Copy, Debug)]
pub struct DecodeInputs<'a, T, Q> {
    /// Contiguous: `S * L` K tensors (sequence-major); paged: `L` K pools.
    pub keys: &'a [&'a [T]],
    /// V, as `keys`.
    pub values: &'a [&'a [T]],
    /// `[S, layers, H, T, D]` queries of the launched layers.
    pub queries: &'a [Q],
    /// `f32 [L, H]` sink logits.
    pub sinks: Option<&'a [f32]>,
    /// `i32 [S, lists, list_capacity]` lists (`None`: dense).
    pub lists: Option<&'a [i32]>,
    /// `i32 [S, lists]` lengths ([`ListLengths::PerList`](super::ListLengths::PerList)).
    pub list_lens: Option<&'a [i32]>,
    /// `i32 [S]` visible slots (dense).
    pub seq_lens: Option<&'a [i32]>,
    /// `i32 [S, max_blocks]` block table (paged).
    pub block_table: Option<&'a [i32]>,
}

/// What a decode over host buffers computed, and how long it took.
#[derive(Clone, Debug)]
pub struct HostDecode {
    /// `f32 [S, layers, H, T, Dv]`.
    pub out: Vec<f32>,
    /// `f32 [S, layers, H, T]`.
    pub lse: Vec<f32>,
    /// Time of the decode and (when split) combine launches.
    pub timings: StageTimings,
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if got != expected {
        return Err(Error::shape(what, format!("{expected} elements"), got));
    }
    Ok(())
}

/// Check that every access a decode of `spec` over layers `first..first + layers` makes stays
/// inside `x` (the kernels trust their inputs; this is the host-buffer entry's guard).
fn check_decode_inputs<T: Element, Q: Element>(
    spec: &super::DecodeSpec,
    x: &DecodeInputs<'_, T, Q>,
    layers: usize,
) -> Result<()> {
    use super::plan::CacheLayout;
    use crate::decode::ListLayout;
    let s = spec.shape();
    if T::DTYPE != s.dtype {
        return Err(Error::shape("cache dtype", s.dtype, T::DTYPE));
    }
    if Q::DTYPE != s.query_dtype {
        return Err(Error::shape("query dtype", s.query_dtype, Q::DTYPE));
    }
    let (n, hkv) = (s.len, s.num_kv_heads);
    check_len("queries", s.num_seqs * layers * s.num_heads * s.num_queries * s.head_dim, x.queries.len())?;
    match (s.sinks, x.sinks) {
        (true, Some(sinks)) => check_len("sinks", s.num_layers * s.num_heads, sinks.len())?,
        (false, None) => {}
        (want, _) => return Err(Error::invalid_argument("sinks", if want { "given" } else { "none" }, "the other")),
    }
    let tables = match s.layout {
        CacheLayout::Contiguous { .. } => s.num_seqs * s.num_layers,
        CacheLayout::Paged { .. } => s.num_layers,
    };
    for (what, t, dim) in [("K tensors", x.keys, s.head_dim), ("V tensors", x.values, s.value_dim)] {
        if t.len() != tables {
            return Err(Error::shape(what, tables, t.len()));
        }
        let needed = match s.layout {
            CacheLayout::Contiguous { keys, values } => {
                let st = if dim == s.head_dim && what.starts_with('K') { keys } else { values };
                (hkv - 1) * st.head_stride + (n - 1) * st.row_stride + dim
            }
            CacheLayout::Paged { block_size, num_blocks, .. } => num_blocks * block_size * hkv * dim,
        };
        if let Some(i) = t.iter().position(|x| x.len() < needed) {
            return Err(Error::shape(format!("{what} [{i}]"), format!("at least {needed} elements"), t[i].len()));
        }
    }
    if let CacheLayout::Paged { block_size, num_blocks, max_blocks, .. } = s.layout {
        let table = x.block_table.ok_or_else(|| Error::invalid_argument("block table", "present (paged)", "none"))?;
        check_len("block table", s.num_seqs * max_blocks, table.len())?;
        for seq in 0..s.num_seqs {
            for b in 0..n.div_ceil(block_size) {
                let blk = table[seq * max_blocks + b];
                if blk < 0 || blk as usize >= num_blocks {
                    return Err(Error::invalid_argument(
                        format!("block table [{seq}, {b}]"),
                        format!("0..{num_blocks}"),
                        blk,
                    ));
                }
            }
        }
    }
    if s.lists == ListLayout::Dense {
        let lens = x.seq_lens.ok_or_else(|| Error::invalid_argument("seq_lens", "present (dense decode)", "none"))?;
        check_len("seq_lens", s.num_seqs, lens.len())?;
        if let Some(&bad) = lens.iter().find(|&&l| l < 0 || l as usize > n) {
            return Err(Error::invalid_argument("seq_lens entry", format!("0..={n}"), bad));
        }
        return Ok(());
    }
    let (lists, cap) = (spec.num_lists(), s.list_capacity);
    let entries = x.lists.ok_or_else(|| Error::invalid_argument("lists", "present", "none"))?;
    check_len("lists", s.num_seqs * lists * cap, entries.len())?;
    let lens: Vec<usize> = match (s.list_lengths, x.list_lens) {
        (super::ListLengths::Full, None) => vec![cap; s.num_seqs * lists],
        (super::ListLengths::PerList, Some(lens)) => {
            check_len("list lengths", s.num_seqs * lists, lens.len())?;
            lens.iter()
                .enumerate()
                .map(|(i, &l)| {
                    if l < 0 || l as usize > cap {
                        Err(Error::invalid_argument(format!("list length [{i}]"), format!("0..={cap}"), l))
                    } else {
                        Ok(l as usize)
                    }
                })
                .collect::<Result<_>>()?
        }
        (want, _) => return Err(Error::invalid_argument("list lengths", format!("{want:?}"), "the other")),
    };
    for (i, &len) in lens.iter().enumerate() {
        let list = &entries[i * cap..i * cap + len];
        if let Some(j) = list.iter().position(|&e| e < 0 || e as usize >= n) {
            return Err(Error::invalid_argument(format!("list {i} entry {j}"), format!("a slot in 0..{n}"), list[j]));
        }
    }
    Ok(())
}

/// Decode layers `first_layer..first_layer + layers` of `plan` over host buffers on `dev`: the
/// inputs staged in its memory, a workspace (the plan's constants, then poison) and poisoned
/// outputs, the plan's launches, the outputs copied back.
pub(crate) fn decode<D: KernelDevice, T: Element, Q: Element>(
    dev: &D,
    plan: &super::DecodePlan,
    x: &DecodeInputs<'_, T, Q>,
    first_layer: usize,
    layers: usize,
) -> Result<HostDecode> {
    let spec = plan.spec();
    let s = spec.shape();
    spec.check_layers(first_layer, layers)?;
    check_decode_inputs(spec, x, layers)?;
    let bytes_of = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let k = upload_all(dev, "keys", x.keys)?;
    let v = upload_all(dev, "values", x.values)?;
    let q = dev.upload("queries", &Q::encode_le(x.queries))?;
    let optional = |what: &str, bytes: Option<Vec<u8>>| bytes.map(|b| dev.upload(what, &b)).transpose();
    let sinks = optional("sinks", x.sinks.map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()))?;
    let lists = optional("lists", x.lists.map(bytes_of))?;
    let list_lens = optional("list lengths", x.list_lens.map(bytes_of))?;
    let seq_lens = optional("seq_lens", x.seq_lens.map(bytes_of))?;
    let block_table = optional("block table", x.block_table.map(bytes_of))?;
    let addr = |b: &Option<D::Buffer>| b.as_ref().map_or(0, |b| dev.address(b));
    let cache = super::DecodeCache {
        keys: addresses(dev, &k),
        values: addresses(dev, &v),
        sinks: addr(&sinks),
        lists: addr(&lists),
        list_lens: addr(&list_lens),
        seq_lens: addr(&seq_lens),
        block_table: addr(&block_table),
    };
    let mut image = plan.workspace_image(&cache)?;
    image.resize(plan.workspace_bytes(), 0xff);
    let workspace = dev.upload("workspace", &image)?;
    let rows = s.num_seqs * layers * s.num_heads * s.num_queries;
    let out = dev.upload("o", &vec![0xff; rows * s.value_dim * 4])?;
    let lse = dev.upload("lse", &vec![0xff; rows * 4])?;
    dev.prepare_variants(&[Some(spec.variant()), spec.combine_variant()].into_iter().flatten().collect::<Vec<_>>())?;
    let run = super::DecodeRun {
        workspace: dev.address(&workspace),
        queries: dev.address(&q),
        out: dev.address(&out),
        lse: dev.address(&lse),
        first_layer,
        layers,
    };
    let mut launcher = dev.timed();
    // SAFETY: every buffer was checked against the spec above and staged in `dev` memory of
    // the checked sizes; the workspace holds the plan's image and its parts.
    unsafe { plan.run(&mut launcher, &cache, &run)? };
    let f32s =
        |b: Vec<u8>| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>();
    let out = f32s(dev.download("o", &out)?);
    let lse = f32s(dev.download("lse", &lse)?);
    Ok(HostDecode { out, lse, timings: dev.timings(&launcher)? })
}

/// One rank's host tensors for a sharded out-of-place round: its layers' K and V (each tensor
/// its KV heads) and where the kept rows go.
#[derive(Debug)]
pub struct RankTensors<'a, T> {
    /// `[L_rank]` K tensors `[Hkv_rank, N, D]`.
    pub keys: Vec<&'a [T]>,
    /// `[L_rank]` V tensors.
    pub values: Vec<&'a [T]>,
    /// `[L_rank]` destination K tensors (the plan's destination strides).
    pub keys_out: Vec<&'a mut [T]>,
    /// `[L_rank]` destination V tensors.
    pub values_out: Vec<&'a mut [T]>,
}

/// Every rank of a sharded round over host buffers, in one process: each rank's out-of-place
/// plan ([`RoundPlan::new_shard`], one per rank of the layout, in rank order) runs part by part,
/// and between parts the exposed buffers are read back, all-reduced in process across the ranks
/// that share them (standing in for the engine's collective) and written back.
pub(crate) fn round_out_of_place_sharded<D: KernelDevice, T: Element>(
    dev: &D,
    plans: &[RoundPlan],
    ranks: &mut [RankTensors<'_, T>],
    round_starts: &[u64],
) -> Result<Vec<HostRound>> {
    use crate::shard::{all_reduce_in_process, ReduceOp, ReductionBuffer, ReductionData};
    if plans.len() != ranks.len() || plans.is_empty() {
        return Err(Error::shape("sharded round ranks", format!("{} (one per plan)", plans.len()), ranks.len()));
    }
    let parts = plans[0].parts();
    for (r, plan) in plans.iter().enumerate() {
        let rank = plan.shard().map(|s| s.rank);
        if rank != Some(r) || plan.parts() != parts {
            return Err(Error::invalid_argument(
                format!("plan {r}"),
                format!("the sharded plan of rank {r} with {parts} parts (RoundPlan::new_shard, rank order)"),
                format!("rank {rank:?} with {} parts", plan.parts()),
            ));
        }
        expect_compaction(plan, matches!(plan.shape().compaction, Compaction::OutOfPlace { .. }), "OutOfPlace")?;
        if round_starts.len() != plan.num_seqs() {
            return Err(Error::shape("round_start values", plan.num_seqs(), round_starts.len()));
        }
    }
    let n = plans[0].shape().len;
    if let Some(&r) = round_starts.iter().find(|&&r| r < n as u64 || r > i64::MAX as u64) {
        return Err(Error::invalid_argument("round_start", format!("{n}..=2^63-1 (>= the cached slots)"), r));
    }
    let starts: Vec<u8> = round_starts.iter().flat_map(|&r| (r as i64).to_le_bytes()).collect();
    struct Staged<B> {
        tensors: OutOfPlace<B>,
        workspace: B,
        slots: B,
    }
    let mut staged = Vec::with_capacity(plans.len());
    for (plan, t) in plans.iter().zip(ranks.iter()) {
        let tensors = stage_out_of_place(dev, plan, &t.keys, &t.values, &t.keys_out, &t.values_out)?;
        let mut image = plan.workspace_image(&tensors.cache)?;
        image.resize(plan.workspace_bytes(), 0xff);
        dev.prepare(plan)?;
        let workspace = dev.upload("workspace", &image)?;
        let slots = dev.upload("round_start", &starts)?;
        staged.push(Staged { tensors, workspace, slots });
    }
    let mut launchers: Vec<D::Timed<'_>> = plans.iter().map(|_| dev.timed()).collect();
    for part in 0..parts {
        for ((plan, s), launcher) in plans.iter().zip(&staged).zip(launchers.iter_mut()) {
            let at = RoundAddresses::bound(dev.address(&s.workspace), dev.address(&s.slots), &s.tensors.cache);
            // SAFETY: each workspace holds its plan's image over sources and destinations that hold
            // the planned rows (checked) in separate `dev` buffers; `slots` holds the round starts
            // (checked >= N); the previous part's collective was written back below.
            unsafe { plan.run_part(launcher, &at, part)? };
        }
        if part + 1 == parts {
            break;
        }
        // The collective after `part`: each rank's buffer, all-reduced within its group.
        let mut keys: Vec<Vec<i32>> = vec![Vec::new(); plans.len()];
        let mut sums: Vec<Vec<f64>> = vec![Vec::new(); plans.len()];
        let mut regions = Vec::with_capacity(plans.len());
        for (r, (plan, s)) in plans.iter().zip(&staged).enumerate() {
            let region = plan.reduction_region(part)?;
            let host = dev.download("workspace", &s.workspace)?;
            let bytes = &host[region.offset..region.offset + region.bytes];
            match plan.reductions()[part].kind.op() {
                ReduceOp::Max => {
                    keys[r] = bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
                }
                ReduceOp::Sum => {
                    sums[r] = bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
                }
            }
            regions.push(region);
        }
        {
            let mut groups: std::collections::BTreeMap<Vec<usize>, Vec<ReductionBuffer<'_>>> = Default::default();
            for ((plan, k), s) in plans.iter().zip(keys.iter_mut()).zip(sums.iter_mut()) {
                let reduction = plan.reductions()[part].clone();
                let data = match reduction.kind.op() {
                    ReduceOp::Max => ReductionData::MaxKeys(k),
                    ReduceOp::Sum => ReductionData::Sums(s),
                };
                let rank = plan.shard().map_or(0, |s| s.rank);
                groups.entry(reduction.ranks.clone()).or_default().push(ReductionBuffer { rank, reduction, data });
            }
            for group in groups.values_mut() {
                all_reduce_in_process(group)?;
            }
        }
        for (r, s) in staged.iter_mut().enumerate() {
            let bytes: Vec<u8> = if keys[r].is_empty() {
                sums[r].iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                keys[r].iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            dev.write("workspace", &mut s.workspace, regions[r].offset, &bytes)?;
        }
    }
    let mut out = Vec::with_capacity(plans.len());
    for (((plan, s), t), launcher) in plans.iter().zip(&staged).zip(ranks.iter_mut()).zip(&launchers) {
        let host = dev.download("workspace", &s.workspace)?;
        let timings = dev.timings(launcher)?;
        let outputs = (0..plan.num_seqs()).map(|seq| plan.read_outputs_of(&host, seq)).collect::<Result<_>>()?;
        download_all(dev, "keys_out", &mut t.keys_out, &s.tensors.k_out)?;
        download_all(dev, "values_out", &mut t.values_out, &s.tensors.v_out)?;
        out.push(HostRound { outputs, timings });
    }
    Ok(out)
}
