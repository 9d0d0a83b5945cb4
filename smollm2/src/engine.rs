//! The decode loop of an engine with triattn in it: the engine owns the KV cache and the model;
//! after each token it asks the compressor whether a round is due and, if so, runs it on the
//! cache (scores every cached key, keeps `budget` slots per KV head, compacts in place). The
//! sequence state tracks each slot's absolute position, so RoPE positions keep counting.

use std::time::{Duration, Instant};

use triattn::round::Scorer;
use triattn::{CompressionConfig, Compressor, KvCache, SequenceState, Stats};

use crate::model::{Model, Observer, PAIRING};
use crate::AppResult;

/// How the cache is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Keep every token.
    Full,
    /// TriAttention rounds (paper preset) every `divide_length` tokens past the budget.
    TriAttention,
}

impl Method {
    pub fn parse(s: &str) -> AppResult<Self> {
        match s {
            "full" => Ok(Method::Full),
            "triattention" => Ok(Method::TriAttention),
            other => Err(format!("--method: expected full or triattention, got {other}").into()),
        }
    }
}

/// One compression round as the engine saw it.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// Cache slots before and after.
    pub before: usize,
    pub after: usize,
    /// Wall time of the round (scoring, selection, compaction).
    pub time: Duration,
}

/// A sequence being decoded.
pub struct Session<'m> {
    model: &'m Model,
    pub cache: KvCache<f32>,
    pub seq: SequenceState,
    compressor: Option<Compressor>,
    pub rounds: Vec<Round>,
    /// Tokens fed so far (prompt and generated).
    pub seen: usize,
    /// The positions of the last step's cache when a round followed it (the cache it attended).
    attended: Option<Vec<Vec<u64>>>,
}

/// TriAttention's knobs beside the budget: the RoPE pairing of the scores, the selection mode
/// (the paper's: one keep set per KV head shared across layers) and a window of recent slots
/// always kept (the paper's: none).
#[derive(Clone, Copy, Debug)]
pub struct TriOptions {
    pub pairing: triattn::PairingStyle,
    pub mode: triattn::SelectionMode,
    pub window: usize,
}

impl Default for TriOptions {
    fn default() -> Self {
        Self { pairing: PAIRING, mode: triattn::SelectionMode::PerHead, window: 0 }
    }
}

/// The compression config of a budget: the paper preset with `divide_length`, the prompt not
/// protected (the chat template's system turn alone is ~30 tokens, a large share of the small
/// budgets this model is evaluated at).
pub fn config(budget: usize, divide_length: usize) -> AppResult<CompressionConfig> {
    let config = CompressionConfig {
        budget,
        divide_length,
        prefix: triattn::policy::PrefixProtection::Unprotected,
        ..CompressionConfig::default()
    };
    config.validate()?;
    Ok(config)
}

impl<'m> Session<'m> {
    /// A session for `method` holding at most `budget + divide_length` slots (TriAttention), or
    /// `max_tokens` (full).
    pub fn new(
        model: &'m Model,
        method: Method,
        budget: usize,
        divide_length: usize,
        stats: Option<&Stats>,
        prompt_len: usize,
        max_tokens: usize,
    ) -> AppResult<Self> {
        Self::with_options(model, method, budget, divide_length, stats, prompt_len, max_tokens, TriOptions::default())
    }

    /// [`Session::new`] with TriAttention's `options` (pairing, selection mode, window).
    #[allow(clippy::too_many_arguments)]
    pub fn with_options(
        model: &'m Model,
        method: Method,
        budget: usize,
        divide_length: usize,
        stats: Option<&Stats>,
        prompt_len: usize,
        max_tokens: usize,
        options: TriOptions,
    ) -> AppResult<Self> {
        let c = &model.config;
        let (compressor, capacity) = match method {
            Method::Full => (None, max_tokens),
            Method::TriAttention => {
                let stats = stats.ok_or("triattention needs statistics (smollm2 calibrate writes them)")?;
                let scorer = Scorer::new(c.triattn_model()?, stats.clone(), Some(options.pairing))?;
                let config =
                    CompressionConfig { mode: options.mode, window: options.window, ..config(budget, divide_length)? };
                config.validate()?;
                let compressor = Compressor::new(config, scorer)?;
                (Some(compressor), (budget + divide_length).min(max_tokens))
            }
        };
        Ok(Self {
            model,
            cache: model.cache(capacity.max(1)),
            seq: SequenceState::new(c.layers, c.kv_heads, prompt_len),
            compressor,
            rounds: Vec::new(),
            seen: 0,
            attended: None,
        })
    }

    /// Feed one token at the next position: its logits, then a round if one is due.
    ///
    /// # Errors
    /// Model or compression errors.
    pub fn feed(&mut self, token: u32, observer: &mut dyn Observer) -> AppResult<Vec<f32>> {
        self.attended = None;
        let position = self.seq.round_start;
        let logits = self.model.step(token, position, &mut self.cache, observer)?;
        self.seq.advance(1);
        self.seen += 1;
        if let Some(compressor) = &self.compressor {
            if compressor.round_due(&self.seq, 0) {
                let before = self.cache.len;
                self.attended = Some(self.seq.positions.clone());
                let t0 = Instant::now();
                compressor.compress(&mut self.cache, &mut self.seq)?;
                self.rounds.push(Round { before, after: self.cache.len, time: t0.elapsed() });
            }
        }
        Ok(logits)
    }

    /// The absolute positions each (layer, KV head) row of the cache held when the last step
    /// attended (before the round that followed it, if one did).
    pub fn attended_positions(&self) -> &[Vec<u64>] {
        self.attended.as_deref().unwrap_or(&self.seq.positions)
    }
}
