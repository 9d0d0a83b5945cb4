//! `triattn demo`: a simulated long decode over a Qwen3-8B-shaped bf16 KV cache.
//!
//! Statistics and model config are the real Qwen3-8B ones embedded in the binary; the keys are
//! simulated. Per (layer, KV head) the pre-RoPE keys are a fixed centre plus small noise, and about
//! one generated token in 32 is an "important" token whose key also has a component of length 3
//! along the mean query of its KV group (the tokens attention would favour). Every key is RoPE-rotated at its absolute
//! position with the model's frequencies (half pairing) and stored as bf16; values are random.
//! The [`Compressor`] runs a round whenever its policy says so and compacts the cache in place.
//!
//! Without `--budget` the demo uses a budget of 512 (not the library's 2048), so that a default
//! run of 64 prompt + 1536 generated tokens goes through several rounds in a few seconds.

use std::time::{Duration, Instant};

use triattn::policy::{PrefixProtection, Preset, RoundOutcome};
use triattn::round::Scorer;
use triattn::score::OffsetAggregation;
use triattn::{Compressor, KvCache, SequenceState};
use triattn::{Error, Result};

use super::bench::{qwen3_8b, say, SplitMix64};
use super::{ms, policy_config};
use crate::DemoArgs;

/// The demo's budget when `--budget` is not given.
const DEMO_BUDGET: usize = 512;
/// "Recent" in the per-round report: the last this many positions.
const RECENT: u64 = 128;
/// One generated token in this many is important.
const IMPORTANT_EVERY: u64 = 32;
/// Length of the component an important token's pre-RoPE key gets along its group's mean query
/// (the centre has length about sqrt(D) = 11, the noise is uniform with half-width 0.35).
const IMPORTANT_BOOST: f64 = 3.0;

/// Pre-RoPE key and value generator of one simulated sequence.
struct Simulator {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    prompt: usize,
    seed: u64,
    omega: Vec<f64>,
    /// Per (layer, KV head) centre, `[L * Hkv, D]`.
    centre: Vec<f32>,
    /// Per (layer, KV head) unit direction of the group's mean query (pre-RoPE, half layout).
    focus: Vec<f32>,
}

impl Simulator {
    fn new(scorer: &Scorer, prompt: usize, seed: u64) -> Self {
        let m = &scorer.model;
        let (l, hkv, d, g) = (m.num_layers, m.num_kv_heads, m.head_dim, m.group_size());
        let f = d / 2;
        let stats = &scorer.stats;
        let mut centre = Vec::with_capacity(l * hkv * d);
        let mut focus = Vec::with_capacity(l * hkv * d);
        for layer in 0..l {
            for kv in 0..hkv {
                let mut rng = SplitMix64::new(seed, (layer * hkv + kv) as u64);
                centre.extend((0..d).map(|_| rng.normal() as f32));
                // Mean of the group's q̄ (pair f at dims f, f + F), normalised.
                let mut dir = vec![0f64; d];
                for h in kv * g..(kv + 1) * g {
                    let o = stats.offset(layer, h);
                    for p in 0..f {
                        dir[p] += stats.q_mean_real[o + p] as f64;
                        dir[p + f] += stats.q_mean_imag[o + p] as f64;
                    }
                }
                let norm = dir.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
                focus.extend(dir.iter().map(|x| (x / norm) as f32));
            }
        }
        Self { layers: l, kv_heads: hkv, head_dim: d, prompt, seed, omega: scorer.omega.clone(), centre, focus }
    }

    /// Whether the token at `pos` is important (generated tokens only).
    fn important(&self, pos: u64) -> bool {
        pos >= self.prompt as u64
            && SplitMix64::new(self.seed ^ 0x1a2b_3c4d, pos).next_u64().is_multiple_of(IMPORTANT_EVERY)
    }

    /// Keys `[L, Hkv, D]` (RoPE-rotated at `pos`) and values `[L, Hkv, D]` of the token at `pos`.
    fn token(&self, pos: u64, keys: &mut [half::bf16], values: &mut [half::bf16]) {
        let (d, f) = (self.head_dim, self.head_dim / 2);
        let (sin, cos): (Vec<f64>, Vec<f64>) = self.omega.iter().map(|w| (pos as f64 * w).sin_cos()).unzip();
        let boost = if self.important(pos) { IMPORTANT_BOOST } else { 0.0 };
        let mut rng = SplitMix64::new(self.seed ^ 0x5eed_f7ac, pos);
        let mut k = vec![0f64; d];
        for row in 0..self.layers * self.kv_heads {
            let c = &self.centre[row * d..(row + 1) * d];
            let u = &self.focus[row * d..(row + 1) * d];
            for i in 0..d {
                k[i] = c[i] as f64 + 0.35 * rng.symmetric() as f64 + boost * u[i] as f64;
            }
            let out = &mut keys[row * d..(row + 1) * d];
            for p in 0..f {
                let (re, im) = (k[p], k[p + f]);
                out[p] = half::bf16::from_f64(re * cos[p] - im * sin[p]);
                out[p + f] = half::bf16::from_f64(re * sin[p] + im * cos[p]);
            }
            for v in &mut values[row * d..(row + 1) * d] {
                *v = half::bf16::from_f32(rng.symmetric());
            }
        }
    }
}

