//! Batched rounds: many sequences with their own prompts, lengths, budgets and windows in one
//! call give bit-identical results to compressing each sequence alone, and keep the budget and
//! protection invariants over simulated decodes of thousands of tokens.

use crate::common;

use common::{model, Rng};
use half::bf16;
use triattn::policy::{CompressionConfig, PrefixProtection, Preset, RoundOutcome, SelectionMode, SkipReason};
use triattn::round::Scorer;
use triattn::score::OffsetAggregation;
use triattn::stats::Stats;
use triattn::{BatchItem, Compressor, Element, ErrorKind, KvCache, ModelConfig, PairingStyle, SequenceState};

fn scorer(rng: &mut Rng, m: &ModelConfig) -> Scorer {
    let count = m.num_layers * m.num_heads * (m.head_dim / 2);
    let (mut re, mut im, mut abs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..count {
        let (a, b) = (rng.normal() as f32, rng.normal() as f32);
        re.push(a);
        im.push(b);
        abs.push(a.hypot(b) + rng.uniform() as f32);
    }
    let stats = Stats {
        num_layers: m.num_layers,
        num_heads: m.num_heads,
        head_dim: m.head_dim,
        rope_style: PairingStyle::Half,
        q_mean_real: re,
        q_mean_imag: im,
        q_abs_mean: abs,
        sampled_heads: None,
        metadata: Default::default(),
    };
    Scorer::new(m.clone(), stats, None).unwrap()
}

/// Values of the token at position `t`: `[t / 256, t % 256, 0, ...]`, exact in every dtype.
fn value_of<T: Element>(t: u64, dv: usize) -> Vec<T> {
    (0..dv)
        .map(|i| {
            T::from_f32(if i == 0 {
                (t / 256) as f32
            } else if i == 1 {
                (t % 256) as f32
            } else {
                0.0
            })
        })
        .collect()
}

/// One sequence of a test batch.
#[derive(Clone, Debug)]
struct Seq<T> {
    cache: KvCache<T>,
    state: SequenceState,
    budget: Option<usize>,
    window: Option<usize>,
}

impl<T: Element> Seq<T> {
    fn new(m: &ModelConfig, dv: usize, capacity: usize, prompt: usize, budget: Option<usize>) -> Self {
        Self {
            cache: KvCache::new(m.num_layers, m.num_kv_heads, m.head_dim, dv, capacity),
            state: SequenceState::new(m.num_layers, m.num_kv_heads, prompt),
            budget,
            window: None,
        }
    }

    /// Write the next token (random keys, values carrying its position).
    fn push(&mut self, rng: &mut Rng) {
        let (l, h, d, dv) = (self.cache.num_layers, self.cache.num_kv_heads, self.cache.head_dim, self.cache.value_dim);
        let k: Vec<T> = (0..l * h * d).map(|_| T::from_f32((rng.normal() * 2.0 + 0.3) as f32)).collect();
        let v: Vec<T> = (0..l * h).flat_map(|_| value_of::<T>(self.state.round_start, dv)).collect();
        self.cache.push(&k, &v).unwrap();
        self.state.advance(1);
    }

    fn item(&mut self) -> BatchItem<'_, T> {
        BatchItem {
            cache: &mut self.cache,
            seq: &mut self.state,
            budget: self.budget,
            window: self.window,
            scheduled: 0,
        }
    }

    /// The compressor this sequence alone would use.
    fn alone(&self, comp: &Compressor) -> Compressor {
        let config = comp.config_with(self.budget, self.window).unwrap();
        Compressor::new(config, comp.scorer().clone()).unwrap()
    }
}

