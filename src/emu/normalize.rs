//! `normalize` on the emu backend: cuda/normalize/normalize.cuh run by the SIMT layer through
//! the same [`NormalizeSpec`] and [`NormalizeParams`](crate::cuda::NormalizeParams) as the GPU.

use crate::cuda::normalize::{NormalizeAddresses, NormalizeSpec};
use crate::cuda::params::RowPartial;
use crate::error::{Error, Result};

/// z-score the rows of `raw` in place from the scorer's tile `partials` (layouts as
/// [`NormalizeSpec`] documents; the output stride is the raw stride).
///
/// # Errors
/// `InvalidArgument` for a bad spec (or `out_stride != raw_stride`), `ShapeMismatch` for a short
/// buffer; `Driver` if the SIMT layer fails.
pub fn normalize(spec: &NormalizeSpec, partials: &[RowPartial], raw: &mut [f32]) -> Result<()> {
    spec.validate()?;
    if spec.out_stride != spec.raw_stride {
        return Err(Error::invalid_argument("normalize out stride (in place)", spec.raw_stride, spec.out_stride));
    }
    if partials.len() < spec.partials_len() {
        return Err(Error::shape("normalize partials", format!("at least {}", spec.partials_len()), partials.len()));
    }
    if raw.len() < spec.raw_len() {
        return Err(Error::shape("normalize rows", format!("at least {} f32", spec.raw_len()), raw.len()));
    }
    let ptr = raw.as_mut_ptr() as u64;
    let params = spec.params(&NormalizeAddresses { partials: partials.as_ptr() as u64, raw: ptr, out: ptr });
    // SAFETY: lengths checked against the validated spec; each element is read then written by
    // the same thread, so in place is sound; the borrows outlive the synchronous launch.
    unsafe { super::launch(spec.variant(), &params, spec.grid(), 0) }
}
