//! Rounds on the GPU: a [`RoundPlan`] launched on a caller's stream.
//!
//! [`CudaBackend::run_round`] is the engine path: raw device addresses of a workspace the caller
//! owns and of `round_start`, nothing but launches (capturable in a CUDA graph).
//! [`DeviceRound`] is the convenience around it: it owns a workspace and a `round_start` slot
//! (cudarc buffers), binds them to a cache once, and reads the outputs back when asked.

use std::sync::Arc;

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};

use crate::error::{Error, ErrorKind, Result};
use crate::variant::Variant;

use super::host_round::KernelDevice;
use super::plan::{
    CacheAddresses, Launcher, RoundAddresses, RoundOutputs, RoundPlan, Stage, StageTimings, WORKSPACE_ALIGN,
};
use super::runtime::CudaBackend;

fn driver(what: &str, e: DriverError) -> Error {
    Error::new(ErrorKind::Driver, format!("{what}: {e}")).with_source(e)
}

/// Launches on one stream of a [`CudaBackend`].
#[derive(Debug)]
pub struct StreamLauncher<'a> {
    backend: &'a CudaBackend,
    stream: CUstream,
}

impl<'a> StreamLauncher<'a> {
    /// Launch on `stream` (a stream of `backend`'s context).
    pub fn new(backend: &'a CudaBackend, stream: CUstream) -> Self {
        Self { backend, stream }
    }
}

impl Launcher for StreamLauncher<'_> {
    unsafe fn launch<P: Copy>(
        &mut self,
        _stage: Stage,
        variant: Variant,
        params: &P,
        grid: (u32, u32, u32),
        dynamic_smem: usize,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller (the plan's run contract); the stream belongs to
        // this backend's context (`new`'s contract).
        unsafe { self.backend.launch(variant, params, grid, dynamic_smem, self.stream) }
    }
}

impl CudaBackend {
    /// Load every kernel `plan` launches (module load, function lookup, shared-memory
    /// attributes), so that [`Self::run_round`] only launches — do this before capturing a graph.
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels; `Driver` for a failed load.
    pub fn prepare_round(&self, plan: &RoundPlan) -> Result<()> {
        for v in plan.variants() {
            self.function_of(v)?;
        }
        Ok(())
    }

    /// Launch a whole round on `stream`: no allocation, no copy, no synchronisation.
    ///
    /// # Errors
    /// As [`Self::prepare_round`]; `InvalidArgument` for a misaligned workspace or `round_start`
    /// or a block table that does not fit the layout; `Driver` for a failed launch;
    /// `Unsupported` when a kernel needs more shared memory than this GPU has.
    ///
    /// # Safety
    /// `at.workspace` is device memory of this context of [`RoundPlan::workspace_bytes`],
    /// aligned to [`WORKSPACE_ALIGN`], whose constants hold [`RoundPlan::workspace_image`] of a
    /// live cache of the planned shape; `at.round_start` is the device address of one `i64 >= N`;
    /// a paged plan's `at.block_table` is the sequence's block-table row on the device; `stream`
    /// belongs to this context; nothing else touches the workspace or the cache until the round
    /// has run.
    pub unsafe fn run_round(&self, plan: &RoundPlan, at: &RoundAddresses, stream: CUstream) -> Result<()> {
        let mut launcher = StreamLauncher::new(self, stream);
        // SAFETY: the caller's contract.
        unsafe { plan.run(&mut launcher, at) }
    }
}

impl CudaBackend {
    /// Launch one decode of `plan` on `stream`: no allocation, no copy, no synchronisation.
    ///
    /// # Errors
    /// As [`super::DecodePlan::run`]; `KernelsUnavailable` or `Driver` for a kernel that does not
    /// load or launch.
    ///
    /// # Safety
    /// As [`super::DecodePlan::run`], with device memory of this context and `stream` a stream of
    /// it.
    pub unsafe fn run_decode(
        &self,
        plan: &super::DecodePlan,
        cache: &super::DecodeCache,
        run: &super::DecodeRun,
        stream: CUstream,
    ) -> Result<()> {
        let mut launcher = StreamLauncher::new(self, stream);
        // SAFETY: the caller's contract.
        unsafe { plan.run(&mut launcher, cache, run) }
    }

    /// Load the kernels `plan` launches (before capturing a graph).
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels; `Driver` for a failed load.
    pub fn prepare_decode(&self, plan: &super::DecodePlan) -> Result<()> {
        self.function_of(plan.spec().variant())?;
        if let Some(v) = plan.spec().combine_variant() {
            self.function_of(v)?;
        }
        Ok(())
    }
}

