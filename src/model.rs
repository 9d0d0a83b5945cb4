//! Model facts from a Hugging Face `config.json`: layer and head counts, head_dim, and RoPE.
//!
//! RoPE frequencies (`omega`, the model's `inv_freq`) and the attention scaling `s` are computed
//! in f64 exactly as the serving framework builds them (ALGORITHM.md §1.3): default, `linear`,
//! `llama3` and `yarn` scaling, spelled as `rope_scaling` (with `rope_type` or the legacy `type`)
//! or as the newer `rope_parameters` object. Anything else is refused by name.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind, Result};

/// How a `D`-vector is viewed as `D/2` complex pairs (ALGORITHM.md §1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairingStyle {
    /// NeoX / rotate_half: pair `f` is dims `(f, f + D/2)`. Llama, Qwen and all official statistics.
    Half,
    /// GPT-J: pair `f` is dims `(2f, 2f + 1)`.
    Interleaved,
}

impl PairingStyle {
    /// `half` or `interleaved`.
    pub const fn name(self) -> &'static str {
        match self {
            PairingStyle::Half => "half",
            PairingStyle::Interleaved => "interleaved",
        }
    }

    /// Parse `half` / `interleaved`.
    ///
    /// # Errors
    /// `InvalidArgument` naming `what`.
    pub fn parse(what: &str, s: &str) -> Result<Self> {
        match s {
            "half" => Ok(PairingStyle::Half),
            "interleaved" => Ok(PairingStyle::Interleaved),
            other => Err(Error::invalid_argument(what, "\"half\" or \"interleaved\"", format!("{other:?}"))),
        }
    }

    /// Dimension indices `(re, im)` of pair `f` in a vector of `head_dim` elements.
    #[inline(always)]
    pub const fn dims(self, f: usize, head_dim: usize) -> (usize, usize) {
        match self {
            PairingStyle::Half => (f, f + head_dim / 2),
            PairingStyle::Interleaved => (2 * f, 2 * f + 1),
        }
    }
}

impl std::fmt::Display for PairingStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// RoPE scaling as declared by the model config.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `omega_f = theta^(-2f/D)`.
    Default,
    /// Position interpolation: `omega_f / factor`.
    Linear {
        /// Interpolation factor.
        factor: f64,
    },
    /// Llama 3 frequency-dependent interpolation.
    Llama3 {
        /// Interpolation factor for long wavelengths.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
    /// YaRN: per-pair blend of interpolated and extrapolated frequencies plus an attention scale.
    Yarn {
        /// Scaling factor.
        factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
        /// `beta_fast` (default 32).
        beta_fast: f64,
        /// `beta_slow` (default 1).
        beta_slow: f64,
        /// Resolved attention scaling `s`.
        attention_factor: f64,
        /// Whether the correction range is floored/ceiled (default true).
        truncate: bool,
    },
}

impl RopeScaling {
    /// Short name: `default`, `linear`, `llama3`, `yarn`.
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }
}

/// What a TriAttention round needs to know about a model, from a Hugging Face `config.json`:
/// layer and head counts, head_dim, and RoPE.
///
/// RoPE frequencies (`omega`, the model's `inv_freq`) and the attention scaling `s` are computed
/// in f64 exactly as the serving framework builds them: default, `linear`, `llama3` and `yarn`
/// scaling, spelled as `rope_scaling` (with `rope_type` or the legacy `type`) or as the newer
/// `rope_parameters` object. Anything else is refused by name.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `num_hidden_layers` (L).
    pub num_layers: usize,
    /// `num_attention_heads` (H).
    pub num_heads: usize,
    /// `num_key_value_heads` (Hkv; defaults to H).
    pub num_kv_heads: usize,
    /// `head_dim` (D; defaults to hidden_size / H). Always even.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings`, if given.
    pub max_position_embeddings: Option<f64>,
    /// `_name_or_path` / `model_type`, for reports.
    pub name: Option<String>,
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn field_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n as usize)),
            None => Err(Error::config(key, "a non-negative integer", v)),
        },
    }
}

fn field_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match as_f64(v) {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(Error::config(key, "a finite number", v)),
        },
    }
}

