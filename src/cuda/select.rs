//! The `select` op's host side: [`SelectSpec`] (validated shape, house rule R3) and, with the
//! `cuda` feature, its launcher on a caller's stream.
//!
//! One launch selects every row of a round: row `r` of `scores` (f32, `len` slots at
//! `r * score_stride`) gives `budget` kept slots, ascending, at `keep[r * keep_stride..]` (i32):
//! every protected slot (`slot < prefix` or `slot >= window_start`) plus the best
//! `budget - protected` other slots in the crate's order (larger score first, ties to the lower
//! slot, NaN below every number) — exactly [`crate::cpu::select::select_row`].
//!
//! Two paths, the same keep sets bit for bit: rows up to [`SELECT_SINGLE_MAX_LEN`] slots run one
//! kernel, one block per row (cuda/select/select.cuh); longer rows run the multi-block sequence
//! of [`SELECT_MULTI_LAUNCHES`] kernels over chunks of [`SELECT_CHUNK_LEN`] slots
//! (cuda/select/multi.cuh), which needs [`SelectSpec::scratch_bytes`] of device scratch.
//! [`SelectSpec::launches`] lists the launches of either path, in order.
//!
//! Batched rounds: rows of several sequences of one shape (same `len`, `window_start`, `budget`)
//! run in one launch with a protected prefix per sequence: [`SelectShape::rows_per_seq`] rows
//! per sequence and [`SelectAddresses::prefixes`] (`i32`, one per sequence); row `r` protects
//! the slots below `prefixes[r / rows_per_seq]`. Host guarantee (the device does not check it,
//! the round plan does): every such prefix is in `0..=len` and leaves at most `budget` protected
//! slots.

use crate::error::{ensure, Result};
use crate::tuning::{Bucket, ChoiceSource, Dispatch};
use crate::variant::{self, Kernel, SelectPhase, Variant};

use super::params::SelectParams;

/// Longest row a `select` launch takes.
pub const SELECT_MAX_LEN: usize = 1 << 17;

/// Longest row the single-block path takes ([`SelectSpec::new`]); longer rows go multi-block.
pub const SELECT_SINGLE_MAX_LEN: usize = 1 << 14;

/// Slots per chunk (one block) of the multi-block path: 8 per thread of its 256-thread blocks.
pub const SELECT_CHUNK_LEN: usize = 8 * variant::SELECT_PASS_THREADS;

/// Radix passes of the multi-block path (8-bit digits of a 32-bit key).
const SELECT_PASSES: usize = 4;

/// Launches of the multi-block path: a histogram and a scan per pass, then count and place. The
/// capacity of [`SelectLaunches`].
pub const SELECT_MULTI_LAUNCHES: usize = 2 * SELECT_PASSES + 2;

/// One launch: the variant, its params, its grid.
pub type SelectLaunch = (Variant, SelectParams, (u32, u32, u32));

/// The launches of a `select`, in order: `Some` first, then `None` (no heap allocation).
pub type SelectLaunches = [Option<SelectLaunch>; SELECT_MULTI_LAUNCHES];

/// The shape of a `select` launch, before validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelectShape {
    /// Rows (one block each), at least 1.
    pub rows: usize,
    /// Slots per row N, `1..=SELECT_MAX_LEN`.
    pub len: usize,
    /// Slots below it are protected (`0..=len`), in every row unless `rows_per_seq` and
    /// [`SelectAddresses::prefixes`] give one per sequence.
    pub prefix: usize,
    /// Slots from it on are protected (`0..=len`; `len` for no window).
    pub window_start: usize,
    /// Kept slots per row K, protected ones included: `protected..=len`.
    pub budget: usize,
    /// Elements between rows of the scores, `>= len`.
    pub score_stride: usize,
    /// Elements between rows of the output, `>= budget`.
    pub keep_stride: usize,
    /// Rows per sequence when [`SelectAddresses::prefixes`] gives a prefix per sequence (a
    /// divisor of `rows`); 0: no per-sequence prefixes (`prefix` for every row).
    pub rows_per_seq: usize,
}

