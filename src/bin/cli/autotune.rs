//! `triattn autotune`: for every family of the ops a model uses and every shape bucket, check
//! each candidate variant against the CPU backend on a small shape, time the ones that agree, keep
//! the fastest, and write a `triattn-tuning-v1` table.
//!
//! Timing on `cuda`: CUDA events around each stage's launch, one warm-up, then the median of the
//! repetitions; every repetition stages its inputs anew, so the keys a stage reads come from
//! device memory, not from L2 (the upload of the next repetition's inputs, larger than L2 at
//! the tuned shapes, evicts them). On `emu` the same loop measures the CPU's wall time over
//! shapes scaled down to a few hundred slots: it exercises the whole path, and says nothing
//! about speed (the table says so in `meta.device`).

use std::io::IsTerminal;
use std::time::Duration;

use triattn::cpu::decode::{decode_layer, SlotLists};
use triattn::cuda::{
    CacheLayout, Compaction, DecodeInputs, DecodePlan, DecodeShape, ListLengths, RoundPlan, RoundShape, RowStrides,
    SplitPolicy, Stage,
};
use triattn::decode::{DecodeOptions, ListLayout};
use triattn::kernels::variant::{self, CompactMode, ScoreAlgo, Variant};
use triattn::policy::SelectionMode;
use triattn::round::{self, Backend, Scorer};
use triattn::score::OffsetAggregation;
use triattn::tuning::{self, device_of, Dispatch, TableSource, Tuning, TuningEntry, TuningMeta};
use triattn::{CompressionConfig, DType, Element, Error, LayerView, ModelConfig, PairingStyle, Result, Stats};

use super::bench::SplitMix64;
use crate::{AutotuneArgs, BackendArg};

/// Keys + values a measured shape may hold in memory on the host and the device.
const GIB: f64 = (1u64 << 30) as f64;

/// One op of the round or the decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Score(ScoreAlgo),
    Select,
    Compact(CompactMode),
    Decode,
}

impl Op {
    /// The family of this op for keys of `dtype` and head_dim `d`, if the build has one.
    fn family(self, dtype: DType, d: usize) -> Option<String> {
        Some(match self {
            Op::Score(algo) => variant::score_variant(dtype, d, algo)?.family(),
            Op::Select => variant::select_variant(1).family(),
            Op::Compact(mode) => variant::compact_variant(mode).family(),
            Op::Decode => variant::decode_variant(dtype, d)?.family(),
        })
    }

    /// The stage whose time is the op's.
    fn stage(self) -> Stage {
        match self {
            Op::Score(_) => Stage::Score,
            Op::Select => Stage::Select,
            Op::Compact(_) => Stage::Compact,
            Op::Decode => Stage::Decode,
        }
    }
}

/// The shape a bucket is measured at.
#[derive(Clone, Copy, Debug)]
struct Measured {
    len: usize,
    batch: usize,
    layers: usize,
}

/// A finished family x bucket.
struct Row {
    family: String,
    max_len: Option<usize>,
    max_batch: Option<usize>,
    default: Option<(Variant, f64)>,
    best: (Variant, f64),
}

