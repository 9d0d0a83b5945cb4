//! SmolLM2-135M (Llama architecture) on the CPU: GGUF weights through candle's quantized matmuls,
//! and our own forward pass, so the engine (this crate) owns the KV cache and can tap the
//! pre-RoPE queries. One token per step: the prompt is fed token by token (what teacher forcing
//! does too), each step writes its post-RoPE key and value into the cache and attends over every
//! slot the cache holds. Positions keep counting after eviction: RoPE uses the token's absolute
//! position, not its slot.
//!
//! RoPE pairing: GGUF files of Llama models carry Q/K weights permuted for llama.cpp's RoPE, which
//! rotates adjacent dimensions (2i, 2i+1) — triattn's `PairingStyle::Interleaved` — not the
//! Hugging Face halves (i, i + D/2).

use std::path::Path;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{Device, Module, Tensor};
use triattn::{KvCache, ModelConfig, PairingStyle};

use crate::AppResult;

/// What the GGUF says of the model.
#[derive(Clone, Debug)]
pub struct Config {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_theta: f64,
    pub context: usize,
    /// Beginning-of-sequence token (the chat template starts without it).
    pub bos: u32,
    pub eos: u32,
}

impl Config {
    /// The model as triattn sees it (a Hugging Face style config: layers, heads, RoPE theta).
    pub fn triattn_model(&self) -> AppResult<ModelConfig> {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context,
        });
        Ok(ModelConfig::from_json(&json)?)
    }
}

/// The pairing of this model file's RoPE.
pub const PAIRING: PairingStyle = PairingStyle::Interleaved;

struct Layer {
    attn_norm: Vec<f32>,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    ffn_norm: Vec<f32>,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// The weights.
pub struct Model {
    pub config: Config,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    lm_head: QMatMul,
    /// `theta^(-2i/D)` per rotary pair.
    inv_freq: Vec<f64>,
    device: Device,
}

/// What a step shows to an observer (calibration taps pre-RoPE queries; the evaluation reads the
/// attention).
pub trait Observer {
    /// The pre-RoPE queries of `layer`, `[H, D]`.
    fn queries(&mut self, _layer: usize, _q: &[f32]) {}
    /// The attention probabilities of `layer`, `[H, n]` over the cache's `n` slots (this token's
    /// own slot last).
    fn attention(&mut self, _layer: usize, _probs: &[f32], _n: usize) {}
    /// Whether [`Observer::attention`] is wanted (computing it is free; copying it is not).
    fn wants_attention(&self) -> bool {
        false
    }
}

/// An observer that looks at nothing.
pub struct Nobody;
impl Observer for Nobody {}

fn meta_u32(c: &gguf_file::Content, key: &str) -> AppResult<u32> {
    c.metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata {key}: missing"))?
        .to_u32()
        .map_err(|e| format!("{key}: {e}").into())
}

fn meta_f32(c: &gguf_file::Content, key: &str) -> AppResult<f32> {
    c.metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata {key}: missing"))?
        .to_f32()
        .map_err(|e| format!("{key}: {e}").into())
}

impl Model {
    /// Load the GGUF at `path` and its tokenizer.
    ///
    /// # Errors
    /// A file that is not this model's GGUF.
    pub fn load(path: &Path) -> AppResult<(Self, tokenizers::Tokenizer)> {
        let device = Device::Cpu;
        let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| format!("{}: {e}", path.display()))?;
        let heads = meta_u32(&content, "llama.attention.head_count")? as usize;
        let hidden = meta_u32(&content, "llama.embedding_length")? as usize;
        let config = Config {
            layers: meta_u32(&content, "llama.block_count")? as usize,
            heads,
            kv_heads: meta_u32(&content, "llama.attention.head_count_kv")? as usize,
            head_dim: hidden / heads,
            hidden,
            vocab: meta_u32(&content, "llama.vocab_size").map(|v| v as usize).or_else(|_| {
                content.metadata["tokenizer.ggml.tokens"].to_vec().map(Vec::len).map_err(|e| e.to_string())
            })?,
            eps: meta_f32(&content, "llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: f64::from(meta_f32(&content, "llama.rope.freq_base")?),
            context: meta_u32(&content, "llama.context_length")? as usize,
            bos: meta_u32(&content, "tokenizer.ggml.bos_token_id")?,
            eos: meta_u32(&content, "tokenizer.ggml.eos_token_id")?,
        };
        let mut tensor = |name: &str| {
            content.tensor(&mut file, name, &device).map_err(|e| -> crate::AppError { format!("{name}: {e}").into() })
        };
        let vector = |t: &candle_core::quantized::QTensor| -> AppResult<Vec<f32>> {
            Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let embed_q = tensor("token_embd.weight")?;
        let embed = vector(&embed_q)?;
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            layers.push(Layer {
                attn_norm: vector(&tensor(&p("attn_norm"))?)?,
                q: QMatMul::from_qtensor(tensor(&p("attn_q"))?)?,
                k: QMatMul::from_qtensor(tensor(&p("attn_k"))?)?,
                v: QMatMul::from_qtensor(tensor(&p("attn_v"))?)?,
                o: QMatMul::from_qtensor(tensor(&p("attn_output"))?)?,
                ffn_norm: vector(&tensor(&p("ffn_norm"))?)?,
                gate: QMatMul::from_qtensor(tensor(&p("ffn_gate"))?)?,
                up: QMatMul::from_qtensor(tensor(&p("ffn_up"))?)?,
                down: QMatMul::from_qtensor(tensor(&p("ffn_down"))?)?,
            });
        }
        let out_norm = vector(&tensor("output_norm.weight")?)?;
        // Tied embeddings: the output projection is the token embedding unless the file has one.
        let lm_head = match tensor("output.weight") {
            Ok(t) => QMatMul::from_qtensor(t)?,
            Err(_) => QMatMul::from_qtensor(embed_q)?,
        };
        if embed.len() != config.vocab * config.hidden {
            return Err(format!(
                "token_embd: expected {} x {} values, got {}",
                config.vocab,
                config.hidden,
                embed.len()
            )
            .into());
        }
        let d = config.head_dim;
        let inv_freq = (0..d / 2).map(|i| config.rope_theta.powf(-2.0 * i as f64 / d as f64)).collect();
        let tokenizer = crate::tokenizer::from_gguf(&content)?;
        Ok((Self { config, embed, layers, out_norm, lm_head, inv_freq, device }, tokenizer))
    }