/// A sequence of a test plan: prompt, budget, window and two token counts or steps.
type PlanRow = (usize, Option<usize>, Option<usize>, usize, usize);

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same_report(what: &str, a: &triattn::RoundReport, b: &triattn::RoundReport) {
    let (a, b) = (&a.round, &b.round);
    assert_eq!(a.n, b.n, "{what}: n");
    assert_eq!(a.outcome, b.outcome, "{what}: outcome");
    assert_eq!(a.keep, b.keep, "{what}: keep");
    assert_eq!(bits(&a.score), bits(&b.score), "{what}: score");
    assert_eq!(a.raw.len(), b.raw.len(), "{what}: raw layers");
    for (l, (x, y)) in a.raw.iter().zip(&b.raw).enumerate() {
        assert_eq!(bits(x), bits(y), "{what}: raw.{l}");
    }
}

fn assert_same_seq<T: Element>(what: &str, a: &Seq<T>, b: &Seq<T>) {
    assert_eq!(a.state, b.state, "{what}: sequence state");
    assert_eq!(a.cache.len, b.cache.len, "{what}: cache len");
    assert!(a.cache.k == b.cache.k, "{what}: keys differ");
    assert!(a.cache.v == b.cache.v, "{what}: values differ");
}

/// Six sequences: different prompts, lengths, budgets (one the compressor's), one window, one
/// whose protected prompt reaches its budget, one within budget (not due). The caches have been
/// through earlier rounds (alone), so `round_start` exceeds their lengths.
fn six_sequences<T: Element>(rng: &mut Rng, comp: &Compressor, m: &ModelConfig) -> Vec<Seq<T>> {
    let cap = 512;
    let dv = 16;
    // (prompt, budget, window, tokens written with rounds when due, then tokens without)
    let plan: [PlanRow; 6] = [
        (20, Some(64), None, 300, 40),   // compressed to 64, several earlier rounds
        (100, Some(80), None, 130, 0),   // prompt 100 >= budget 80: skipped
        (5, None, None, 500, 50),        // the compressor's budget (96)
        (10, Some(200), None, 150, 0),   // within budget, not due
        (0, Some(40), Some(8), 777, 45), // a window of 8 under the paper preset
        (33, Some(128), None, 160, 0),   // due exactly at budget + divide_length
    ];
    let mut seqs = Vec::new();
    for (prompt, budget, window, tokens, extra) in plan {
        let mut s = Seq::<T>::new(m, dv, cap, prompt, budget);
        s.window = window;
        let alone = s.alone(comp);
        for t in 0..tokens {
            s.push(rng);
            if t + 1 > prompt && t + 1 < tokens && alone.round_due(&s.state, 0) {
                let r = alone.compress(&mut s.cache, &mut s.state).unwrap();
                assert!(matches!(r.round.outcome, RoundOutcome::Compressed { .. } | RoundOutcome::Skipped(_)));
            }
        }
        for _ in 0..extra {
            s.push(rng);
        }
        seqs.push(s);
    }
    seqs
}

