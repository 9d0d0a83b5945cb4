//! The device half of the C ABI behind the `extern "C"` shells in `mod.rs`: contexts on a
//! kernel backend (a CUDA device, feature `cuda`; the SIMT layer, feature `emu`), round plans
//! (host-only; they need [`crate::cuda`]'s planning, present in every build), and bindings —
//! a workspace bound to one cache — that launch on a caller's stream. Everything here returns a
//! [`Result`]; the shells turn it into a status.

use std::sync::Arc;

use crate::cuda::{CacheAddresses, Compaction, RoundAddresses, RoundPlan, Stage};
use crate::error::{Error, ErrorKind, Result};
use crate::policy::RoundOutcome;
use crate::round::Backend;

use super::{non_null, triattn_compaction, triattn_compressor, triattn_dtype, triattn_outcome};
use super::{triattn_cache_pointers, triattn_layout, triattn_plan_info, triattn_positions, triattn_round_shape};

/// The error of a call that needs a feature this build lacks.
#[cfg_attr(all(feature = "cuda", feature = "emu"), allow(dead_code))]
fn missing_feature(what: &str, feature: &str) -> Error {
    Error::unsupported(format!(
        "{what}: this library was built without the {feature} feature (rebuild triattn with `--features {feature}`)"
    ))
}

