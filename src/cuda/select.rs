//! The `select` op's host side: [`SelectSpec`] (validated shape, house rule R3) and, with the
//! `cuda` feature, its launcher on a caller's stream.
//!
//! One launch selects every row of a round: row `r` of `scores` (f32, `len` slots at
//! `r * score_stride`) gives `budget` kept slots, ascending, at `keep[r * keep_stride..]` (i32):
//! every protected slot (`slot < prefix` or `slot >= window_start`) plus the best
//! `budget - protected` other slots in the crate's order (larger score first, ties to the lower
//! slot, NaN below every number) — exactly [`crate::cpu::select::select_row`].

use crate::error::{Error, Result};
use crate::variant::{self, Kernel, Variant};

use super::params::SelectParams;

/// Longest row a `select` launch takes. The kernel runs one block per row and re-reads the row
/// from L2 in each radix pass, so long prompt rows work, only slower than a multi-block select
/// would be.
pub const SELECT_MAX_LEN: usize = 1 << 17;

/// The shape of a `select` launch, before validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelectShape {
    /// Rows (one block each), at least 1.
    pub rows: usize,
    /// Slots per row N, `1..=SELECT_MAX_LEN`.
    pub len: usize,
    /// Slots below it are protected (`0..=len`).
    pub prefix: usize,
    /// Slots from it on are protected (`0..=len`; `len` for no window).
    pub window_start: usize,
    /// Kept slots per row K, protected ones included: `protected..=len`.
    pub budget: usize,
    /// Elements between rows of the scores, `>= len`.
    pub score_stride: usize,
    /// Elements between rows of the output, `>= budget`.
    pub keep_stride: usize,
}

impl SelectShape {
    /// Protected slots per row (prefix and window may overlap; counted once).
    pub fn protected(&self) -> usize {
        self.prefix.min(self.len) + self.len.saturating_sub(self.window_start.max(self.prefix))
    }
}

/// A validated `select` launch: shape and variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectSpec {
    shape: SelectShape,
    variant: Variant,
}

/// Addresses of a `select` launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectAddresses {
    /// `f32 [scores_len]`.
    pub scores: u64,
    /// `i32 [keep_len]` out.
    pub keep: u64,
}

fn ensure(ok: bool, what: &str, expected: impl std::fmt::Display, got: impl std::fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(what, expected, got))
    }
}

impl SelectSpec {
    /// Validate `shape` and pick the variant for its row length.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn new(shape: SelectShape) -> Result<Self> {
        Self::with_variant(shape, variant::select_variant(shape.len))
    }

    /// Validate `shape` for a given `select` variant (tests run every variant).
    ///
    /// # Errors
    /// As [`Self::new`]; `InvalidArgument` if `variant` is not a `select` kernel.
    pub fn with_variant(shape: SelectShape, variant: Variant) -> Result<Self> {
        let s = &shape;
        ensure(matches!(variant.kernel, Kernel::Select { .. }), "select variant", "a select kernel", variant.symbol())?;
        ensure(s.rows >= 1 && s.rows <= i32::MAX as usize, "select rows", "1..=2^31-1", s.rows)?;
        ensure(s.len >= 1 && s.len <= SELECT_MAX_LEN, "select slots", format!("1..={SELECT_MAX_LEN}"), s.len)?;
        ensure(s.prefix <= s.len, "select prefix", format!("0..={}", s.len), s.prefix)?;
        ensure(s.window_start <= s.len, "select window start", format!("0..={}", s.len), s.window_start)?;
        let protected = s.protected();
        ensure(
            s.budget >= protected && s.budget <= s.len,
            "select budget",
            format!("{protected}..={} (protected slots to slots)", s.len),
            s.budget,
        )?;
        ensure(s.score_stride >= s.len, "select score stride", format!(">= {}", s.len), s.score_stride)?;
        ensure(s.keep_stride >= s.budget, "select keep stride", format!(">= {}", s.budget), s.keep_stride)?;
        ensure(
            (s.rows - 1)
                .checked_mul(s.score_stride)
                .and_then(|x| x.checked_add(s.len))
                .is_some_and(|x| x <= i64::MAX as usize)
                && (s.rows - 1).checked_mul(s.keep_stride).is_some_and(|x| x <= i64::MAX as usize),
            "select buffers",
            "addressable sizes",
            format!("{} rows", s.rows),
        )?;
        Ok(Self { shape, variant })
    }

    /// The validated shape.
    pub fn shape(&self) -> &SelectShape {
        &self.shape
    }

    /// The variant a launch runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Launch grid `(rows, 1, 1)`.
    pub fn grid(&self) -> (u32, u32, u32) {
        (self.shape.rows as u32, 1, 1)
    }

    /// f32 elements the scores must hold: `(rows - 1) * score_stride + len`.
    pub fn scores_len(&self) -> usize {
        (self.shape.rows - 1) * self.shape.score_stride + self.shape.len
    }

    /// i32 elements the output must hold: `(rows - 1) * keep_stride + budget`.
    pub fn keep_len(&self) -> usize {
        (self.shape.rows - 1) * self.shape.keep_stride + self.shape.budget
    }

    /// The params struct for `at`.
    pub fn params(&self, at: &SelectAddresses) -> SelectParams {
        let s = &self.shape;
        // Every count fits: rows and len are bounded in `with_variant`, the rest by len.
        SelectParams {
            scores: at.scores,
            keep: at.keep,
            score_stride: s.score_stride as i64,
            keep_stride: s.keep_stride as i64,
            num_rows: s.rows as i32,
            len: s.len as i32,
            prefix: s.prefix as i32,
            window_start: s.window_start as i32,
            budget: s.budget as i32,
            pad: 0,
        }
    }
}

