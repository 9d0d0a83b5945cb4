//! `smollm2 eval`: TriAttention against other eviction methods on this model, by teacher forcing.
//!
//! The reference generates `T` tokens greedily with the full cache and records, at every
//! replayed position, its next-token distribution and its attention over every earlier position.
//! Each method then replays exactly those tokens with rounds every `divide_length` tokens past the
//! same budget (cache at most `budget + divide_length` slots), and is scored on the same
//! positions: mean KL(full || method) of the next-token distributions, top-1 agreement with the
//! full cache, and attention recall — the share of the full cache's attention mass (per layer and
//! head, averaged over layers, heads and steps) that falls on the positions the method's cache
//! holds at that step.
//!
//! Methods (every selection is per layer and KV head, applied with `triattn::evict`, except
//! TriAttention's own rounds):
//! - `full`: no eviction (must replay exactly: KL 0, top-1 1);
//! - `triattention`: this library, paper preset, this model's calibrated statistics;
//! - `streamingllm`: 4 attention sinks and the most recent slots (Xiao et al., 2023);
//! - `snapkv`: the attention of the last 16 queries (an observation window), summed over the
//!   KV head's query heads and max-pooled over 7 neighbouring slots, keeps the top slots beside
//!   the window (Li et al., 2024);
//! - `h2o`: the attention each slot has accumulated since it was written, summed over the query
//!   heads: half the budget to the heaviest, half to the most recent (Zhang et al., 2023);
//! - `random`: the newest slot and a uniform random choice of the rest (seeded).

use std::time::Instant;

use triattn::{evict, Stats};

use crate::engine::{config, Method as Engine, Session, TriOptions};
use crate::model::{argmax, Model, Observer};
use crate::AppResult;

/// The methods compared, in report order.
pub const METHODS: [&str; 6] = ["full", "triattention", "streamingllm", "snapkv", "h2o", "random"];

/// Ablations of TriAttention's preset, run only when named (`--methods`): one keep set per layer
/// and KV head instead of one per KV head shared across layers, and a window of recent slots
/// always kept.
pub const ABLATIONS: [&str; 2] = ["triattention-layers", "triattention-window"];

/// Recent slots the `triattention-window` ablation keeps.
const ABLATION_WINDOW: usize = 16;

const SINKS: usize = 4;
const SNAP_WINDOW: usize = 16;
const SNAP_POOL: usize = 7;

/// One method's scores.
#[derive(Clone, Debug)]
pub struct Scores {
    pub method: &'static str,
    pub budget: usize,
    pub kl: f64,
    pub top1: f64,
    pub recall: f64,
    pub rounds: usize,
    pub seconds: f64,
}

impl Scores {
    pub fn json(&self) -> String {
        serde_json::json!({
            "method": self.method, "budget": self.budget, "kl": self.kl, "top1": self.top1,
            "recall": self.recall, "rounds": self.rounds, "seconds": self.seconds,
        })
        .to_string()
    }
}

/// What the full cache did at each replayed position.
pub struct Reference {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// Log-probabilities of the next token after the prompt and after each replayed token but
    /// the last: `[T][V]`.
    logp: Vec<Vec<f32>>,
    /// Attention of each replayed step (the last prompt token, then each replayed token but the
    /// last) over every position so far: `[T][L * H * n]`, `n` = positions so far.
    attention: Vec<Vec<f32>>,
    pub seconds: f64,
}

/// Records the attention of every layer of one step, `[L][H * n]` flattened.
struct Recorder {
    step: Vec<f32>,
}

impl Observer for Recorder {
    fn attention(&mut self, _layer: usize, probs: &[f32], _n: usize) {
        self.step.extend_from_slice(probs);
    }
    fn wants_attention(&self) -> bool {
        true
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    logits.iter().map(|x| x - lse).collect()
}

/// Generate `tokens` greedily with the full cache, recording what the methods are scored on.
///
/// # Errors
/// Model errors.
pub fn reference(model: &Model, prompt: &[u32], tokens: usize) -> AppResult<Reference> {
    let t0 = Instant::now();
    let mut s = Session::new(model, Engine::Full, 0, 0, None, prompt.len(), prompt.len() + tokens)?;
    let mut rec = Recorder { step: Vec::new() };
    let mut logits = Vec::new();
    for (i, &t) in prompt.iter().enumerate() {
        rec.step.clear();
        logits = if i + 1 == prompt.len() { s.feed(t, &mut rec)? } else { s.feed(t, &mut crate::model::Nobody)? };
    }
    let (mut out, mut logp, mut attention) = (Vec::new(), Vec::new(), vec![std::mem::take(&mut rec.step)]);
    for i in 0..tokens {
        let next = argmax(&logits);
        out.push(next);
        logp.push(log_softmax(&logits));
        if i + 1 == tokens {
            break;
        }
        logits = s.feed(next, &mut rec)?;
        attention.push(std::mem::take(&mut rec.step));
    }
    Ok(Reference { prompt: prompt.to_vec(), tokens: out, logp, attention, seconds: t0.elapsed().as_secs_f64() })
}

/// The selection state a baseline keeps between rounds.
enum Baseline {
    StreamingLlm,
    /// Per (layer, KV head) row: accumulated attention per slot.
    H2o(Vec<Vec<f64>>),
    /// The last steps' attention, per step `(positions of every row, probs [L][H * n])`.
    SnapKv(std::collections::VecDeque<(Vec<Vec<u64>>, Vec<f32>)>),
    Random(u64),
}

/// Feeds the method's own attention to its baseline state.
struct Tracker<'a> {
    baseline: &'a mut Option<Baseline>,
    heads: usize,
    kv_heads: usize,
    /// SnapKV: this step's attention, `[L][H * n]`.
    step: Vec<f32>,
}

