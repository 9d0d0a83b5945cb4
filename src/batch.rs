//! Batched rounds: many sequences of one model compressed in one call (see [`BatchItem`]).

use rayon::prelude::*;

use crate::cache::KvCache;
use crate::compressor::{Compressor, RoundReport, SequenceState};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::policy::CompressionConfig;

/// One sequence of a batch: its cache, its state, and its overrides of the compressor's knobs.
///
/// An engine serving many requests holds one [`KvCache`] and one [`SequenceState`] per sequence;
/// prompts, lengths and positions differ, and so may each sequence's budget (and window). The
/// policy — preset, selection mode, score knobs, normalisation, prefix protection, trigger slack —
/// is the [`Compressor`]'s and shared by the batch. A [`BatchItem`] names one sequence and its
/// overrides; [`Compressor::compress_batch`] runs a round on every item and
/// [`Compressor::compress_due`] only on the items whose round is due.
///
/// The contract: each item's result (scores, keep sets, outcome, compacted cache, positions) is
/// bit-identical to [`Compressor::compress`] on that sequence alone by a compressor whose
/// configuration is [`Compressor::config_with`] the item's budget and window. On the CPU,
/// sequences run in parallel on rayon's pool (each round also uses the pool internally;
/// work-stealing nests); on a kernel backend the items that evict and share a shape (slots,
/// capacity, budget, window) run as one batch plan — one launch per stage for all of them — and
/// the others one by one.
///
/// Every item is validated before any cache is touched: a bad budget or window, a cache that
/// does not fit the model or disagrees with its state fails the whole call, with an error naming
/// the item, e.g. `batch item 3: budget: expected >= 1, got 0`.
///
/// ```
/// use triattn::BatchItem;
/// use triattn::round::Scorer;
/// use triattn::{CompressionConfig, Compressor, KvCache, ModelConfig, RoundOutcome, SequenceState, Stats};
///
/// # fn main() -> triattn::Result<()> {
/// let model = ModelConfig::from_file("data/qwen3_8b.config.json")?;
/// let stats = Stats::load("data/qwen3_8b.safetensors")?;
/// let config = CompressionConfig { budget: 48, divide_length: 16, ..CompressionConfig::default() };
/// let compressor = Compressor::new(config, Scorer::new(model.clone(), stats, None)?)?;
/// let (l, hkv, d) = (model.num_layers, model.num_kv_heads, model.head_dim);
///
/// // Two sequences: prompts of 8 and 4 tokens; the second keeps 32 slots instead of 48.
/// let mut caches = vec![KvCache::<f32>::new(l, hkv, d, d, 64), KvCache::<f32>::new(l, hkv, d, d, 64)];
/// let mut seqs = vec![SequenceState::new(l, hkv, 8), SequenceState::new(l, hkv, 4)];
/// for (i, (cache, seq)) in caches.iter_mut().zip(seqs.iter_mut()).enumerate() {
///     for t in 0..64 - 16 * i {
///         let key: Vec<f32> = (0..l * hkv * d).map(|j| ((j * 7 + t * 13) % 17) as f32 - 8.0).collect();
///         cache.push(&key, &key)?;
///         seq.advance(1);
///     }
/// }
/// let mut it = caches.iter_mut().zip(seqs.iter_mut());
/// let (c0, s0) = it.next().unwrap();
/// let (c1, s1) = it.next().unwrap();
/// let mut items = [BatchItem::new(c0, s0), BatchItem::new(c1, s1).with_budget(32)];
/// assert_eq!(compressor.due_items(&items), vec![0, 1]);
/// let reports = compressor.compress_due(&mut items)?;
/// assert!(reports.iter().all(|r| matches!(r.as_ref().unwrap().round.outcome, RoundOutcome::Compressed { .. })));
/// assert_eq!((caches[0].len, caches[1].len), (48, 32));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct BatchItem<'a, T> {
    /// The sequence's cache, compacted in place by a round.
    pub cache: &'a mut KvCache<T>,
    /// The sequence's state (round start, prompt length, positions), updated by a round.
    pub seq: &'a mut SequenceState,
    /// Slots to keep; `None`: the compressor's budget.
    pub budget: Option<usize>,
    /// Recent slots always kept; `None`: the compressor's window.
    pub window: Option<usize>,
    /// Tokens the next step writes for this sequence (the `vllm` trigger); ignored by `paper`.
    pub scheduled: usize,
}

