//! The `normalize` op's host side: [`NormalizeSpec`] (validated shape), the host reference of
//! its row moments ([`moments_from_partials`]) and, with the `cuda` feature, its launcher.
//!
//! One launch z-scores every raw row of a round from the tile partials the scorer wrote: the
//! statistics are those of the scorer's candidates (slots in `[stat_start, stat_end)`, NaN scores
//! left out, as [`crate::cpu::normalize::row_moments`] does), combined in f64 as
//! [`RowPartial::combine`]. Against [`crate::cpu::normalize`], which sums the row itself in f64,
//! results agree to f32 rounding of the partials (about 1e-7 of the row's deviation); a NaN score
//! stays NaN and leaves the rest of its row unaffected.

use crate::error::{ensure, Result};
use crate::policy::ZScore;
use crate::variant::{self, Variant};

use super::params::{NormalizeParams, RowPartial, ZSCORE_POPULATION_FLOOR, ZSCORE_UNBIASED_CENTRE_FLAT};

/// The shape of a `normalize` launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormalizeSpec {
    /// Rows (one block each; `S * L * H` for a scoring launch whose rows are evenly strided).
    pub rows: usize,
    /// Slots per row N.
    pub len: usize,
    /// Partials per row (the scoring launch's tiles).
    pub num_tiles: usize,
    /// Elements between raw rows, `>= len`.
    pub raw_stride: usize,
    /// Elements between output rows, `>= len` (the output may be the raw buffer itself).
    pub out_stride: usize,
    /// z-score flavour.
    pub flavour: ZScore,
}

/// Addresses of a `normalize` launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormalizeAddresses {
    /// `RowPartial [rows * num_tiles]`.
    pub partials: u64,
    /// `f32 [raw_len]`.
    pub raw: u64,
    /// `f32 [out_len]` out; may equal `raw` when the strides are equal.
    pub out: u64,
}

/// Mean and divisor of one row from its tile partials, as the kernel computes them (bit for bit).
pub fn moments_from_partials(parts: &[RowPartial], flavour: ZScore) -> (f64, f64) {
    let s = RowPartial::combine(parts);
    if s.count == 0.0 {
        return (0.0, 1.0);
    }
    let divisor = match flavour {
        ZScore::PopulationFloor => (s.m2 / s.count).sqrt().max(1e-6),
        ZScore::UnbiasedCentreFlat => {
            let sd = if s.count > 1.0 { (s.m2 / (s.count - 1.0)).sqrt() } else { 0.0 };
            if sd < 1e-8 || !sd.is_finite() {
                1.0
            } else {
                sd
            }
        }
    };
    (s.mean, divisor)
}

impl NormalizeSpec {
    /// Check everything the kernel assumes.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn validate(&self) -> Result<()> {
        let cap = i32::MAX as usize;
        ensure(self.rows >= 1 && self.rows <= cap, "normalize rows", "1..=2^31-1", self.rows)?;
        ensure(self.len >= 1 && self.len <= cap, "normalize slots", ">= 1", self.len)?;
        ensure(self.num_tiles >= 1 && self.num_tiles <= cap, "normalize tiles", ">= 1", self.num_tiles)?;
        ensure(self.raw_stride >= self.len, "normalize raw stride", format!(">= {}", self.len), self.raw_stride)?;
        ensure(self.out_stride >= self.len, "normalize out stride", format!(">= {}", self.len), self.out_stride)?;
        Ok(())
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        variant::normalize_variant()
    }

    /// Launch grid `(rows, 1, 1)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        (self.rows as u32, 1, 1)
    }

    /// f32 elements the raw rows must hold.
    pub fn raw_len(&self) -> usize {
        (self.rows - 1) * self.raw_stride + self.len
    }

    /// f32 elements the output must hold.
    pub fn out_len(&self) -> usize {
        (self.rows - 1) * self.out_stride + self.len
    }

    /// Partials the launch reads: `rows * num_tiles`.
    pub fn partials_len(&self) -> usize {
        self.rows * self.num_tiles
    }

    /// The params struct for `at` (call [`Self::validate`] first).
    pub fn params(&self, at: &NormalizeAddresses) -> NormalizeParams {
        NormalizeParams {
            partials: at.partials,
            raw: at.raw,
            out: at.out,
            raw_stride: self.raw_stride as i64,
            out_stride: self.out_stride as i64,
            num_rows: self.rows as i32,
            num_tiles: self.num_tiles as i32,
            len: self.len as i32,
            flavour: match self.flavour {
                ZScore::PopulationFloor => ZSCORE_POPULATION_FLOOR,
                ZScore::UnbiasedCentreFlat => ZSCORE_UNBIASED_CENTRE_FLAT,
            },
        }
    }
}

#[cfg(feature = "cuda")]
impl super::runtime::CudaBackend {
    /// Normalize on the GPU over raw device addresses, on the caller's stream (launch only).
    ///
    /// # Errors
    /// `InvalidArgument` for a bad spec; `KernelsUnavailable` for a build without kernels,
    /// `Driver` for a failed load or launch.
    ///
    /// # Safety
    /// The addresses in `at` are device memory of this context holding
    /// [`NormalizeSpec::partials_len`], [`NormalizeSpec::raw_len`] and
    /// [`NormalizeSpec::out_len`] elements; the output is not accessed by anything else until
    /// the kernel has run (it may be the raw buffer itself); `stream` belongs to this context.
    pub unsafe fn launch_normalize_raw(
        &self,
        spec: &NormalizeSpec,
        at: &NormalizeAddresses,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        spec.validate()?;
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec.
        unsafe { self.launch(spec.variant(), &params, spec.grid(), 0, stream) }
    }
}