fn batch_matches_one_by_one<T: Element>(seed: u64, m: ModelConfig, config: CompressionConfig) {
    let mut rng = Rng(seed);
    let sc = scorer(&mut rng, &m);
    let comp = Compressor::new(config, sc).unwrap();
    let seqs = six_sequences::<T>(&mut rng, &comp, &m);
    assert!(seqs.iter().any(|s| s.state.round_start > s.cache.len as u64), "earlier rounds must have run");

    // One by one.
    let mut alone = seqs.clone();
    let alone_reports: Vec<_> =
        alone.iter_mut().map(|s| s.alone(&comp).compress(&mut s.cache, &mut s.state).unwrap()).collect();

    // The whole batch, every item.
    let mut batch = seqs.clone();
    let reports = {
        let mut items: Vec<_> = batch.iter_mut().map(Seq::item).collect();
        assert_eq!(comp.due_items(&items), vec![0, 1, 2, 4, 5]);
        comp.compress_batch(&mut items).unwrap()
    };
    assert_eq!(reports.len(), 6);
    for (i, (r, a)) in reports.iter().zip(&alone_reports).enumerate() {
        assert_same_report(&format!("item {i}"), r, a);
        assert_same_seq(&format!("item {i}"), &batch[i], &alone[i]);
    }
    let outcome = |i: usize| reports[i].round.outcome;
    assert_eq!(outcome(0), RoundOutcome::Compressed { kept: 64, evicted: seqs[0].cache.len - 64 });
    assert_eq!(outcome(1), RoundOutcome::Skipped(SkipReason::ProtectedReachBudget { protected: 100, budget: 80 }));
    let RoundOutcome::Skipped(reason) = outcome(1) else { unreachable!() };
    assert!(reason.to_string().contains("reach the budget of 80"), "{reason}");
    assert_eq!(outcome(2), RoundOutcome::Compressed { kept: 96, evicted: seqs[2].cache.len - 96 });
    assert_eq!(outcome(3), RoundOutcome::WithinBudget);
    assert_eq!(outcome(4), RoundOutcome::Compressed { kept: 40, evicted: seqs[4].cache.len - 40 });
    assert_eq!(outcome(5), RoundOutcome::Compressed { kept: 128, evicted: 32 });
    assert_eq!(batch[1].cache.len, 130, "a skipped round keeps every slot");

    // Only the due items: the same for those, the others untouched.
    let mut due = seqs.clone();
    let reports = {
        let mut items: Vec<_> = due.iter_mut().map(Seq::item).collect();
        comp.compress_due(&mut items).unwrap()
    };
    for (i, r) in reports.iter().enumerate() {
        match r {
            Some(r) => {
                assert_same_report(&format!("due item {i}"), r, &alone_reports[i]);
                assert_same_seq(&format!("due item {i}"), &due[i], &alone[i]);
            }
            None => {
                assert_eq!(i, 3, "only item 3 is not due");
                assert_same_seq("item not due", &due[i], &seqs[i]);
            }
        }
    }

    // Run after run, whatever else is in the batch: item 4 alone in a batch, reversed order.
    let mut again = seqs.clone();
    let mut items: Vec<_> = again.iter_mut().rev().map(Seq::item).collect();
    let reports = comp.compress_batch(&mut items).unwrap();
    for (j, r) in reports.iter().enumerate() {
        assert_same_report(&format!("reversed item {j}"), r, &alone_reports[5 - j]);
    }
    let mut single = [seqs[4].clone()];
    let mut items: Vec<_> = single.iter_mut().map(Seq::item).collect();
    assert_same_report("single item", &comp.compress_batch(&mut items).unwrap()[0], &alone_reports[4]);
}

fn paper(budget: usize, divide: usize) -> CompressionConfig {
    CompressionConfig { budget, divide_length: divide, ..CompressionConfig::preset(Preset::Paper) }
}

#[test]
fn batch_equals_one_by_one_f32_per_head() {
    batch_matches_one_by_one::<f32>(21, model(3, 8, 2, 64), paper(96, 32));
}

#[test]
fn batch_equals_one_by_one_bf16_per_layer_per_head_max() {
    let mut config = CompressionConfig { mode: SelectionMode::PerLayerPerHead, ..paper(96, 32) };
    config.score.aggregation = OffsetAggregation::Max;
    batch_matches_one_by_one::<bf16>(22, model(2, 4, 2, 32), config);
}

#[test]
fn batch_equals_one_by_one_bf16_union() {
    batch_matches_one_by_one::<bf16>(
        23,
        model(2, 6, 3, 64),
        CompressionConfig { mode: SelectionMode::Union, ..paper(96, 32) },
    );
}

#[test]
fn empty_batch_is_fine() {
    let mut rng = Rng(24);
    let m = model(1, 2, 1, 32);
    let comp = Compressor::new(paper(16, 8), scorer(&mut rng, &m)).unwrap();
    let mut items: Vec<BatchItem<'_, f32>> = Vec::new();
    assert!(comp.compress_batch(&mut items).unwrap().is_empty());
    assert!(comp.compress_due(&mut items).unwrap().is_empty());
    assert!(comp.due_items(&items).is_empty());
}