impl SelectShape {
    /// Protected slots per row (prefix and window may overlap; counted once).
    pub fn protected(&self) -> usize {
        self.prefix.min(self.len) + self.len.saturating_sub(self.window_start.max(self.prefix))
    }
}

/// A validated `select`: shape and path (one single-block variant, or the multi-block sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectSpec {
    shape: SelectShape,
    /// The single-block variant, or the first multi-block kernel (the histogram).
    variant: Variant,
    /// Chunks per row of the multi-block path; 0 for the single-block path.
    chunks: usize,
}

/// Addresses of a `select` launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectAddresses {
    /// `f32 [scores_len]`.
    pub scores: u64,
    /// `i32 [keep_len]` out.
    pub keep: u64,
    /// Scratch of [`SelectSpec::scratch_bytes`] (4-byte aligned; no initial contents needed,
    /// nothing else may use it until the launches have run); unused (0) on the single-block path.
    pub scratch: u64,
    /// `i32 [rows / rows_per_seq]` per-sequence prefixes, or 0 (`prefix` for every row); ignored
    /// when [`SelectShape::rows_per_seq`] is 0. Host guarantee: every entry in `0..=len` with at
    /// most `budget` protected slots.
    pub prefixes: u64,
}

/// The built-in rule of family `select f32` for rows of `len` slots: a single-block variant up to
/// [`SELECT_SINGLE_MAX_LEN`], the multi-block path (named by its first kernel) beyond.
pub(crate) fn built_in_variant(len: usize) -> Variant {
    if len > SELECT_SINGLE_MAX_LEN {
        variant::select_pass_variant(SelectPhase::Histogram)
    } else {
        variant::select_variant(len)
    }
}

impl SelectSpec {
    /// Validate `shape` and pick the path for its row length: single-block up to
    /// [`SELECT_SINGLE_MAX_LEN`] slots, multi-block beyond.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first field out of range.
    pub fn new(shape: SelectShape) -> Result<Self> {
        Self::tuned(shape, &Dispatch::built_in()).map(|(spec, _)| spec)
    }