impl ModelConfig {
    /// Read and validate a `config.json`.
    ///
    /// # Errors
    /// `Io` if unreadable; `InvalidConfig` naming the file and field otherwise.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.context(path.display()))
    }

    /// Parse and validate `config.json` text.
    ///
    /// # Errors
    /// `InvalidConfig` naming the field, expected and got.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("not a JSON model config: {e}")))?;
        Self::from_json(&value)
    }

    /// Validate a parsed `config.json`.
    ///
    /// # Errors
    /// `InvalidConfig` naming the field, expected and got.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::config("config", "a JSON object", kind_of(value)))?;
        // Multimodal configs nest the language model.
        if let Some(Value::Object(text)) = obj.get("text_config") {
            if !obj.contains_key("num_hidden_layers") {
                return Self::from_json(&Value::Object(text.clone()));
            }
        }
        let num_layers = field_usize(obj, "num_hidden_layers")?
            .ok_or_else(|| Error::config("num_hidden_layers", "a positive integer", "nothing"))?;
        let num_heads = field_usize(obj, "num_attention_heads")?
            .ok_or_else(|| Error::config("num_attention_heads", "a positive integer", "nothing"))?;
        let num_kv_heads = field_usize(obj, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_layers == 0 {
            return Err(Error::config("num_hidden_layers", "a positive integer", 0));
        }
        if num_heads == 0 {
            return Err(Error::config("num_attention_heads", "a positive integer", 0));
        }
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("a positive divisor of num_attention_heads ({num_heads})"),
                num_kv_heads,
            ));
        }
        let head_dim = match field_usize(obj, "head_dim")? {
            Some(d) => d,
            None => {
                let hidden = field_usize(obj, "hidden_size")?
                    .ok_or_else(|| Error::config("head_dim", "head_dim or hidden_size", "neither"))?;
                if hidden % num_heads != 0 {
                    return Err(Error::config(
                        "hidden_size",
                        format!("a multiple of num_attention_heads ({num_heads}) when head_dim is absent"),
                        hidden,
                    ));
                }
                hidden / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::config("head_dim", "a positive even number", head_dim));
        }
        let params = match obj.get("rope_parameters") {
            Some(Value::Object(p)) => Some(p),
            None | Some(Value::Null) => None,
            Some(other) => return Err(Error::config("rope_parameters", "an object or null", kind_of(other))),
        };
        let scaling = match obj.get("rope_scaling") {
            Some(Value::Object(p)) => Some(p),
            None | Some(Value::Null) => None,
            Some(other) => return Err(Error::config("rope_scaling", "an object or null", kind_of(other))),
        };
        // rope_parameters (newer transformers) carries rope_theta and the scaling in one object.
        let rope_obj = params.or(scaling);
        let rope_theta = match params.and_then(|p| p.get("rope_theta")) {
            Some(_) => field_f64(params.unwrap(), "rope_theta")?,
            None => field_f64(obj, "rope_theta")?,
        }
        .unwrap_or(10000.0);
        if rope_theta <= 1.0 {
            return Err(Error::config("rope_theta", "a number > 1", rope_theta));
        }
        if let Some(prf) = field_f64(obj, "partial_rotary_factor")?.or(match rope_obj {
            Some(p) => field_f64(p, "partial_rotary_factor")?,
            None => None,
        }) {
            if prf < 1.0 {
                return Err(Error::unsupported(format!(
                    "partial_rotary_factor: expected 1.0 (partial rotary embeddings are not supported yet), got {prf}"
                )));
            }
        }
        let max_position_embeddings = field_f64(obj, "max_position_embeddings")?;
        let rope_scaling = parse_scaling(
            rope_obj,
            if params.is_some() { "rope_parameters" } else { "rope_scaling" },
            max_position_embeddings,
        )?;
        let name = obj
            .get("_name_or_path")
            .and_then(Value::as_str)
            .or_else(|| obj.get("model_type").and_then(Value::as_str))
            .map(str::to_string);
        Ok(Self {
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            name,
        })
    }

    /// GQA group size `G = H / Hkv`.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Number of rotary pairs `F = D / 2`.
    pub fn freq_count(&self) -> usize {
        self.head_dim / 2
    }

    /// RoPE angular frequencies `omega_f`, `f = 0..F`, after scaling, in f64.
    pub fn omega(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let f_count = self.freq_count();
        let base: Vec<f64> = (0..f_count).map(|f| self.rope_theta.powf(-(2.0 * f as f64) / d)).collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|w| w / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&w| {
                        let wavelen = 2.0 * std::f64::consts::PI / w;
                        if wavelen < high_wavelen {
                            w
                        } else if wavelen > low_wavelen {
                            w / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * w / factor + smooth * w
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
                let correction_dim = |rotations: f64| {
                    d * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.rope_theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                base.iter()
                    .enumerate()
                    .map(|(f, &w)| {
                        let ramp = ((f as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (w / factor) * (1.0 - extrapolation) + w * extrapolation
                    })
                    .collect()
            }
        }
    }

    /// RoPE attention scaling `s` (1 except YaRN).
    pub fn attention_scaling(&self) -> f64 {
        match &self.rope_scaling {
            RopeScaling::Yarn { attention_factor, .. } => *attention_factor,
            _ => 1.0,
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse_scaling(obj: Option<&Map<String, Value>>, field: &str, max_pos: Option<f64>) -> Result<RopeScaling> {
    let Some(p) = obj else { return Ok(RopeScaling::Default) };
    let kind = match p.get("rope_type").or_else(|| p.get("type")) {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(Error::config(format!("{field}.rope_type"), "a string", kind_of(other))),
    };
    let need = |key: &str| -> Result<f64> {
        field_f64(p, key).map_err(|e| e.context(field))?.ok_or_else(|| {
            Error::config(format!("{field}.{key}"), format!("a number (required for rope_type {kind})"), "nothing")
        })
    };
    let positive = |key: &str, v: f64| -> Result<f64> {
        if v > 0.0 {
            Ok(v)
        } else {
            Err(Error::config(format!("{field}.{key}"), "a positive number", v))
        }
    };
    match kind.as_str() {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: positive("factor", need("factor")?)? }),
        "llama3" => {
            let low = positive("low_freq_factor", need("low_freq_factor")?)?;
            let high = positive("high_freq_factor", need("high_freq_factor")?)?;
            if high <= low {
                return Err(Error::config(
                    format!("{field}.high_freq_factor"),
                    format!("> low_freq_factor ({low})"),
                    high,
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: positive("factor", need("factor")?)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: positive(
                    "original_max_position_embeddings",
                    need("original_max_position_embeddings")?,
                )?,
            })
        }
        "yarn" => {
            let factor = positive("factor", need("factor")?)?;
            let original = match field_f64(p, "original_max_position_embeddings")? {
                Some(v) => v,
                None => max_pos.ok_or_else(|| {
                    Error::config(
                        format!("{field}.original_max_position_embeddings"),
                        "a number (or max_position_embeddings)",
                        "nothing",
                    )
                })?,
            };
            let attention_factor = match field_f64(p, "attention_factor")? {
                Some(a) => a,
                None => match (field_f64(p, "mscale")?, field_f64(p, "mscale_all_dim")?) {
                    (Some(m), Some(mad)) if m != 0.0 && mad != 0.0 => yarn_mscale(factor, m) / yarn_mscale(factor, mad),
                    _ => yarn_mscale(factor, 1.0),
                },
            };
            let truncate = match p.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(other) => return Err(Error::config(format!("{field}.truncate"), "a boolean", kind_of(other))),
            };
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: positive("original_max_position_embeddings", original)?,
                beta_fast: field_f64(p, "beta_fast")?.unwrap_or(32.0),
                beta_slow: field_f64(p, "beta_slow")?.unwrap_or(1.0),
                attention_factor,
                truncate,
            })
        }
        other => Err(Error::unsupported(format!(
            "{field}.rope_type: expected one of default, linear, llama3, yarn, got {other:?} (not supported)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dim_defaults_to_hidden_over_heads() {
        let c = ModelConfig::from_json_str(
            r#"{"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"hidden_size":256}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.omega()[1], 10000f64.powf(-2.0 / 64.0));
    }

    #[test]
    fn unknown_rope_type_is_refused_by_name() {
        let e = ModelConfig::from_json_str(
            r#"{"num_hidden_layers":2,"num_attention_heads":4,"head_dim":64,"rope_scaling":{"type":"dynamic","factor":2}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("dynamic"), "{e}");
    }

    #[test]
    fn odd_head_dim_and_bad_groups_are_refused() {
        let e =
            ModelConfig::from_json_str(r#"{"num_hidden_layers":2,"num_attention_heads":4,"head_dim":63}"#).unwrap_err();
        assert!(e.to_string().contains("head_dim"), "{e}");
        let e = ModelConfig::from_json_str(
            r#"{"num_hidden_layers":2,"num_attention_heads":6,"num_key_value_heads":4,"head_dim":64}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn yarn_attention_factor_defaults() {
        let c = ModelConfig::from_json_str(
            r#"{"num_hidden_layers":1,"num_attention_heads":1,"head_dim":64,"rope_theta":1e6,
                "rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}}"#,
        )
        .unwrap();
        assert!((c.attention_scaling() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        let w = c.omega();
        assert_eq!(w[0], 1.0); // highest frequency is extrapolated (kept)
        assert!((w[31] - 1e6f64.powf(-62.0 / 64.0) / 4.0).abs() < 1e-20); // lowest is interpolated
    }

    #[test]
    fn rope_parameters_spelling() {
        let c = ModelConfig::from_json_str(
            r#"{"num_hidden_layers":1,"num_attention_heads":2,"head_dim":8,
                "rope_parameters":{"rope_type":"linear","factor":2.0,"rope_theta":500000.0}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn partial_rotary_is_refused_by_name() {
        let e = ModelConfig::from_json_str(
            r#"{"num_hidden_layers":1,"num_attention_heads":2,"head_dim":8,"partial_rotary_factor":0.5}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor"), "{e}");
    }
}
