//! The CUDA runtime: the embedded fatbin, loaded once per context, and launchers that only
//! launch.
//!
//! The driver is loaded at run time (cudarc `dynamic-loading`), so this builds and runs on
//! machines without CUDA: [`CudaBackend::probe`] answers `NoDevice` there instead of panicking.
//! A launch takes device addresses (raw, or from cudarc buffers) and a stream — the caller's
//! `CUstream` or a cudarc [`CudaStream`] — and does nothing but `cuLaunchKernel`: no allocation,
//! no copy to or from the host, no synchronisation, so rounds can be captured in a CUDA graph.
//! The weights kernel reads `round_start` from device memory for the same reason.
//!
//! The caller's current context is left as it was: a launch (and the module load of the first
//! one) makes this backend's context current only for the driver calls it makes, then restores
//! whatever context the calling thread had, or none ([`CurrentContext`]). Engines keep their own
//! contexts current on their threads; a launch from the crate never changes that.

use std::ffi::CString;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{self, CUfunction_attribute_enum, CUstream};
use cudarc::driver::{result, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};

use crate::error::{Error, ErrorKind, Result};
use crate::variant::{self, Variant, MAX_VECTORS};

use super::params::RowPartial;
use super::spec::{ScoreAddresses, ScoreSpec, TrigAddresses, TrigSpec};

/// Every op's kernels in one fatbin: SASS for `TRIATTN_CUDA_ARCHS` plus PTX for the newest (empty when
/// built with `TRIATTN_NO_NVCC=1`).
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

fn driver(what: &str, e: DriverError) -> Error {
    Error::new(ErrorKind::Driver, format!("{what}: {e}")).with_source(e)
}

/// This backend's context made current for the driver calls of one scope; dropping it makes the
/// calling thread's previous context (or none) current again. Two driver calls when the contexts
/// differ, one (`cuCtxGetCurrent`) when they are the same; nothing is allocated.
struct CurrentContext {
    /// The context to restore, when a different one (or none) was current.
    restore: Option<sys::CUcontext>,
}

impl CurrentContext {
    fn enter(ctx: &CudaContext) -> std::result::Result<Self, DriverError> {
        ctx.check_err()?;
        let mine = ctx.cu_ctx();
        let previous = result::ctx::get_current()?;
        if previous == Some(mine) {
            return Ok(Self { restore: None });
        }
        // SAFETY: `mine` is the live context of this backend (its `CudaContext` outlives the scope).
        unsafe { result::ctx::set_current(mine) }?;
        Ok(Self { restore: Some(previous.unwrap_or(std::ptr::null_mut())) })
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // SAFETY: `previous` was the calling thread's current context when the scope began (the
            // caller keeps it alive) or null, which unbinds ours; a failure leaves ours current,
            // which is what every launch did before, so it is not reported.
            let _ = unsafe { result::ctx::set_current(previous) };
        }
    }
}

/// A loaded module and its functions, fetched at most once each (indexed by variant id).
struct Module {
    module: sys::CUmodule,
    functions: Vec<OnceLock<std::result::Result<usize, String>>>,
}

// SAFETY: a CUmodule handle is a context-wide driver object usable from any thread once the
// context is current; it is only read after loading.
unsafe impl Send for Module {}
// SAFETY: as above; the OnceLocks synchronise the lazy function lookups.
unsafe impl Sync for Module {}

/// The CUDA backend of one device context.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    arch: u32,
    sm_count: usize,
    max_dynamic_smem: usize,
    module: OnceLock<std::result::Result<Module, String>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("ordinal", &self.ctx.ordinal()).field("arch", &self.arch).finish()
    }
}