#[test]
fn bad_items_name_the_item_and_field_and_touch_nothing() {
    let mut rng = Rng(25);
    let m = model(2, 4, 2, 32);
    let comp = Compressor::new(paper(32, 8), scorer(&mut rng, &m)).unwrap();
    let mut seqs: Vec<Seq<f32>> = (0..5).map(|i| Seq::new(&m, 8, 128, 4, Some(24 + i))).collect();
    for s in seqs.iter_mut() {
        for _ in 0..60 {
            s.push(&mut rng);
        }
    }
    let original = seqs.clone();
    let check = |seqs: &mut Vec<Seq<f32>>, expected: &str, kind: ErrorKind| {
        let snapshot = seqs.clone();
        for due_only in [false, true] {
            let mut items: Vec<_> = seqs.iter_mut().map(Seq::item).collect();
            let err = if due_only {
                comp.compress_due(&mut items).map(|_| ()).unwrap_err()
            } else {
                comp.compress_batch(&mut items).map(|_| ()).unwrap_err()
            };
            assert_eq!(err.to_string(), expected);
            assert_eq!(err.kind(), kind);
            drop(items);
            for (i, (s, o)) in seqs.iter().zip(&snapshot).enumerate() {
                assert_same_seq(&format!("item {i} after a failed batch"), s, o);
            }
        }
    };

    seqs[3].budget = Some(0);
    check(&mut seqs, "batch item 3: budget: expected >= 1, got 0", ErrorKind::InvalidArgument);
    seqs[3].budget = Some(27);

    seqs[1].window = Some(25);
    check(&mut seqs, "batch item 1: window: expected < budget (25), got 25", ErrorKind::InvalidArgument);
    seqs[1].window = None;

    seqs[4].state.positions[0].pop();
    let msg = "batch item 4: sequence state slots: expected 60, got 59";
    check(&mut seqs, msg, ErrorKind::ShapeMismatch);
    seqs[4].state = original[4].state.clone();

    seqs[2].state.round_start = 59;
    let msg = "batch item 2: round_start: expected >= the 60 cached slots, got 59";
    check(&mut seqs, msg, ErrorKind::InvalidArgument);
    seqs[2].state.round_start = 60;

    // Repaired, the same batch runs: every item compressed to its own budget.
    assert!(seqs
        .iter()
        .zip(&original)
        .all(|(s, o)| s.state == o.state && s.budget == o.budget && s.window == o.window));
    let mut items: Vec<_> = seqs.iter_mut().map(Seq::item).collect();
    let reports = comp.compress_due(&mut items).unwrap();
    for (i, r) in reports.iter().enumerate() {
        let kept = 24 + i;
        assert_eq!(
            r.as_ref().unwrap().round.outcome,
            RoundOutcome::Compressed { kept, evicted: 60 - kept },
            "item {i}"
        );
    }
    drop(items);

    let other = model(2, 4, 1, 32);
    seqs[0] = Seq::new(&other, 8, 128, 4, None);
    seqs[0].push(&mut rng);
    let mut items: Vec<_> = seqs.iter_mut().map(Seq::item).collect();
    let err = comp.compress_batch(&mut items).unwrap_err();
    assert!(err.to_string().starts_with("batch item 0: cache [L, Hkv, D]: expected [2, 2, 32]"), "{err}");
}

