//! The `calibrate` op's launch description: [`CalibrateSpec`] and, with feature `cuda`, the
//! launcher on a caller's stream.
//!
//! One launch adds one layer's pre-RoPE queries `[H, T, D]` (f32, f16 or bf16) to the running
//! f64 sums `Σ Re z`, `Σ Im z`, `Σ |z|` per (head, pair) — what
//! [`Accumulator`](crate::stats::calibrate::Accumulator) does on the CPU. Every (head, pair) is
//! owned by one thread block lane set and reduced in a fixed order, so results are bit-identical
//! from run to run; against the CPU they differ only by the order of f64 additions.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::PairingStyle;
use crate::variant::{self, Variant};

use super::params::CalibrateParams;
use super::spec::style_code;

/// A validated calibration launch over one layer's queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibrateSpec {
    dtype: DType,
    num_heads: usize,
    num_tokens: usize,
    head_dim: usize,
    style: PairingStyle,
    variant: Variant,
}

/// Addresses of a calibration launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CalibrateAddresses {
    /// `[H, T, D]` queries of the spec's dtype, row-major.
    pub queries: u64,
    /// `f64 [H, D/2]`, in/out.
    pub sum_real: u64,
    /// `f64 [H, D/2]`, in/out.
    pub sum_imag: u64,
    /// `f64 [H, D/2]`, in/out.
    pub sum_abs: u64,
}

impl CalibrateSpec {
    /// Check the shape of dense `[num_heads, num_tokens, head_dim]` queries.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first quantity out of range.
    pub fn new(
        dtype: DType,
        num_heads: usize,
        num_tokens: usize,
        head_dim: usize,
        style: PairingStyle,
    ) -> Result<Self> {
        let bad = |what: &str, expected: &str, got: usize| Err(Error::invalid_argument(what, expected, got));
        if !(1..=65535).contains(&num_heads) {
            return bad("calibration heads", "1..=65535", num_heads);
        }
        if head_dim < 2 || !head_dim.is_multiple_of(2) || head_dim > 65536 {
            return bad("calibration head_dim", "even, 2..=65536", head_dim);
        }
        if num_tokens > i32::MAX as usize {
            return bad("calibration tokens per launch", "<= i32::MAX", num_tokens);
        }
        Ok(Self { dtype, num_heads, num_tokens, head_dim, style, variant: variant::calibrate_variant(dtype) })
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Query dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Elements of the queries `[H, T, D]`.
    pub fn queries_len(&self) -> usize {
        self.num_heads * self.num_tokens * self.head_dim
    }

    /// Entries of each sum `[H, D/2]`.
    pub fn sums_len(&self) -> usize {
        self.num_heads * self.head_dim / 2
    }

    /// Launch grid `(ceil(F / 32), H, 1)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        ((self.head_dim / 2).div_ceil(32) as u32, self.num_heads as u32, 1)
    }

    /// The params of a launch over these addresses.
    pub fn params(&self, at: &CalibrateAddresses) -> CalibrateParams {
        CalibrateParams {
            queries: at.queries,
            sum_real: at.sum_real,
            sum_imag: at.sum_imag,
            sum_abs: at.sum_abs,
            head_stride: (self.num_tokens * self.head_dim) as i64,
            token_stride: self.head_dim as i64,
            num_heads: self.num_heads as i32,
            num_tokens: self.num_tokens as i32,
            head_dim: self.head_dim as i32,
            style: style_code(self.style),
        }
    }
}

#[cfg(feature = "cuda")]
impl super::runtime::CudaBackend {
    /// Add one layer's queries to the f64 sums on the GPU, on the caller's stream (no
    /// allocation, copy or synchronisation).
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels, `Driver` for a failed load or launch.
    ///
    /// # Safety
    /// `at.queries` holds [`CalibrateSpec::queries_len`] elements of the spec's dtype and each
    /// sum [`CalibrateSpec::sums_len`] f64, all device memory of this context alive until the
    /// kernel has run; `stream` belongs to this context.
    pub unsafe fn launch_calibrate_raw(
        &self,
        spec: &CalibrateSpec,
        at: &CalibrateAddresses,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        if spec.num_tokens == 0 {
            return Ok(());
        }
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec for its own variant.
        unsafe { self.launch(spec.variant(), &params, spec.grid(), 0, stream) }
    }
}