impl CudaBackend {
    /// Open device `ordinal` (its primary context).
    ///
    /// # Errors
    /// `NoDevice` when no driver library is installed or the device cannot be opened — never a
    /// panic; `Driver` when a device query fails.
    pub fn probe(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the driver library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::new(ErrorKind::NoDevice, "no CUDA driver library (libcuda) on this machine"));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::new(ErrorKind::NoDevice, format!("CUDA device {ordinal}: {e}")).with_source(e))?;
        Self::from_context(ctx)
    }

    /// Use a context the caller created.
    ///
    /// # Errors
    /// `Driver` when a device query fails.
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(|e| driver("compute capability", e))?;
        let optin = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| driver("shared memory per block", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver("multiprocessor count", e))?;
        Ok(Self {
            ctx,
            arch: (major * 10 + minor) as u32,
            sm_count: sms.max(1) as usize,
            max_dynamic_smem: optin.max(0) as usize,
            module: OnceLock::new(),
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Run `f` (raw driver calls) with this backend's context current, then restore the calling
    /// thread's previous context, as every launch does.
    pub(crate) fn with_current_context<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let _current = CurrentContext::enter(&self.ctx).map_err(|e| driver("make the CUDA context current", e))?;
        f()
    }

    /// SM version, e.g. 90.
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// Streaming multiprocessors of the device (what [`super::SplitPolicy::Auto`] wants).
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The device's name (`NVIDIA H200`), or `CUDA device <ordinal>` when the driver does not say.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| format!("CUDA device {}", self.ctx.ordinal()))
    }

    /// The driver's CUDA version (`13.0`), when the driver says.
    pub fn driver_version(&self) -> Option<String> {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: cuDriverGetVersion writes one int; the driver library is loaded (a context exists).
        let status = unsafe { sys::cuDriverGetVersion(&mut v) };
        (status == sys::CUresult::CUDA_SUCCESS && v > 0).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
    }

    fn module(&self) -> Result<&Module> {
        let loaded = self.module.get_or_init(|| {
            if FATBIN.is_empty() {
                return Err(String::new());
            }
            let _current = CurrentContext::enter(&self.ctx).map_err(|e| format!("bind context: {e}"))?;
            // The driver reads the image in place; a copy makes it NUL-terminated and aligned.
            let mut image = FATBIN.to_vec();
            image.push(0);
            // SAFETY: `image` is the fatbin nvcc wrote (a well-formed image), alive for the call.
            let module = unsafe { result::module::load_data(image.as_ptr().cast()) }
                .map_err(|e| format!("load the kernel fatbin on sm_{}: {e}", self.arch))?;
            Ok(Module { module, functions: (0..variant::table().len()).map(|_| OnceLock::new()).collect() })
        });
        match loaded {
            Ok(m) => Ok(m),
            Err(msg) if msg.is_empty() => Err(Error::new(
                ErrorKind::KernelsUnavailable,
                "this build has no CUDA kernels (built with TRIATTN_NO_NVCC=1)",
            )),
            Err(msg) => Err(Error::new(ErrorKind::Driver, msg.clone())),
        }
    }

    /// The loaded function of `v` (loading the module and setting its attributes the first time).
    pub(super) fn function_of(&self, v: Variant) -> Result<sys::CUfunction> {
        let module = self.module()?;
        let got = module.functions[v.id.0 as usize].get_or_init(|| {
            let _current = CurrentContext::enter(&self.ctx).map_err(|e| format!("bind context: {e}"))?;
            let name = CString::new(v.symbol()).expect("symbols have no NUL");
            // SAFETY: `module.module` was loaded by this backend and is never unloaded.
            let f = unsafe { result::module::get_function(module.module, name) }
                .map_err(|e| format!("{} on sm_{}: {e}", v.symbol(), self.arch))?;
            let wanted = v.dynamic_smem_bytes(MAX_VECTORS).min(self.max_dynamic_smem);
            if wanted > 48 * 1024 {
                // SAFETY: `f` is a live function of this context; the value is within the
                // device's opt-in limit.
                unsafe {
                    result::function::set_function_attribute(
                        f,
                        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        wanted as i32,
                    )
                }
                .map_err(|e| format!("{}: shared memory attribute: {e}", v.symbol()))?;
            }
            Ok(f as usize)
        });
        match got {
            Ok(f) => Ok(*f as sys::CUfunction),
            Err(msg) => Err(Error::new(ErrorKind::Driver, msg.clone())),
        }
    }

    /// Launch `v` with its params struct.
    ///
    /// # Safety
    /// `params` is `v`'s params type with valid device addresses for this grid; `stream` is a
    /// stream of this backend's context (or null for the legacy default stream).
    pub(super) unsafe fn launch<P>(
        &self,
        v: Variant,
        params: &P,
        grid: (u32, u32, u32),
        smem: usize,
        stream: CUstream,
    ) -> Result<()> {
        if smem > self.max_dynamic_smem.max(48 * 1024) {
            return Err(Error::unsupported(format!(
                "{} needs {smem} bytes of shared memory; sm_{} allows {}",
                v.symbol(),
                self.arch,
                self.max_dynamic_smem
            )));
        }
        let f = self.function_of(v)?;
        // Ours for the launch, the caller's again when `_current` drops.
        let _current = CurrentContext::enter(&self.ctx).map_err(|e| driver("bind context", e))?;
        let mut args = [params as *const P as *mut std::ffi::c_void];
        // SAFETY: the kernel takes exactly one argument of type P (R1: sizes asserted on both
        // sides); the caller vouches for the addresses inside it and for the stream.
        unsafe { result::launch_kernel(f, grid, (v.threads() as u32, 1, 1), smem as u32, stream, &mut args) }
            .map_err(|e| driver(&v.symbol(), e))
    }

    /// Score on the GPU over raw device addresses, on the caller's stream.
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels, `Unsupported` when the variant needs
    /// more shared memory than this GPU has, `Driver` for a failed load or launch.
    ///
    /// # Safety
    /// Every address in `at` is device memory of this context with the length [`ScoreSpec`]
    /// documents (`key_table_len`, `weights_len`, …); every key row reached through the key
    /// table, block table and `seq_lens` lies inside its allocation; `stream` belongs to this
    /// context; the buffers stay alive until the kernel has run.
    pub unsafe fn launch_score_raw(&self, spec: &ScoreSpec, at: &ScoreAddresses, stream: CUstream) -> Result<()> {
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec for its own variant.
        unsafe { self.launch(spec.variant(), &params, spec.grid(), spec.dynamic_smem_bytes(), stream) }
    }

    /// Build one round's weights on the GPU (f64 trigonometry; `round_start` read on the device).
    ///
    /// # Errors
    /// `InvalidArgument` for a bad spec; otherwise as [`Self::launch_score_raw`].
    ///
    /// # Safety
    /// Every address in `at` is device memory of this context with the length [`TrigSpec`]
    /// documents; `stream` belongs to this context.
    pub unsafe fn launch_trig_raw(&self, spec: &TrigSpec, at: &TrigAddresses, stream: CUstream) -> Result<()> {
        spec.validate()?;
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec.
        unsafe { self.launch(variant::trig_variant(), &params, spec.grid(), 0, stream) }
    }

    /// Score with cudarc buffers on a cudarc stream. Lengths are checked against `spec`.
    ///
    /// # Errors
    /// `ShapeMismatch` for a buffer shorter than the spec needs; otherwise as
    /// [`Self::launch_score_raw`].
    ///
    /// # Safety
    /// The entries of `buffers.keys` are device addresses of key tensors (contiguous) or pools
    /// (paged) that hold every row `seq_lens` and the block table reach, on this context.
    pub unsafe fn score(&self, stream: &Arc<CudaStream>, spec: &ScoreSpec, buffers: ScoreBuffers<'_>) -> Result<()> {
        let s = spec.shape();
        let check = |what: &str, need: usize, got: usize| {
            if got < need {
                Err(Error::shape(what, format!("at least {need} elements"), got))
            } else {
                Ok(())
            }
        };
        check("key table", spec.key_table_len(), buffers.keys.len())?;
        let weights_len = match buffers.weights {
            WeightsBuffer::Vectors(w) if !spec.weights_are_levels() => w.len(),
            WeightsBuffer::Levels(w) if spec.weights_are_levels() => w.len(),
            _ => {
                let want = if spec.weights_are_levels() { "Levels (max)" } else { "Vectors (mean)" };
                return Err(Error::invalid_argument("weights buffer", want, "the other kind"));
            }
        };
        if s.vectors > 0 {
            check("weights", spec.weights_len(), weights_len)?;
        }
        check("norm", spec.norm_len(), buffers.norm.len())?;
        check("seq_lens", s.num_seqs, buffers.seq_lens.len())?;
        if let Some(t) = buffers.stat_start {
            check("stat_start", s.num_seqs, t.len())?;
        }
        if let Some(t) = buffers.stat_end {
            check("stat_end", s.num_seqs, t.len())?;
        }
        if let super::spec::KeyLayout::Paged { max_blocks, .. } = s.layout {
            let t = buffers.block_table.ok_or_else(|| Error::invalid_argument("block table", "present", "none"))?;
            check("block table", s.num_seqs * max_blocks, t.len())?;
        }
        check("raw scores", spec.raw_len(), buffers.raw.len())?;
        if let Some(p) = &buffers.partials {
            check("partials", spec.partials_len(), p.len())?;
        }
        let (keys, _k) = buffers.keys.device_ptr(stream);
        let (weights, _w) = match buffers.weights {
            WeightsBuffer::Vectors(w) => w.device_ptr(stream),
            WeightsBuffer::Levels(w) => w.device_ptr(stream),
        };
        let (norm, _n) = buffers.norm.device_ptr(stream);
        let (seq_lens, _l) = buffers.seq_lens.device_ptr(stream);
        let block_table = buffers.block_table.map(|t| t.device_ptr(stream));
        let stat_start = buffers.stat_start.map(|t| t.device_ptr(stream));
        let stat_end = buffers.stat_end.map(|t| t.device_ptr(stream));
        let (raw, _r) = buffers.raw.device_ptr_mut(stream);
        let partials = buffers.partials.map(|p| p.device_ptr_mut(stream));
        let at = ScoreAddresses {
            keys,
            weights,
            norm,
            block_table: block_table.as_ref().map_or(0, |t| t.0),
            seq_lens,
            stat_start: stat_start.as_ref().map_or(0, |t| t.0),
            stat_end: stat_end.as_ref().map_or(0, |t| t.0),
            raw,
            partials: partials.as_ref().map_or(0, |t| t.0),
        };
        // SAFETY: lengths checked above; the guards (`_k`, …, `partials`) live until the end of
        // this scope, after the launch is queued, so cudarc records the accesses; key rows are
        // the caller's contract.
        unsafe { self.launch_score_raw(spec, &at, stream.cu_stream()) }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(Ok(m)) = self.module.get() {
            // Work queued from this module must finish before it goes (not a launch path).
            let current = CurrentContext::enter(&self.ctx);
            if current.is_ok() && self.ctx.synchronize().is_ok() {
                // SAFETY: loaded by this backend, unloaded only here, nothing of it still queued.
                let _ = unsafe { result::module::unload(m.module) };
            }
        }
    }
}