/// Simulated decode across a batch: sequences join at different steps with their own prompts,
/// budgets and lengths; every step writes one token to each live sequence and compresses the due
/// ones in one call, mirrored one by one. Invariants: a compressed cache holds exactly its
/// budget, a cache never exceeds budget + divide_length (except where rounds are skipped), the
/// prompt survives under the paper preset, the window survives, positions stay ascending and
/// unique, values move with their positions; the batch equals the one-by-one mirror bit for bit.
fn simulate<T: Element>(preset: Preset, mode: SelectionMode, tokens: usize, seed: u64) {
    let mut rng = Rng(seed);
    let m = model(2, 4, 2, 32);
    let divide = 32;
    let config = CompressionConfig {
        budget: 96,
        divide_length: divide,
        mode,
        window: if preset == Preset::Vllm { 16 } else { 0 },
        ..CompressionConfig::preset(preset)
    };
    let comp = Compressor::new(config, scorer(&mut rng, &m)).unwrap();
    // (prompt, budget, window, first step, last step)
    let plan: [PlanRow; 6] = [
        (40, None, None, 0, tokens),
        (7, Some(48), None, 0, tokens),
        (120, Some(100), None, 0, tokens / 3), // paper: prompt reaches the budget, rounds skipped
        (0, Some(160), Some(24), tokens / 5, tokens),
        (64, Some(200), None, tokens / 2, tokens),
        (16, Some(60), Some(32), 10, tokens - 100),
    ];
    let live = |t: usize, (_, _, _, first, last): PlanRow| t >= first && t < last;
    let mut seqs: Vec<Seq<T>> = plan
        .iter()
        .map(|&(prompt, budget, window, first, last)| {
            let mut s = Seq::new(&m, 8, prompt.max(budget.unwrap_or(96) + divide) + last - first + 1, prompt, budget);
            s.window = window;
            s
        })
        .collect();
    let mut mirror = seqs.clone();
    let mut rounds = [0usize; 6];
    let mut skipped = [0usize; 6];
    for t in 0..tokens {
        let step = |seqs: &mut [Seq<T>], mirror: &mut [Seq<T>], rounds: &mut [usize; 6], skipped: &mut [usize; 6]| {
            // Live sequences past their prefill (paper: with a generated token written).
            let idx: Vec<usize> = (0..6)
                .filter(|&i| live(t, plan[i]))
                .filter(|&i| {
                    let written = seqs[i].state.round_start as usize;
                    written >= plan[i].0.max(1) && (preset == Preset::Vllm || written > plan[i].0)
                })
                .collect();
            let before: Vec<Vec<Vec<u64>>> = idx.iter().map(|&i| seqs[i].state.positions.clone()).collect();
            let reports = {
                let mut items: Vec<BatchItem<'_, T>> = Vec::new();
                for (i, s) in seqs.iter_mut().enumerate() {
                    if idx.contains(&i) {
                        items.push(s.item().with_scheduled(usize::from(preset == Preset::Vllm)));
                    }
                }
                comp.compress_due(&mut items).unwrap()
            };
            for ((&i, report), old) in idx.iter().zip(reports).zip(before) {
                let sc = usize::from(preset == Preset::Vllm);
                let Some(report) = report else {
                    assert!(
                        !comp.round_due_with(&seqs[i].state, seqs[i].budget, sc),
                        "step {t} item {i}: due, not run"
                    );
                    continue;
                };
                let alone = mirror[i].alone(&comp);
                assert!(alone.round_due(&mirror[i].state, sc));
                let r = alone.compress(&mut mirror[i].cache, &mut mirror[i].state).unwrap();
                assert_same_report(&format!("step {t} item {i}"), &report, &r);
                assert_same_seq(&format!("step {t} item {i}"), &seqs[i], &mirror[i]);
                let cfg = comp.config_with(seqs[i].budget, seqs[i].window).unwrap();
                match report.round.outcome {
                    RoundOutcome::Compressed { kept, .. } => {
                        rounds[i] += 1;
                        assert_eq!(kept, cfg.budget);
                        check_compressed(&seqs[i], &cfg, &old, &format!("step {t} item {i}"));
                    }
                    RoundOutcome::Skipped(SkipReason::ProtectedReachBudget { protected, budget }) => {
                        skipped[i] += 1;
                        assert_eq!((protected, budget), (plan[i].0.min(seqs[i].cache.len), cfg.budget));
                    }
                    RoundOutcome::WithinBudget => {
                        panic!("step {t} item {i}: a due round found the cache within budget")
                    }
                }
            }
        };
        // vllm: rounds run before the step that writes the token.
        if preset == Preset::Vllm {
            step(&mut seqs, &mut mirror, &mut rounds, &mut skipped);
        }
        for i in 0..6 {
            if live(t, plan[i]) {
                // The prompt is written at the sequence's first step (prefill), then one token per step.
                let count = if seqs[i].state.round_start == 0 { plan[i].0.max(1) } else { 1 };
                for _ in 0..count {
                    let seed = rng.next_u64();
                    seqs[i].push(&mut Rng(seed));
                    mirror[i].push(&mut Rng(seed));
                }
                let cfg = comp.config_with(seqs[i].budget, seqs[i].window).unwrap();
                let protected = cfg.protection(seqs[i].cache.len, seqs[i].state.prompt_slots()).count();
                if protected < cfg.budget && seqs[i].state.round_start as usize > plan[i].0 {
                    assert!(
                        seqs[i].cache.len <= cfg.budget + divide,
                        "step {t} item {i}: cache above budget + divide_length"
                    );
                }
            }
        }
        if preset == Preset::Paper {
            step(&mut seqs, &mut mirror, &mut rounds, &mut skipped);
        }
    }
    for i in 0..6 {
        let (prompt, budget, _, first, last) = plan[i];
        let budget = budget.unwrap_or(96);
        let written = prompt.max(1) + (last - first - 1);
        if preset == Preset::Paper && prompt >= budget {
            assert_eq!(rounds[i], 0, "item {i}");
            assert!(skipped[i] > 0, "item {i}: the skipped rounds must be reported");
        } else if written > budget + divide {
            let expected = (written - budget) / divide;
            assert!(rounds[i] + 1 >= expected, "item {i}: only {} rounds, expected about {expected}", rounds[i]);
        }
    }
    assert!(rounds.iter().sum::<usize>() > 100, "{rounds:?}");
}

