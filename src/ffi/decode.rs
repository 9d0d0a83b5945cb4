//! The C ABI of sparse decode attention: a plan per decode shape, a binding per workspace and
//! cache, runs on the caller's stream (the same pattern as device rounds).

use std::ffi::c_void;
use std::sync::Arc;

use crate::cuda::{CacheLayout, DecodeCache, DecodePlan, DecodeRun, DecodeShape, ListLengths, RowStrides, SplitPolicy};
use crate::decode::{DecodeOptions, ListLayout};
use crate::error::{Error, ErrorKind, Result};
use crate::round::Backend;

use super::types::{read_versioned, write_versioned, Versioned};
use super::{boundary, non_null, triattn_context, triattn_dtype, triattn_layout, triattn_status};

/// Which list each (layer, KV head) of a decode reads (`triattn_decode_shape::lists`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_list_layout {
    /// No lists: every slot `0..seq_lens[s]` is visible (dense decode of a compacted cache).
    Dense = 0,
    /// One list for every layer and KV head (a `union` round's keep set).
    Shared = 1,
    /// One list per KV head, for every layer (`per-head` keep sets).
    PerKvHead = 2,
    /// One list per (layer, KV head) (`per-layer-per-head` keep sets).
    PerLayerKvHead = 3,
}

/// The shape of a device decode: S sequences of one cache shape, every layer, T queries per
/// head. Enum fields travel as uint32_t and are checked on entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_decode_shape {
    /// `sizeof(triattn_decode_shape)`, set by the caller: the ABI version of this struct.
    pub struct_size: u32,
    /// Element type of K and V: a `triattn_dtype` value.
    pub dtype: u32,
    /// Element type of the queries: a `triattn_dtype` value.
    pub query_dtype: u32,
    /// Where the rows live: a `triattn_layout` value.
    pub layout: u32,
    /// Sequences S.
    pub num_seqs: usize,
    /// Layers L.
    pub num_layers: usize,
    /// Attention heads H (a multiple of num_kv_heads).
    pub num_heads: usize,
    /// KV heads Hkv.
    pub num_kv_heads: usize,
    /// Head dimension D of q and K.
    pub head_dim: usize,
    /// Value dimension Dv (a multiple of 16 bytes, at most 256).
    pub value_dim: usize,
    /// Decode queries per head T.
    pub num_queries: usize,
    /// Slots each sequence's K/V tensors hold: the bound of every list entry.
    pub len: usize,
    /// Contiguous: elements between KV heads of K.
    pub key_head_stride: usize,
    /// Contiguous: elements between slots of K.
    pub key_row_stride: usize,
    /// Contiguous: elements between KV heads of V.
    pub value_head_stride: usize,
    /// Contiguous: elements between slots of V.
    pub value_row_stride: usize,
    /// Paged: slots per block, 16 to 256.
    pub block_size: usize,
    /// Paged: blocks in each layer's pool.
    pub num_blocks: usize,
    /// Paged: entries of each sequence's block-table row.
    pub max_blocks: usize,
    /// Which list each (layer, KV head) reads: a `triattn_list_layout` value.
    pub lists: u32,
    /// 1: per-list lengths `int32 [S, lists]` (ragged lists); 0: every list holds `list_capacity`
    /// entries (a round's keep sets).
    pub ragged: i32,
    /// Entries between lists (the longest list at most); ignored when dense.
    pub list_capacity: usize,
    /// 1: sinks `float [L, H]` join the softmax normaliser.
    pub sinks: i32,
    /// Logit scale; 0: `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Soft-capping C > 0 (logits become `C * tanh(s / C)`); 0: off.
    pub softcap: f32,
    /// Splits of every list: 0 chooses from the longest list and the device's SM count.
    pub splits: u32,
}

/// What a decode plan needs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_decode_info {
    /// `sizeof(triattn_decode_info)`, set by the caller before the call.
    pub struct_size: u32,
    /// Bytes of device workspace a binding needs.
    pub workspace_bytes: usize,
    /// Required alignment of the workspace base (256).
    pub workspace_alignment: usize,
    /// Leading bytes of the workspace `triattn_decode_plan_bind` writes.
    pub constants_bytes: usize,
    /// Splits of every list (1: no combine launch).
    pub splits: usize,
}