pub fn autotune(a: AutotuneArgs) -> Result<()> {
    let backend = open(&a)?;
    let emu = !matches!(a.backend, BackendArg::Cuda);
    let model = ModelConfig::from_file(&a.model_config)?;
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::Bf16,
        other => return Err(Error::invalid_argument("--dtype", "f32, f16 or bf16", other)),
    };
    let d = model.head_dim;
    let config = CompressionConfig::default();
    let mut ops = Vec::new();
    for op in &a.ops {
        match op.as_str() {
            "score" => ops.extend([Op::Score(ScoreAlgo::Mean), Op::Score(ScoreAlgo::Max)]),
            "select" => ops.push(Op::Select),
            "compact" => ops.extend([Op::Compact(CompactMode::OrderPreserving), Op::Compact(CompactMode::HoleFilling)]),
            "decode" => ops.push(Op::Decode),
            other => return Err(Error::invalid_argument("--ops", "score, select, compact, decode", other)),
        }
    }
    let first_len = config.budget + config.divide_length;
    let mut lengths = a.lengths.clone().unwrap_or(if a.quick {
        vec![first_len, 32 * 1024]
    } else {
        vec![first_len, 8 * 1024, 32 * 1024, 128 * 1024]
    });
    let mut batches = a.batches.clone().unwrap_or(if a.quick { vec![1, 16] } else { vec![1, 16, 64] });
    for (what, v) in [("--lengths", &mut lengths), ("--batches", &mut batches)] {
        v.sort_unstable();
        v.dedup();
        if v.is_empty() || v[0] == 0 {
            return Err(Error::invalid_argument(what, "positive numbers", format!("{v:?}")));
        }
    }
    let max_gb = if a.quick { a.max_gb.min(1.0) } else { a.max_gb };
    let reps = a.reps.unwrap_or(if emu {
        1
    } else if a.quick {
        5
    } else {
        15
    });
    let (device, target, _) = device_of(&backend);
    let out = match &a.out {
        Some(p) => p.clone(),
        None => tuning::default_path(&device)
            .ok_or_else(|| Error::invalid_argument("--out", "a path (no home folder to default to)", "none"))?,
    };
    if emu {
        eprintln!(
            "autotune: emu backend: the kernels run on the CPU over shapes scaled down to at most {EMU_LEN} slots and \
             {EMU_BATCH} sequences; the times say nothing about a GPU"
        );
    }

    let families: Vec<(Op, String)> = ops.iter().filter_map(|&op| op.family(dtype, d).map(|f| (op, f))).collect();
    // Check every candidate first: one that disagrees with the CPU backend is never timed.
    let mut candidates: Vec<(Op, String, Vec<Variant>)> = Vec::new();
    for (op, family) in &families {
        let mut ok = Vec::new();
        for v in variant::family_members(family) {
            match check(&backend, &model, dtype, *op, v) {
                Ok(()) => ok.push(v),
                Err(e) => eprintln!("autotune: {} disagrees with the CPU backend, never chosen: {e}", v.symbol()),
            }
        }
        candidates.push((*op, family.clone(), ok));
    }

    let buckets: Vec<(usize, usize)> = lengths.iter().flat_map(|&l| batches.iter().map(move |&b| (l, b))).collect();
    let steps: usize = candidates.iter().map(|c| c.2.len()).sum::<usize>() * buckets.len();
    let mut progress = Progress::new(steps);
    let mut rows = Vec::new();
    for (op, family, members) in &candidates {
        if members.is_empty() {
            continue;
        }
        for &(len, batch) in &buckets {
            let Some(measured) = measured_shape(&model, dtype, *op, len, batch, emu, max_gb) else {
                progress.skip(members.len());
                eprintln!("autotune: {family} len {len} batch {batch}: one layer is over {max_gb} GiB, skipped");
                continue;
            };
            let default = tuning::built_in_choice(family, measured.len);
            let mut times = Vec::new();
            for &v in members {
                progress.step(&format!("{family} len<={len} batch<={batch} {}", v.symbol()));
                let t = time_candidate(&backend, &model, dtype, *op, v, measured, reps)?;
                times.push((v, t.as_secs_f64() * 1e6));
            }
            let best = *times.iter().min_by(|x, y| x.1.total_cmp(&y.1)).expect("at least one candidate");
            let default = times.iter().copied().find(|(v, _)| Some(*v) == default);
            rows.push(Row {
                family: family.clone(),
                max_len: (len != *lengths.last().unwrap()).then_some(len),
                max_batch: (batch != *batches.last().unwrap()).then_some(batch),
                default,
                best,
            });
        }
    }
    progress.finish();

    let entries: Vec<TuningEntry> = rows
        .iter()
        .map(|r| TuningEntry {
            family: r.family.clone(),
            variant: r.best.0.symbol(),
            max_len: r.max_len.map(|x| x as u64),
            max_batch: r.max_batch.map(|x| x as u64),
            time_us: Some(round3(r.best.1)),
            default_variant: r.default.map(|(v, _)| v.symbol()),
            default_us: r.default.map(|(_, t)| round3(t)),
        })
        .collect();
    let meta = TuningMeta {
        format: tuning::FORMAT.to_string(),
        arch: target.arch.clone(),
        device: Some(if emu {
            "emu (kernels executed on the CPU; times meaningless for speed)".to_string()
        } else {
            device
        }),
        source: TableSource::Measured,
        variant_table: variant::table_hash(),
        sm_count: target.sm_count,
        toolkit: tuning::built_toolkit().map(str::to_string),
        driver: driver_version(&backend),
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        date: tuning::today_utc(),
    };
    let table = Tuning::new(meta, entries, &out.display().to_string())?;
    table.write(&out)?;

    println!(
        "{:<24} {:>9} {:>7}  {:<44} {:>10}  {:<44} {:>10} {:>8}",
        "family", "max_len", "batch", "default", "us", "best", "us", "speed-up"
    );
    for r in &rows {
        let bound = |b: Option<usize>| b.map_or("any".to_string(), |x| x.to_string());
        let (dv, dt) = r.default.map_or(("-".to_string(), f64::NAN), |(v, t)| (v.symbol(), t));
        println!(
            "{:<24} {:>9} {:>7}  {:<44} {:>10.1}  {:<44} {:>10.1} {:>7.2}x",
            r.family,
            bound(r.max_len),
            bound(r.max_batch),
            dv,
            dt,
            r.best.0.symbol(),
            r.best.1,
            dt / r.best.1
        );
    }
    println!(
        "measured shapes: {}",
        if emu { "scaled down (emu)" } else { "the bucket bounds (layers reduced to fit --max-gb)" }
    );
    println!("wrote {}", out.display());
    Ok(())
}

