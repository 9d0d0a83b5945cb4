//! Per-head query statistics: the native `triattention-calibration-v1` safetensors format.
//!
//! Layout (`shared/data/calibration/README.md`): `q_mean_real`, `q_mean_imag`, `q_abs_mean`, f32
//! `[L, H, F]`; optional `head_present` u8 `[L, H]` and `sampled_heads` i32 `[N, 2]`; string
//! metadata with at least `format`, `rope_style` and `head_dim`. Pair `f` is formed with the
//! file's `rope_style` (ALGORITHM.md §1.2).
//!
//! Submodules: [`pt`] reads the official `torch.save` files without executing pickle code;
//! [`calibrate`] accumulates new statistics from pre-RoPE queries.

pub mod calibrate;
pub mod pt;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{FileDType, Tensor, TensorFile};
use crate::model::{ModelConfig, PairingStyle};

/// The value of the `format` metadata key.
pub const FORMAT: &str = "triattention-calibration-v1";

/// Calibration statistics of every (layer, attention head).
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Layers (L).
    pub num_layers: usize,
    /// Attention heads per layer (H).
    pub num_heads: usize,
    /// Head dimension (D); `F = D / 2` pairs per head.
    pub head_dim: usize,
    /// Pairing style the pairs were formed with.
    pub rope_style: PairingStyle,
    /// `Re q̄`, `[L, H, F]`.
    pub q_mean_real: Vec<f32>,
    /// `Im q̄`, `[L, H, F]`.
    pub q_mean_imag: Vec<f32>,
    /// `a = E|q_f|`, `[L, H, F]`.
    pub q_abs_mean: Vec<f32>,
    /// `(layer, head)` pairs in the source's order, if recorded.
    pub sampled_heads: Option<Vec<[i32; 2]>>,
    /// Every other metadata key (provenance, model facts), written back on save.
    pub metadata: BTreeMap<String, String>,
}

impl Stats {
    /// Number of pairs per head.
    pub fn freq_count(&self) -> usize {
        self.head_dim / 2
    }

    /// Offset of `(layer, head)` in the `[L, H, F]` arrays.
    pub fn offset(&self, layer: usize, head: usize) -> usize {
        (layer * self.num_heads + head) * self.freq_count()
    }

    /// The statistics of layers `layers` and query heads `heads` (a rank's share under tensor
    /// and pipeline parallelism), for a model slice of `kv_heads` KV heads. Sampled heads are
    /// renumbered into the slice; metadata is kept, `num_key_value_heads` set to `kv_heads`.
    ///
    /// # Errors
    /// `InvalidArgument` for an empty range or one beyond the statistics.
    pub fn slice(
        &self,
        layers: std::ops::Range<usize>,
        heads: std::ops::Range<usize>,
        kv_heads: usize,
    ) -> Result<Self> {
        if layers.is_empty() || layers.end > self.num_layers {
            return Err(Error::invalid_argument(
                "statistics layers",
                format!("a range within 0..{}", self.num_layers),
                format!("{layers:?}"),
            ));
        }
        if heads.is_empty() || heads.end > self.num_heads {
            return Err(Error::invalid_argument(
                "statistics heads",
                format!("a range within 0..{}", self.num_heads),
                format!("{heads:?}"),
            ));
        }
        let f = self.freq_count();
        let take = |v: &[f32]| -> Vec<f32> {
            layers
                .clone()
                .flat_map(|l| {
                    v[self.offset(l, heads.start)..self.offset(l, heads.start) + heads.len() * f].iter().copied()
                })
                .collect()
        };
        let sampled_heads = self.sampled_heads.as_ref().map(|pairs| {
            pairs
                .iter()
                .filter(|[l, h]| layers.contains(&(*l as usize)) && heads.contains(&(*h as usize)))
                .map(|[l, h]| [*l - layers.start as i32, *h - heads.start as i32])
                .collect()
        });
        let mut metadata = self.metadata.clone();
        if metadata.contains_key("num_key_value_heads") {
            metadata.insert("num_key_value_heads".into(), kv_heads.to_string());
        }
        Ok(Stats {
            num_layers: layers.len(),
            num_heads: heads.len(),
            head_dim: self.head_dim,
            rope_style: self.rope_style,
            q_mean_real: take(&self.q_mean_real),
            q_mean_imag: take(&self.q_mean_imag),
            q_abs_mean: take(&self.q_abs_mean),
            sampled_heads,
            metadata,
        })
    }

