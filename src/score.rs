//! The per-key score of ALGORITHM.md §2.2 in its matrix form (§9), backend-neutral parts.
//!
//! For one round (`round_start = r`), one layer and one attention head with statistics `q̄`, `a`:
//!
//! ```text
//! trig_j(k̃) = Σ_f σ (A_f cos(t_j ω_f) − B_f sin(t_j ω_f)),  t_j = r + o_j,  A + iB = q̄_f conj(k̃_f)
//! e(k̃)      = Σ_f σ c_f |k̃_f|,                               c_f = a_f − |q̄_f|  (or a_f)
//! score     = AGG_j trig_j(k̃) + e(k̃)
//! ```
//!
//! which is `k̃ · W[:, j]` with `W[:, j]` the mean query rotated to `t_j` (§9.1). This module builds
//! the per-round weights — `cos`/`sin(t_j ω_f)` evaluated in f64, weights formed in f64 and
//! rounded once to f32 — that every backend's scoring kernel consumes: one folded vector `w̄`
//! per head for mean aggregation (§9.2), the full `J × D` matrix per head for max.

use crate::error::{Error, Result};
use crate::model::PairingStyle;
use crate::stats::Stats;

/// How the per-offset scores are combined (§2.1 step 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OffsetAggregation {
    /// Mean over offsets: folds into one dot product per head (the default everywhere).
    #[default]
    Mean,
    /// Max over offsets: a small matrix product per head.
    Max,
}

/// The position-independent norm term's coefficient (the `disable_mlr` switch, §2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NormTerm {
    /// `c_f = a_f − |q̄_f|` (MLR; the default).
    #[default]
    MeanResidual,
    /// `c_f = a_f` (`disable_mlr`).
    MeanModulus,
}

/// Whether the trigonometric term is scored (the `disable_trig` switch, §2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TrigTerm {
    /// `score = AGG_j trig_j + e` (the default).
    #[default]
    Included,
    /// `score = e` only (`disable_trig`).
    Excluded,
}

/// Everything that shapes the score formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScoreConfig {
    /// Largest geometric offset bound: offsets `1, 2, 4, … ≤ offset_max_length` (default 65536, J = 17).
    pub offset_max_length: u64,
    /// Mean or max over offsets.
    pub aggregation: OffsetAggregation,
    /// MLR or plain modulus coefficient.
    pub norm: NormTerm,
    /// Trigonometric term on or off.
    pub trig: TrigTerm,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            offset_max_length: 65536,
            aggregation: OffsetAggregation::Mean,
            norm: NormTerm::MeanResidual,
            trig: TrigTerm::Included,
        }
    }
}

/// Geometric offsets `[1, 2, 4, …, 2^m]` with `2^m ≤ offset_max_length` (§2.4).
///
/// # Errors
/// `InvalidArgument` if `offset_max_length < 1`.
pub fn geometric_offsets(offset_max_length: u64) -> Result<Vec<u64>> {
    if offset_max_length < 1 {
        return Err(Error::invalid_argument("offset_max_length", ">= 1", offset_max_length));
    }
    Ok((0..64).map(|m| 1u64 << m).take_while(|&o| o <= offset_max_length).collect())
}

/// `cos`/`sin(t_j ω_f)` for one round, in f64: `[J, F]` each, shared by every head and layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundTrig {
    /// Number of offsets J.
    pub num_offsets: usize,
    /// Number of pairs F.
    pub freq_count: usize,
    /// `cos(t_j ω_f)`, `[J, F]`.
    pub cos: Vec<f64>,
    /// `sin(t_j ω_f)`, `[J, F]`.
    pub sin: Vec<f64>,
}