    /// [`Self::new`] with the path `dispatch` picks for family `select f32` (`len` = row length,
    /// `batch` = rows): a single-block variant, or the multi-block path under the name of its
    /// first kernel. A table's buckets place the cut-over between them.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn tuned(shape: SelectShape, dispatch: &Dispatch) -> Result<(Self, ChoiceSource)> {
        let multi = variant::select_pass_variant(SelectPhase::Histogram);
        let default = built_in_variant(shape.len);
        let bucket = Bucket { len: shape.len, batch: shape.rows };
        let (chosen, source) =
            dispatch.pick(&default.family(), bucket, &|_| true).unwrap_or((default, ChoiceSource::BuiltIn));
        let spec = if chosen == multi { Self::multi_block(shape)? } else { Self::with_variant(shape, chosen)? };
        Ok((spec, source))
    }

    /// Validate `shape` for the multi-block path whatever its length (tests run it on short rows).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn multi_block(shape: SelectShape) -> Result<Self> {
        let mut spec = Self::validate(shape, variant::select_pass_variant(SelectPhase::Histogram))?;
        spec.chunks = shape.len.div_ceil(SELECT_CHUNK_LEN);
        ensure(
            shape.rows.checked_mul(spec.row_scratch_words() * 4).is_some_and(|x| x <= i64::MAX as usize),
            "select scratch",
            "an addressable size",
            format!("{} rows", shape.rows),
        )?;
        Ok(spec)
    }

    /// Validate `shape` for a given single-block `select` variant (tests run every variant).
    ///
    /// # Errors
    /// As [`Self::new`]; `InvalidArgument` if `variant` is not a single-block `select` kernel.
    pub fn with_variant(shape: SelectShape, variant: Variant) -> Result<Self> {
        ensure(matches!(variant.kernel, Kernel::Select { .. }), "select variant", "a select kernel", variant.symbol())?;
        Self::validate(shape, variant)
    }

    fn validate(shape: SelectShape, variant: Variant) -> Result<Self> {
        let s = &shape;
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
            s.rows_per_seq == 0 || s.rows.is_multiple_of(s.rows_per_seq),
            "select rows per sequence",
            format!("0 or a divisor of the {} rows", s.rows),
            s.rows_per_seq,
        )?;
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
        Ok(Self { shape, variant, chunks: 0 })
    }

    /// The validated shape.
    pub fn shape(&self) -> &SelectShape {
        &self.shape
    }

    /// The variant of the single-block launch, or of the first multi-block launch.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Whether the multi-block path runs.
    pub fn is_multi_block(&self) -> bool {
        self.chunks > 0
    }

    /// Grid of the single-block launch `(rows, 1, 1)` (of the first launch when multi-block).
    pub fn grid(&self) -> (u32, u32, u32) {
        (self.shape.rows as u32, self.chunks.max(1) as u32, 1)
    }

    /// u32 scratch words per row (multi-block): state, chunk histograms, chunk counts
    /// (`select_scratch_words` in multi.cuh).
    fn row_scratch_words(&self) -> usize {
        4 + self.chunks * (256 + 2)
    }

    /// Bytes of scratch the launches need ([`SelectAddresses::scratch`]); 0 on the single-block
    /// path.
    pub fn scratch_bytes(&self) -> usize {
        if self.is_multi_block() {
            self.shape.rows * self.row_scratch_words() * 4
        } else {
            0
        }
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
            pass: 0,
            scratch: if self.is_multi_block() { at.scratch } else { 0 },
            num_chunks: self.chunks as i32,
            chunk_len: if self.is_multi_block() { SELECT_CHUNK_LEN as i32 } else { 0 },
            prefixes: if s.rows_per_seq > 0 { at.prefixes } else { 0 },
            rows_per_seq: s.rows_per_seq as i32,
            pad3: 0,
        }
    }

    /// Check that `at.scratch` is usable: non-null and 4-byte aligned on the multi-block path (a
    /// launcher's cheap guard; its size is the caller's contract).
    ///
    /// # Errors
    /// `InvalidArgument` naming the scratch.
    pub fn check_scratch(&self, at: &SelectAddresses) -> Result<()> {
        ensure(
            !self.is_multi_block() || (at.scratch != 0 && at.scratch.is_multiple_of(4)),
            "select scratch",
            format!("a 4-byte aligned address of {} bytes", self.scratch_bytes()),
            format!("{:#x}", at.scratch),
        )
    }

    /// Every launch of this select at `at`, in order: the single-block kernel, or the multi-block
    /// sequence (per radix pass a histogram over `(rows, chunks)` and a scan over `(rows)`, then
    /// count and place over `(rows, chunks)`). Launches must run in this order on one stream.
    pub fn launches(&self, at: &SelectAddresses) -> SelectLaunches {
        let mut out: SelectLaunches = [None; SELECT_MULTI_LAUNCHES];
        let params = self.params(at);
        if !self.is_multi_block() {
            out[0] = Some((self.variant, params, self.grid()));
            return out;
        }
        let chunked = self.grid();
        let per_row = (self.shape.rows as u32, 1, 1);
        for pass in 0..SELECT_PASSES {
            let p = SelectParams { pass: pass as i32, ..params };
            out[2 * pass] = Some((variant::select_pass_variant(SelectPhase::Histogram), p, chunked));
            out[2 * pass + 1] = Some((variant::select_pass_variant(SelectPhase::Scan), p, per_row));
        }
        out[2 * SELECT_PASSES] = Some((variant::select_pass_variant(SelectPhase::Count), params, chunked));
        out[2 * SELECT_PASSES + 1] = Some((variant::select_pass_variant(SelectPhase::Place), params, chunked));
        out
    }
}