fn check_compressed<T: Element>(s: &Seq<T>, cfg: &CompressionConfig, before: &[Vec<u64>], what: &str) {
    assert_eq!(s.cache.len, cfg.budget, "{what}: a compressed cache holds its budget");
    for (row, (pos, old)) in s.state.positions.iter().zip(before).enumerate() {
        assert_eq!(pos.len(), cfg.budget, "{what}: row {row}");
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{what}: row {row}: positions must stay ascending and unique");
        if cfg.prefix == PrefixProtection::Protected {
            assert!((0..s.state.prompt_len as u64).all(|p| pos.contains(&p)), "{what}: row {row}: prompt evicted");
        }
        for p in &old[old.len() - cfg.window..] {
            assert!(pos.contains(p), "{what}: row {row}: window position {p} evicted");
        }
    }
    let (hkv, cap, dv) = (s.cache.num_kv_heads, s.cache.capacity, s.cache.value_dim);
    for l in 0..s.cache.num_layers {
        for g in 0..hkv {
            for (i, &p) in s.state.positions[l * hkv + g].iter().enumerate() {
                let v = &s.cache.v[l][(g * cap + i) * dv..(g * cap + i) * dv + 2];
                assert!(
                    v == &value_of::<T>(p, dv)[..2],
                    "{what}: layer {l} head {g} slot {i}: values moved apart from position {p}"
                );
            }
        }
    }
}

#[test]
fn decode_batch_paper_per_head_f32() {
    simulate::<f32>(Preset::Paper, SelectionMode::PerHead, 3000, 31);
}

#[test]
fn decode_batch_paper_per_layer_per_head_bf16() {
    simulate::<bf16>(Preset::Paper, SelectionMode::PerLayerPerHead, 2500, 32);
}

#[test]
fn decode_batch_vllm_per_head_bf16() {
    simulate::<bf16>(Preset::Vllm, SelectionMode::PerHead, 2500, 33);
}