impl RoundTrig {
    /// Evaluate the round's trigonometry at `t_j = round_start + o_j` in f64.
    ///
    /// `t_j ω_f` is formed as one f64 product (`t_j` is an exact integer), so phases in the
    /// hundreds of thousands of radians keep ~1e-11 absolute accuracy (§2.6).
    pub fn new(omega: &[f64], round_start: u64, offsets: &[u64]) -> Self {
        let f_count = omega.len();
        let mut cos = Vec::with_capacity(offsets.len() * f_count);
        let mut sin = Vec::with_capacity(offsets.len() * f_count);
        for &o in offsets {
            let t = (round_start + o) as f64;
            for &w in omega {
                let (s, c) = (t * w).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        Self { num_offsets: offsets.len(), freq_count: f_count, cos, sin }
    }
}

/// Per-round scoring weights of every (layer, attention head), in f32.
///
/// Mean aggregation: `weights` is `[L, H, D]`, the folded `w̄`. Max: `[L, H, J, D]`. With
/// [`TrigTerm::Excluded`] `weights` is empty. `norm` is `[L, H, F]` (`σ c_f`). Row `d` of a weight
/// vector multiplies key element `d` as stored, so the pairing style is already applied.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundWeights {
    /// Layers L.
    pub num_layers: usize,
    /// Attention heads H.
    pub num_heads: usize,
    /// Head dimension D.
    pub head_dim: usize,
    /// Weight vectors per head: 1 (mean), J (max) or 0 (trig excluded).
    pub vectors_per_head: usize,
    /// Aggregation these weights were built for.
    pub aggregation: OffsetAggregation,
    /// `[L, H, vectors_per_head, D]`.
    pub weights: Vec<f32>,
    /// `[L, H, F]`.
    pub norm: Vec<f32>,
}

impl RoundWeights {
    /// Build the weights of one round.
    ///
    /// `omega` has `F` entries (the model's RoPE frequencies), `sigma` is `s²` (the square of
    /// the RoPE attention scaling), `style` pairs dimensions as the cache stores them.
    ///
    /// # Errors
    /// `ShapeMismatch` if `omega` does not have `F` entries; `InvalidArgument` for bad offsets.
    pub fn build(
        stats: &Stats,
        style: PairingStyle,
        omega: &[f64],
        sigma: f64,
        round_start: u64,
        config: &ScoreConfig,
    ) -> Result<Self> {
        let f_count = stats.freq_count();
        let d = stats.head_dim;
        if omega.len() != f_count {
            return Err(Error::shape("omega", format!("{f_count} frequencies (head_dim / 2)"), omega.len()));
        }
        let offsets = geometric_offsets(config.offset_max_length)?;
        let trig = RoundTrig::new(omega, round_start, &offsets);
        let j_count = offsets.len();
        let vectors_per_head = match (config.trig, config.aggregation) {
            (TrigTerm::Excluded, _) => 0,
            (TrigTerm::Included, OffsetAggregation::Mean) => 1,
            (TrigTerm::Included, OffsetAggregation::Max) => j_count,
        };
        let rows = stats.num_layers * stats.num_heads;
        let mut weights = vec![0f32; rows * vectors_per_head * d];
        let mut norm = vec![0f32; rows * f_count];
        let mut column = vec![0f64; d];
        let mut folded = vec![0f64; d];
        for row in 0..rows {
            let base = row * f_count;
            let qr = &stats.q_mean_real[base..base + f_count];
            let qi = &stats.q_mean_imag[base..base + f_count];
            let qa = &stats.q_abs_mean[base..base + f_count];
            for f in 0..f_count {
                let (re, im) = (qr[f] as f64, qi[f] as f64);
                let c = match config.norm {
                    NormTerm::MeanResidual => qa[f] as f64 - (re * re + im * im).sqrt(),
                    NormTerm::MeanModulus => qa[f] as f64,
                };
                norm[base + f] = (sigma * c) as f32;
            }
            if vectors_per_head == 0 {
                continue;
            }
            folded.iter_mut().for_each(|x| *x = 0.0);
            for j in 0..j_count {
                for f in 0..f_count {
                    let (re, im) = (qr[f] as f64, qi[f] as f64);
                    let (c, s) = (trig.cos[j * f_count + f], trig.sin[j * f_count + f]);
                    let (dr, di) = style.dims(f, d);
                    column[dr] = sigma * (re * c - im * s);
                    column[di] = sigma * (re * s + im * c);
                }
                match config.aggregation {
                    OffsetAggregation::Mean => folded.iter_mut().zip(&column).for_each(|(a, b)| *a += b),
                    OffsetAggregation::Max => {
                        let out = &mut weights[(row * j_count + j) * d..(row * j_count + j + 1) * d];
                        out.iter_mut().zip(&column).for_each(|(o, &v)| *o = v as f32);
                    }
                }
            }
            if config.aggregation == OffsetAggregation::Mean {
                let out = &mut weights[row * d..(row + 1) * d];
                out.iter_mut().zip(&folded).for_each(|(o, &v)| *o = (v / j_count as f64) as f32);
            }
        }
        Ok(Self {
            num_layers: stats.num_layers,
            num_heads: stats.num_heads,
            head_dim: d,
            vectors_per_head,
            aggregation: config.aggregation,
            weights,
            norm,
        })
    }

    /// The weight vectors of `(layer, head)`: `vectors_per_head × D` values.
    pub fn head_weights(&self, layer: usize, head: usize) -> &[f32] {
        let n = self.vectors_per_head * self.head_dim;
        let start = (layer * self.num_heads + head) * n;
        &self.weights[start..start + n]
    }

    /// The norm coefficients `σ c` of `(layer, head)`: `F` values.
    pub fn head_norm(&self, layer: usize, head: usize) -> &[f32] {
        let f = self.head_dim / 2;
        let start = (layer * self.num_heads + head) * f;
        &self.norm[start..start + f]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_powers_of_two_up_to_the_bound() {
        assert_eq!(geometric_offsets(65536).unwrap().len(), 17);
        assert_eq!(geometric_offsets(1).unwrap(), vec![1]);
        assert_eq!(geometric_offsets(100).unwrap(), vec![1, 2, 4, 8, 16, 32, 64]);
        assert!(geometric_offsets(0).is_err());
    }
}
