//! The C ABI: a thin, panic-proof shell over the Rust API (`include/triattn.h`, generated).
//!
//! Every function returns a [`triattn_status`], checks its pointers, runs inside a panic
//! boundary and writes its outputs only on success. The message of the last failure on the
//! calling thread is read with [`triattn_last_error`]. Handles are opaque; each `*_create` has a
//! matching `*_destroy` that accepts null. Structs the caller fills or receives start with
//! `struct_size` (set it to `sizeof` the struct): a library refuses a struct of another size by
//! name, so the ABI can grow. The header's preamble (`cbindgen.toml`) states the thread-safety
//! rules of every handle.
//!
//! Two kinds of round: on host buffers ([`triattn_round_host`]: the CPU, or the GPU of a CUDA
//! context with the keys copied there and back), and on device pointers on the caller's CUDA
//! stream: a plan ([`triattn_plan_create`]) once per cache shape, a binding
//! ([`triattn_plan_bind`]) per workspace and cache, then [`triattn_binding_run`] per round. The
//! engine owns the workspace, the cache and the stream, and a run only launches kernels (no
//! allocation, copy or synchronisation), so it can be captured in a CUDA graph. Streams travel
//! as `void*` (a `CUstream` / `cudaStream_t`), so the header needs no CUDA header. An emu
//! context (`TRIATTN_BACKEND_EMU`, feature `emu`) runs the same plan, bind and run calls with
//! the kernels on the CPU over host memory.
#![allow(non_camel_case_types)]

mod decode;
mod device;
mod shard;
mod types;

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use decode::*;
pub use types::*;

use crate::cache::LayerView;
use crate::error::{Error, ErrorKind, Result};
use crate::model::ModelConfig;
use crate::policy::{CompressionConfig, RoundOutcome};
use crate::round::{self, Backend, Scorer};
use crate::stats::Stats;
use crate::tuning::Dispatch;
use crate::DType;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: &str) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message.to_string());
}

fn status_of(kind: ErrorKind) -> triattn_status {
    match kind {
        ErrorKind::InvalidArgument => triattn_status::InvalidArgument,
        ErrorKind::InvalidConfig => triattn_status::InvalidConfig,
        ErrorKind::InvalidFormat => triattn_status::InvalidFormat,
        ErrorKind::ShapeMismatch => triattn_status::ShapeMismatch,
        ErrorKind::Unsupported => triattn_status::Unsupported,
        ErrorKind::Io => triattn_status::Io,
        ErrorKind::NoDevice => triattn_status::NoDevice,
        ErrorKind::KernelsUnavailable => triattn_status::KernelsUnavailable,
        ErrorKind::Driver => triattn_status::Driver,
    }
}

/// Run `f` inside the panic boundary; map errors to statuses and record their messages.
fn boundary(f: impl FnOnce() -> Result<()>) -> triattn_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => triattn_status::Ok,
        Ok(Err(e)) => {
            set_last_error(e.message());
            status_of(e.kind())
        }
        Err(_) => {
            set_last_error("internal panic (a bug in triattn)");
            triattn_status::Panic
        }
    }
}

fn non_null<T>(what: &str, p: *const T) -> Result<()> {
    if p.is_null() {
        Err(Error::invalid_argument(what, "a non-null pointer", "NULL"))
    } else {
        Ok(())
    }
}

/// # Safety
/// `p` is null (checked) or a NUL-terminated string.
unsafe fn path_arg(what: &str, p: *const c_char) -> Result<String> {
    non_null(what, p)?;
    // SAFETY: non-null (checked above); the caller guarantees NUL termination.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(str::to_string).map_err(|_| Error::invalid_argument(what, "UTF-8 text", "invalid UTF-8"))
}

/// Library version packed as `major << 16 | minor << 8 | patch`.
#[no_mangle]
pub extern "C" fn triattn_version() -> u32 {
    TRIATTN_VERSION_MAJOR << 16 | TRIATTN_VERSION_MINOR << 8 | TRIATTN_VERSION_PATCH
}