/// A planned round bound to a cache, with its own workspace and `round_start` slot.
pub struct DeviceRound {
    plan: RoundPlan,
    bound: CacheAddresses,
    workspace: CudaSlice<u8>,
    round_start: CudaSlice<i64>,
    /// `workspace` and `round_start` as raw addresses, taken once: a run (possibly inside a
    /// graph capture) only launches, with no cudarc event bookkeeping on its stream.
    addresses: (u64, u64),
}

impl std::fmt::Debug for DeviceRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRound").field("workspace_bytes", &self.plan.workspace_bytes()).finish()
    }
}

impl DeviceRound {
    /// Allocate the workspace, copy the constants for the cache at `cache` (device addresses)
    /// and load the kernels. Allocation and copies happen here, never in [`Self::run`].
    ///
    /// # Errors
    /// `ShapeMismatch` for address tables that do not fit the plan; `Driver` for a failed
    /// allocation, copy or load.
    pub fn new(
        backend: &CudaBackend,
        stream: &Arc<CudaStream>,
        plan: RoundPlan,
        cache: &CacheAddresses,
    ) -> Result<Self> {
        // The constants, then 0xff bytes: the scratch and outputs start as garbage, as they do in
        // the raw device memory an engine hands in, so a kernel that skips a write is caught.
        let mut image = plan.workspace_image(cache)?;
        image.resize(plan.workspace_bytes().max(1), 0xff);
        backend.prepare_round(&plan)?;
        let workspace = stream.clone_htod(&image).map_err(|e| driver("workspace constants", e))?;
        let round_start =
            stream.alloc_zeros::<i64>(plan.num_seqs()).map_err(|e| driver("round_start allocation", e))?;
        let base = workspace.device_ptr(stream).0;
        if base % WORKSPACE_ALIGN as u64 != 0 {
            return Err(Error::new(
                ErrorKind::Driver,
                format!("workspace at {base:#x} is not {WORKSPACE_ALIGN}-byte aligned"),
            ));
        }
        let slot = round_start.device_ptr(stream).0;
        // The constants must be on the device before any run reads them.
        stream.synchronize().map_err(|e| driver("workspace constants", e))?;
        Ok(Self { plan, bound: cache.clone(), workspace, round_start, addresses: (base, slot) })
    }

    /// The plan.
    pub fn plan(&self) -> &RoundPlan {
        &self.plan
    }

    /// Write the next round's `round_start` (a host-to-device copy on `stream`, outside the
    /// captured launches: a replayed graph reads the new value).
    ///
    /// # Errors
    /// `InvalidArgument` for `round_start < N`; `Driver` for a failed copy.
    pub fn set_round_start(&mut self, stream: &Arc<CudaStream>, round_start: u64) -> Result<()> {
        self.set_round_starts(stream, &[round_start])
    }

    /// Write every sequence's next `round_start` (a batch plan; see [`Self::set_round_start`]).
    ///
    /// # Errors
    /// `ShapeMismatch` without one value per sequence; as [`Self::set_round_start`].
    pub fn set_round_starts(&mut self, stream: &Arc<CudaStream>, round_starts: &[u64]) -> Result<()> {
        let n = self.plan.shape().len;
        if round_starts.len() != self.plan.num_seqs() {
            return Err(Error::shape("round_start values", self.plan.num_seqs(), round_starts.len()));
        }
        let values = round_starts
            .iter()
            .map(|&r| {
                if r < n as u64 || r > i64::MAX as u64 {
                    Err(Error::invalid_argument("round_start", format!("{n}..=2^63-1"), r))
                } else {
                    Ok(r as i64)
                }
            })
            .collect::<Result<Vec<i64>>>()?;
        stream.memcpy_htod(&values, &mut self.round_start).map_err(|e| driver("round_start copy", e))
    }

    /// Launch the round on `stream`: launches only.
    ///
    /// # Errors
    /// As [`CudaBackend::run_round`].
    ///
    /// # Safety
    /// The cache bound in [`Self::new`] is still alive, holds the planned shape, and nothing else
    /// accesses it until the round has run; `stream` is the stream this round was created on (or
    /// ordered after it: the workspace carries no cudarc event bookkeeping across streams).
    pub unsafe fn run(&mut self, backend: &CudaBackend, stream: &Arc<CudaStream>) -> Result<()> {
        let at = RoundAddresses::bound(self.addresses.0, self.addresses.1, &self.bound);
        // SAFETY: the workspace and slot are this round's, alive as long as `self` (sized,
        // aligned and initialised in `new`); the cache is the caller's contract.
        unsafe { backend.run_round(&self.plan, &at, stream.cu_stream()) }
    }