/// Largest shape measured on emu.
const EMU_LEN: usize = 384;
const EMU_BATCH: usize = 2;

fn open(a: &AutotuneArgs) -> Result<Backend> {
    match a.backend {
        BackendArg::Cpu => Err(Error::invalid_argument("--backend", "cuda or emu (autotune times kernels)", "cpu")),
        BackendArg::Emu => super::round_backend(BackendArg::Emu),
        #[cfg(feature = "cuda")]
        BackendArg::Cuda => Ok(Backend::Cuda(std::sync::Arc::new(triattn::cuda::CudaDevice::open(a.device)?))),
        #[cfg(not(feature = "cuda"))]
        BackendArg::Cuda => super::round_backend(BackendArg::Cuda),
    }
}

fn driver_version(backend: &Backend) -> Option<String> {
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => dev.backend().driver_version(),
        _ => None,
    }
}

/// The shape a bucket of `len` slots and `batch` sequences is measured at: the bucket's bounds
/// with the model's layers reduced until keys and values fit `max_gb` (none if one layer does
/// not); on emu a few hundred slots of one layer.
fn measured_shape(
    model: &ModelConfig,
    dtype: DType,
    op: Op,
    len: usize,
    batch: usize,
    emu: bool,
    max_gb: f64,
) -> Option<Measured> {
    if emu {
        return Some(Measured { len: len.min(EMU_LEN), batch: batch.min(EMU_BATCH), layers: 1 });
    }
    // Decode lists of `len` entries over a cache of twice as many slots.
    let slots = if op == Op::Decode { 2 * len } else { len };
    let per_layer = (batch * model.num_kv_heads * slots * 2 * model.head_dim * dtype.size()) as f64;
    let layers = ((max_gb * GIB / per_layer) as usize).min(model.num_layers);
    (layers >= 1).then_some(Measured { len, batch, layers })
}