/// The same batch on a kernel backend: scores within 1e-5 of the row's spread; on the emu keep
/// sets, caches and sequence states equal the CPU backend's exactly. A GPU's last-bit differences
/// (FMA, device `sincos`) may swap slots whose CPU scores lie within `KEEP_SWAP_TOL` of a selection
/// boundary on these random keys (`common::assert_keep_sets_match`); an item with swaps must then
/// hold exactly the rows and positions its own keep sets name.
#[cfg(any(feature = "emu", feature = "cuda"))]
fn batch_on_backend_matches_cpu<T: Element>(
    seed: u64,
    m: ModelConfig,
    config: CompressionConfig,
    backend: triattn::Backend,
) {
    let mut rng = Rng(seed);
    let sc = scorer(&mut rng, &m);
    let cpu = Compressor::new(config, sc).unwrap();
    let device = cpu.clone().with_backend(backend);
    let seqs = six_sequences::<T>(&mut rng, &cpu, &m);
    let mut on_cpu = seqs.clone();
    let want = {
        let mut items: Vec<_> = on_cpu.iter_mut().map(Seq::item).collect();
        cpu.compress_batch(&mut items).unwrap()
    };
    let mut on_device = seqs.clone();
    let got = {
        let mut items: Vec<_> = on_device.iter_mut().map(Seq::item).collect();
        device.compress_batch(&mut items).unwrap()
    };
    let exact = device.backend().name() == "emu";
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let what = format!("{} item {i}", device.backend().name());
        assert_eq!(g.round.outcome, w.round.outcome, "{what}: outcome");
        let tol = if exact { 0.0 } else { common::KEEP_SWAP_TOL };
        let swaps = common::assert_keep_sets_match(&what, &w.round.score, &w.round.keep, &g.round.keep, tol);
        assert!(swaps == 0 || !exact, "{what}: the emu must keep exactly what the CPU keeps");
        for (gl, wl) in g.round.raw.iter().zip(&w.round.raw) {
            let n = w.round.n;
            for (gr, wr) in gl.chunks(n).zip(wl.chunks(n)) {
                let spread = common::std_dev(wr).max(1e-6);
                let err = gr.iter().zip(wr).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
                assert!(err <= 1e-5 * spread, "{what}: raw scores differ by {err} (row std {spread})");
            }
        }
        if swaps == 0 {
            assert_same_seq(&what, &on_device[i], &on_cpu[i]);
        } else {
            assert_seq_follows_keep(&what, &seqs[i], &on_device[i], &g.round.keep, config.mode);
            assert_eq!(on_device[i].state.round_start, on_cpu[i].state.round_start, "{what}: round_start");
            assert_eq!(on_device[i].cache.len, on_cpu[i].cache.len, "{what}: cache len");
        }
    }
}

/// `after` is `before` compacted (order-preserving) to `keep`, the keep sets of its round: each
/// (layer, KV head) row holds the positions, keys and values of its set's slots, in slot order.
#[cfg(any(feature = "emu", feature = "cuda"))]
fn assert_seq_follows_keep<T: Element>(
    what: &str,
    before: &Seq<T>,
    after: &Seq<T>,
    keep: &[Vec<u32>],
    mode: SelectionMode,
) {
    let c = &before.cache;
    let (hkv, cap, d, dv) = (c.num_kv_heads, c.capacity, c.head_dim, c.value_dim);
    for l in 0..c.num_layers {
        for g in 0..hkv {
            let set = &keep[mode.set_index(l, g, hkv)];
            let row = l * hkv + g;
            let want: Vec<u64> = set.iter().map(|&s| before.state.positions[row][s as usize]).collect();
            assert_eq!(after.state.positions[row], want, "{what}: positions of layer {l} head {g}");
            for (i, &s) in set.iter().enumerate() {
                let (src, dst) = ((g * cap + s as usize), (g * cap + i));
                assert!(c.k[l][src * d..(src + 1) * d] == after.cache.k[l][dst * d..(dst + 1) * d], "{what}: key row");
                assert!(
                    c.v[l][src * dv..(src + 1) * dv] == after.cache.v[l][dst * dv..(dst + 1) * dv],
                    "{what}: value row"
                );
            }
        }
    }
}

