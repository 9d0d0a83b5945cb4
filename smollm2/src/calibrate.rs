//! `smollm2 calibrate`: this model's query statistics from its own pre-RoPE queries, over its own
//! greedy generations on the calibration prompts kept in the crate (`calibration/prompts.txt`,
//! none of them an evaluation prompt), accumulated with triattn's calibration API.

use std::path::Path;

use triattn::stats::calibrate::Accumulator;

use crate::engine::{Method, Session};
use crate::model::{argmax, Model, Observer, PAIRING};
use crate::{fetch, tokenizer, AppResult};

/// Where the statistics are committed.
pub const DEFAULT_OUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/smollm2_135m.safetensors");

/// The calibration prompts, one per line.
pub const PROMPTS: &str = include_str!("../calibration/prompts.txt");

/// Collects each step's pre-RoPE queries per layer, `[T][H * D]`.
struct Taps {
    per_layer: Vec<Vec<f32>>,
}

impl Observer for Taps {
    fn queries(&mut self, layer: usize, q: &[f32]) {
        self.per_layer[layer].extend_from_slice(q);
    }
}

pub fn run(out: &Path, tokens: usize) -> AppResult<()> {
    let (model, tok) = Model::load(&fetch::model_path()?)?;
    let c = model.config.clone();
    let (h, d) = (c.heads, c.head_dim);
    let mut acc = Accumulator::new(c.layers, h, d, PAIRING)?;
    let prompts: Vec<&str> = PROMPTS.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let mut total = 0usize;
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer::encode(&tok, &tokenizer::chat_prompt(prompt))?;
        let mut session = Session::new(&model, Method::Full, 0, 0, None, ids.len(), ids.len() + tokens)?;
        let mut taps = Taps { per_layer: vec![Vec::new(); c.layers] };
        let mut logits = Vec::new();
        for &t in &ids {
            logits = session.feed(t, &mut taps)?;
        }
        for _ in 0..tokens {
            let next = argmax(&logits);
            if next == c.eos || tok.id_to_token(next).as_deref() == Some("<|im_end|>") {
                break;
            }
            logits = session.feed(next, &mut taps)?;
        }
        let steps = session.seen;
        for (l, q) in taps.per_layer.iter().enumerate() {
            // [T, H, D] -> [H, T, D].
            let mut by_head = vec![0f32; q.len()];
            for t in 0..steps {
                for hh in 0..h {
                    by_head[(hh * steps + t) * d..(hh * steps + t + 1) * d]
                        .copy_from_slice(&q[(t * h + hh) * d..(t * h + hh + 1) * d]);
                }
            }
            acc.add(l, &by_head, steps)?;
        }
        total += steps;
        eprintln!("calibrate: prompt {}/{}: {} tokens ({} prompt)", i + 1, prompts.len(), steps, ids.len());
    }
    let mut stats = acc.finish()?;
    stats.record_model(&c.triattn_model()?);
    let meta = &mut stats.metadata;
    meta.insert(
        "calibration.model".into(),
        format!(
            "{} from the PyPI package {} (wheel sha256 {})",
            fetch::GGUF_NAME,
            fetch::REQUIREMENT,
            fetch::WHEEL_SHA256
        ),
    );
    meta.insert("calibration.method".into(), format!(
        "smollm2 calibrate: pre-RoPE queries of every token (chat-template prompt and up to {tokens} greedy tokens, full cache) of {} prompts in smollm2/calibration/prompts.txt; pairing interleaved (llama.cpp GGUF RoPE)",
        prompts.len()
    ));
    meta.insert("calibration.tokens".into(), total.to_string());
    stats.save(out)?;
    eprintln!("calibrate: {total} tokens over {} prompts -> {}", prompts.len(), out.display());
    Ok(())
}