/// Open CUDA device `ordinal` (its primary context).
pub(super) fn open_cuda(ordinal: u32) -> Result<Backend> {
    #[cfg(feature = "cuda")]
    {
        let device = crate::cuda::CudaDevice::open(ordinal as usize)?;
        Ok(Backend::Cuda(Arc::new(device)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(missing_feature("TRIATTN_BACKEND_CUDA", "cuda"))
    }
}

/// The SIMT layer (kernels on the CPU, host addresses for device addresses).
pub(super) fn open_emu() -> Result<Backend> {
    #[cfg(feature = "emu")]
    {
        Ok(Backend::Emu)
    }
    #[cfg(not(feature = "emu"))]
    {
        Err(missing_feature("TRIATTN_BACKEND_EMU", "emu"))
    }
}

/// A validated round plan and the backend of the compressor it was made from. Shared (`Arc`)
/// by the plan handle and every binding made from it, so either may be destroyed first.
pub(super) struct Plan {
    plan: RoundPlan,
    backend: Backend,
}

/// A workspace bound to one cache: the plan, the workspace base and the cache's addresses (its
/// block-table row and positions travel with every run of this binding, never another's).
pub(super) struct Binding {
    plan: Arc<Plan>,
    workspace: u64,
    cache: CacheAddresses,
}

/// Check the fields of `s` for a model of `head_dim`, each error naming the field.
fn validate_shape(
    s: &triattn_round_shape,
    head_dim: usize,
) -> Result<(triattn_dtype, triattn_compaction, triattn_layout)> {
    let dtype = triattn_dtype::from_c("shape.dtype", s.dtype)?;
    let compaction = triattn_compaction::from_c("shape.compaction", s.compaction)?;
    let layout = triattn_layout::from_c("shape.layout", s.layout)?;
    if s.len == 0 || s.len > i32::MAX as usize {
        return Err(Error::invalid_argument("shape.len", "1..=2147483647 cached slots", s.len));
    }
    if s.prefix_len > s.len {
        return Err(Error::invalid_argument("shape.prefix_len", format!("<= shape.len ({})", s.len), s.prefix_len));
    }
    let elem = dtype.to_rust().size();
    let vec = 16 / elem;
    let strides = |prefix: &str, dim: usize, head: usize, row: usize| -> Result<()> {
        for (field, v) in [("head_stride", head), ("row_stride", row)] {
            if v % vec != 0 {
                return Err(Error::invalid_argument(
                    format!("shape.{prefix}_{field}"),
                    format!("a multiple of {vec} elements (16 bytes)"),
                    v,
                ));
            }
        }
        if row < dim {
            return Err(Error::invalid_argument(
                format!("shape.{prefix}_row_stride"),
                format!(">= {dim} elements"),
                row,
            ));
        }
        Ok(())
    };
    if compaction != triattn_compaction::KeepSetsOnly && s.value_dim == 0 {
        return Err(Error::invalid_argument("shape.value_dim", ">= 1 (the round compacts V)", 0));
    }
    if layout != triattn_layout::Contiguous {
        // Block size, pool and table sizes are checked by the plan, by name.
        if compaction == triattn_compaction::OutOfPlace {
            return Err(Error::invalid_argument(
                "shape.compaction",
                "KEEP_SETS_ONLY or IN_PLACE_* for a paged cache",
                "TRIATTN_COMPACTION_OUT_OF_PLACE",
            ));
        }
        return Ok((dtype, compaction, layout));
    }
    strides("key", head_dim, s.key_head_stride, s.key_row_stride)?;
    if compaction != triattn_compaction::KeepSetsOnly {
        strides("value", s.value_dim, s.value_head_stride, s.value_row_stride)?;
    }
    if compaction == triattn_compaction::OutOfPlace {
        strides("dst_key", head_dim, s.dst_key_head_stride, s.dst_key_row_stride)?;
        strides("dst_value", s.value_dim, s.dst_value_head_stride, s.dst_value_row_stride)?;
    }
    Ok((dtype, compaction, layout))
}

/// Plan a round of `c` over caches of shape `s` (host-only).
pub(super) fn create_plan(
    c: &triattn_compressor,
    s: &triattn_round_shape,
    prefix_lens: Option<&[usize]>,
) -> Result<Arc<Plan>> {
    use crate::cuda::{CacheLayout, PageOrder, PositionType, RoundShape, RowStrides};
    use crate::variant::CompactMode;
    let (dtype, compaction, layout) = validate_shape(s, c.scorer.model.head_dim)?;
    let st = |head_stride, row_stride| RowStrides { head_stride, row_stride };
    let shape = RoundShape {
        dtype: dtype.to_rust(),
        len: s.len,
        prefix_len: s.prefix_len,
        value_dim: s.value_dim,
        layout: match layout {
            triattn_layout::Contiguous => CacheLayout::Contiguous {
                keys: st(s.key_head_stride, s.key_row_stride),
                values: st(s.value_head_stride, s.value_row_stride),
            },
            triattn_layout::PagedNhd | triattn_layout::PagedHnd => CacheLayout::Paged {
                block_size: s.block_size,
                order: if layout == triattn_layout::PagedNhd { PageOrder::Nhd } else { PageOrder::Hnd },
                num_blocks: s.num_blocks,
                max_blocks: s.max_blocks,
            },
        },
        compaction: match compaction {
            triattn_compaction::KeepSetsOnly => Compaction::KeepSetsOnly,
            triattn_compaction::InPlaceOrderPreserving => Compaction::InPlace(CompactMode::OrderPreserving),
            triattn_compaction::InPlaceHoleFilling => Compaction::InPlace(CompactMode::HoleFilling),
            triattn_compaction::OutOfPlace => Compaction::OutOfPlace {
                keys: st(s.dst_key_head_stride, s.dst_key_row_stride),
                values: st(s.dst_value_head_stride, s.dst_value_row_stride),
            },
        },
        positions: match triattn_positions::from_c("shape.positions", s.positions)? {
            triattn_positions::None => None,
            triattn_positions::I32 => Some(PositionType::I32),
            triattn_positions::I64 => Some(PositionType::I64),
        },
    };
    let what = if prefix_lens.is_some() { "triattn_plan_create_batch" } else { "triattn_plan_create" };
    let prefixes = prefix_lens.map_or_else(|| vec![shape.prefix_len], <[usize]>::to_vec);
    let plan = match &c.shard {
        None => RoundPlan::new_batch_tuned(&c.scorer, &c.config, shape, &prefixes, &c.dispatch),
        Some(shard) => RoundPlan::new_shard(&c.scorer, shard, &c.config, shape, &prefixes, &c.dispatch),
    }
    .map_err(|e| e.context(what))?;
    Ok(Arc::new(Plan { plan, backend: c.device.clone() }))
}

/// The sizes and output offsets of `p`.
pub(super) fn plan_info(p: &Plan) -> triattn_plan_info {
    let plan = &p.plan;
    let w = plan.layout();
    triattn_plan_info {
        struct_size: std::mem::size_of::<triattn_plan_info>() as u32,
        workspace_bytes: plan.workspace_bytes(),
        workspace_alignment: crate::cuda::WORKSPACE_ALIGN,
        constants_bytes: w.constants_bytes,
        outcome: match plan.outcome() {
            RoundOutcome::Compressed { .. } => triattn_outcome::Compressed,
            RoundOutcome::WithinBudget => triattn_outcome::WithinBudget,
            RoundOutcome::Skipped(_) => triattn_outcome::SkippedProtectedReachBudget,
        },
        sets: plan.sets(),
        kept: plan.kept(),
        num_seqs: plan.num_seqs(),
        keep_offset: w.keep.offset,
        keep_bytes: w.keep.bytes,
        score_offset: w.score.offset,
        score_bytes: w.score.bytes,
        raw_offset: w.raw.offset,
        raw_bytes: w.raw.bytes,
        slot_map_offset: if w.slot_map.bytes > 0 { w.slot_map.offset } else { 0 },
        slot_map_bytes: w.slot_map.bytes,
    }
}

/// The refusal of a plan of a CPU context: device rounds run on a kernel backend.
fn cpu_plan(what: &str) -> Error {
    Error::new(
        ErrorKind::NoDevice,
        format!(
            "{what}: plan: expected a plan of a compressor from a TRIATTN_BACKEND_CUDA (or TRIATTN_BACKEND_EMU) \
             context (device rounds run on the kernels), got one from a TRIATTN_BACKEND_CPU context"
        ),
    )
}

/// The kernels a binding loads before its first run (read by the CUDA backend only).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) enum Kernels<'a> {
    /// Every stage of a round plan.
    Round(&'a RoundPlan),
    /// A decode plan's decode (and combine).
    Decode(&'a crate::cuda::DecodePlan),
}

/// Load `kernels` and copy `image` to the workspace at `ws` on `stream` (waiting for the copy):
/// the setup step of every binding. Under emu the workspace is host memory.
///
/// # Safety
/// `ws` is memory of `backend` (device memory of its context, host memory under emu) of at
/// least `image.len()` bytes that nothing else accesses during the call; `stream` is NULL or a
/// stream of that context.
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(unused_variables))]
pub(super) unsafe fn write_constants(
    backend: &Backend,
    ws: u64,
    image: &[u8],
    stream: *mut std::ffi::c_void,
    what: &str,
    kernels: Kernels<'_>,
) -> Result<()> {
    match backend {
        Backend::Cpu => Err(cpu_plan(what)),
        #[cfg(feature = "emu")]
        Backend::Emu => {
            let _ = (stream, kernels);
            // SAFETY: the caller's contract: `ws` is host memory of at least `image.len()` bytes,
            // distinct from the image.
            unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), ws as *mut u8, image.len()) };
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => {
            let gpu = dev.backend();
            match kernels {
                Kernels::Round(plan) => gpu.prepare_round(plan)?,
                Kernels::Decode(plan) => gpu.prepare_decode(plan)?,
            }
            let stream = stream as cudarc::driver::sys::CUstream;
            gpu.with_current_context(|| {
                // SAFETY: `ws` is device memory of this context of at least `image.len()` bytes
                // and `stream` a stream of it (caller contract); the host image outlives the copy
                // because the stream is synchronised before returning.
                unsafe { cudarc::driver::result::memcpy_htod_async(ws, image, stream) }
                    .map_err(|e| driver(&format!("{what}: copy the workspace constants"), e))?;
                // SAFETY: as above.
                unsafe { cudarc::driver::result::stream::synchronize(stream) }
                    .map_err(|e| driver(&format!("{what}: synchronise the stream after the constants copy"), e))
            })
        }
    }
}

