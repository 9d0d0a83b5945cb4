//! The emu backend as a kernel device: host memory aligned like device memory, launches run
//! synchronously by the SIMT layer, wall time per stage. Whole rounds go through the shared
//! host-round path (`crate::cuda::host_round`), the same one a GPU takes.

use std::time::Instant;

use crate::cuda::host_round::KernelDevice;
use crate::cuda::plan::{Launcher, Stage, StageTimings, WORKSPACE_ALIGN};
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

/// Host memory with its base aligned to [`WORKSPACE_ALIGN`], as device allocations are: the
/// emu backend's stand-in for a device buffer.
pub(crate) struct HostBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    len: usize,
}

// SAFETY: a uniquely owned heap allocation, like a `Vec<u8>`.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only reads it (`bytes`).
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    fn of(bytes: &[u8]) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(bytes.len().max(1), WORKSPACE_ALIGN)
            .map_err(|_| Error::invalid_argument("emu buffer", "a size below isize::MAX", bytes.len()))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: `ptr` holds `layout.size() >= bytes.len()` writable bytes, distinct from `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
        Ok(Self { ptr, layout, len: bytes.len() })
    }

    fn write_at(&mut self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset.checked_add(bytes.len()).is_none_or(|end| end > self.len) {
            return Err(Error::invalid_argument(
                "emu buffer write",
                format!("a range within its {} bytes", self.len),
                format!("{} bytes at {offset}", bytes.len()),
            ));
        }
        // SAFETY: the range is inside the allocation (checked) and `self` is borrowed exclusively.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(offset), bytes.len()) };
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the allocation were initialised in `of`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `of`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// The emu backend as a [`KernelDevice`]: buffers are aligned host memory, launches run on the
/// SIMT layer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EmuDevice;

impl KernelDevice for EmuDevice {
    type Buffer = HostBuffer;
    type Timed<'a> = EmuLauncher;

    fn upload(&self, _what: &str, bytes: &[u8]) -> Result<Self::Buffer> {
        HostBuffer::of(bytes)
    }

    fn address(&self, buffer: &Self::Buffer) -> u64 {
        buffer.ptr.as_ptr() as u64
    }

    fn download(&self, _what: &str, buffer: &Self::Buffer) -> Result<Vec<u8>> {
        Ok(buffer.bytes().to_vec())
    }

    fn write(&self, _what: &str, buffer: &mut Self::Buffer, offset: usize, bytes: &[u8]) -> Result<()> {
        buffer.write_at(offset, bytes)
    }

    /// Nothing to load: the SIMT layer links every variant of the table.
    fn prepare_variants(&self, _variants: &[Variant]) -> Result<()> {
        Ok(())
    }

    fn timed(&self) -> EmuLauncher {
        EmuLauncher::default()
    }

    fn timings(&self, launcher: &EmuLauncher) -> Result<StageTimings> {
        Ok(launcher.timings)
    }
}
