//! Streaming calibration (ALGORITHM.md §5.1): per-head means of the pre-RoPE query pairs.
//!
//! For every layer `l`, attention head `h` and pair `f`, the [`Accumulator`] sums over all tokens
//! given so far, in f64, `Re z`, `Im z` and `|z| = sqrt(Re² + Im²)` of the complex pair `z` formed
//! with the chosen [`PairingStyle`] from the f32-widened query values, and counts the tokens of each
//! layer. Queries may arrive in any number of chunks and documents; [`Accumulator::finish`] divides
//! by each layer's token count and rounds the means to f32.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::io::{shape_str, FileDType, Tensor};
use crate::model::PairingStyle;
use crate::stats::Stats;

/// Most `(layer, head, pair)` sums one accumulator may hold (far above any real model).
const MAX_SUMS: usize = 1 << 26;

/// Running sums of pre-RoPE query statistics for every (layer, attention head, pair).
#[derive(Clone, Debug)]
pub struct Accumulator {
    num_layers: usize,
    num_heads: usize,
    head_dim: usize,
    style: PairingStyle,
    /// `Σ Re z`, `[L, H, F]`.
    sum_real: Vec<f64>,
    /// `Σ Im z`, `[L, H, F]`.
    sum_imag: Vec<f64>,
    /// `Σ |z|`, `[L, H, F]`.
    sum_abs: Vec<f64>,
    /// Tokens added per layer.
    tokens: Vec<u64>,
}