/// Device addresses of the cache a decode binding reads. The tables hold `num_seqs * num_layers`
/// K (and V) tensor addresses, sequence-major (paged: the `num_layers` pools).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_decode_cache {
    /// `sizeof(triattn_decode_cache)`, set by the caller.
    pub struct_size: u32,
    /// K tensor (or pool) of each (sequence, layer).
    pub keys: *const *mut c_void,
    /// V tensor (or pool) of each (sequence, layer).
    pub values: *const *mut c_void,
    /// `float [L, H]` sinks, or NULL.
    pub sinks: *const f32,
    /// `int32 [S, lists, list_capacity]` ascending slots (e.g. a round plan's keep sets in its
    /// workspace), or NULL (dense).
    pub lists: *const i32,
    /// `int32 [S, lists]` lengths (ragged lists), or NULL.
    pub list_lens: *const i32,
    /// `int32 [S]` visible slots (dense), or NULL.
    pub seq_lens: *const i32,
    /// `int32 [S, max_blocks]` block table (paged), or NULL.
    pub block_table: *const i32,
}

// SAFETY: `#[repr(C)]` with `struct_size: u32` first (the definitions above).
unsafe impl Versioned for triattn_decode_shape {
    const NAME: &'static str = "triattn_decode_shape";
}
// SAFETY: as above.
unsafe impl Versioned for triattn_decode_info {
    const NAME: &'static str = "triattn_decode_info";
}
// SAFETY: as above.
unsafe impl Versioned for triattn_decode_cache {
    const NAME: &'static str = "triattn_decode_cache";
}

impl triattn_list_layout {
    fn from_c(what: &str, v: u32) -> Result<ListLayout> {
        Ok(match v {
            0 => ListLayout::Dense,
            1 => ListLayout::Shared,
            2 => ListLayout::PerKvHead,
            3 => ListLayout::PerLayerKvHead,
            _ => {
                return Err(Error::invalid_argument(
                    what,
                    "TRIATTN_LIST_LAYOUT_DENSE (0), _SHARED (1), _PER_KV_HEAD (2) or _PER_LAYER_KV_HEAD (3)",
                    v,
                ))
            }
        })
    }
}

/// Opaque decode plan: one decode shape on one backend, validated on the host. Immutable after
/// creation: may be shared by threads.
pub struct triattn_decode_plan {
    inner: Arc<(DecodePlan, Backend)>,
}

/// Opaque decode binding: a plan's workspace bound to one cache. Runs of one binding are ordered
/// by the caller (they share its workspace); the handle may be used from any thread.
pub struct triattn_decode_binding {
    plan: Arc<(DecodePlan, Backend)>,
    workspace: u64,
    #[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(dead_code))]
    cache: DecodeCache,
}

fn flag(what: &str, v: i32) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(Error::invalid_argument(what, "0 or 1", other)),
    }
}

fn positive_or_zero(what: &str, v: f32) -> Result<Option<f32>> {
    if v == 0.0 {
        return Ok(None);
    }
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::invalid_argument(what, "0 (default) or a positive finite number", v));
    }
    Ok(Some(v))
}

fn shape_of(s: &triattn_decode_shape, backend: &Backend) -> Result<DecodeShape> {
    use crate::cuda::PageOrder;
    let layout = triattn_layout::from_c("shape.layout", s.layout)?;
    let st = |head_stride, row_stride| RowStrides { head_stride, row_stride };
    let splits = match s.splits {
        0 => SplitPolicy::Auto { sm_count: sm_count(backend) },
        n => SplitPolicy::Fixed(n as usize),
    };
    Ok(DecodeShape {
        dtype: triattn_dtype::from_c("shape.dtype", s.dtype)?.to_rust(),
        query_dtype: triattn_dtype::from_c("shape.query_dtype", s.query_dtype)?.to_rust(),
        num_seqs: s.num_seqs,
        num_layers: s.num_layers,
        num_heads: s.num_heads,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.head_dim,
        value_dim: s.value_dim,
        num_queries: s.num_queries,
        len: s.len,
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
        lists: triattn_list_layout::from_c("shape.lists", s.lists)?,
        list_capacity: s.list_capacity,
        list_lengths: if flag("shape.ragged", s.ragged)? { ListLengths::PerList } else { ListLengths::Full },
        sinks: flag("shape.sinks", s.sinks)?,
        options: DecodeOptions {
            scale: positive_or_zero("shape.scale", s.scale)?,
            softcap: positive_or_zero("shape.softcap", s.softcap)?,
        },
        splits,
    })
}