impl<'a, T: Element> BatchItem<'a, T> {
    /// An item with the compressor's budget and window and nothing scheduled.
    pub fn new(cache: &'a mut KvCache<T>, seq: &'a mut SequenceState) -> Self {
        Self { cache, seq, budget: None, window: None, scheduled: 0 }
    }

    /// This sequence keeps `budget` slots.
    pub fn with_budget(mut self, budget: usize) -> Self {
        self.budget = Some(budget);
        self
    }

    /// This sequence always keeps its last `window` slots.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = Some(window);
        self
    }

    /// The next step writes `scheduled` tokens for this sequence (`vllm` trigger).
    pub fn with_scheduled(mut self, scheduled: usize) -> Self {
        self.scheduled = scheduled;
        self
    }
}

impl Compressor {
    /// Indices of the items whose round is due, each under its own budget and `scheduled` count
    /// (see [`Compressor::round_due_with`]).
    pub fn due_items<T: Element>(&self, items: &[BatchItem<'_, T>]) -> Vec<usize> {
        items
            .iter()
            .enumerate()
            .filter(|(_, item)| self.round_due_with(item.seq, item.budget, item.scheduled))
            .map(|(i, _)| i)
            .collect()
    }

    /// Run a round on every item and compact each cache in place; one report per item, in order.
    ///
    /// An item at or under its budget reports [`crate::RoundOutcome::WithinBudget`]; one whose
    /// protected slots reach its budget reports [`crate::RoundOutcome::Skipped`] with the reason;
    /// the others are compressed to their budgets.
    ///
    /// # Errors
    /// Before any cache is touched, `batch item <i>: ...`: `InvalidArgument` for a bad budget or
    /// window (budget 0, window >= budget) or a `round_start` below the cached slots;
    /// `ShapeMismatch` for a cache that does not fit the model or disagrees with its state.
    pub fn compress_batch<T: Element>(&self, items: &mut [BatchItem<'_, T>]) -> Result<Vec<RoundReport>> {
        let configs = self.validate_batch(items)?;
        let work: Vec<_> = items.iter_mut().zip(configs).collect();
        self.run_batch(work.into_iter().enumerate().collect())
    }

    /// Run a round on the items that are due (see [`Compressor::due_items`]) and compact their
    /// caches; `None` for the items not due (left untouched).
    ///
    /// # Errors
    /// As [`Compressor::compress_batch`]; every item is validated, due or not.
    pub fn compress_due<T: Element>(&self, items: &mut [BatchItem<'_, T>]) -> Result<Vec<Option<RoundReport>>> {
        let configs = self.validate_batch(items)?;
        let due = self.due_items(items);
        let mut out: Vec<Option<RoundReport>> = (0..items.len()).map(|_| None).collect();
        let work: Vec<_> =
            items.iter_mut().zip(configs).enumerate().filter(|(i, _)| due.binary_search(i).is_ok()).collect();
        for (i, report) in due.iter().zip(self.run_batch(work)?) {
            out[*i] = Some(report);
        }
        Ok(out)
    }

    /// The configuration of every item, after checking every item.
    fn validate_batch<T: Element>(&self, items: &[BatchItem<'_, T>]) -> Result<Vec<CompressionConfig>> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let context = || format!("batch item {i}");
                let config = self.config_with(item.budget, item.window).map_err(|e| e.context(context()))?;
                self.check_sequence(item.cache, item.seq).map_err(|e| e.context(context()))?;
                let n = item.cache.len;
                if item.seq.round_start < n as u64 {
                    return Err(Error::invalid_argument(
                        "round_start",
                        format!(">= the {n} cached slots"),
                        item.seq.round_start,
                    )
                    .context(context()));
                }
                Ok(config)
            })
            .collect()
    }

    /// Rounds of validated items `(index, item, config)` in parallel; reports in input order, or
    /// the error of the lowest failing index.
    fn run_batch<T: Element>(
        &self,
        work: Vec<(usize, (&mut BatchItem<'_, T>, CompressionConfig))>,
    ) -> Result<Vec<RoundReport>> {
        if !self.backend().is_cpu() {
            return self.run_batch_on_device(work);
        }
        let results: Vec<Result<RoundReport>> = work
            .into_par_iter()
            .map(|(i, (item, config))| {
                self.compress_with(&config, item.cache, item.seq).map_err(|e| e.context(format!("batch item {i}")))
            })
            .collect();
        results.into_iter().collect()
    }

    /// On a kernel backend: the items that evict and share a shape (slots, capacity, budget,
    /// window) go through one batch plan — one launch per stage for all of them; the others run
    /// one by one.
    #[cfg(any(feature = "emu", feature = "cuda"))]
    fn run_batch_on_device<T: Element>(
        &self,
        mut work: Vec<(usize, (&mut BatchItem<'_, T>, CompressionConfig))>,
    ) -> Result<Vec<RoundReport>> {
        use std::collections::BTreeMap;

        use crate::cuda::{Compaction, RoundPlan, RoundShape};
        use crate::variant::CompactMode;

        let mut reports: Vec<Option<RoundReport>> = (0..work.len()).map(|_| None).collect();
        // Group the evicting items by shape; the rest (and groups of one) run alone.
        let mut groups: BTreeMap<(usize, usize, usize, usize), Vec<usize>> = BTreeMap::new();
        for (at, (_, (item, config))) in work.iter().enumerate() {
            let n = item.cache.len;
            let evicts = n > config.budget && config.protection(n, item.seq.prompt_slots()).count() < config.budget;
            if evicts {
                groups.entry((n, item.cache.capacity, config.budget, config.window)).or_default().push(at);
            }
        }
        let batched: Vec<Vec<usize>> = groups.into_values().filter(|g| g.len() > 1).collect();
        for members in &batched {
            let (first_i, (first, config)) = &work[members[0]];
            let (n, cap) = (first.cache.len, first.cache.capacity);
            let m = &self.scorer().model;
            let shape = RoundShape::dense(T::DTYPE, n, 0, m.head_dim, first.cache.value_dim, cap)
                .with_compaction(Compaction::InPlace(CompactMode::OrderPreserving));
            let prefixes: Vec<usize> = members.iter().map(|&at| work[at].1 .0.seq.prompt_slots()).collect();
            let starts: Vec<u64> = members.iter().map(|&at| work[at].1 .0.seq.round_start).collect();
            let config = *config;
            let plan = RoundPlan::new_batch_tuned(self.scorer(), &config, shape, &prefixes, self.dispatch())
                .map_err(|e| e.context(format!("batch item {first_i}")))?;
            let crate::cuda::HostRound { outputs, timings } = {
                let mut keys: Vec<&mut [T]> = Vec::new();
                let mut values: Vec<&mut [T]> = Vec::new();
                let mut chosen: Vec<&mut (usize, (&mut BatchItem<'_, T>, CompressionConfig))> =
                    work.iter_mut().enumerate().filter(|(at, _)| members.contains(at)).map(|(_, w)| w).collect();
                for w in chosen.iter_mut() {
                    let cache = &mut *w.1 .0.cache;
                    keys.extend(cache.k.iter_mut().map(Vec::as_mut_slice));
                    values.extend(cache.v.iter_mut().map(Vec::as_mut_slice));
                }
                self.backend()
                    .round_in_place(&plan, &mut keys, &mut values, &starts)
                    .map_err(|e| e.context(format!("batch items {members:?}")))?
            };
            for (&at, out) in members.iter().zip(outputs) {
                let item = &mut work[at].1 .0;
                let result =
                    crate::round::RoundResult::from_outputs(&plan, out, crate::round::StageTimes::of(&timings));
                if let crate::policy::RoundOutcome::Compressed { kept, .. } = result.outcome {
                    let (layers, kv_heads) = (item.cache.num_layers, item.cache.num_kv_heads);
                    crate::compressor::update_positions(&config, layers, kv_heads, &result.keep, item.seq);
                    item.cache.len = kept;
                }
                reports[at] = Some(RoundReport { round: result, compact: timings.get(crate::cuda::Stage::Compact) });
            }
        }
        for (at, (i, (item, config))) in work.into_iter().enumerate() {
            if reports[at].is_none() {
                let report = self
                    .compress_with(&config, item.cache, item.seq)
                    .map_err(|e| e.context(format!("batch item {i}")))?;
                reports[at] = Some(report);
            }
        }
        Ok(reports.into_iter().map(|r| r.expect("every item has a report")).collect())
    }

    #[cfg(not(any(feature = "emu", feature = "cuda")))]
    fn run_batch_on_device<T: Element>(
        &self,
        work: Vec<(usize, (&mut BatchItem<'_, T>, CompressionConfig))>,
    ) -> Result<Vec<RoundReport>> {
        work.into_iter()
            .map(|(i, (item, config))| {
                self.compress_with(&config, item.cache, item.seq).map_err(|e| e.context(format!("batch item {i}")))
            })
            .collect()
    }
}