/// Copy the last error message of this thread into `buf` (NUL-terminated, truncated to `len`).
/// Returns the full message length (without NUL), so a caller can size a buffer; 0 if none.
///
/// # Safety
/// `buf` is null or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn triattn_last_error(buf: *mut c_char, len: usize) -> usize {
    LAST_ERROR.with(|e| {
        let msg = e.borrow();
        if !buf.is_null() && len > 0 {
            let n = msg.len().min(len - 1);
            // SAFETY: `buf` has `len` bytes (caller contract) and `n + 1 <= len`.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
}

/// Fill `out` with the defaults of `preset` (a `triattn_preset` value).
///
/// # Safety
/// `out` is null (an error) or points to a writable `triattn_config`.
#[no_mangle]
pub unsafe extern "C" fn triattn_config_default(preset: u32, out: *mut triattn_config) -> triattn_status {
    boundary(|| {
        non_null("out", out)?;
        let preset = triattn_preset::from_c("preset", preset)?;
        let c = triattn_config::from_rust(&CompressionConfig::preset(preset.to_rust()));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Opaque library context: the backend rounds run on (and, for CUDA, the device) and the tuning
/// tables its plans choose kernel variants from. Immutable after creation except through
/// `triattn_context_load_tuning`: may be shared by threads.
pub struct triattn_context {
    device: Backend,
    dispatch: std::sync::RwLock<Dispatch>,
}

impl triattn_context {
    /// A context on `device` with the tables `TRIATTN_TUNING` (or the per-device file of an
    /// earlier `triattn autotune`) and the shipped table of the GPU's arch name; warnings (a
    /// stale or unreadable implicit table) go to stderr, one line each.
    fn new(device: Backend) -> Result<Self> {
        let (dispatch, warnings) = Dispatch::resolve(&device, None).map_err(|e| e.context("TRIATTN_TUNING"))?;
        for w in warnings {
            eprintln!("triattn: warning: {w}");
        }
        Ok(Self { device, dispatch: std::sync::RwLock::new(dispatch) })
    }

    /// The tables in use now.
    fn dispatch(&self) -> Dispatch {
        self.dispatch.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Create a context for `backend` (a `triattn_backend` value): `TRIATTN_BACKEND_CPU`,
/// `TRIATTN_BACKEND_CUDA` for CUDA device 0 (as `triattn_context_create_cuda(0, out)`), or
/// `TRIATTN_BACKEND_EMU` (the kernels on the CPU; host addresses where device rounds take device
/// addresses).
///
/// A CUDA context needs a library built with the `cuda` feature (else
/// `TRIATTN_STATUS_UNSUPPORTED`) and a driver and device (else `TRIATTN_STATUS_NO_DEVICE`); an
/// emu context a library built with the `emu` feature (else `TRIATTN_STATUS_UNSUPPORTED`).
///
/// # Safety
/// `out` is null (an error) or points to writable storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_context_create(backend: u32, out: *mut *mut triattn_context) -> triattn_status {
    boundary(|| {
        non_null("out", out)?;
        let backend = triattn_backend::from_c("backend", backend)?;
        let device = match backend {
            triattn_backend::Cpu => Backend::Cpu,
            triattn_backend::Cuda => device::open_cuda(0)?,
            triattn_backend::Emu => device::open_emu()?,
        };
        let ctx = Box::into_raw(Box::new(triattn_context::new(device)?));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(ctx) };
        Ok(())
    })
}

/// Create a CUDA context on device `device_ordinal` (its primary context, shared with the CUDA
/// runtime API of the same process).
///
/// `TRIATTN_STATUS_UNSUPPORTED` when the library was built without the `cuda` feature;
/// `TRIATTN_STATUS_NO_DEVICE` when there is no driver or no such device.
///
/// # Safety
/// `out` is null (an error) or points to writable storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_context_create_cuda(
    device_ordinal: u32,
    out: *mut *mut triattn_context,
) -> triattn_status {
    boundary(|| {
        non_null("out", out)?;
        let device = device::open_cuda(device_ordinal)?;
        let ctx = Box::into_raw(Box::new(triattn_context::new(device)?));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(ctx) };
        Ok(())
    })
}

/// Choose kernel variants from the tuning table at `path` (format `triattn-tuning-v1`, e.g. the
/// output of `triattn autotune`), over the shipped table of the GPU's arch and the built-in
/// rule. Replaces the user table the context had (`TRIATTN_TUNING`, or an implicit per-device
/// file). Compressors and decode plans created afterwards use it; existing ones keep theirs.
///
/// A table that is malformed, or names a kernel variant this library does not compile, is
/// refused with `TRIATTN_STATUS_INVALID_FORMAT` and a message naming the line or entry; the
/// context keeps its tables. A stale table (made for another build, arch, SM count or toolkit)
/// is used for the entries that still resolve, with one warning on stderr. On a CPU context the
/// table is read and checked (nothing on the CPU is tuned).
///
/// # Safety
/// `ctx` is a live context; `path` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn triattn_context_load_tuning(
    ctx: *const triattn_context,
    path: *const c_char,
) -> triattn_status {
    boundary(|| {
        non_null("ctx", ctx)?;
        // SAFETY: checked non-null; a live context and a NUL-terminated path (caller contract).
        let (ctx, path) = unsafe { (&*ctx, path_arg("path", path)?) };
        let (dispatch, warnings) = Dispatch::resolve(&ctx.device, Some(std::path::Path::new(&path)))
            .map_err(|e| e.context("triattn_context_load_tuning"))?;
        for w in warnings {
            eprintln!("triattn: warning: {w}");
        }
        *ctx.dispatch.write().unwrap_or_else(std::sync::PoisonError::into_inner) = dispatch;
        Ok(())
    })
}

/// Destroy a context (null is ignored).
///
/// # Safety
/// `ctx` is null or a handle from `triattn_context_create` not yet destroyed, and no call with it
/// is in progress on another thread. Compressors made from it stay valid.
#[no_mangle]
pub unsafe extern "C" fn triattn_context_destroy(ctx: *mut triattn_context) {
    if !ctx.is_null() {
        // SAFETY: created by Box::into_raw in triattn_context_create, destroyed once.
        drop(unsafe { Box::from_raw(ctx) });
    }
}

/// Opaque compressor: policy, model RoPE and statistics (and the backend of its context).
/// Immutable after creation: may be shared by threads (host rounds and plans from several
/// threads at once).
pub struct triattn_compressor {
    device: Backend,
    dispatch: Dispatch,
    config: CompressionConfig,
    scorer: Scorer,
    /// The rank a shard compressor (`triattn_compressor_create_shard`) plans for; `scorer` is
    /// then the rank's.
    shard: Option<crate::shard::Shard>,
}

/// Create a compressor from a model `config.json`, a statistics file and a config.
///
/// # Safety
/// `ctx` is a live context; the paths are NUL-terminated; `config` points to a `triattn_config`;
/// `out` points to writable storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_compressor_create(
    ctx: *const triattn_context,
    model_config_path: *const c_char,
    stats_path: *const c_char,
    config: *const triattn_config,
    out: *mut *mut triattn_compressor,
) -> triattn_status {
    boundary(|| {
        non_null("ctx", ctx)?;
        non_null("config", config)?;
        non_null("out", out)?;
        // SAFETY: the pointers were checked non-null; the caller guarantees what they point to.
        let (device, dispatch, model_path, stats_path, config) = unsafe {
            (
                (*ctx).device.clone(),
                (*ctx).dispatch(),
                path_arg("model_config_path", model_config_path)?,
                path_arg("stats_path", stats_path)?,
                read_versioned("config", config)?,
            )
        };
        let config = config.to_rust()?;
        config.validate()?;
        let model = ModelConfig::from_file(&model_path)?;
        let stats = Stats::load(&stats_path)?;
        let scorer = Scorer::new(model, stats, None).map_err(|e| e.context(format!("{stats_path} vs {model_path}")))?;
        let handle = Box::into_raw(Box::new(triattn_compressor { device, dispatch, config, scorer, shard: None }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Destroy a compressor (null is ignored).
///
/// # Safety
/// `c` is null or a handle from `triattn_compressor_create` not yet destroyed, and no call with
/// it is in progress on another thread. Plans made from it stay valid.
#[no_mangle]
pub unsafe extern "C" fn triattn_compressor_destroy(c: *mut triattn_compressor) {
    if !c.is_null() {
        // SAFETY: created by Box::into_raw in triattn_compressor_create, destroyed once.
        drop(unsafe { Box::from_raw(c) });
    }
}

/// Model shape as the compressor sees it: layers, attention heads, KV heads, head_dim, and the
/// number of keep sets a round produces (per its selection mode).
///
/// # Safety
/// `c` is a live compressor; `out` points to a writable `triattn_shape`.
#[no_mangle]
pub unsafe extern "C" fn triattn_compressor_shape(
    c: *const triattn_compressor,
    out: *mut triattn_shape,
) -> triattn_status {
    boundary(|| {
        non_null("compressor", c)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live handle (caller contract).
        let c = unsafe { &*c };
        let m = &c.scorer.model;
        let shape = triattn_shape {
            struct_size: std::mem::size_of::<triattn_shape>() as u32,
            num_layers: m.num_layers,
            num_heads: m.num_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            num_keep_sets: c.config.mode.num_sets(m.num_layers, m.num_kv_heads),
        };
        // SAFETY: checked non-null; writable, `struct_size` set (caller contract).
        unsafe { write_versioned("out", out, shape) }
    })
}

/// Whether a round is due for a cache of `cache_len` slots before a step that writes `scheduled`
/// tokens (the vllm preset uses `scheduled`; the paper preset evaluates after the forward).
///
/// # Safety
/// `c` is a live compressor; `due` points to a writable int.
#[no_mangle]
pub unsafe extern "C" fn triattn_compressor_round_due(
    c: *const triattn_compressor,
    cache_len: usize,
    scheduled: usize,
    due: *mut i32,
) -> triattn_status {
    boundary(|| {
        non_null("compressor", c)?;
        non_null("due", due)?;
        // SAFETY: checked non-null; live handle and writable output (caller contract).
        unsafe { due.write((*c).config.round_due(cache_len, scheduled) as i32) };
        Ok(())
    })
}

/// Run one round over host key buffers and write the keep sets: on the CPU for a compressor of a
/// CPU context; every stage on the kernels (keys copied to the GPU and back, or run by the emu
/// layer) for one of a CUDA or emu context.
///
/// `args.keys[l]` points to layer `l`'s keys, `[Hkv, n, head_dim]` contiguous, of `args.dtype`.
/// On success `args.keep` holds `num_keep_sets` rows of `*kept` ascending slot indices (row
/// stride `args.keep_row_stride`), `args.score` (if not null) `num_keep_sets x n` reduced scores,
/// and `*outcome` what happened. `*kept` is `budget` when the round compresses, and `n` (every
/// slot) when it does not evict: within budget, or skipped because the protected slots (prompt
/// and window) reach the budget — so `keep_row_stride` must be at least `budget` when the round
/// compresses and at least `n` otherwise (`n` always suffices); a shorter stride is refused
/// before anything is written.
///
/// # Safety
/// `c` is a live compressor; every pointer in `args` is valid for the sizes above; `kept` and
/// `outcome` are writable.
#[no_mangle]
pub unsafe extern "C" fn triattn_round_host(
    c: *const triattn_compressor,
    args: *const triattn_host_round,
    kept: *mut usize,
    outcome: *mut triattn_outcome,
) -> triattn_status {
    boundary(|| {
        non_null("compressor", c)?;
        non_null("args", args)?;
        non_null("kept", kept)?;
        non_null("outcome", outcome)?;
        // SAFETY: checked non-null; a live handle (caller contract).
        if let Some(shard) = unsafe { &(*c).shard } {
            return Err(Error::invalid_argument(
                "compressor",
                "an unsharded compressor (a shard's round runs as a plan, in parts: triattn_plan_create)",
                format!("the compressor of rank {}", shard.rank),
            ));
        }
        // SAFETY: checked non-null; live handle and readable args (caller contract).
        let (c, a) = unsafe { (&*c, read_versioned("args", args)?) };
        // SAFETY: forwarded caller contract on the buffers in `a`.
        let (result_kept, result_outcome) = unsafe { round_host(c, &a)? };
        // SAFETY: checked non-null; writable (caller contract).
        unsafe {
            kept.write(result_kept);
            outcome.write(result_outcome);
        }
        Ok(())
    })
}

/// # Safety
/// As [`triattn_round_host`].
unsafe fn round_host(c: &triattn_compressor, a: &triattn_host_round) -> Result<(usize, triattn_outcome)> {
    let backend = c.device.clone();
    let m = &c.scorer.model;
    non_null("args.keys", a.keys)?;
    non_null("args.keep", a.keep)?;
    let sets = c.config.mode.num_sets(m.num_layers, m.num_kv_heads);
    // The shape fixes how many slots each set keeps: the budget, or all n when nothing is evicted.
    let outcome = c.config.outcome(a.n, a.prefix_len.min(a.n));
    let need = outcome.kept(a.n);
    if a.keep_row_stride < need {
        let why = match outcome {
            RoundOutcome::Compressed { .. } => "the budget: the round compresses",
            RoundOutcome::WithinBudget => "n: the cache is within budget, every slot is kept",
            RoundOutcome::Skipped(_) => {
                "n: the protected slots reach the budget, the round is skipped and keeps every slot"
            }
        };
        return Err(Error::invalid_argument("args.keep_row_stride", format!(">= {need} ({why})"), a.keep_row_stride));
    }
    let elems = m.num_kv_heads * a.n * m.head_dim;
    // SAFETY: `keys` holds `num_layers` pointers (caller contract).
    let ptrs = unsafe { std::slice::from_raw_parts(a.keys, m.num_layers) };
    for (l, p) in ptrs.iter().enumerate() {
        non_null(&format!("args.keys[{l}]"), *p)?;
    }
    let dtype = triattn_dtype::from_c("args.dtype", a.dtype)?.to_rust();
    fn views<'a, T: crate::Element>(
        ptrs: &[*const std::ffi::c_void],
        elems: usize,
        hkv: usize,
        n: usize,
        d: usize,
    ) -> Result<Vec<LayerView<'a, T>>> {
        ptrs.iter()
            .enumerate()
            .map(|(l, &p)| {
                // SAFETY: each pointer addresses `elems` elements of T (caller contract), checked non-null.
                let data = unsafe { std::slice::from_raw_parts(p.cast::<T>(), elems) };
                LayerView::contiguous(&format!("keys[{l}]"), data, hkv, n, d)
            })
            .collect()
    }
    let (hkv, n, d) = (m.num_kv_heads, a.n, m.head_dim);
    let result = match dtype {
        DType::F32 => round::run(
            &c.config,
            &c.scorer,
            &views::<f32>(ptrs, elems, hkv, n, d)?,
            a.round_start,
            a.prefix_len,
            backend.clone(),
        )?,
        DType::F16 => round::run(
            &c.config,
            &c.scorer,
            &views::<half::f16>(ptrs, elems, hkv, n, d)?,
            a.round_start,
            a.prefix_len,
            backend.clone(),
        )?,
        DType::Bf16 => round::run(
            &c.config,
            &c.scorer,
            &views::<half::bf16>(ptrs, elems, hkv, n, d)?,
            a.round_start,
            a.prefix_len,
            backend,
        )?,
    };
    let kept = result.outcome.kept(a.n);
    // An invariant of every backend (a panic here is caught at the boundary and reported as a bug).
    assert!(
        result.keep.len() == sets && result.keep.iter().all(|set| set.len() == kept) && kept <= a.keep_row_stride,
        "a round of {sets} sets of {kept} slots returned other sets"
    );
    // SAFETY: `keep` has `sets * keep_row_stride` writable i32 (caller contract); every set holds
    // `kept <= keep_row_stride` slots (checked), so each row's writes stay inside it.
    let keep_out = unsafe { std::slice::from_raw_parts_mut(a.keep, sets * a.keep_row_stride) };
    for (row, set) in keep_out.chunks_mut(a.keep_row_stride).zip(&result.keep) {
        for (dst, &slot) in row.iter_mut().zip(set) {
            *dst = slot as i32;
        }
    }
    if !a.score.is_null() {
        // SAFETY: `score` has `sets * n` writable floats (caller contract).
        unsafe { std::slice::from_raw_parts_mut(a.score, sets * n) }.copy_from_slice(&result.score);
    }
    let outcome = match result.outcome {
        RoundOutcome::Compressed { .. } => triattn_outcome::Compressed,
        RoundOutcome::WithinBudget => triattn_outcome::WithinBudget,
        RoundOutcome::Skipped(reason) => {
            set_last_error(&format!("round skipped: {reason}"));
            triattn_outcome::SkippedProtectedReachBudget
        }
    };
    Ok((kept, outcome))
}

/// Compact one head's rows in place, order-preserving: row `i` receives row `keep[i]`.
/// `rows` holds `n` rows of `row_bytes` bytes, `row_stride_bytes` apart; `keep` is ascending.
///
/// # Safety
/// `rows` is valid for `n * row_stride_bytes` bytes; `keep` for `k` i32.
#[no_mangle]
pub unsafe extern "C" fn triattn_compact_host(
    rows: *mut std::ffi::c_void,
    n: usize,
    row_bytes: usize,
    row_stride_bytes: usize,
    keep: *const i32,
    k: usize,
) -> triattn_status {
    boundary(|| {
        non_null("rows", rows)?;
        non_null("keep", keep)?;
        if row_stride_bytes < row_bytes {
            return Err(Error::invalid_argument(
                "row_stride_bytes",
                format!(">= row_bytes ({row_bytes})"),
                row_stride_bytes,
            ));
        }
        // SAFETY: caller contract on sizes; both checked non-null.
        let (data, keep) = unsafe {
            (
                std::slice::from_raw_parts_mut(rows.cast::<u8>(), n * row_stride_bytes),
                std::slice::from_raw_parts(keep, k),
            )
        };
        let mut slots = Vec::with_capacity(k);
        for &s in keep {
            if s < 0 {
                return Err(Error::invalid_argument("keep", "non-negative slots", s));
            }
            slots.push(s as u32);
        }
        crate::cpu::compact::compact_in_place(data, row_stride_bytes, row_bytes, &slots)
    })
}

/// Opaque round plan: one compressor's round over caches of one shape, validated on the host,
/// with its workspace layout. One plan serves every round of that shape (in the steady state of a
/// decode, every round of a sequence) and any number of bindings (one per workspace and cache).
/// Immutable after creation: may be shared by threads.
pub struct triattn_plan {
    inner: std::sync::Arc<device::Plan>,
}

/// Opaque binding: a plan's workspace bound to one cache (its layer addresses, block-table row
/// and positions). Each run of a binding reads and writes its workspace and cache: runs of one
/// binding (or of bindings that share a workspace or a cache) must be ordered by the caller (the
/// same stream, or events); bindings of distinct workspaces and caches run concurrently. The
/// handle itself may be used from any thread.
pub struct triattn_binding {
    inner: device::Binding,
}

/// Plan a device round of compressor `c` over caches of `shape` (host-only: no device work).
///
/// Every field of `shape` is checked on entry (errors name it, with expected vs got). Planning
/// works in every build; binding and running need a compressor of a CUDA context (feature
/// `cuda`) or an emu context (feature `emu`): a plan of a CPU context can be planned and
/// inspected but not bound.
///
/// # Safety
/// `c` is a live compressor; `shape` points to a `triattn_round_shape`; `out` points to writable
/// storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_create(
    c: *const triattn_compressor,
    shape: *const triattn_round_shape,
    out: *mut *mut triattn_plan,
) -> triattn_status {
    boundary(|| {
        non_null("compressor", c)?;
        non_null("shape", shape)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live handle and readable shape (caller contract).
        let (c, shape) = unsafe { (&*c, read_versioned("shape", shape)?) };
        let plan = device::create_plan(c, &shape, None)?;
        let handle = Box::into_raw(Box::new(triattn_plan { inner: plan }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Plan one device round for `num_seqs` sequences that share `shape` (slots, strides or pools,
/// compaction) but each have their own prompt length (`prefix_lens[s]`, replacing
/// `shape->prefix_len`) and round_start: one launch per stage for the whole batch.
///
/// A binding then takes `num_seqs * num_layers` addresses per table (sequence-major; a paged cache:
/// its `num_layers` pools and a block table `int32[num_seqs, max_blocks]` of blocks distinct
/// across the batch), a run reads `int64 round_start[num_seqs]`, and the outputs of sequence `s`
/// sit at the info's offsets plus `s` times the per-sequence bytes (`keep_bytes / num_seqs`, ...).
/// A sequence whose protected prompt reaches the budget is refused (plan it alone: it is
/// skipped).
///
/// # Safety
/// As `triattn_plan_create`; `prefix_lens` points to `num_seqs` readable values.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_create_batch(
    c: *const triattn_compressor,
    shape: *const triattn_round_shape,
    prefix_lens: *const usize,
    num_seqs: usize,
    out: *mut *mut triattn_plan,
) -> triattn_status {
    boundary(|| {
        non_null("compressor", c)?;
        non_null("shape", shape)?;
        non_null("prefix_lens", prefix_lens)?;
        non_null("out", out)?;
        if num_seqs == 0 || num_seqs > 65535 {
            return Err(Error::invalid_argument("num_seqs", "1..=65535", num_seqs));
        }
        // SAFETY: checked non-null; live handle, readable shape and `num_seqs` prefix lengths
        // (caller contract).
        let (c, shape, prefixes) =
            unsafe { (&*c, read_versioned("shape", shape)?, std::slice::from_raw_parts(prefix_lens, num_seqs)) };
        let plan = device::create_plan(c, &shape, Some(prefixes))?;
        let handle = Box::into_raw(Box::new(triattn_plan { inner: plan }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// The workspace a plan needs and where a run leaves its outputs (byte offsets in the workspace).
///
/// # Safety
/// `plan` is a live plan; `out` points to a writable `triattn_plan_info` whose `struct_size` is
/// set.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_get_info(
    plan: *const triattn_plan,
    out: *mut triattn_plan_info,
) -> triattn_status {
    boundary(|| {
        non_null("plan", plan)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live handle and writable output (caller contract).
        unsafe { write_versioned("out", out, device::plan_info(&(*plan).inner)) }
    })
}

/// Bind `workspace` to the cache at `cache` and return the binding in `*out`: check every
/// address (non-null where required, K/V bases 16-byte aligned, the block table 4-byte and
/// positions aligned to their type, the workspace to 256), load the plan's kernels, copy the
/// per-cache constants (statistics, frequencies, the K/V address tables) into the first
/// `constants_bytes` of `workspace` on `stream`, and synchronise `stream` before returning.
///
/// A setup step, not part of the captured round: call it once per workspace, again only when
/// the cache moves (new layer addresses), and never while `stream` is being captured. Bind one
/// workspace per sequence (or per batch): each binding carries its own cache, block-table row
/// and positions, and a run of one binding never touches another's. The workspace is the
/// caller's device memory of `workspace_bytes`, aligned to 256 (cudaMalloc's alignment); the
/// library never allocates it. The binding keeps the plan alive: the plan handle may be
/// destroyed first.
///
/// # Safety
/// `plan` is a live plan of a CUDA or emu context; `cache` points to a `triattn_cache_pointers`
/// whose arrays hold `num_layers` device addresses each where required (`keys` always, `values`
/// when the round compacts, the `*_out` arrays out of place; a paged plan's `block_table` the
/// sequence's block-table row on the device, which every run of this binding reads);
/// `workspace` is device memory of that context of at least `workspace_bytes`; `stream` is NULL
/// (the legacy default stream) or a stream of that context (ignored under emu, where every
/// address is host memory); `out` points to writable storage for a handle.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_bind(
    plan: *const triattn_plan,
    cache: *const triattn_cache_pointers,
    workspace: *mut std::ffi::c_void,
    stream: *mut std::ffi::c_void,
    out: *mut *mut triattn_binding,
) -> triattn_status {
    boundary(|| {
        non_null("plan", plan)?;
        non_null("cache", cache)?;
        non_null("out", out)?;
        // SAFETY: checked non-null; live handle and readable pointers (caller contract).
        let binding = unsafe {
            let cache = read_versioned("cache", cache)?;
            device::bind(&(*plan).inner, &cache, workspace, stream)?
        };
        let handle = Box::into_raw(Box::new(triattn_binding { inner: binding }));
        // SAFETY: non-null (checked) and writable (caller contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Launch one round of `binding` on `stream`: nothing but kernel launches (no allocation, no
/// copy, no synchronisation), so it can be captured in a CUDA graph and replayed.
///
/// `round_start_device` is the device address of one int64 per sequence (a batch plan: `num_seqs`
/// of them, 8-byte aligned), the tokens seen so far (>= len), read by the kernels when they run:
/// write it in stream order (e.g. cudaMemcpyAsync) before each launch or replay. The keep sets,
/// scores and slot map land in the binding's workspace at the offsets of `triattn_plan_info`;
/// with an in-place or out-of-place compaction K and V are moved too.
///
/// # Safety
/// `binding` is a live binding whose cache is still alive and holds `len` slots at the planned
/// strides (out of place: destinations of `kept` slots, not overlapping the source); `stream`
/// is NULL or a stream of the plan's device context; nothing else touches the workspace or the
/// cache until the round has run.
#[no_mangle]
pub unsafe extern "C" fn triattn_binding_run(
    binding: *const triattn_binding,
    round_start_device: *const i64,
    stream: *mut std::ffi::c_void,
) -> triattn_status {
    boundary(|| {
        non_null("binding", binding)?;
        // SAFETY: checked non-null; live handle; the rest is the caller's contract.
        unsafe { device::run(&(*binding).inner, round_start_device, stream) }
    })
}

/// Destroy a binding (null is ignored). Work already queued with it may still be running: the
/// binding holds nothing the device reads (the workspace and cache are the caller's).
///
/// # Safety
/// `binding` is null or a handle from `triattn_plan_bind` not yet destroyed, and no call with it
/// is in progress on another thread.
#[no_mangle]
pub unsafe extern "C" fn triattn_binding_destroy(binding: *mut triattn_binding) {
    if !binding.is_null() {
        // SAFETY: created by Box::into_raw in triattn_plan_bind, destroyed once.
        drop(unsafe { Box::from_raw(binding) });
    }
}

/// Destroy a plan (null is ignored). Bindings made from it stay valid; work already queued
/// with it may still be running: the plan holds nothing the device reads.
///
/// # Safety
/// `plan` is null or a handle from `triattn_plan_create` not yet destroyed, and no call with it
/// is in progress on another thread.
#[no_mangle]
pub unsafe extern "C" fn triattn_plan_destroy(plan: *mut triattn_plan) {
    if !plan.is_null() {
        // SAFETY: created by Box::into_raw in triattn_plan_create, destroyed once.
        drop(unsafe { Box::from_raw(plan) });
    }
}