#[cfg(feature = "cuda")]
impl super::runtime::CudaBackend {
    /// Select on the GPU over raw device addresses, on the caller's stream: only
    /// `cuLaunchKernel` (no allocation, copy or sync; graph capturable).
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels, `Driver` for a failed load or launch.
    ///
    /// # Safety
    /// `at.scores` is device memory of this context holding [`SelectSpec::scores_len`] f32,
    /// `at.keep` holds [`SelectSpec::keep_len`] i32 that nothing else accesses until the kernel
    /// has run; `stream` belongs to this context (or is null, the legacy default stream).
    pub unsafe fn launch_select_raw(
        &self,
        spec: &SelectSpec,
        at: &SelectAddresses,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let params = spec.params(at);
        // SAFETY: the caller's contract; params from a validated spec for its own variant.
        unsafe { self.launch(spec.variant(), &params, spec.grid(), 0, stream) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(len: usize, prefix: usize, window_start: usize, budget: usize) -> SelectShape {
        SelectShape { rows: 2, len, prefix, window_start, budget, score_stride: len, keep_stride: budget }
    }

    #[test]
    fn protected_count_matches_the_policy() {
        assert_eq!(shape(10, 8, 6, 10).protected(), 10);
        assert_eq!(shape(20, 3, 16, 10).protected(), 7);
        assert_eq!(shape(20, 0, 20, 10).protected(), 0);
    }

    #[test]
    fn spec_refuses_what_the_kernel_assumes() {
        assert!(SelectSpec::new(shape(20, 3, 16, 10)).is_ok());
        assert!(SelectSpec::new(shape(20, 3, 16, 6)).is_err()); // budget below protected
        assert!(SelectSpec::new(shape(20, 0, 20, 21)).is_err()); // budget above len
        assert!(SelectSpec::new(shape(20, 21, 20, 21)).is_err());
        assert!(SelectSpec::new(shape(0, 0, 0, 0)).is_err());
        assert!(SelectSpec::new(SelectShape { score_stride: 19, ..shape(20, 0, 20, 5) }).is_err());
        assert!(SelectSpec::new(SelectShape { keep_stride: 4, ..shape(20, 0, 20, 5) }).is_err());
        assert!(SelectSpec::new(SelectShape { rows: 0, ..shape(20, 0, 20, 5) }).is_err());
        assert!(SelectSpec::with_variant(shape(20, 0, 20, 5), variant::trig_variant()).is_err());
    }
}
