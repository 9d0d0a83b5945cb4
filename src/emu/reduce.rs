//! `reduce` on the emu backend: cuda/reduce/reduce.cuh run by the SIMT layer through the same
//! [`ReduceSpec`] and [`ReduceParams`](crate::cuda::ReduceParams) as the GPU.

use crate::cuda::reduce::{ReduceAddresses, ReduceSpec};
use crate::error::{Error, Result};

/// Reduce `z` into `out` (layouts as [`ReduceSpec`] documents): [`crate::cpu::reduce::reduce`]
/// plus `+inf` on protected slots, bit for bit.
///
/// # Errors
/// `InvalidArgument` for a bad spec, `ShapeMismatch` for a short buffer; `Driver` if the SIMT
/// layer fails.
pub fn reduce(spec: &ReduceSpec, z: &[f32], out: &mut [f32]) -> Result<()> {
    spec.validate()?;
    if z.len() < spec.z_len() {
        return Err(Error::shape("reduce input", format!("at least {} f32", spec.z_len()), z.len()));
    }
    if out.len() < spec.out_len() {
        return Err(Error::shape("reduce output", format!("at least {} f32", spec.out_len()), out.len()));
    }
    let params = spec.params(&ReduceAddresses { z: z.as_ptr() as u64, out: out.as_mut_ptr() as u64 });
    // SAFETY: both lengths checked against the validated spec; the borrows outlive the
    // synchronous launch and `out` is borrowed exclusively.
    unsafe { super::launch(spec.variant(), &params, spec.grid(), 0) }
}
