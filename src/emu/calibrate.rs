//! `calibrate` on the emu backend: the kernel of cuda/calibrate/calibrate.cuh run by the SIMT
//! layer, through the same [`CalibrateSpec`] and [`CalibrateParams`](crate::cuda::CalibrateParams)
//! as the GPU.

use crate::cuda::calibrate::{CalibrateAddresses, CalibrateSpec};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::io::Tensor;
use crate::stats::calibrate::Accumulator;

/// Launch a `calibrate` kernel over raw host addresses.
///
/// # Safety
/// `at.queries` must point to [`CalibrateSpec::queries_len`] elements of the spec's dtype and
/// each sum to [`CalibrateSpec::sums_len`] f64 of host memory that nothing else accesses
/// meanwhile.
pub unsafe fn launch_calibrate(spec: &CalibrateSpec, at: &CalibrateAddresses) -> Result<()> {
    if spec.queries_len() == 0 {
        return Ok(());
    }
    let params = spec.params(at);
    // SAFETY: the caller's contract; params from a validated spec for its own variant.
    unsafe { super::launch(spec.variant(), &params, spec.grid(), 0) }
}

/// Add one layer's queries `[H, T, D]` to the f64 sums `[H, D/2]` (`sum_real += Σ Re z`, …).
///
/// # Errors
/// `ShapeMismatch` when the dtype or a length does not fit `spec`; `Driver` if the SIMT layer
/// reports a divergent barrier.
pub fn calibrate_sums<T: Element>(
    spec: &CalibrateSpec,
    queries: &[T],
    sum_real: &mut [f64],
    sum_imag: &mut [f64],
    sum_abs: &mut [f64],
) -> Result<()> {
    if T::DTYPE != spec.dtype() {
        return Err(Error::shape("calibration query dtype", spec.dtype(), T::DTYPE));
    }
    if queries.len() != spec.queries_len() {
        return Err(Error::shape("calibration queries", format!("{} elements", spec.queries_len()), queries.len()));
    }
    for (what, s) in [("Re sums", &*sum_real), ("Im sums", &*sum_imag), ("|z| sums", &*sum_abs)] {
        if s.len() != spec.sums_len() {
            return Err(Error::shape(format!("calibration {what}"), format!("{} f64", spec.sums_len()), s.len()));
        }
    }
    let at = CalibrateAddresses {
        queries: queries.as_ptr() as u64,
        sum_real: sum_real.as_mut_ptr() as u64,
        sum_imag: sum_imag.as_mut_ptr() as u64,
        sum_abs: sum_abs.as_mut_ptr() as u64,
    };
    // SAFETY: every length checked above against the spec; the borrows outlive the synchronous
    // launch and the sums are borrowed exclusively.
    unsafe { launch_calibrate(spec, &at) }
}

/// Add the pre-RoPE queries of `layer` from the `[H, T, D]` F32, F16 or BF16 tensor `name` to
/// `acc` on the emu backend: [`Accumulator::add_named_tensor`] with the sums formed by the
/// calibrate kernel (equal up to the order of f64 additions).
///
/// # Errors
/// As [`Accumulator::add_named_tensor`]; `Driver` if the SIMT layer fails.
pub fn calibrate_tensor(acc: &mut Accumulator, layer: usize, name: &str, tensor: &Tensor) -> Result<()> {
    let (dtype, tokens) = acc.check_named_tensor(layer, name, tensor)?;
    let spec = CalibrateSpec::new(dtype, acc.num_heads(), tokens, acc.head_dim(), acc.style())?;
    let (real, imag, abs) = acc.layer_sums_mut(layer);
    match dtype {
        DType::F32 => calibrate_sums(&spec, &f32::decode_le(&tensor.data), real, imag, abs)?,
        DType::F16 => calibrate_sums(&spec, &half::f16::decode_le(&tensor.data), real, imag, abs)?,
        DType::Bf16 => calibrate_sums(&spec, &half::bf16::decode_le(&tensor.data), real, imag, abs)?,
    }
    acc.count_tokens(layer, tokens);
    Ok(())
}

/// Add `tokens` tokens of `layer`'s queries (`[H, tokens, D]`) to `acc` on the emu backend:
/// [`Accumulator::add`] through the calibrate kernel.
///
/// # Errors
/// `InvalidArgument` if `layer` is out of range; `ShapeMismatch` for a wrong length.
pub fn calibrate_add<T: Element>(acc: &mut Accumulator, layer: usize, queries: &[T], tokens: usize) -> Result<()> {
    if layer >= acc.num_layers() {
        return Err(Error::invalid_argument("queries layer", format!("< {} (num_layers)", acc.num_layers()), layer));
    }
    let spec = CalibrateSpec::new(T::DTYPE, acc.num_heads(), tokens, acc.head_dim(), acc.style())?;
    let (real, imag, abs) = acc.layer_sums_mut(layer);
    calibrate_sums(&spec, queries, real, imag, abs)?;
    acc.count_tokens(layer, tokens);
    Ok(())
}