#[derive(Default)]
struct Totals {
    rounds: usize,
    score: Duration,
    normalize: Duration,
    reduce: Duration,
    select: Duration,
    compact: Duration,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let mut config = policy_config(&a.policy)?;
    if a.policy.budget.is_none() {
        config.budget = DEMO_BUDGET;
        config.validate().map_err(|e| e.context(format!("with the demo's default --budget {DEMO_BUDGET}")))?;
    }
    if a.tokens == 0 {
        return Err(Error::invalid_argument("--tokens", ">= 1", 0));
    }
    if config.prefix == PrefixProtection::Protected && a.prompt + config.window >= config.budget {
        return Err(Error::invalid_argument(
            "--prompt",
            format!(
                "fewer than budget - window = {} tokens while the prompt is protected (or pass --no-protect-prefix)",
                config.budget - config.window
            ),
            a.prompt,
        ));
    }
    let scorer = qwen3_8b(a.layers)?;
    let sim = Simulator::new(&scorer, a.prompt, a.seed);
    let backend = super::round_backend(a.backend)?;
    let dispatch = super::dispatch_for(&backend, a.tuning.as_deref())?;
    let compressor = Compressor::new(config, scorer)?.with_backend(backend).with_dispatch(dispatch);
    let m = &compressor.scorer().model;
    let (layers, kv_heads, d) = (m.num_layers, m.num_kv_heads, m.head_dim);
    let threshold = config.budget + config.divide_length;
    let capacity = threshold.max(a.prompt) + 1;
    let mut cache = KvCache::<half::bf16>::new(layers, kv_heads, d, d, capacity);
    let mut seq = SequenceState::new(layers, kv_heads, a.prompt);
    let token_bytes = layers * kv_heads * 2 * d * std::mem::size_of::<half::bf16>();

    say!(
        "triattn demo: simulated decode of Qwen3-8B with TriAttention KV compression ({} backend)",
        compressor.backend().name()
    );
    say!("statistics: Qwen/Qwen3-8B, TriAttention authors (arXiv:2604.04921), Apache-2.0");
    say!(
        "model      {layers} layers x {} heads ({kv_heads} KV heads), head_dim {d}, rope_theta {}; keys simulated, bf16",
        m.num_heads, m.rope_theta
    );
    say!(
        "policy     {} preset, budget {}{}, divide_length {}, {}, {} over {} offsets, window {}, prompt {}",
        config.preset.name(),
        config.budget,
        if a.policy.budget.is_none() { " (demo default)" } else { "" },
        config.divide_length,
        config.mode.name(),
        match config.score.aggregation {
            OffsetAggregation::Mean => "mean",
            OffsetAggregation::Max => "max",
        },
        triattn::score::geometric_offsets(config.score.offset_max_length)?.len(),
        config.window,
        match config.prefix {
            PrefixProtection::Protected => "protected",
            PrefixProtection::Unprotected => "unprotected",
        }
    );
    say!(
        "sequence   {} prompt + {} generated tokens, seed {}; 1 in {IMPORTANT_EVERY} generated tokens is important",
        a.prompt,
        a.tokens,
        a.seed
    );
    say!("columns    r = tokens seen, before/after = cache slots, kept = slots kept per set, prot = protected slots;");
    say!("           kept slots by age (prompt, recent = last {RECENT} positions, older) and important kept/seen are");
    say!("           averaged over the {} (layer, KV head) rows; stage times in ms", layers * kv_heads);
    say!("");
    say!(
        "{:>5} {:>7} {:>6} {:>6} {:>5} {:>5} {:>7} {:>7} {:>7} {:>9} | {:>7} {:>7} {:>7} {:>7} {:>7}",
        "round",
        "r",
        "before",
        "after",
        "kept",
        "prot",
        "prompt",
        "recent",
        "older",
        "important",
        "score",
        "norm",
        "reduce",
        "select",
        "compact"
    );