    /// Load and validate a statistics file.
    ///
    /// # Errors
    /// `Io`, or `InvalidFormat`/`ShapeMismatch` naming the file, tensor or key.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = TensorFile::read(path)?;
        Self::from_tensor_file(&file).map_err(|e| {
            if e.message().starts_with(&*path.file_name().unwrap_or_default().to_string_lossy()) {
                e
            } else {
                e.context(path.display())
            }
        })
    }

    /// Validate an in-memory statistics file.
    ///
    /// # Errors
    /// `InvalidFormat`/`ShapeMismatch` naming the tensor or key, expected and got.
    pub fn from_tensor_file(file: &TensorFile) -> Result<Self> {
        match file.meta("format") {
            Some(FORMAT) => {}
            Some(other) => return Err(Error::format(format!("metadata format: expected {FORMAT:?}, got {other:?}"))),
            None => return Err(Error::format(format!("metadata format: expected {FORMAT:?}, got nothing"))),
        }
        let rope_style = PairingStyle::parse(
            "metadata rope_style",
            file.meta("rope_style").ok_or_else(|| {
                Error::format("metadata rope_style: expected \"half\" or \"interleaved\", got nothing")
            })?,
        )?;
        let mean = file.get("q_mean_real")?;
        if mean.dtype != FileDType::Float(crate::DType::F32) || mean.shape.len() != 3 {
            return Err(Error::shape(
                "tensor q_mean_real",
                "F32 [L, H, F]",
                format!("{} {:?}", mean.dtype, mean.shape),
            ));
        }
        let (num_layers, num_heads, freq_count) = (mean.shape[0], mean.shape[1], mean.shape[2]);
        if num_layers == 0 || num_heads == 0 || freq_count == 0 {
            return Err(Error::shape("tensor q_mean_real", "non-empty [L, H, F]", format!("{:?}", mean.shape)));
        }
        let head_dim = file
            .meta_usize("head_dim")?
            .ok_or_else(|| Error::format(format!("metadata head_dim: expected {}, got nothing", 2 * freq_count)))?;
        if head_dim != 2 * freq_count {
            return Err(Error::shape(
                "metadata head_dim",
                format!("2 x the last axis of q_mean_real = {}", 2 * freq_count),
                head_dim,
            ));
        }
        let shape = [num_layers, num_heads, freq_count];
        let f32s = [FileDType::Float(crate::DType::F32)];
        let q_mean_real = file.get_checked("q_mean_real", &f32s, &shape)?.to_f32_vec();
        let q_mean_imag = file.get_checked("q_mean_imag", &f32s, &shape)?.to_f32_vec();
        let q_abs_mean = file.get_checked("q_abs_mean", &f32s, &shape)?.to_f32_vec();
        if let Some(t) = file.tensors.get("head_present") {
            let t = file.get_checked("head_present", &[FileDType::U8], &[num_layers, num_heads]).map(|_| t)?;
            if let Some(i) = t.data.iter().position(|&b| b == 0) {
                return Err(Error::unsupported(format!(
                    "tensor head_present: expected every head present, got layer {} head {} missing (partial statistics are not supported yet)",
                    i / num_heads,
                    i % num_heads
                )));
            }
        }
        let sampled_heads = match file.tensors.get("sampled_heads") {
            None => None,
            Some(t) => {
                if t.dtype != FileDType::I32 && t.dtype != FileDType::I64 || t.shape.len() != 2 || t.shape[1] != 2 {
                    return Err(Error::shape(
                        "tensor sampled_heads",
                        "I32 [N, 2]",
                        format!("{} {:?}", t.dtype, t.shape),
                    ));
                }
                let v = t.to_i64_vec();
                let mut pairs = Vec::with_capacity(v.len() / 2);
                for p in v.chunks_exact(2) {
                    if p[0] < 0 || p[0] as usize >= num_layers || p[1] < 0 || p[1] as usize >= num_heads {
                        return Err(Error::shape(
                            "tensor sampled_heads",
                            format!("(layer < {num_layers}, head < {num_heads}) pairs"),
                            format!("({}, {})", p[0], p[1]),
                        ));
                    }
                    pairs.push([p[0] as i32, p[1] as i32]);
                }
                Some(pairs)
            }
        };
        for (name, values) in
            [("q_mean_real", &q_mean_real), ("q_mean_imag", &q_mean_imag), ("q_abs_mean", &q_abs_mean)]
        {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                let f = freq_count;
                return Err(Error::format(format!(
                    "tensor {name}: expected finite values, got {} at [{}, {}, {}]",
                    values[i],
                    i / (num_heads * f),
                    (i / f) % num_heads,
                    i % f
                )));
            }
        }
        for (key, expected) in
            [("num_layers", num_layers), ("num_attention_heads", num_heads), ("freq_count", freq_count)]
        {
            if let Some(v) = file.meta_usize(key)? {
                if v != expected {
                    return Err(Error::shape(format!("metadata {key}"), format!("{expected} (from q_mean_real)"), v));
                }
            }
        }
        let metadata = file.metadata.clone();
        Ok(Self {
            num_layers,
            num_heads,
            head_dim,
            rope_style,
            q_mean_real,
            q_mean_imag,
            q_abs_mean,
            sampled_heads,
            metadata,
        })
    }

    /// The statistics as a safetensors file, with complete metadata.
    pub fn to_tensor_file(&self) -> TensorFile {
        let shape = vec![self.num_layers, self.num_heads, self.freq_count()];
        let mut file = TensorFile::default();
        file.tensors.insert("q_mean_real".into(), Tensor::from_f32(shape.clone(), &self.q_mean_real));
        file.tensors.insert("q_mean_imag".into(), Tensor::from_f32(shape.clone(), &self.q_mean_imag));
        file.tensors.insert("q_abs_mean".into(), Tensor::from_f32(shape, &self.q_abs_mean));
        file.tensors.insert(
            "head_present".into(),
            Tensor::from_u8(vec![self.num_layers, self.num_heads], &vec![1u8; self.num_layers * self.num_heads]),
        );
        if let Some(pairs) = &self.sampled_heads {
            let flat: Vec<i32> = pairs.iter().flatten().copied().collect();
            file.tensors.insert("sampled_heads".into(), Tensor::from_i32(vec![pairs.len(), 2], &flat));
        }
        file.metadata = self.metadata.clone();
        file.metadata.insert("format".into(), FORMAT.into());
        file.metadata.insert("rope_style".into(), self.rope_style.name().into());
        file.metadata.insert("head_dim".into(), self.head_dim.to_string());
        file.metadata.insert("freq_count".into(), self.freq_count().to_string());
        file.metadata.insert("num_layers".into(), self.num_layers.to_string());
        file.metadata.insert("num_attention_heads".into(), self.num_heads.to_string());
        file.metadata.entry("layout".into()).or_insert_with(|| {
            format!(
                "q_*: [layer, attention_head, pair]; pair f pairs dims {} for rope_style={}",
                match self.rope_style {
                    PairingStyle::Half => "(f, f+head_dim/2)",
                    PairingStyle::Interleaved => "(2f, 2f+1)",
                },
                self.rope_style
            )
        });
        file
    }

    /// Write atomically to `path`.
    ///
    /// # Errors
    /// `Io` naming the path.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.to_tensor_file().write(path)
    }

    /// Record the model facts the statistics depend on in the metadata.
    pub fn record_model(&mut self, model: &ModelConfig) {
        self.metadata.insert("num_key_value_heads".into(), model.num_kv_heads.to_string());
        self.metadata.insert("rope_theta".into(), format!("{}", model.rope_theta));
        self.metadata.insert("rope_type".into(), model.rope_scaling.name().into());
        if let Some(name) = &model.name {
            self.metadata.entry("model_name".into()).or_insert_with(|| name.clone());
        }
    }

    /// Check the statistics against a model: layers, heads, head_dim, KV heads (if recorded).
    ///
    /// # Errors
    /// `ShapeMismatch` naming the quantity, the statistics' value and the model's.
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        if self.num_layers != model.num_layers {
            return Err(Error::shape(
                "statistics layers",
                format!("{} (num_hidden_layers of the model config)", model.num_layers),
                self.num_layers,
            ));
        }
        if self.num_heads != model.num_heads {
            return Err(Error::shape(
                "statistics attention heads",
                format!("{} (num_attention_heads of the model config)", model.num_heads),
                self.num_heads,
            ));
        }
        if self.head_dim != model.head_dim {
            return Err(Error::shape(
                "statistics head_dim",
                format!("{} (head_dim of the model config)", model.head_dim),
                self.head_dim,
            ));
        }
        if let Some(kv) = self.metadata.get("num_key_value_heads").and_then(|v| v.parse::<usize>().ok()) {
            if kv != model.num_kv_heads {
                return Err(Error::shape(
                    "statistics metadata num_key_value_heads",
                    format!("{} (num_key_value_heads of the model config)", model.num_kv_heads),
                    kv,
                ));
            }
        }
        Ok(())
    }
}
