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
    reduce_batch(spec, z, None, out)
}

/// Reduce `spec.num_seqs` sequences in one launch; `prefixes` (one per sequence, each
/// `0..=len`) replaces `spec.prefix` per sequence when given.
///
/// # Errors
/// As [`reduce`]; `ShapeMismatch` for a prefix list that is not one per sequence,
/// `InvalidArgument` for a prefix past `len`.
pub fn reduce_batch(spec: &ReduceSpec, z: &[f32], prefixes: Option<&[i32]>, out: &mut [f32]) -> Result<()> {
    spec.validate()?;
    if let Some(p) = prefixes {
        if p.len() != spec.num_seqs {
            return Err(Error::shape("reduce prefixes", spec.num_seqs, p.len()));
        }
        if let Some(&bad) = p.iter().find(|&&x| x < 0 || x as usize > spec.len) {
            return Err(Error::invalid_argument("reduce prefix", format!("0..={}", spec.len), bad));
        }
    }
    if z.len() < spec.z_len() {
        return Err(Error::shape("reduce input", format!("at least {} f32", spec.z_len()), z.len()));
    }
    if out.len() < spec.out_len() {
        return Err(Error::shape("reduce output", format!("at least {} f32", spec.out_len()), out.len()));
    }
    let params = spec.params(&ReduceAddresses {
        z: z.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
        prefixes: prefixes.map_or(0, |p| p.as_ptr() as u64),
    });
    // SAFETY: all lengths (and the prefixes' range) checked against the validated spec; the borrows outlive the
    // synchronous launch and `out` is borrowed exclusively.
    unsafe { super::launch(spec.variant(), &params, spec.grid(), 0) }
}
