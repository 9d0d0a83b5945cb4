//! The device half of the C ABI behind the `extern "C"` shells in `mod.rs`: CUDA contexts
//! (feature `cuda`), round plans (host-only; they need [`crate::cuda`], i.e. feature `emu` or
//! `cuda`), and binding and launching a plan on device pointers and a caller's stream
//! (feature `cuda`). Everything here returns a [`Result`]; the shells turn it into a status.

use crate::error::{Error, Result};
use crate::policy::RoundOutcome;

use super::{non_null, triattn_compaction, triattn_compressor, triattn_dtype, triattn_outcome};
use super::{triattn_cache_pointers, triattn_layout, triattn_plan_info, triattn_positions, triattn_round_shape};

/// The CUDA device of a context, compressor or plan (none for the CPU backend, and always none
/// in a build without the `cuda` feature).
#[derive(Clone, Default)]
pub(super) struct Device {
    #[cfg(feature = "cuda")]
    gpu: Option<std::sync::Arc<crate::cuda::CudaDevice>>,
}

impl Device {
    /// The backend host rounds of this device run on.
    pub(super) fn round_backend(&self) -> crate::round::Backend {
        #[cfg(feature = "cuda")]
        if let Some(dev) = &self.gpu {
            return crate::round::Backend::Cuda(dev.clone());
        }
        crate::round::Backend::Cpu
    }
}

/// The error of a call that needs the `cuda` feature in a build without it.
#[cfg(not(feature = "cuda"))]
fn no_cuda_feature(what: &str) -> Error {
    Error::unsupported(format!(
        "{what}: this library was built without the cuda feature (rebuild triattn with `--features cuda`)"
    ))
}

/// Open CUDA device `ordinal` (its primary context).
pub(super) fn open_cuda(ordinal: u32) -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        let device = crate::cuda::CudaDevice::open(ordinal as usize)?;
        Ok(Device { gpu: Some(std::sync::Arc::new(device)) })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(no_cuda_feature("TRIATTN_BACKEND_CUDA"))
    }
}

/// A validated round plan and the device of the compressor it was made from.
pub(super) struct Plan {
    plan: crate::cuda::RoundPlan,
    /// The cache bound by `triattn_plan_bind` (its block table and positions travel with every
    /// run).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    bound: crate::cuda::CacheAddresses,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
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
) -> Result<Plan> {
    use crate::cuda::{CacheLayout, Compaction, PageOrder, PositionType, RoundPlan, RoundShape, RowStrides};
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
    let plan = match prefix_lens {
        None => RoundPlan::new(&c.scorer, &c.config, shape).map_err(|e| e.context("triattn_plan_create"))?,
        Some(p) => {
            RoundPlan::new_batch(&c.scorer, &c.config, shape, p).map_err(|e| e.context("triattn_plan_create_batch"))?
        }
    };
    Ok(Plan { plan, bound: Default::default(), device: c.device.clone() })
}

/// The sizes and output offsets of `p`.
pub(super) fn plan_info(p: &Plan) -> triattn_plan_info {
    let plan = &p.plan;
    let w = plan.layout();
    triattn_plan_info {
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

/// The GPU a plan runs on, or why it has none.
#[cfg(feature = "cuda")]
fn gpu_of<'a>(p: &'a Plan, what: &str) -> Result<&'a crate::cuda::CudaBackend> {
    p.device.gpu.as_deref().map(crate::cuda::CudaDevice::backend).ok_or_else(|| {
        Error::new(
            crate::error::ErrorKind::NoDevice,
            format!(
                "{what}: plan: expected a plan of a compressor from a TRIATTN_BACKEND_CUDA context (device rounds \
                 run on a CUDA device), got one from a TRIATTN_BACKEND_CPU context"
            ),
        )
    })
}

#[cfg(feature = "cuda")]
fn driver(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::new(crate::error::ErrorKind::Driver, format!("{what}: {e}")).with_source(e)
}

fn check_workspace(workspace: *mut std::ffi::c_void) -> Result<u64> {
    non_null("workspace", workspace)?;
    let align = 256u64;
    let addr = workspace as u64;
    if addr % align != 0 {
        return Err(Error::invalid_argument(
            "workspace",
            format!("a device address aligned to {align} bytes"),
            format!("{addr:#x}"),
        ));
    }
    Ok(addr)
}