    /// Launch the round through another launcher of this round's device (a timing wrapper around
    /// [`StreamLauncher`], say), with this round's workspace and `round_start` slot.
    ///
    /// # Errors
    /// What the launcher reports.
    ///
    /// # Safety
    /// As [`Self::run`]; `launcher` launches on this round's device and stream.
    pub unsafe fn run_with<L: Launcher>(&mut self, launcher: &mut L) -> Result<()> {
        let at = RoundAddresses::bound(self.addresses.0, self.addresses.1, &self.bound);
        // SAFETY: as in `run`.
        unsafe { self.plan.run(launcher, &at) }
    }

    /// Copy the outputs back (synchronises `stream`).
    ///
    /// # Errors
    /// `Driver` for a failed copy.
    pub fn read_outputs(&self, stream: &Arc<CudaStream>) -> Result<RoundOutputs> {
        let host = stream.clone_dtoh(&self.workspace).map_err(|e| driver("workspace read-back", e))?;
        self.plan.read_outputs(&host)
    }

    /// Copy the outputs of every sequence of a batch plan back (synchronises `stream`).
    ///
    /// # Errors
    /// `Driver` for a failed copy.
    pub fn read_batch_outputs(&self, stream: &Arc<CudaStream>) -> Result<Vec<RoundOutputs>> {
        let host = stream.clone_dtoh(&self.workspace).map_err(|e| driver("workspace read-back", e))?;
        (0..self.plan.num_seqs()).map(|seq| self.plan.read_outputs_of(&host, seq)).collect()
    }
}

/// Times each launch with a pair of CUDA events (for reports and benchmarks; it allocates
/// events, so it is not the engine path).
pub struct TimedLauncher<'a> {
    inner: StreamLauncher<'a>,
    stream: &'a Arc<CudaStream>,
    marks: Vec<(Stage, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
}

impl<'a> TimedLauncher<'a> {
    /// Launch on `stream` of `backend`, timing every launch.
    pub fn new(backend: &'a CudaBackend, stream: &'a Arc<CudaStream>) -> Self {
        Self { inner: StreamLauncher::new(backend, stream.cu_stream()), stream, marks: Vec::new() }
    }

    /// Time per stage (summed over its launches, CUDA event time); synchronises on the events.
    ///
    /// # Errors
    /// `Driver` for a failed event query.
    pub fn timings(&self) -> Result<StageTimings> {
        let mut out = StageTimings::default();
        for (stage, start, end) in &self.marks {
            end.synchronize().map_err(|e| driver("event", e))?;
            let ms = start.elapsed_ms(end).map_err(|e| driver("event time", e))?;
            out.add(*stage, std::time::Duration::from_secs_f64(f64::from(ms) / 1e3));
        }
        Ok(out)
    }
}

impl Launcher for TimedLauncher<'_> {
    unsafe fn launch<P: Copy>(
        &mut self,
        stage: Stage,
        variant: Variant,
        params: &P,
        grid: (u32, u32, u32),
        dynamic_smem: usize,
    ) -> Result<()> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(flags).map_err(|e| driver("event", e))?;
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.launch(stage, variant, params, grid, dynamic_smem)? };
        let end = self.stream.record_event(flags).map_err(|e| driver("event", e))?;
        self.marks.push((stage, start, end));
        Ok(())
    }
}

/// A GPU and a stream of its primary context: what rounds over host buffers
/// (`Backend::Cuda`'s `round_*` methods, [`crate::Compressor`] on the CUDA backend) run on.
/// A convenience, not the engine path: its copies go through cudarc's safe calls, which make
/// this device's context current on the calling thread (launches, [`CudaBackend::run_round`]
/// and the C ABI's bindings restore the caller's context instead).
pub struct CudaDevice {
    backend: CudaBackend,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("backend", &self.backend).finish()
    }
}

impl CudaDevice {
    /// Open device `ordinal` and its default stream.
    ///
    /// # Errors
    /// `NoDevice` without a driver or device; `Driver` for a failed query.
    pub fn open(ordinal: usize) -> Result<Self> {
        let backend = CudaBackend::probe(ordinal)?;
        let stream = backend.context().default_stream();
        Ok(Self { backend, stream })
    }

    /// The backend.
    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }

    /// The stream rounds run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn upload(&self, what: &str, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        self.stream.clone_htod(bytes).map_err(|e| driver(&format!("copy {what} to the device"), e))
    }
}