    /// An empty cache with room for `capacity` slots.
    pub fn cache(&self, capacity: usize) -> KvCache<f32> {
        let c = &self.config;
        KvCache::new(c.layers, c.kv_heads, c.head_dim, c.head_dim, capacity)
    }

    fn matvec(&self, w: &QMatMul, x: &[f32]) -> AppResult<Vec<f32>> {
        let t = Tensor::from_slice(x, (1, x.len()), &self.device)?;
        Ok(w.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn rms_norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let scale = 1.0 / (ms + self.config.eps).sqrt();
        x.iter().zip(w).map(|(v, g)| v * scale * g).collect()
    }

    /// `(cos, sin)` of every rotary pair's angle at `position`.
    fn rope_angles(&self, position: u64) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|f| {
                let a = position as f64 * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip()
    }

    /// Rotate each head of `x` (`[heads, D]`) by the angles `(cos, sin)`: pairs (2i, 2i + 1).
    fn rope(&self, x: &mut [f32], (cos, sin): &(Vec<f32>, Vec<f32>)) {
        let d = self.config.head_dim;
        for head in x.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// One token at absolute `position`: its key and value go to slot `cache.len` of every layer,
    /// attention runs over the `cache.len + 1` slots, then `cache.len` grows by one. Returns the
    /// next-token logits.
    ///
    /// # Errors
    /// A full cache; candle errors.
    pub fn step(
        &self,
        token: u32,
        position: u64,
        cache: &mut KvCache<f32>,
        observer: &mut dyn Observer,
    ) -> AppResult<Vec<f32>> {
        let c = &self.config;
        let (h, hkv, d) = (c.heads, c.kv_heads, c.head_dim);
        if cache.len >= cache.capacity {
            return Err(format!("KV cache full: {} of {} slots", cache.len, cache.capacity).into());
        }
        let t = token as usize;
        if t >= c.vocab {
            return Err(format!("token {token}: expected < {}", c.vocab).into());
        }
        let mut x = self.embed[t * c.hidden..(t + 1) * c.hidden].to_vec();
        let (slot, n, cap) = (cache.len, cache.len + 1, cache.capacity);
        let group = h / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        let mut probs = vec![0f32; h * n];
        let angles = self.rope_angles(position);
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = self.rms_norm(&x, &layer.attn_norm);
            let mut q = self.matvec(&layer.q, &xn)?;
            let mut k = self.matvec(&layer.k, &xn)?;
            let v = self.matvec(&layer.v, &xn)?;
            observer.queries(l, &q);
            self.rope(&mut q, &angles);
            self.rope(&mut k, &angles);
            for g in 0..hkv {
                cache.k[l][(g * cap + slot) * d..(g * cap + slot + 1) * d].copy_from_slice(&k[g * d..(g + 1) * d]);
                cache.v[l][(g * cap + slot) * d..(g * cap + slot + 1) * d].copy_from_slice(&v[g * d..(g + 1) * d]);
            }
            let mut attn = vec![0f32; h * d];
            for head in 0..h {
                let g = head / group;
                let qh = &q[head * d..(head + 1) * d];
                let keys = &cache.k[l][g * cap * d..];
                let p = &mut probs[head * n..(head + 1) * n];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = &keys[j * d..(j + 1) * d];
                    *pj = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let values = &cache.v[l][g * cap * d..];
                let out = &mut attn[head * d..(head + 1) * d];
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj /= sum;
                    for (o, vv) in out.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                        *o += *pj * vv;
                    }
                }
            }
            if observer.wants_attention() {
                observer.attention(l, &probs, n);
            }
            let o = self.matvec(&layer.o, &attn)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = self.rms_norm(&x, &layer.ffn_norm);
            let gate = self.matvec(&layer.gate, &xn)?;
            let up = self.matvec(&layer.up, &xn)?;
            let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = self.matvec(&layer.down, &act)?;
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        cache.len += 1;
        let xn = self.rms_norm(&x, &self.out_norm);
        self.matvec(&self.lm_head, &xn)
    }
}

/// The index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