#[cfg(feature = "emu")]
#[test]
fn batch_on_emu_matches_cpu_bf16_per_head() {
    batch_on_backend_matches_cpu::<bf16>(41, model(2, 8, 2, 64), paper(96, 32), triattn::Backend::Emu);
}

#[cfg(feature = "emu")]
#[test]
fn batch_on_emu_matches_cpu_f32_vllm_per_layer_per_head() {
    let config = CompressionConfig {
        budget: 96,
        divide_length: 32,
        window: 16,
        mode: SelectionMode::PerLayerPerHead,
        ..CompressionConfig::preset(Preset::Vllm)
    };
    batch_on_backend_matches_cpu::<f32>(42, model(2, 8, 2, 64), config, triattn::Backend::Emu);
}

#[cfg(feature = "cuda")]
#[test]
fn batch_on_cuda_matches_cpu() {
    let Some(_gpu) = common::gpu_or_skip("batch_on_cuda_matches_cpu") else { return };
    let dev = std::sync::Arc::new(triattn::cuda::CudaDevice::open(0).unwrap());
    batch_on_backend_matches_cpu::<bf16>(43, model(2, 8, 2, 64), paper(96, 32), triattn::Backend::Cuda(dev));
}

/// Sequences that share a shape (slots, capacity, budget, window) go through one batch plan on a
/// kernel backend — one launch per stage — with results bit-identical to running each alone on
/// that backend, and keep sets equal to the CPU backend's.
#[cfg(feature = "emu")]
#[test]
fn same_shape_items_share_one_batch_plan_on_emu() {
    let m = model(2, 8, 2, 64);
    let mut rng = Rng(77);
    let sc = scorer(&mut rng, &m);
    let config = paper(96, 32);
    let cpu = Compressor::new(config, sc).unwrap();
    let emu = cpu.clone().with_backend(triattn::Backend::Emu);
    let mut seqs: Vec<Seq<bf16>> = [0usize, 5, 20, 33]
        .iter()
        .map(|&prompt| {
            let mut s = Seq::<bf16>::new(&m, 16, 200, prompt, None);
            for _ in 0..150 {
                s.push(&mut rng);
            }
            s
        })
        .collect();
    seqs.push({
        // A different length: runs alone.
        let mut s = Seq::<bf16>::new(&m, 16, 200, 3, None);
        for _ in 0..140 {
            s.push(&mut rng);
        }
        s
    });
    let run = |comp: &Compressor, batch: bool| {
        let mut mine = seqs.clone();
        let reports = if batch {
            let mut items: Vec<_> = mine.iter_mut().map(Seq::item).collect();
            comp.compress_batch(&mut items).unwrap()
        } else {
            mine.iter_mut().map(|s| comp.compress(&mut s.cache, &mut s.state).unwrap()).collect()
        };
        (mine, reports)
    };
    let (emu_batch, emu_batch_reports) = run(&emu, true);
    let (emu_alone, emu_alone_reports) = run(&emu, false);
    let (cpu_alone, cpu_reports) = run(&cpu, false);
    for i in 0..seqs.len() {
        assert_same_report(&format!("item {i}: batched vs alone on emu"), &emu_batch_reports[i], &emu_alone_reports[i]);
        assert_same_seq(&format!("item {i}: batched vs alone on emu"), &emu_batch[i], &emu_alone[i]);
        assert_eq!(emu_batch_reports[i].round.keep, cpu_reports[i].round.keep, "item {i}: keep sets vs the CPU");
        assert_same_seq(&format!("item {i}: emu vs cpu"), &emu_batch[i], &cpu_alone[i]);
    }
}