impl Accumulator {
    /// An empty accumulator for `num_layers` layers of `num_heads` attention heads of dimension
    /// `head_dim`, pairing dimensions with `style`.
    ///
    /// # Errors
    /// `InvalidArgument` naming the quantity if a count is 0, `head_dim` is odd, or the sums would
    /// not fit in memory.
    pub fn new(num_layers: usize, num_heads: usize, head_dim: usize, style: PairingStyle) -> Result<Self> {
        if num_layers == 0 {
            return Err(Error::invalid_argument("calibration num_layers", ">= 1", num_layers));
        }
        if num_heads == 0 {
            return Err(Error::invalid_argument("calibration num_heads", ">= 1", num_heads));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::invalid_argument("calibration head_dim", "an even number >= 2", head_dim));
        }
        let n = num_layers
            .checked_mul(num_heads)
            .and_then(|x| x.checked_mul(head_dim / 2))
            .filter(|&n| n <= MAX_SUMS)
            .ok_or_else(|| {
                Error::invalid_argument(
                    "calibration layers x heads x head_dim/2",
                    format!("at most {MAX_SUMS}"),
                    format!("{num_layers} x {num_heads} x {}", head_dim / 2),
                )
            })?;
        Ok(Self {
            num_layers,
            num_heads,
            head_dim,
            style,
            sum_real: vec![0.0; n],
            sum_imag: vec![0.0; n],
            sum_abs: vec![0.0; n],
            tokens: vec![0; num_layers],
        })
    }

    /// Layers (L).
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Attention heads per layer (H).
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Head dimension (D).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The pairing style.
    pub fn style(&self) -> PairingStyle {
        self.style
    }

    /// Tokens added so far to `layer` (0 for a layer out of range).
    pub fn tokens(&self, layer: usize) -> u64 {
        self.tokens.get(layer).copied().unwrap_or(0)
    }

    fn check_layer(&self, layer: usize, what: &str) -> Result<()> {
        if layer >= self.num_layers {
            return Err(Error::invalid_argument(
                format!("{what} layer"),
                format!("< {} (num_layers)", self.num_layers),
                layer,
            ));
        }
        Ok(())
    }

    /// Add the pre-RoPE queries of `layer` for `tokens` tokens: `queries` is `[H, tokens, D]`,
    /// row-major.
    ///
    /// # Errors
    /// `InvalidArgument` if `layer` is out of range; `ShapeMismatch` naming `queries` with the
    /// expected and actual length.
    pub fn add<T: Element>(&mut self, layer: usize, queries: &[T], tokens: usize) -> Result<()> {
        self.check_layer(layer, "queries")?;
        let (h, d) = (self.num_heads, self.head_dim);
        let expected = h.checked_mul(tokens).and_then(|x| x.checked_mul(d));
        if expected != Some(queries.len()) {
            return Err(Error::shape(
                format!("queries of layer {layer}"),
                format!("{h} x {tokens} x {d} = [H, T, D] elements"),
                format!("{} elements", queries.len()),
            ));
        }
        self.accumulate(layer, tokens, |i| queries[i].to_f32());
        Ok(())
    }

    /// Add the pre-RoPE queries of `layer` from a `[H, T, D]` F32, F16 or BF16 tensor; messages
    /// call it `q.<layer>`, the name it has in a queries file (see [`Self::add_named_tensor`]).
    ///
    /// # Errors
    /// As [`Self::add_named_tensor`].
    pub fn add_tensor(&mut self, layer: usize, tensor: &Tensor) -> Result<()> {
        self.add_named_tensor(layer, &format!("q.{layer}"), tensor)
    }

    /// Add the pre-RoPE queries of `layer` from the `[H, T, D]` F32, F16 or BF16 tensor `name`.
    ///
    /// # Errors
    /// `InvalidArgument` if `layer` is out of range; `ShapeMismatch` naming the tensor with the
    /// expected and actual dtype or shape (or byte length, for a malformed tensor).
    pub fn add_named_tensor(&mut self, layer: usize, name: &str, tensor: &Tensor) -> Result<()> {
        let (dtype, tokens) = self.check_named_tensor(layer, name, tensor)?;
        let bytes = &tensor.data;
        match dtype {
            DType::F32 => self.accumulate(layer, tokens, |i| {
                f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
            }),
            DType::F16 => {
                self.accumulate(layer, tokens, |i| half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32())
            }
            DType::Bf16 => {
                self.accumulate(layer, tokens, |i| half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32())
            }
        }
        Ok(())
    }

    /// The running sums `(Σ Re z, Σ Im z, Σ |z|)`, each `[L, H, F]` f64.
    pub fn sums(&self) -> (&[f64], &[f64], &[f64]) {
        (&self.sum_real, &self.sum_imag, &self.sum_abs)
    }

    /// The running sums of `layer` (`[H, F]` each), for backends that add to them; the caller
    /// then records the tokens with [`Self::count_tokens`]. Callers have checked the layer.
    #[cfg_attr(not(feature = "emu"), allow(dead_code))]
    pub(crate) fn layer_sums_mut(&mut self, layer: usize) -> (&mut [f64], &mut [f64], &mut [f64]) {
        let hf = self.num_heads * (self.head_dim / 2);
        let range = layer * hf..(layer + 1) * hf;
        (&mut self.sum_real[range.clone()], &mut self.sum_imag[range.clone()], &mut self.sum_abs[range])
    }

    /// Record `tokens` more tokens of `layer` (after adding them to [`Self::layer_sums_mut`]).
    #[cfg_attr(not(feature = "emu"), allow(dead_code))]
    pub(crate) fn count_tokens(&mut self, layer: usize, tokens: usize) {
        self.tokens[layer] += tokens as u64;
    }

    /// Check that `tensor` is `[H, T, D]` F32, F16 or BF16 queries for `layer`; its dtype and T.
    pub(crate) fn check_named_tensor(&self, layer: usize, name: &str, tensor: &Tensor) -> Result<(DType, usize)> {
        self.check_layer(layer, &format!("tensor {name}"))?;
        let (h, d) = (self.num_heads, self.head_dim);
        let dtype = match tensor.dtype {
            FileDType::Float(dt) => dt,
            other => return Err(Error::shape(format!("tensor {name} dtype"), "F32, F16 or BF16", other)),
        };
        let tokens = match tensor.shape.as_slice() {
            &[th, t, td] if th == h && td == d => t,
            _ => {
                return Err(Error::shape(
                    format!("tensor {name} shape"),
                    format!("[{h}, T, {d}] ([heads, tokens, head_dim])"),
                    shape_str(&tensor.shape),
                ))
            }
        };
        let numel = h.checked_mul(tokens).and_then(|x| x.checked_mul(d));
        let bytes = &tensor.data;
        if numel.and_then(|n| n.checked_mul(dtype.size())) != Some(bytes.len()) {
            return Err(Error::shape(
                format!("tensor {name} data"),
                format!(
                    "{} x {} bytes for shape {}",
                    numel.unwrap_or(usize::MAX),
                    dtype.size(),
                    shape_str(&tensor.shape)
                ),
                format!("{} bytes", bytes.len()),
            ));
        }
        Ok((dtype, tokens))
    }

    /// Add `tokens` tokens of `layer`, element `i` of the `[H, T, D]` block being `load(i)`.
    /// Callers have checked the layer and the length.
    fn accumulate(&mut self, layer: usize, tokens: usize, load: impl Fn(usize) -> f32 + Sync) {
        let (h, d, f) = (self.num_heads, self.head_dim, self.head_dim / 2);
        let style = self.style;
        let range = layer * h * f..(layer + 1) * h * f;
        let real = &mut self.sum_real[range.clone()];
        let imag = &mut self.sum_imag[range.clone()];
        let abs = &mut self.sum_abs[range];
        real.par_chunks_mut(f).zip(imag.par_chunks_mut(f)).zip(abs.par_chunks_mut(f)).enumerate().for_each(
            |(head, ((real, imag), abs))| {
                // Local sums per head and chunk, added to the running sums once.
                let mut sr = vec![0f64; f];
                let mut si = vec![0f64; f];
                let mut sa = vec![0f64; f];
                let base = head * tokens * d;
                for t in 0..tokens {
                    let row = base + t * d;
                    for p in 0..f {
                        let (ri, ii) = style.dims(p, d);
                        let re = load(row + ri) as f64;
                        let im = load(row + ii) as f64;
                        sr[p] += re;
                        si[p] += im;
                        sa[p] += (re * re + im * im).sqrt();
                    }
                }
                for p in 0..f {
                    real[p] += sr[p];
                    imag[p] += si[p];
                    abs[p] += sa[p];
                }
            },
        );
        self.tokens[layer] += tokens as u64;
    }

    /// The statistics: every sum divided by its layer's token count, rounded to f32.
    ///
    /// `sampled_heads` lists every (layer, head), layer-major; the metadata records
    /// `calibration_tokens` (the token count, or a JSON list of per-layer counts if they differ).
    ///
    /// # Errors
    /// `InvalidArgument` naming the first layer that received no tokens.
    pub fn finish(self) -> Result<Stats> {
        if let Some(layer) = self.tokens.iter().position(|&t| t == 0) {
            return Err(Error::invalid_argument(
                format!("calibration queries of layer {layer}"),
                "at least one token",
                "0 tokens",
            ));
        }
        let hf = self.num_heads * (self.head_dim / 2);
        let mean = |sums: &[f64]| -> Vec<f32> {
            sums.chunks(hf)
                .zip(&self.tokens)
                .flat_map(|(layer, &t)| layer.iter().map(move |&s| (s / t as f64) as f32))
                .collect()
        };
        let q_mean_real = mean(&self.sum_real);
        let q_mean_imag = mean(&self.sum_imag);
        let q_abs_mean = mean(&self.sum_abs);
        let sampled_heads = (0..self.num_layers)
            .flat_map(|l| (0..self.num_heads).map(move |h| [l as i32, h as i32]))
            .collect::<Vec<_>>();
        let mut metadata = BTreeMap::new();
        let first = self.tokens[0];
        let tokens = if self.tokens.iter().all(|&t| t == first) {
            first.to_string()
        } else {
            serde_json::Value::from(self.tokens.clone()).to_string()
        };
        metadata.insert("calibration_tokens".to_string(), tokens);
        Ok(Stats {
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            head_dim: self.head_dim,
            rope_style: self.style,
            q_mean_real,
            q_mean_imag,
            q_abs_mean,
            sampled_heads: Some(sampled_heads),
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_case_by_hand() {
        // One layer, one head, D = 4, two tokens, half pairing: pairs (x0, x2) and (x1, x3).
        let mut acc = Accumulator::new(1, 1, 4, PairingStyle::Half).unwrap();
        acc.add(0, &[3.0f32, 1.0, 4.0, 0.0, -3.0, 1.0, 4.0, 0.0], 2).unwrap();
        let s = acc.finish().unwrap();
        assert_eq!(s.q_mean_real, vec![0.0, 1.0]);
        assert_eq!(s.q_mean_imag, vec![4.0, 0.0]);
        assert_eq!(s.q_abs_mean, vec![5.0, 1.0]);
        assert_eq!(s.metadata["calibration_tokens"], "2");
        // Interleaved: pairs (x0, x1) and (x2, x3).
        let mut acc = Accumulator::new(1, 1, 4, PairingStyle::Interleaved).unwrap();
        acc.add(0, &[3.0f32, 4.0, 0.0, 1.0], 1).unwrap();
        let s = acc.finish().unwrap();
        assert_eq!((s.q_mean_real, s.q_mean_imag, s.q_abs_mean), (vec![3.0, 0.0], vec![4.0, 1.0], vec![5.0, 1.0]));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(Accumulator::new(1, 1, 3, PairingStyle::Half).is_err());
        assert!(Accumulator::new(0, 1, 4, PairingStyle::Half).is_err());
        assert!(Accumulator::new(usize::MAX, usize::MAX, 4, PairingStyle::Half).is_err());
        let mut acc = Accumulator::new(2, 1, 4, PairingStyle::Half).unwrap();
        let e = acc.add(0, &[0f32; 7], 2).unwrap_err();
        assert!(e.message().contains("queries of layer 0: expected 1 x 2 x 4"), "{e}");
        assert!(acc.add(2, &[0f32; 4], 1).is_err());
        acc.add(0, &[1f32; 4], 1).unwrap();
        let e = acc.finish().unwrap_err();
        assert!(e.message().contains("layer 1"), "{e}");
    }
}