/// The GPU as a kernel device of the shared host-round path: buffers are device allocations on
/// this device's stream, launches are timed with CUDA events.
impl KernelDevice for CudaDevice {
    type Buffer = CudaSlice<u8>;
    type Timed<'a> = TimedLauncher<'a>;

    fn upload(&self, what: &str, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            // A zero-length device allocation has no address; the kernels never read it.
            return self.stream.alloc_zeros::<u8>(1).map_err(|e| driver(&format!("allocate {what}"), e));
        }
        CudaDevice::upload(self, what, bytes)
    }

    fn address(&self, buffer: &CudaSlice<u8>) -> u64 {
        buffer.device_ptr(&self.stream).0
    }

    fn download(&self, what: &str, buffer: &CudaSlice<u8>) -> Result<Vec<u8>> {
        self.stream.clone_dtoh(buffer).map_err(|e| driver(&format!("copy {what} back"), e))
    }

    fn write(&self, what: &str, buffer: &mut CudaSlice<u8>, offset: usize, bytes: &[u8]) -> Result<()> {
        let Some(mut view) = offset.checked_add(bytes.len()).and_then(|end| buffer.try_slice_mut(offset..end)) else {
            return Err(Error::invalid_argument(
                format!("{what} write"),
                "a range within the buffer",
                format!("{} bytes at {offset}", bytes.len()),
            ));
        };
        self.stream.memcpy_htod(bytes, &mut view).map_err(|e| driver(&format!("copy {what} to the device"), e))
    }

    fn prepare_variants(&self, variants: &[Variant]) -> Result<()> {
        for &v in variants {
            self.backend.function_of(v)?;
        }
        Ok(())
    }

    fn timed(&self) -> TimedLauncher<'_> {
        TimedLauncher::new(&self.backend, &self.stream)
    }

    fn timings(&self, launcher: &TimedLauncher<'_>) -> Result<StageTimings> {
        launcher.timings()
    }
}

impl CudaDevice {
    /// Add one layer's pre-RoPE queries (a `[H, T, D]` tensor named `name`) to `acc` on the GPU:
    /// the layer's f64 sums go to the device, the calibrate kernel adds the queries, the sums
    /// come back (what `triattn calibrate --backend cuda` does per file and layer).
    ///
    /// # Errors
    /// As [`crate::stats::calibrate::Accumulator::add_named_tensor`] for a tensor that does not
    /// fit; `Driver` for a failed copy or launch.
    pub fn calibrate_tensor(
        &self,
        acc: &mut crate::stats::calibrate::Accumulator,
        layer: usize,
        name: &str,
        tensor: &crate::io::Tensor,
    ) -> Result<()> {
        use super::calibrate::{CalibrateAddresses, CalibrateSpec};
        let (dtype, tokens) = acc.check_named_tensor(layer, name, tensor)?;
        let spec = CalibrateSpec::new(dtype, acc.num_heads(), tokens, acc.head_dim(), acc.style())?;
        if spec.queries_len() > 0 {
            let queries = self.upload("queries", &tensor.data)?;
            let (real, imag, abs) = acc.layer_sums_mut(layer);
            let mut sums = [real, imag, abs]
                .iter()
                .map(|s| self.stream.clone_htod(&s[..]).map_err(|e| driver("copy the sums to the device", e)))
                .collect::<Result<Vec<CudaSlice<f64>>>>()?;
            {
                let (q, _q) = queries.device_ptr(&self.stream);
                let [r, i, a] = &mut sums[..] else { unreachable!("three sums") };
                let (r, _r) = r.device_ptr_mut(&self.stream);
                let (i, _i) = i.device_ptr_mut(&self.stream);
                let (a, _a) = a.device_ptr_mut(&self.stream);
                let at = CalibrateAddresses { queries: q, sum_real: r, sum_imag: i, sum_abs: a };
                // SAFETY: the query buffer holds the checked tensor's bytes (spec.queries_len()
                // elements of `dtype`), each sum buffer `sums_len` f64; the guards outlive the
                // queued launch and the copies below synchronise the stream.
                unsafe { self.backend.launch_calibrate_raw(&spec, &at, self.stream.cu_stream())? };
            }
            let (real, imag, abs) = acc.layer_sums_mut(layer);
            for (host, dev) in [real, imag, abs].into_iter().zip(&sums) {
                let back = self.stream.clone_dtoh(dev).map_err(|e| driver("copy the sums back", e))?;
                host.copy_from_slice(&back);
            }
        }
        acc.count_tokens(layer, tokens);
        Ok(())
    }
}