/// The model cut to `layers` with deterministic synthetic statistics (speed does not depend on
/// their values; a check compares backends on the same ones).
fn scorer_for(model: &ModelConfig, layers: usize) -> Result<Scorer> {
    let mut m = model.clone();
    m.num_layers = layers;
    let (h, d) = (m.num_heads, m.head_dim);
    let n = layers * h * (d / 2);
    let mut rng = SplitMix64::new(0x7e57, layers as u64);
    let qr: Vec<f32> = (0..n).map(|_| rng.symmetric() * 2.0).collect();
    let qi: Vec<f32> = (0..n).map(|_| rng.symmetric() * 2.0).collect();
    let qa: Vec<f32> = (0..n).map(|i| (qr[i] * qr[i] + qi[i] * qi[i]).sqrt() + 0.5 * (rng.symmetric() + 1.0)).collect();
    let stats = Stats {
        num_layers: layers,
        num_heads: h,
        head_dim: d,
        rope_style: PairingStyle::Half,
        q_mean_real: qr,
        q_mean_imag: qi,
        q_abs_mean: qa,
        sampled_heads: None,
        metadata: Default::default(),
    };
    Scorer::new(m, stats, None)
}

/// Keys or values `[S * L]` tensors of `[Hkv, len, dim]`, deterministic.
fn tensors<T: Element>(count: usize, elems: usize, seed: u64) -> Vec<Vec<T>> {
    use rayon::prelude::*;
    (0..count)
        .into_par_iter()
        .map(|i| {
            let mut rng = SplitMix64::new(seed, i as u64);
            (0..elems).map(|_| T::from_f32(rng.symmetric() * 2.0)).collect()
        })
        .collect()
}

/// The round config of an op: mean or max aggregation; the budget keeps all but a divide
/// length (what a round at `budget + divide_length` slots does).
fn round_config(op: Op, len: usize) -> CompressionConfig {
    let mut c = CompressionConfig::default();
    if op == Op::Score(ScoreAlgo::Max) {
        c.score.aggregation = OffsetAggregation::Max;
    }
    c.mode = SelectionMode::PerHead;
    c.budget = len.saturating_sub(c.divide_length).max(len / 2).max(1);
    c
}

fn round_shape(dtype: DType, len: usize, d: usize, op: Op, prefix: usize) -> RoundShape {
    let strides = RowStrides { head_stride: len * d, row_stride: d };
    RoundShape {
        dtype,
        len,
        prefix_len: prefix,
        value_dim: d,
        layout: CacheLayout::Contiguous { keys: strides, values: strides },
        compaction: match op {
            Op::Compact(mode) => Compaction::InPlace(mode),
            _ => Compaction::KeepSetsOnly,
        },
        positions: None,
    }
}