#[cfg(feature = "cuda")]
fn driver(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::new(ErrorKind::Driver, format!("{what}: {e}")).with_source(e)
}

/// Read one host array of `count` device addresses; `None` when `ptr` is null.
///
/// # Safety
/// `ptr` is null or points to `count` readable pointers.
unsafe fn address_table(what: &str, ptr: *const *mut std::ffi::c_void, count: usize) -> Result<Option<Vec<u64>>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; `count` entries (caller contract).
    let t = unsafe { std::slice::from_raw_parts(ptr, count) };
    if let Some(i) = t.iter().position(|p| p.is_null()) {
        return Err(Error::invalid_argument(format!("{what}[{i}]"), "a non-null device address", "NULL"));
    }
    Ok(Some(t.iter().map(|&p| p as u64).collect()))
}

/// The addresses of `cache` that `plan` reads, each table checked for presence and length.
///
/// # Safety
/// As `triattn_plan_bind` (the arrays in `cache` hold `table_len` readable entries where
/// non-null).
unsafe fn cache_addresses(plan: &RoundPlan, cache: &triattn_cache_pointers) -> Result<CacheAddresses> {
    let count = plan.table_len();
    let needs_values = plan.stages().contains(&Stage::Compact);
    let out_of_place = matches!(plan.shape().compaction, Compaction::OutOfPlace { .. });
    let table = |what: &str, ptr: *const *mut std::ffi::c_void, needed: bool, why: &str| -> Result<Vec<u64>> {
        if !needed {
            return Ok(Vec::new());
        }
        // SAFETY: forwarded caller contract (`count` entries when non-null).
        match unsafe { address_table(what, ptr, count)? } {
            Some(t) => Ok(t),
            None => Err(Error::invalid_argument(what, format!("an array of {count} device addresses ({why})"), "NULL")),
        }
    };
    let paged = plan.contiguous_strides().is_none();
    if paged == cache.block_table.is_null() {
        return Err(Error::invalid_argument(
            "cache.block_table",
            if paged {
                "the device address of the sequence's block-table row (paged cache)"
            } else {
                "NULL (contiguous cache)"
            },
            format!("{:#x}", cache.block_table as u64),
        ));
    }
    Ok(CacheAddresses {
        keys: table("cache.keys", cache.keys, true, "one K tensor per layer")?,
        values: table("cache.values", cache.values, needs_values, "the round compacts V")?,
        keys_out: table("cache.keys_out", cache.keys_out, out_of_place, "the round compacts out of place")?,
        values_out: table("cache.values_out", cache.values_out, out_of_place, "the round compacts out of place")?,
        block_table: cache.block_table as u64,
        positions: cache.positions as u64,
        positions_out: cache.positions_out as u64,
    })
}