#[cfg(feature = "cuda")]
impl super::runtime::CudaBackend {
    /// Select on the GPU over raw device addresses, on the caller's stream: only
    /// `cuLaunchKernel`, every launch of [`SelectSpec::launches`] in order (no allocation, copy
    /// or sync; graph capturable).
    ///
    /// # Errors
    /// `KernelsUnavailable` for a build without kernels, `Driver` for a failed load or launch,
    /// `InvalidArgument` for a null or misaligned scratch on the multi-block path.
    ///
    /// # Safety
    /// `at.scores` is device memory of this context holding [`SelectSpec::scores_len`] f32,
    /// `at.keep` holds [`SelectSpec::keep_len`] i32 that nothing else accesses until the kernels
    /// have run; with `rows_per_seq > 0`, `at.prefixes` is 0 or holds `rows / rows_per_seq` i32
    /// each in `0..=len` with at most `budget` protected slots; for the multi-block path ([`SelectSpec::scratch_bytes`] > 0) `at.scratch` is
    /// device memory of this context of that many bytes, 4-byte aligned, contents irrelevant,
    /// that nothing else accesses until the kernels have run; `stream` belongs to this context
    /// (or is null, the legacy default stream).
    pub unsafe fn launch_select_raw(
        &self,
        spec: &SelectSpec,
        at: &SelectAddresses,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        spec.check_scratch(at)?;
        for (variant, params, grid) in spec.launches(at).iter().flatten() {
            // SAFETY: the caller's contract; params from a validated spec for their variant.
            unsafe { self.launch(*variant, params, *grid, 0, stream)? };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(len: usize, prefix: usize, window_start: usize, budget: usize) -> SelectShape {
        SelectShape {
            rows: 2,
            len,
            prefix,
            window_start,
            budget,
            score_stride: len,
            keep_stride: budget,
            rows_per_seq: 0,
        }
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
        let pass = variant::select_pass_variant(SelectPhase::Histogram);
        assert!(SelectSpec::with_variant(shape(20, 0, 20, 5), pass).is_err());
        assert!(SelectSpec::multi_block(shape(20, 3, 16, 6)).is_err());
    }

    #[test]
    fn multi_block_launch_sequence() {
        let len = SELECT_SINGLE_MAX_LEN + 1;
        let spec = SelectSpec::new(shape(len, 0, len, 100)).unwrap();
        let chunks = len.div_ceil(SELECT_CHUNK_LEN);
        assert_eq!(spec.scratch_bytes(), 2 * (4 + chunks * 258) * 4);
        let at = SelectAddresses { scores: 16, keep: 32, scratch: 64, prefixes: 0 };
        let launches = spec.launches(&at);
        let phases: Vec<SelectPhase> = launches
            .iter()
            .flatten()
            .map(|(v, _, _)| match v.kernel {
                Kernel::SelectPass { phase, .. } => phase,
                _ => panic!("not a multi-block kernel"),
            })
            .collect();
        use SelectPhase::*;
        let want = [Histogram, Scan, Histogram, Scan, Histogram, Scan, Histogram, Scan, Count, Place];
        assert_eq!(phases, want);
        for (i, (_, p, grid)) in launches.iter().flatten().enumerate() {
            assert_eq!((p.scratch, p.num_chunks, p.chunk_len), (64, chunks as i32, SELECT_CHUNK_LEN as i32));
            assert_eq!(p.pass, if i < 8 { (i / 2) as i32 } else { 0 });
            assert_eq!(*grid, if want[i] == Scan { (2, 1, 1) } else { (2, chunks as u32, 1) });
        }
        let single = SelectSpec::new(shape(len - 1, 0, len - 1, 100)).unwrap();
        let launches = single.launches(&at);
        assert_eq!(launches.iter().flatten().count(), 1);
        assert_eq!(launches[0].unwrap().1.scratch, 0);
        assert_eq!(single.scratch_bytes(), 0);
        assert!(single.check_scratch(&SelectAddresses::default()).is_ok());
        assert!(spec.check_scratch(&SelectAddresses::default()).is_err());
        assert!(spec.check_scratch(&SelectAddresses { scratch: 66, ..at }).is_err());
        assert!(spec.check_scratch(&at).is_ok());
    }
}