/// Read one host array of `layers` device addresses; `None` when `ptr` is null.
///
/// # Safety
/// `ptr` is null or points to `layers` readable pointers.
unsafe fn address_table(what: &str, ptr: *const *mut std::ffi::c_void, layers: usize) -> Result<Option<Vec<u64>>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; `layers` entries (caller contract).
    let t = unsafe { std::slice::from_raw_parts(ptr, layers) };
    if let Some(i) = t.iter().position(|p| p.is_null()) {
        return Err(Error::invalid_argument(format!("{what}[{i}]"), "a non-null device address", "NULL"));
    }
    Ok(Some(t.iter().map(|&p| p as u64).collect()))
}

/// Copy `p`'s constants for the cache at `cache` into `workspace` on `stream`, load its kernels,
/// and wait for the copy.
///
/// # Safety
/// As `triattn_plan_bind`.
pub(super) unsafe fn bind(
    p: &mut Plan,
    cache: &triattn_cache_pointers,
    workspace: *mut std::ffi::c_void,
    stream: *mut std::ffi::c_void,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use crate::cuda::{CacheAddresses, Compaction, Stage};
        let gpu = gpu_of(p, "triattn_plan_bind")?;
        let plan = &p.plan;
        // `S * L` tensors, sequence-major (a paged cache: its `L` pools).
        let layers = plan.table_len();
        let needs_values = plan.stages().contains(&Stage::Compact);
        let out_of_place = matches!(plan.shape().compaction, Compaction::OutOfPlace { .. });
        let table = |what: &str, ptr: *const *mut std::ffi::c_void, needed: bool, why: &str| -> Result<Vec<u64>> {
            if !needed {
                return Ok(Vec::new());
            }
            // SAFETY: forwarded caller contract (`layers` entries when non-null).
            match unsafe { address_table(what, ptr, layers)? } {
                Some(t) => Ok(t),
                None => {
                    Err(Error::invalid_argument(what, format!("an array of {layers} device addresses ({why})"), "NULL"))
                }
            }
        };
        let addresses = CacheAddresses {
            keys: table("cache.keys", cache.keys, true, "one K tensor per layer")?,
            values: table("cache.values", cache.values, needs_values, "the round compacts V")?,
            keys_out: table("cache.keys_out", cache.keys_out, out_of_place, "the round compacts out of place")?,
            values_out: table("cache.values_out", cache.values_out, out_of_place, "the round compacts out of place")?,
            block_table: cache.block_table as u64,
            positions: cache.positions as u64,
            positions_out: cache.positions_out as u64,
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
        let ws = check_workspace(workspace)?;
        let image = plan.workspace_image(&addresses).map_err(|e| e.context("triattn_plan_bind"))?;
        gpu.prepare_round(plan)?;
        gpu.context().bind_to_thread().map_err(|e| driver("triattn_plan_bind: bind the CUDA context", e))?;
        let stream = stream as cudarc::driver::sys::CUstream;
        // SAFETY: `ws` is device memory of this context of at least `workspace_bytes` >=
        // `image.len()` bytes and `stream` a stream of it (caller contract); the host image
        // outlives the copy because the stream is synchronised before it is dropped.
        unsafe { cudarc::driver::result::memcpy_htod_async(ws, &image, stream) }
            .map_err(|e| driver("triattn_plan_bind: copy the workspace constants", e))?;
        // SAFETY: as above.
        unsafe { cudarc::driver::result::stream::synchronize(stream) }
            .map_err(|e| driver("triattn_plan_bind: synchronise the stream after the constants copy", e))?;
        p.bound = addresses;
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, cache, workspace, stream, address_table, check_workspace);
        Err(no_cuda_feature("triattn_plan_bind"))
    }
}

/// Launch `p` on `stream`: launches only.
///
/// # Safety
/// As `triattn_plan_run`.
pub(super) unsafe fn run(
    p: &Plan,
    workspace: *mut std::ffi::c_void,
    round_start: *const i64,
    stream: *mut std::ffi::c_void,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let gpu = gpu_of(p, "triattn_plan_run")?;
        let ws = check_workspace(workspace)?;
        non_null("round_start_device", round_start)?;
        if round_start as u64 % 8 != 0 {
            return Err(Error::invalid_argument(
                "round_start_device",
                "a device address aligned to 8 bytes",
                format!("{:#x}", round_start as u64),
            ));
        }
        // SAFETY: the caller's contract (a workspace bound by `triattn_plan_bind` to a live cache
        // of the planned shape, a device int64 >= len, a stream of this device's context).
        let at = crate::cuda::RoundAddresses::bound(ws, round_start as u64, &p.bound);
        unsafe { gpu.run_round(&p.plan, &at, stream as cudarc::driver::sys::CUstream) }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (p, workspace, round_start, stream);
        Err(no_cuda_feature("triattn_plan_run"))
    }
}