impl Observer for Tracker<'_> {
    fn attention(&mut self, layer: usize, probs: &[f32], n: usize) {
        match self.baseline {
            Some(Baseline::H2o(acc)) => {
                let group = self.heads / self.kv_heads;
                for g in 0..self.kv_heads {
                    let row = &mut acc[layer * self.kv_heads + g];
                    row.resize(n, 0.0);
                    for h in g * group..(g + 1) * group {
                        for (a, p) in row.iter_mut().zip(&probs[h * n..(h + 1) * n]) {
                            *a += f64::from(*p);
                        }
                    }
                }
            }
            Some(Baseline::SnapKv(_)) => {
                if layer == 0 {
                    self.step.clear();
                }
                self.step.extend_from_slice(probs);
            }
            _ => {}
        }
    }
    fn wants_attention(&self) -> bool {
        matches!(self.baseline, Some(Baseline::H2o(_)) | Some(Baseline::SnapKv(_)))
    }
}

/// Indices of the `k` largest of `score` among `candidates` (ties to the lower index), ascending.
fn top(score: &[f64], candidates: impl Iterator<Item = usize>, k: usize) -> Vec<usize> {
    let mut c: Vec<usize> = candidates.collect();
    c.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    c.truncate(k);
    c.sort_unstable();
    c
}

impl Baseline {
    /// Keep rows for a cache of `n` slots, `budget` each, per (layer, KV head) row.
    fn select(
        &mut self,
        n: usize,
        budget: usize,
        rows: usize,
        heads: usize,
        kv_heads: usize,
        positions: &[Vec<u64>],
    ) -> Vec<Vec<u32>> {
        let keep: Vec<Vec<usize>> = match self {
            Baseline::StreamingLlm => {
                let sinks = SINKS.min(budget);
                let row: Vec<usize> = (0..sinks).chain(n - (budget - sinks)..n).collect();
                vec![row; rows]
            }
            Baseline::H2o(acc) => (0..rows)
                .map(|r| {
                    let recent = budget / 2;
                    let mut keep = top(&acc[r], 0..n - recent, budget - recent);
                    keep.extend(n - recent..n);
                    keep
                })
                .collect(),
            Baseline::SnapKv(window) => {
                let group = heads / kv_heads;
                let win = SNAP_WINDOW.min(budget / 2);
                (0..rows)
                    .map(|r| {
                        let (l, g) = (r / kv_heads, r % kv_heads);
                        let here = &positions[r];
                        let mut score = vec![0f64; n];
                        for (pos, probs) in window.iter() {
                            let m = pos[r].len();
                            let per_layer = heads * m;
                            let layer = &probs[l * per_layer..(l + 1) * per_layer];
                            for (j, p) in pos[r].iter().enumerate() {
                                if let Ok(slot) = here.binary_search(p) {
                                    for h in g * group..(g + 1) * group {
                                        score[slot] += f64::from(layer[h * m + j]);
                                    }
                                }
                            }
                        }
                        let pooled: Vec<f64> = (0..n)
                            .map(|i| {
                                let (a, b) = (i.saturating_sub(SNAP_POOL / 2), (i + SNAP_POOL / 2 + 1).min(n));
                                score[a..b].iter().copied().fold(0.0, f64::max)
                            })
                            .collect();
                        let mut keep = top(&pooled, 0..n - win, budget - win);
                        keep.extend(n - win..n);
                        keep
                    })
                    .collect()
            }
            Baseline::Random(state) => {
                let mut rows_out = Vec::with_capacity(rows);
                for _ in 0..rows {
                    let mut c: Vec<usize> = (0..n - 1).collect();
                    for i in 0..budget - 1 {
                        *state ^= *state << 13;
                        *state ^= *state >> 7;
                        *state ^= *state << 17;
                        let j = i + (*state % (c.len() - i) as u64) as usize;
                        c.swap(i, j);
                    }
                    c.truncate(budget - 1);
                    c.push(n - 1);
                    c.sort_unstable();
                    rows_out.push(c);
                }
                rows_out
            }
        };
        if let Baseline::H2o(acc) = self {
            for (row, k) in acc.iter_mut().zip(&keep) {
                *row = k.iter().map(|&s| row[s]).collect();
            }
        }
        keep.into_iter().map(|r| r.into_iter().map(|s| s as u32).collect()).collect()
    }
}