/// SMs of the backend's device (a nominal 16 under emu, where splits only exercise the path).
fn sm_count(backend: &Backend) -> usize {
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => dev.backend().sm_count(),
        _ => 16,
    }
}

/// Plan a device decode of `shape` on the backend of `ctx` (host-only: no device work).
///
/// Every field of `shape` is checked on entry (errors name it, with expected vs got). A plan of
/// a CPU context can be created and inspected but not bound.
///
/// # Safety
/// `ctx` is a live context; `shape` points to a `triattn_decode_shape`; `out` points to writable
/// storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_decode_plan_create(
    ctx: *const triattn_context,
    shape: *const triattn_decode_shape,
    out: *mut *mut triattn_decode_plan,
) -> triattn_status {
    boundary(|| {
        non_null("ctx", ctx)?;
        non_null("shape", shape)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live context and readable shape (caller contract).
        let (backend, dispatch, shape) =
            unsafe { ((*ctx).device.clone(), (*ctx).dispatch(), read_versioned("shape", shape)?) };
        let plan = DecodePlan::tuned(shape_of(&shape, &backend)?, &dispatch)
            .map_err(|e| e.context("triattn_decode_plan_create"))?;
        let handle = Box::into_raw(Box::new(triattn_decode_plan { inner: Arc::new((plan, backend)) }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// The workspace a decode plan needs and its split count.
///
/// # Safety
/// `plan` is a live plan; `out` points to a writable `triattn_decode_info` whose `struct_size`
/// is set.
#[no_mangle]
pub unsafe extern "C" fn triattn_decode_plan_get_info(
    plan: *const triattn_decode_plan,
    out: *mut triattn_decode_info,
) -> triattn_status {
    boundary(|| {
        non_null("plan", plan)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live handle (caller contract).
        let p = unsafe { &(&*plan).inner.0 };
        let info = triattn_decode_info {
            struct_size: std::mem::size_of::<triattn_decode_info>() as u32,
            workspace_bytes: p.workspace_bytes(),
            workspace_alignment: crate::cuda::WORKSPACE_ALIGN,
            constants_bytes: p.constants_bytes(),
            splits: p.spec().splits(),
        };
        // SAFETY: checked non-null; writable with its size set (caller contract).
        unsafe { write_versioned("out", out, info) }
    })
}

/// Bind `workspace` to the cache at `cache` and return the binding in `*out`: check every address
/// (present exactly when the shape reads it; K/V bases 16-byte aligned, the int32 and float
/// buffers 4, the workspace 256), load the kernels, copy the K/V address tables into the first
/// `constants_bytes` of the workspace on `stream` and synchronise it (setup, never captured).
/// The binding keeps the plan alive.
///
/// # Safety
/// `plan` is a live plan of a CUDA or emu context; `cache` points to a `triattn_decode_cache`
/// whose tables hold `num_seqs * num_layers` (paged: `num_layers`) device addresses; every
/// address is device memory of that context (host memory under emu) of the documented layout;
/// `workspace` holds `workspace_bytes`; `stream` is NULL or a stream of that context; `out`
/// points to writable storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_decode_plan_bind(
    plan: *const triattn_decode_plan,
    cache: *const triattn_decode_cache,
    workspace: *mut c_void,
    stream: *mut c_void,
    out: *mut *mut triattn_decode_binding,
) -> triattn_status {
    boundary(|| {
        non_null("plan", plan)?;
        non_null("cache", cache)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live handle and readable struct (caller contract).
        let (inner, c) = unsafe { ((*plan).inner.clone(), read_versioned("cache", cache)?) };
        let (p, backend) = (&inner.0, &inner.1);
        if backend.is_cpu() {
            return Err(Error::new(
                ErrorKind::NoDevice,
                "triattn_decode_plan_bind: plan: expected a plan of a TRIATTN_BACKEND_CUDA or TRIATTN_BACKEND_EMU \
                 context, got one of a TRIATTN_BACKEND_CPU context",
            ));
        }
        let count = p.spec().table_len();
        let table = |what: &str, t: *const *mut c_void| -> Result<Vec<u64>> {
            non_null(what, t)?;
            // SAFETY: non-null; `count` entries (caller contract).
            Ok(unsafe { std::slice::from_raw_parts(t, count) }.iter().map(|&a| a as u64).collect())
        };
        let bound = DecodeCache {
            keys: table("cache.keys", c.keys)?,
            values: table("cache.values", c.values)?,
            sinks: c.sinks as u64,
            lists: c.lists as u64,
            list_lens: c.list_lens as u64,
            seq_lens: c.seq_lens as u64,
            block_table: c.block_table as u64,
        };
        let ws = workspace as u64;
        crate::cuda::check_workspace_address(ws)?;
        let image = p.workspace_image(&bound).map_err(|e| e.context("triattn_decode_plan_bind"))?;
        // SAFETY: the caller's contract: `ws` holds the plan's workspace on `stream`'s context.
        unsafe {
            super::device::write_constants(
                backend,
                ws,
                &image,
                stream,
                "triattn_decode_plan_bind",
                super::device::Kernels::Decode(p),
            )?
        };
        let handle =
            Box::into_raw(Box::new(triattn_decode_binding { plan: inner.clone(), workspace: ws, cache: bound }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Launch one decode of `binding` on `stream` over layers `first_layer .. first_layer + layers`
/// (all of them, or the one an engine's forward pass is at): `queries` `[S, layers, H, T, D]` of
/// the shape's query dtype in, `out` `float [S, layers, H, T, Dv]` and `lse`
/// `float [S, layers, H, T]` (natural log) out. Nothing but kernel launches (no allocation, copy
/// or synchronisation): capturable in a CUDA graph.
///
/// # Safety
/// `binding` is a live binding whose cache is alive; `queries`, `out` and `lse` are device
/// memory of the plan's context (host memory under emu) of those sizes, 4-byte aligned; the lists
/// hold slots below `len`; `stream` is NULL or a stream of that context.
#[no_mangle]
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(unused_variables))]
pub unsafe extern "C" fn triattn_decode_binding_run(
    binding: *const triattn_decode_binding,
    queries: *const c_void,
    out: *mut f32,
    lse: *mut f32,
    first_layer: usize,
    layers: usize,
    stream: *mut c_void,
) -> triattn_status {
    boundary(|| {
        non_null("binding", binding)?;
        // SAFETY: checked non-null; live handle (caller contract).
        let b = unsafe { &*binding };
        let run = DecodeRun {
            workspace: b.workspace,
            queries: queries as u64,
            out: out as u64,
            lse: lse as u64,
            first_layer,
            layers,
        };
        let plan = &b.plan.0;
        let result: Result<()> = match &b.plan.1 {
            Backend::Cpu => Err(Error::new(ErrorKind::NoDevice, "a decode binding of a TRIATTN_BACKEND_CPU context")),
            #[cfg(feature = "emu")]
            Backend::Emu => {
                let _ = stream;
                // SAFETY: the caller's contract (host memory under emu).
                unsafe { plan.run(&mut crate::emu::EmuLauncher::default(), &b.cache, &run) }
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => {
                // SAFETY: the caller's contract.
                unsafe { dev.backend().run_decode(plan, &b.cache, &run, stream as cudarc::driver::sys::CUstream) }
            }
        };
        result.map_err(|e| e.context("triattn_decode_binding_run"))
    })
}

/// Destroy a decode binding (null is ignored).
///
/// # Safety
/// `binding` is null or a handle from `triattn_decode_plan_bind` not yet destroyed, with no call
/// in progress on another thread.
#[no_mangle]
pub unsafe extern "C" fn triattn_decode_binding_destroy(binding: *mut triattn_decode_binding) {
    if !binding.is_null() {
        // SAFETY: created by Box::into_raw in triattn_decode_plan_bind, destroyed once.
        drop(unsafe { Box::from_raw(binding) });
    }
}

/// Destroy a decode plan (null is ignored); its bindings stay valid.
///
/// # Safety
/// `plan` is null or a handle from `triattn_decode_plan_create` not yet destroyed, with no call
/// in progress on another thread.
#[no_mangle]
pub unsafe extern "C" fn triattn_decode_plan_destroy(plan: *mut triattn_decode_plan) {
    if !plan.is_null() {
        // SAFETY: created by Box::into_raw in triattn_decode_plan_create, destroyed once.
        drop(unsafe { Box::from_raw(plan) });
    }
}