/// Bind `workspace` to the cache at `cache`: check every address, write the plan's constants
/// for that cache into the workspace (on `stream`, waiting for the copy) and load the kernels.
///
/// # Safety
/// As `triattn_plan_bind`.
pub(super) unsafe fn bind(
    plan: &Arc<Plan>,
    cache: &triattn_cache_pointers,
    workspace: *mut std::ffi::c_void,
    stream: *mut std::ffi::c_void,
) -> Result<Binding> {
    if plan.backend.is_cpu() {
        return Err(cpu_plan("triattn_plan_bind"));
    }
    non_null("workspace", workspace)?;
    // SAFETY: forwarded caller contract.
    let addresses = unsafe { cache_addresses(&plan.plan, cache)? };
    let ws = workspace as u64;
    crate::cuda::check_workspace_address(ws)?;
    let image = plan.plan.workspace_image(&addresses).map_err(|e| e.context("triattn_plan_bind"))?;
    // SAFETY: forwarded caller contract (`ws` holds the plan's workspace on `stream`'s context).
    unsafe { write_constants(&plan.backend, ws, &image, stream, "triattn_plan_bind", Kernels::Round(&plan.plan))? };
    Ok(Binding { plan: plan.clone(), workspace: ws, cache: addresses })
}

/// The round plan of a plan handle.
pub(super) fn round_plan(p: &Plan) -> &RoundPlan {
    &p.plan
}

/// Launch part `part` of binding `b`'s sharded round on `stream`: launches only.
///
/// # Safety
/// As `triattn_binding_run_part`.
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(unused_variables))]
pub(super) unsafe fn run_part(
    b: &Binding,
    round_start: *const i64,
    part: usize,
    stream: *mut std::ffi::c_void,
) -> Result<()> {
    non_null("round_start_device", round_start)?;
    let at = RoundAddresses::bound(b.workspace, round_start as u64, &b.cache);
    match &b.plan.backend {
        Backend::Cpu => Err(cpu_plan("triattn_binding_run_part")),
        #[cfg(feature = "emu")]
        Backend::Emu => {
            let _ = stream;
            let mut launcher = crate::emu::EmuLauncher::default();
            // SAFETY: the caller's contract (as `run`, and the previous part's collective done).
            unsafe { b.plan.plan.run_part(&mut launcher, &at, part) }.map_err(|e| e.context("triattn_binding_run_part"))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => {
            let mut launcher = crate::cuda::StreamLauncher::new(dev.backend(), stream as cudarc::driver::sys::CUstream);
            // SAFETY: the caller's contract (as `run`, on a stream of this device's context).
            unsafe { b.plan.plan.run_part(&mut launcher, &at, part) }.map_err(|e| e.context("triattn_binding_run_part"))
        }
    }
}

/// Launch the round of binding `b` on `stream`: launches only.
///
/// # Safety
/// As `triattn_binding_run`.
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(unused_variables))]
pub(super) unsafe fn run(b: &Binding, round_start: *const i64, stream: *mut std::ffi::c_void) -> Result<()> {
    non_null("round_start_device", round_start)?;
    let at = RoundAddresses::bound(b.workspace, round_start as u64, &b.cache);
    match &b.plan.backend {
        Backend::Cpu => Err(cpu_plan("triattn_binding_run")),
        #[cfg(feature = "emu")]
        Backend::Emu => {
            let _ = stream;
            let mut launcher = crate::emu::EmuLauncher::default();
            // SAFETY: the caller's contract: the workspace was bound to a live cache of the
            // planned shape (host memory under emu), `round_start` is a readable i64 >= len.
            unsafe { b.plan.plan.run(&mut launcher, &at) }.map_err(|e| e.context("triattn_binding_run"))
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => {
            // SAFETY: the caller's contract (a workspace bound to a live cache of the planned
            // shape, a device int64 >= len, a stream of this device's context).
            unsafe { dev.backend().run_round(&b.plan.plan, &at, stream as cudarc::driver::sys::CUstream) }
                .map_err(|e| e.context("triattn_binding_run"))
        }
    }
}
