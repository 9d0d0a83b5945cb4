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

use rayon::prelude::*;

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
        // Each (layer, head) row is independent: rows are built in parallel, each with the same
        // f64 operations in the same order as one after another.
        let rows_of = WeightRows { stats, style, sigma, config, trig: &trig, vectors_per_head };
        if vectors_per_head == 0 {
            norm.par_chunks_mut(f_count).enumerate().for_each(|(row, n)| rows_of.build(row, n, &mut []));
        } else {
            norm.par_chunks_mut(f_count)
                .zip(weights.par_chunks_mut(vectors_per_head * d))
                .enumerate()
                .for_each(|(row, (n, w))| rows_of.build(row, n, w));
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

/// What building one (layer, head) row of [`RoundWeights`] reads.
struct WeightRows<'a> {
    stats: &'a Stats,
    style: PairingStyle,
    sigma: f64,
    config: &'a ScoreConfig,
    trig: &'a RoundTrig,
    vectors_per_head: usize,
}

impl WeightRows<'_> {
    /// Row `row`: its norm coefficients into `norm` (`F`) and weight vectors into `weights`
    /// (`vectors_per_head x D`). The loops over pairs are plain f64 arithmetic that the compiler
    /// vectorises; where the CPU has AVX-512 or AVX2 they are compiled for it (eight or four
    /// lanes instead of SSE2's two). Every path performs the same IEEE operations in the same
    /// order (Rust never fuses a multiply and an add), so the result does not depend on the path.
    fn build(&self, row: usize, norm: &mut [f32], weights: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: this CPU runs AVX-512F (checked just above).
            return unsafe { self.build_avx512(row, norm, weights) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU runs AVX2 (checked just above).
            return unsafe { self.build_avx2(row, norm, weights) };
        }
        self.build_portable(row, norm, weights)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn build_avx512(&self, row: usize, norm: &mut [f32], weights: &mut [f32]) {
        self.build_portable(row, norm, weights)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn build_avx2(&self, row: usize, norm: &mut [f32], weights: &mut [f32]) {
        self.build_portable(row, norm, weights)
    }

    #[inline(always)]
    fn build_portable(&self, row: usize, norm: &mut [f32], weights: &mut [f32]) {
        let (stats, config, sigma) = (self.stats, self.config, self.sigma);
        let f_count = stats.freq_count();
        let d = stats.head_dim;
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
            norm[f] = (sigma * c) as f32;
        }
        if self.vectors_per_head == 0 {
            return;
        }
        // Per pair f, the real and imaginary columns `σ (re c - im s)` and `σ (re s + im c)` as
        // contiguous arrays (so the loop over f vectorises), placed at the pairing style's
        // dimensions when written out.
        let mut columns = vec![0f64; 6 * f_count];
        let (re, rest) = columns.split_at_mut(f_count);
        let (im, rest) = rest.split_at_mut(f_count);
        let (col_re, rest) = rest.split_at_mut(f_count);
        let (col_im, rest) = rest.split_at_mut(f_count);
        let (sum_re, sum_im) = rest.split_at_mut(f_count);
        re.iter_mut().zip(qr).for_each(|(o, &x)| *o = x as f64);
        im.iter_mut().zip(qi).for_each(|(o, &x)| *o = x as f64);
        let style = self.style;
        let place = |out: &mut [f32], a: &[f64], b: &[f64], scale: Option<f64>| {
            for f in 0..f_count {
                let (dr, di) = style.dims(f, d);
                let (x, y) = match scale {
                    Some(j) => (a[f] / j, b[f] / j),
                    None => (a[f], b[f]),
                };
                out[dr] = x as f32;
                out[di] = y as f32;
            }
        };
        let j_count = self.trig.num_offsets;
        for j in 0..j_count {
            let c = &self.trig.cos[j * f_count..(j + 1) * f_count];
            let sn = &self.trig.sin[j * f_count..(j + 1) * f_count];
            match config.aggregation {
                // The columns summed over offsets in offset order, as they are formed.
                OffsetAggregation::Mean => {
                    let sums = sum_re.iter_mut().zip(sum_im.iter_mut());
                    for ((a, b), (((&x, &y), &c), &sn)) in sums.zip(re.iter().zip(im.iter()).zip(c).zip(sn)) {
                        *a += sigma * (x * c - y * sn);
                        *b += sigma * (x * sn + y * c);
                    }
                }
                OffsetAggregation::Max => {
                    let cols = col_re.iter_mut().zip(col_im.iter_mut());
                    for ((a, b), (((&x, &y), &c), &sn)) in cols.zip(re.iter().zip(im.iter()).zip(c).zip(sn)) {
                        *a = sigma * (x * c - y * sn);
                        *b = sigma * (x * sn + y * c);
                    }
                    place(&mut weights[j * d..(j + 1) * d], col_re, col_im, None);
                }
            }
        }
        if config.aggregation == OffsetAggregation::Mean {
            place(weights, sum_re, sum_im, Some(j_count as f64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights as one loop over rows, offsets and pairs (the formula as written): the
    /// parallel, vectorised build must equal it bit for bit.
    fn weights_by_the_formula(
        stats: &Stats,
        style: PairingStyle,
        omega: &[f64],
        sigma: f64,
        r: u64,
        config: &ScoreConfig,
    ) -> (Vec<f32>, Vec<f32>) {
        let (f_count, d) = (stats.freq_count(), stats.head_dim);
        let offsets = geometric_offsets(config.offset_max_length).unwrap();
        let trig = RoundTrig::new(omega, r, &offsets);
        let j_count = offsets.len();
        let vectors = match (config.trig, config.aggregation) {
            (TrigTerm::Excluded, _) => 0,
            (TrigTerm::Included, OffsetAggregation::Mean) => 1,
            (TrigTerm::Included, OffsetAggregation::Max) => j_count,
        };
        let rows = stats.num_layers * stats.num_heads;
        let (mut weights, mut norm) = (vec![0f32; rows * vectors * d], vec![0f32; rows * f_count]);
        for row in 0..rows {
            let base = row * f_count;
            for f in 0..f_count {
                let (re, im) = (stats.q_mean_real[base + f] as f64, stats.q_mean_imag[base + f] as f64);
                let c = match config.norm {
                    NormTerm::MeanResidual => stats.q_abs_mean[base + f] as f64 - (re * re + im * im).sqrt(),
                    NormTerm::MeanModulus => stats.q_abs_mean[base + f] as f64,
                };
                norm[base + f] = (sigma * c) as f32;
            }
            if vectors == 0 {
                continue;
            }
            let mut folded = vec![0f64; d];
            for j in 0..j_count {
                let mut column = vec![0f64; d];
                for f in 0..f_count {
                    let (re, im) = (stats.q_mean_real[base + f] as f64, stats.q_mean_imag[base + f] as f64);
                    let (c, s) = (trig.cos[j * f_count + f], trig.sin[j * f_count + f]);
                    let (dr, di) = style.dims(f, d);
                    column[dr] = sigma * (re * c - im * s);
                    column[di] = sigma * (re * s + im * c);
                }
                match config.aggregation {
                    OffsetAggregation::Mean => folded.iter_mut().zip(&column).for_each(|(a, b)| *a += b),
                    OffsetAggregation::Max => {
                        for (o, v) in
                            weights[(row * j_count + j) * d..(row * j_count + j + 1) * d].iter_mut().zip(&column)
                        {
                            *o = *v as f32;
                        }
                    }
                }
            }
            if config.aggregation == OffsetAggregation::Mean {
                for (o, v) in weights[row * d..(row + 1) * d].iter_mut().zip(&folded) {
                    *o = (v / j_count as f64) as f32;
                }
            }
        }
        (weights, norm)
    }

    #[test]
    fn weights_equal_the_formula_bit_for_bit() {
        let (layers, heads, d) = (3, 5, 64);
        let f = d / 2;
        let value = |i: usize, k: u32| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(k) % 20_011) as f32 / 1_000.0 - 10.0
        };
        let stats = Stats {
            num_layers: layers,
            num_heads: heads,
            head_dim: d,
            rope_style: PairingStyle::Half,
            q_mean_real: (0..layers * heads * f).map(|i| value(i, 1)).collect(),
            q_mean_imag: (0..layers * heads * f).map(|i| value(i, 2)).collect(),
            q_abs_mean: (0..layers * heads * f).map(|i| value(i, 3).abs() + 12.0).collect(),
            sampled_heads: None,
            metadata: Default::default(),
        };
        let omega: Vec<f64> = (0..f).map(|i| 1e6f64.powf(-(i as f64) / f as f64)).collect();
        for style in [PairingStyle::Half, PairingStyle::Interleaved] {
            for config in [
                ScoreConfig::default(),
                ScoreConfig { aggregation: OffsetAggregation::Max, ..ScoreConfig::default() },
                ScoreConfig { norm: NormTerm::MeanModulus, offset_max_length: 100, ..ScoreConfig::default() },
                ScoreConfig { trig: TrigTerm::Excluded, ..ScoreConfig::default() },
            ] {
                let got = RoundWeights::build(&stats, style, &omega, 1.37, 123_457, &config).unwrap();
                let (w, n) = weights_by_the_formula(&stats, style, &omega, 1.37, 123_457, &config);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.weights), bits(&w), "{style:?} {config:?}");
                assert_eq!(bits(&got.norm), bits(&n), "{style:?} {config:?}");
            }
        }
    }

    #[test]
    fn offsets_are_powers_of_two_up_to_the_bound() {
        assert_eq!(geometric_offsets(65536).unwrap().len(), 17);
        assert_eq!(geometric_offsets(1).unwrap(), vec![1]);
        assert_eq!(geometric_offsets(100).unwrap(), vec![1, 2, 4, 8, 16, 32, 64]);
        assert!(geometric_offsets(0).is_err());
    }
}
