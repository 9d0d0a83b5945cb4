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

use super::plan::{CacheAddresses, Launcher, RoundOutputs, RoundPlan, Stage, WORKSPACE_ALIGN};
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
    /// As [`Self::prepare_round`]; `Driver` for a failed launch; `Unsupported` when a kernel
    /// needs more shared memory than this GPU has.
    ///
    /// # Safety
    /// `workspace` is device memory of this context of [`RoundPlan::workspace_bytes`], aligned to
    /// [`WORKSPACE_ALIGN`], whose constants hold [`RoundPlan::workspace_image`] of a live cache of
    /// the planned shape; `round_start` is the device address of one `i64 >= N`; `stream` belongs
    /// to this context; nothing else touches the workspace or the cache until the round has run.
    pub unsafe fn run_round(&self, plan: &RoundPlan, workspace: u64, round_start: u64, stream: CUstream) -> Result<()> {
        if workspace % WORKSPACE_ALIGN as u64 != 0 {
            return Err(Error::invalid_argument(
                "workspace address",
                format!("a multiple of {WORKSPACE_ALIGN}"),
                workspace,
            ));
        }
        if round_start % 8 != 0 {
            return Err(Error::invalid_argument("round_start address", "a multiple of 8", round_start));
        }
        let mut launcher = StreamLauncher::new(self, stream);
        // SAFETY: the caller's contract.
        unsafe { plan.run(&mut launcher, workspace, round_start) }
    }
}

/// A planned round bound to a cache, with its own workspace and `round_start` slot.
pub struct DeviceRound {
    plan: RoundPlan,
    workspace: CudaSlice<u8>,
    round_start: CudaSlice<i64>,
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
        let image = plan.workspace_image(cache)?;
        backend.prepare_round(&plan)?;
        let mut workspace =
            stream.alloc_zeros::<u8>(plan.workspace_bytes().max(1)).map_err(|e| driver("workspace allocation", e))?;
        stream.memcpy_htod(&image, &mut workspace).map_err(|e| driver("workspace constants", e))?;
        let round_start = stream.alloc_zeros::<i64>(1).map_err(|e| driver("round_start allocation", e))?;
        let (base, _guard) = workspace.device_ptr(stream);
        if base % WORKSPACE_ALIGN as u64 != 0 {
            return Err(Error::new(
                ErrorKind::Driver,
                format!("workspace at {base:#x} is not {WORKSPACE_ALIGN}-byte aligned"),
            ));
        }
        drop(_guard);
        Ok(Self { plan, workspace, round_start })
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
        let n = self.plan.shape().len;
        if round_start < n as u64 || round_start > i64::MAX as u64 {
            return Err(Error::invalid_argument("round_start", format!("{n}..=2^63-1"), round_start));
        }
        stream.memcpy_htod(&[round_start as i64], &mut self.round_start).map_err(|e| driver("round_start copy", e))
    }

    /// Launch the round on `stream`: launches only.
    ///
    /// # Errors
    /// As [`CudaBackend::run_round`].
    ///
    /// # Safety
    /// The cache bound in [`Self::new`] is still alive, holds the planned shape, and nothing else
    /// accesses it until the round has run.
    pub unsafe fn run(&mut self, backend: &CudaBackend, stream: &Arc<CudaStream>) -> Result<()> {
        let (ws, _w) = self.workspace.device_ptr_mut(stream);
        let (rs, _r) = self.round_start.device_ptr(stream);
        // SAFETY: the workspace and slot are this round's (sized, aligned and initialised in
        // `new`); the guards live until the launches are queued; the cache is the caller's
        // contract.
        unsafe { backend.run_round(&self.plan, ws, rs, stream.cu_stream()) }
    }

    /// Launch the round through another launcher of this round's device (a timing wrapper around
    /// [`StreamLauncher`], say), with this round's workspace and `round_start` slot.
    ///
    /// # Errors
    /// What the launcher reports.
    ///
    /// # Safety
    /// As [`Self::run`]; `launcher` launches on `stream`'s device.
    pub unsafe fn run_with<L: Launcher>(&mut self, launcher: &mut L, stream: &Arc<CudaStream>) -> Result<()> {
        let (ws, _w) = self.workspace.device_ptr_mut(stream);
        let (rs, _r) = self.round_start.device_ptr(stream);
        // SAFETY: as in `run`.
        unsafe { self.plan.run(launcher, ws, rs) }
    }

    /// Copy the outputs back (synchronises `stream`).
    ///
    /// # Errors
    /// `Driver` for a failed copy.
    pub fn read_outputs(&self, stream: &Arc<CudaStream>) -> Result<RoundOutputs> {
        let host = stream.clone_dtoh(&self.workspace).map_err(|e| driver("workspace read-back", e))?;
        self.plan.read_outputs(&host)
    }
}