/// The weights of a scoring launch.
pub enum WeightsBuffer<'a> {
    /// Mean mode: f32 `[S?, L, H, V, D]` (the trig kernel's mean output).
    Vectors(&'a CudaSlice<f32>),
    /// Max mode: the bf16 level image (the trig kernel's max output, or
    /// [`weight_levels`](super::spec::weight_levels) of host weights).
    Levels(&'a CudaSlice<u16>),
}

/// cudarc buffers of one scoring launch (layouts as in [`ScoreSpec`]).
pub struct ScoreBuffers<'a> {
    /// `u64 [key_table_len]` device addresses of key tensors or pools.
    pub keys: &'a CudaSlice<u64>,
    /// `[weights_len]`.
    pub weights: WeightsBuffer<'a>,
    /// `f32 [norm_len]`.
    pub norm: &'a CudaSlice<f32>,
    /// `i32 [S, max_blocks]` (paged).
    pub block_table: Option<&'a CudaSlice<i32>>,
    /// `i32 [S]`.
    pub seq_lens: &'a CudaSlice<i32>,
    /// `i32 [S]` first z-score candidate slot, or slot 0.
    pub stat_start: Option<&'a CudaSlice<i32>>,
    /// `i32 [S]` one past the last z-score candidate slot, or `seq_lens`.
    pub stat_end: Option<&'a CudaSlice<i32>>,
    /// `f32 [raw_len]` out.
    pub raw: &'a mut CudaSlice<f32>,
    /// `[partials_len]` out.
    pub partials: Option<&'a mut CudaSlice<RowPartial>>,
}