    let mut keys = vec![half::bf16::ZERO; layers * kv_heads * d];
    let mut values = vec![half::bf16::ZERO; layers * kv_heads * d];
    let mut totals = Totals::default();
    let wall = Instant::now();
    let mut gen_time = Duration::ZERO;
    let round = |cache: &mut KvCache<half::bf16>, seq: &mut SequenceState, totals: &mut Totals| -> Result<()> {
        let before = cache.len;
        let protected = compressor.config().protection(before, seq.prompt_slots()).count();
        let report = compressor.compress(cache, seq)?;
        totals.rounds += 1;
        let t = &report.round.times;
        totals.score += t.score;
        totals.normalize += t.normalize;
        totals.reduce += t.reduce;
        totals.select += t.select;
        totals.compact += report.compact;
        let r = seq.round_start;
        let rows = seq.positions.len() as f64;
        let (mut prompt, mut recent, mut older, mut important) = (0usize, 0usize, 0usize, 0usize);
        for row in &seq.positions {
            for &p in row {
                if p < a.prompt as u64 {
                    prompt += 1;
                } else if p + RECENT >= r {
                    recent += 1;
                } else {
                    older += 1;
                }
                important += sim.important(p) as usize;
            }
        }
        let seen = (a.prompt as u64..r).filter(|&p| sim.important(p)).count();
        let kept = match report.round.outcome {
            RoundOutcome::Compressed { kept, .. } => kept.to_string(),
            RoundOutcome::WithinBudget => "all".to_string(),
            RoundOutcome::Skipped(reason) => {
                eprintln!("round {} skipped: {reason}", totals.rounds);
                "skip".to_string()
            }
        };
        say!(
            "{:>5} {:>7} {:>6} {:>6} {:>5} {:>5} {:>7.1} {:>7.1} {:>7.1} {:>9} | {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}",
            totals.rounds,
            r,
            before,
            cache.len,
            kept,
            protected,
            prompt as f64 / rows,
            recent as f64 / rows,
            older as f64 / rows,
            format!("{:.1}/{seen}", important as f64 / rows),
            ms(t.score),
            ms(t.normalize),
            ms(t.reduce),
            ms(t.select),
            ms(report.compact)
        );
        Ok(())
    };

    // Prefill: the prompt is written as one step.
    let t = Instant::now();
    for pos in 0..a.prompt as u64 {
        sim.token(pos, &mut keys, &mut values);
        cache.push(&keys, &values)?;
    }
    seq.advance(a.prompt);
    gen_time += t.elapsed();
    if config.preset == Preset::Paper && compressor.round_due(&seq, 0) {
        round(&mut cache, &mut seq, &mut totals)?;
    }
    for _ in 0..a.tokens {
        // vllm: the trigger is checked before the step that writes one token.
        if config.preset == Preset::Vllm && compressor.round_due(&seq, 1) {
            round(&mut cache, &mut seq, &mut totals)?;
        }
        if cache.len == cache.capacity {
            return Err(Error::unsupported(format!(
                "the simulated cache is full ({} slots) because rounds evict nothing under this policy",
                cache.capacity
            )));
        }
        let t = Instant::now();
        sim.token(seq.round_start, &mut keys, &mut values);
        cache.push(&keys, &values)?;
        seq.advance(1);
        gen_time += t.elapsed();
        // paper: checked after the forward, with the new token cached.
        if config.preset == Preset::Paper && compressor.round_due(&seq, 0) {
            round(&mut cache, &mut seq, &mut totals)?;
        }
    }
    let wall = wall.elapsed();

    let total_tokens = seq.round_start as usize;
    let full = total_tokens * token_bytes;
    let kept = cache.len * token_bytes;
    let stages = totals.score + totals.normalize + totals.reduce + totals.select + totals.compact;
    let (mut imp_kept, mut imp_all, mut other_kept, mut other_all) = (0usize, 0usize, 0usize, 0usize);
    for row in &seq.positions {
        for &p in row.iter().filter(|&&p| p >= a.prompt as u64) {
            if sim.important(p) {
                imp_kept += 1;
            } else {
                other_kept += 1;
            }
        }
    }
    let rows = seq.positions.len();
    for p in a.prompt as u64..seq.round_start {
        if sim.important(p) {
            imp_all += rows;
        } else {
            other_all += rows;
        }
    }
    let pct = |x: usize, of: usize| if of == 0 { 0.0 } else { 100.0 * x as f64 / of as f64 };
    say!("");
    say!("summary");
    say!("  rounds              {}", totals.rounds);
    say!(
        "  stage totals (ms)   score {:.2}, normalize {:.2}, reduce {:.2}, select {:.2}, compact {:.2}; all {:.2} ({:.2} per round)",
        ms(totals.score),
        ms(totals.normalize),
        ms(totals.reduce),
        ms(totals.select),
        ms(totals.compact),
        ms(stages),
        if totals.rounds == 0 { 0.0 } else { ms(stages) / totals.rounds as f64 }
    );
    say!(
        "  cache               {} slots per (layer, KV head) for {total_tokens} tokens: {:.1} MB of K+V vs {:.1} MB uncompressed ({:.1}% saved)",
        cache.len,
        kept as f64 / 1e6,
        full as f64 / 1e6,
        100.0 - pct(kept, full)
    );
    say!(
        "  generated tokens    important kept {:.1}% ({imp_kept} of {imp_all} row-slots), others kept {:.1}% ({other_kept} of {other_all})",
        pct(imp_kept, imp_all),
        pct(other_kept, other_all)
    );
    say!(
        "  wall time           {:.0} ms ({:.0} ms simulating tokens, {:.0} ms in rounds)",
        ms(wall),
        ms(gen_time),
        ms(stages)
    );
    Ok(())
}