/// Replay the reference under `method` at `budget` and score it.
///
/// # Errors
/// Model or compression errors.
pub fn run(
    model: &Model,
    stats: &Stats,
    r: &Reference,
    method: &'static str,
    budget: usize,
    divide: usize,
) -> AppResult<Scores> {
    run_paired(model, stats, r, method, budget, divide, crate::model::PAIRING)
}

/// [`run`] with TriAttention scoring under RoPE pairing `pairing` (the ablation of the pairing).
///
/// # Errors
/// As [`run`].
pub fn run_paired(
    model: &Model,
    stats: &Stats,
    r: &Reference,
    method: &'static str,
    budget: usize,
    divide: usize,
    pairing: triattn::PairingStyle,
) -> AppResult<Scores> {
    let t0 = Instant::now();
    let mut options = TriOptions { pairing, ..TriOptions::default() };
    match method {
        "triattention-layers" => options.mode = triattn::SelectionMode::PerLayerPerHead,
        "triattention-window" => options.window = ABLATION_WINDOW.min(budget / 2),
        _ => {}
    }
    let c = &model.config;
    let (l, h, hkv) = (c.layers, c.heads, c.kv_heads);
    let total = r.prompt.len() + r.tokens.len();
    let engine = if method.starts_with("triattention") { Engine::TriAttention } else { Engine::Full };
    let bounded = method != "full";
    let capacity = if bounded { budget + divide } else { total };
    let mut s = Session::with_options(model, engine, budget, divide, Some(stats), r.prompt.len(), capacity, options)?;
    let cfg = config(budget, divide)?;
    let mut baseline = match method {
        "streamingllm" => Some(Baseline::StreamingLlm),
        "h2o" => Some(Baseline::H2o(vec![Vec::new(); l * hkv])),
        "snapkv" => Some(Baseline::SnapKv(std::collections::VecDeque::new())),
        "random" => Some(Baseline::Random(0x9e37_79b9_7f4a_7c15 ^ budget as u64)),
        _ => None,
    };
    let (mut kl, mut top1, mut recall, mut steps, mut rounds) = (0f64, 0usize, 0f64, 0usize, 0usize);
    let fed: Vec<u32> = r.prompt.iter().chain(&r.tokens[..r.tokens.len() - 1]).copied().collect();
    for (i, &t) in fed.iter().enumerate() {
        let mut tracker = Tracker { baseline: &mut baseline, heads: h, kv_heads: hkv, step: Vec::new() };
        let logits = s.feed(t, &mut tracker)?;
        let snap_step = std::mem::take(&mut tracker.step);
        if let Some(Baseline::SnapKv(window)) = &mut baseline {
            window.push_back((s.seq.positions.clone(), snap_step));
            if window.len() > SNAP_WINDOW {
                window.pop_front();
            }
        }
        // Score the replayed positions: after the last prompt token and every replayed token.
        if i + 1 >= r.prompt.len() {
            let k = i + 1 - r.prompt.len();
            let logp = log_softmax(&logits);
            let want = &r.logp[k];
            kl += want.iter().zip(&logp).map(|(p, q)| f64::from(p.exp()) * f64::from(p - q)).sum::<f64>();
            top1 += usize::from(argmax(&logits) == argmax(want));
            // Recall: the full cache's attention of this step on the positions the method's
            // cache held when it attended (before a round that followed the step).
            let att = &r.attention[k];
            let n = att.len() / (l * h);
            let group = h / hkv;
            let held = s.attended_positions();
            let mut step_recall = 0f64;
            for layer in 0..l {
                for head in 0..h {
                    let row = &att[(layer * h + head) * n..(layer * h + head + 1) * n];
                    step_recall +=
                        held[layer * hkv + head / group].iter().map(|&p| f64::from(row[p as usize])).sum::<f64>();
                }
            }
            recall += step_recall / (l * h) as f64;
            steps += 1;
        }
        if let Some(b) = &mut baseline {
            if cfg.round_due(s.cache.len, 0) {
                let keep = b.select(s.cache.len, budget, l * hkv, h, hkv, &s.seq.positions);
                evict(&mut s.cache, &mut s.seq, &keep)?;
                rounds += 1;
            }
        }
    }
    rounds += s.rounds.len();
    Ok(Scores {
        method,
        budget,
        kl: kl / steps as f64,
        top1: top1 as f64 / steps as f64,
        recall: recall / steps as f64,
        rounds,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