fn time_candidate(
    backend: &Backend,
    model: &ModelConfig,
    dtype: DType,
    op: Op,
    v: Variant,
    m: Measured,
    reps: usize,
) -> Result<Duration> {
    match dtype {
        DType::F32 => time_typed::<f32>(backend, model, op, v, m, reps),
        DType::F16 => time_typed::<half::f16>(backend, model, op, v, m, reps),
        DType::Bf16 => time_typed::<half::bf16>(backend, model, op, v, m, reps),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn time_typed<T: Element>(
    backend: &Backend,
    model: &ModelConfig,
    op: Op,
    v: Variant,
    m: Measured,
    reps: usize,
) -> Result<Duration> {
    let forced = Dispatch::forcing(&[v]);
    let (hkv, d) = (model.num_kv_heads, model.head_dim);
    if op == Op::Decode {
        let problem = DecodeProblem::<T>::new(model, m.batch, m.layers, m.len, 11);
        let plan = problem.plan(backend, &forced)?;
        let k: Vec<&[T]> = problem.keys.iter().map(Vec::as_slice).collect();
        let v: Vec<&[T]> = problem.values.iter().map(Vec::as_slice).collect();
        let mut times = Vec::new();
        for _ in 0..=reps {
            let got = backend.decode(&plan, &problem.inputs(&k, &v), 0, m.layers)?;
            times.push(got.timings.get(Stage::Decode) + got.timings.get(Stage::Combine));
        }
        times.remove(0);
        return Ok(median(times));
    }
    let scorer = scorer_for(model, m.layers)?;
    let config = round_config(op, m.len);
    let prefix = 16.min(m.len / 4);
    let shape = round_shape(T::DTYPE, m.len, d, op, prefix);
    let plan = RoundPlan::new_batch_tuned(&scorer, &config, shape, &vec![prefix; m.batch], &forced)?;
    let starts = vec![m.len as u64; m.batch];
    let mut keys = tensors::<T>(m.batch * m.layers, hkv * m.len * d, 21);
    let mut values =
        if matches!(op, Op::Compact(_)) { tensors::<T>(m.batch * m.layers, hkv * m.len * d, 22) } else { Vec::new() };
    let mut times = Vec::new();
    for _ in 0..=reps {
        let timings = if matches!(op, Op::Compact(_)) {
            let mut k: Vec<&mut [T]> = keys.iter_mut().map(Vec::as_mut_slice).collect();
            let mut vv: Vec<&mut [T]> = values.iter_mut().map(Vec::as_mut_slice).collect();
            backend.round_in_place(&plan, &mut k, &mut vv, &starts)?.timings
        } else {
            let k: Vec<&[T]> = keys.iter().map(Vec::as_slice).collect();
            backend.round_keys(&plan, &k, &starts)?.timings
        };
        times.push(timings.get(op.stage()));
    }
    times.remove(0);
    Ok(median(times))
}

/// Candidate `v` of `op` against the CPU backend on a small shape (2 layers, a few hundred
/// slots): raw scores within 1e-4 of each row's spread, keep sets equal to a CPU top-k of the
/// candidate's own ranked scores, compacted rows equal to a CPU compaction by its keep sets, a
/// decode within 1e-4 of max |v|.
fn check(backend: &Backend, model: &ModelConfig, dtype: DType, op: Op, v: Variant) -> Result<()> {
    match dtype {
        DType::F32 => check_typed::<f32>(backend, model, op, v),
        DType::F16 => check_typed::<half::f16>(backend, model, op, v),
        DType::Bf16 => check_typed::<half::bf16>(backend, model, op, v),
    }
}

fn check_typed<T: Element>(backend: &Backend, model: &ModelConfig, op: Op, v: Variant) -> Result<()> {
    let forced = Dispatch::forcing(&[v]);
    let (layers, len) = (2.min(model.num_layers), 300);
    let (hkv, d) = (model.num_kv_heads, model.head_dim);
    let fail = |what: String| Err(Error::invalid_argument(format!("{} check", v.symbol()), "agreement", what));
    if op == Op::Decode {
        let p = DecodeProblem::<T>::new(model, 1, layers, 150, 5);
        let plan = p.plan(backend, &forced)?;
        let k: Vec<&[T]> = p.keys.iter().map(Vec::as_slice).collect();
        let vs: Vec<&[T]> = p.values.iter().map(Vec::as_slice).collect();
        let got = backend.decode(&plan, &p.inputs(&k, &vs), 0, layers)?;
        let h = model.num_heads;
        for l in 0..layers {
            let kv = LayerView::contiguous("k", &p.keys[l], hkv, p.slots, d)?;
            let vv = LayerView::contiguous("v", &p.values[l], hkv, p.slots, d)?;
            let lists = SlotLists::new(ListLayout::PerKvHead, p.lists.clone(), 1, hkv, p.slots)?;
            let q = &p.queries[l * h * d..(l + 1) * h * d];
            let want = decode_layer(q, 1, &kv, &vv, &lists, 0, None, &DecodeOptions::default())?;
            let scale = want.o.iter().fold(1e-30f32, |a, x| a.max(x.abs()));
            let got_o = &got.out[l * h * d..(l + 1) * h * d];
            let worst = got_o.iter().zip(&want.o).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
            if worst.is_nan() || worst > 1e-4 {
                return fail(format!("decode layer {l}: o differs by {worst:.2e} of max |o|"));
            }
        }
        return Ok(());
    }
    let scorer = scorer_for(model, layers)?;
    let config = round_config(op, len);
    let prefix = 16;
    let shape = round_shape(T::DTYPE, len, d, op, prefix);
    let plan = RoundPlan::tuned(&scorer, &config, shape, &forced)?;
    let keys = tensors::<T>(layers, hkv * len * d, 31);
    let values = tensors::<T>(layers, hkv * len * d, 32);
    let start = len as u64;
    let (outputs, k_after, v_after) = if let Op::Compact(_) = op {
        let (mut k2, mut v2) = (keys.clone(), values.clone());
        let out = {
            let mut k: Vec<&mut [T]> = k2.iter_mut().map(Vec::as_mut_slice).collect();
            let mut vv: Vec<&mut [T]> = v2.iter_mut().map(Vec::as_mut_slice).collect();
            backend.round_in_place(&plan, &mut k, &mut vv, &[start])?
        };
        (out.outputs, k2, v2)
    } else {
        let k: Vec<&[T]> = keys.iter().map(Vec::as_slice).collect();
        (backend.round_keys(&plan, &k, &[start])?.outputs, Vec::new(), Vec::new())
    };
    let out = &outputs[0];
    match op {
        Op::Score(_) => {
            let views: Vec<LayerView<'_, T>> =
                keys.iter().map(|k| LayerView::contiguous("k", k, hkv, len, d)).collect::<Result<_>>()?;
            let cpu = round::run(&config, &scorer, &views, start, prefix, Backend::Cpu)?;
            for (l, (a, b)) in out.raw.iter().zip(&cpu.raw).enumerate() {
                for (r, (ra, rb)) in a.chunks(len).zip(b.chunks(len)).enumerate() {
                    let mean = rb.iter().map(|x| *x as f64).sum::<f64>() / len as f64;
                    let var = rb.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / len as f64;
                    let spread = var.sqrt().max(1e-30);
                    let worst = ra.iter().zip(rb).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0f64, f64::max);
                    if worst.is_nan() || worst / spread > 1e-4 {
                        return fail(format!(
                            "raw scores of layer {l} head {r} differ by {:.2e} of the row's spread",
                            worst / spread
                        ));
                    }
                }
            }
        }
        Op::Select => {
            let budget = plan.kept();
            for (set, (row, keep)) in out.score.chunks(len).zip(&out.keep).enumerate() {
                let want = triattn::cpu::select::select_row(row, |_| false, budget);
                if &want != keep {
                    return fail(format!("keep set {set} differs from a CPU top-{budget} of the same scores"));
                }
            }
        }
        Op::Compact(mode) => {
            let kept = plan.kept();
            for l in 0..layers {
                for g in 0..hkv {
                    let keep = &out.keep[g];
                    for (what, src, after) in [("K", &keys[l], &k_after[l]), ("V", &values[l], &v_after[l])] {
                        let mut rows = src[g * len * d..(g + 1) * len * d].to_vec();
                        match mode {
                            CompactMode::OrderPreserving => {
                                triattn::cpu::compact::compact_in_place(&mut rows, d, d, keep)?
                            }
                            CompactMode::HoleFilling => {
                                triattn::cpu::compact::hole_fill_in_place(&mut rows, d, d, keep)?;
                            }
                        }
                        let got = &after[g * len * d..g * len * d + kept * d];
                        let same = got
                            .iter()
                            .zip(&rows[..kept * d])
                            .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
                        if !same {
                            return fail(format!("{what} rows of layer {l} KV head {g} differ from a CPU compaction"));
                        }
                    }
                }
            }
        }
        Op::Decode => unreachable!("handled above"),
    }
    Ok(())
}

/// A decode of `batch` sequences over `layers` layers: per-KV-head lists of `len` random slots
/// (ascending) over caches of `2 * len` slots, one query per head.
struct DecodeProblem<T> {
    batch: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    slots: usize,
    len: usize,
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
    queries: Vec<f32>,
    /// Sequence 0's lists (every sequence uses them).
    lists: Vec<Vec<u32>>,
    flat: Vec<i32>,
    lens: Vec<i32>,
}

impl<T: Element> DecodeProblem<T> {
    fn new(model: &ModelConfig, batch: usize, layers: usize, len: usize, seed: u64) -> Self {
        let (h, hkv, d) = (model.num_heads, model.num_kv_heads, model.head_dim);
        let slots = 2 * len;
        let keys = tensors::<T>(batch * layers, hkv * slots * d, seed);
        let values = tensors::<T>(batch * layers, hkv * slots * d, seed + 1);
        let mut rng = SplitMix64::new(seed + 2, 0);
        let queries: Vec<f32> = (0..batch * layers * h * d).map(|_| rng.symmetric()).collect();
        let lists: Vec<Vec<u32>> = (0..hkv)
            .map(|_| {
                let mut list: Vec<u32> = (0..slots as u32).filter(|_| rng.next_u64().is_multiple_of(2)).collect();
                list.truncate(len);
                list
            })
            .collect();
        let flat: Vec<i32> = (0..batch)
            .flat_map(|_| {
                lists.iter().flat_map(|l| l.iter().map(|&x| x as i32).chain(std::iter::repeat_n(-1, len - l.len())))
            })
            .collect();
        let lens: Vec<i32> = (0..batch).flat_map(|_| lists.iter().map(|l| l.len() as i32)).collect();
        Self { batch, layers, heads: h, kv_heads: hkv, d, slots, len, keys, values, queries, lists, flat, lens }
    }

    fn plan(&self, backend: &Backend, dispatch: &Dispatch) -> Result<DecodePlan> {
        let strides = RowStrides { head_stride: self.slots * self.d, row_stride: self.d };
        let sm_count = match backend {
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => dev.backend().sm_count(),
            _ => 16,
        };
        DecodePlan::tuned(
            DecodeShape {
                dtype: T::DTYPE,
                query_dtype: DType::F32,
                num_seqs: self.batch,
                num_layers: self.layers,
                num_heads: self.heads,
                num_kv_heads: self.kv_heads,
                head_dim: self.d,
                value_dim: self.d,
                num_queries: 1,
                len: self.slots,
                layout: CacheLayout::Contiguous { keys: strides, values: strides },
                lists: ListLayout::PerKvHead,
                list_capacity: self.len,
                list_lengths: ListLengths::PerList,
                sinks: false,
                options: DecodeOptions::default(),
                splits: SplitPolicy::Auto { sm_count },
            },
            dispatch,
        )
    }

    /// The inputs over `keys` and `values`, the slices of [`Self::keys`] and [`Self::values`].
    fn inputs<'a>(&'a self, keys: &'a [&'a [T]], values: &'a [&'a [T]]) -> DecodeInputs<'a, T, f32> {
        DecodeInputs {
            keys,
            values,
            queries: &self.queries,
            sinks: None,
            lists: Some(&self.flat),
            list_lens: Some(&self.lens),
            seq_lens: None,
            block_table: None,
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A progress bar on stderr: redrawn in place on a terminal, one line per step otherwise.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self { total: total.max(1), done: 0, tty: std::io::stderr().is_terminal() }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        let width = 30;
        let filled = width * self.done / self.total;
        let bar = format!("[{}{}] {}/{}", "=".repeat(filled), " ".repeat(width - filled), self.done, self.total);
        if self.tty {
            eprint!("\r\x1b[2K{bar} {what}");
        } else {
            eprintln!("autotune: {bar} {what}");
        }
    }

    fn skip(&mut self, n: usize) {
        self.done += n;
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
