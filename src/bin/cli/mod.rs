//! The subcommands of `triattn`.

#[cfg(any(feature = "emu", feature = "cuda"))]
mod autotune;
mod bench;
mod decode;
mod demo;
mod shard;
mod tuning;

use std::time::Instant;

use triattn::io::{FileDType, Tensor, TensorFile};
use triattn::policy::{
    CompressionConfig, GroupAggregation, Normalization, PrefixProtection, Preset, RoundOutcome, SelectionMode,
};
use triattn::round::{self, Backend, RoundResult, Scorer};
use triattn::score::{NormTerm, OffsetAggregation, TrigTerm};
use triattn::stats::Stats;
use triattn::{DType, Element, LayerView};
use triattn::{Error, Result};
use triattn::{ModelConfig, PairingStyle};

#[cfg(any(feature = "emu", feature = "cuda"))]
pub use autotune::autotune;

/// `triattn autotune` in a build without kernels.
#[cfg(not(any(feature = "emu", feature = "cuda")))]
pub fn autotune(_: crate::AutotuneArgs) -> Result<()> {
    Err(Error::unsupported("autotune: expected a build with kernels (--features cuda, or emu), got one without"))
}
pub use bench::bench;
pub use decode::decode;
pub use demo::demo;
pub(crate) use tuning::dispatch_for;

use crate::{
    AggArg, BackendArg, CalibrateArgs, CompressArgs, ConvertArgs, InfoArgs, KernelsArgs, ModeArg, PolicyArgs,
    PresetArg, StyleArg,
};

fn style_of(s: StyleArg) -> PairingStyle {
    match s {
        StyleArg::Half => PairingStyle::Half,
        StyleArg::Interleaved => PairingStyle::Interleaved,
    }
}

/// The compression config the policy flags describe.
pub(crate) fn policy_config(a: &PolicyArgs) -> Result<CompressionConfig> {
    let preset = match a.preset {
        PresetArg::Paper => Preset::Paper,
        PresetArg::Vllm => Preset::Vllm,
    };
    let mut c = CompressionConfig::preset(preset);
    if let Some(b) = a.budget {
        c.budget = b;
    }
    if let Some(m) = a.mode {
        c.mode = match m {
            ModeArg::PerHead => SelectionMode::PerHead,
            ModeArg::PerLayerPerHead => SelectionMode::PerLayerPerHead,
            ModeArg::Union => SelectionMode::Union,
        };
    }
    if let Some(agg) = a.offsets_aggregation {
        c.score.aggregation = match agg {
            AggArg::Mean => OffsetAggregation::Mean,
            AggArg::Max => OffsetAggregation::Max,
        };
    }
    if let Some(agg) = a.group_aggregation {
        c.group_aggregation = match agg {
            AggArg::Mean => GroupAggregation::Mean,
            AggArg::Max => GroupAggregation::Max,
        };
    }
    if let Some(w) = a.window {
        c.window = w;
    }
    if a.normalize {
        c.normalization = Normalization::ZScore;
    }
    if a.no_normalize {
        c.normalization = Normalization::Off;
    }
    if a.protect_prefix {
        c.prefix = PrefixProtection::Protected;
    }
    if a.no_protect_prefix {
        c.prefix = PrefixProtection::Unprotected;
    }
    if let Some(d) = a.divide_length {
        c.divide_length = d;
    }
    if let Some(o) = a.offset_max_length {
        c.score.offset_max_length = o;
    }
    if a.disable_mlr {
        c.score.norm = NormTerm::MeanModulus;
    }
    if a.disable_trig {
        c.score.trig = TrigTerm::Excluded;
    }
    c.validate()?;
    if c.group_aggregation == GroupAggregation::Mean && c.mode != SelectionMode::PerLayerPerHead {
        eprintln!(
            "warning: --group-aggregation applies to --mode per-layer-per-head; {} reduces groups with max",
            c.mode.name()
        );
    }
    Ok(c)
}

/// Keys and values of every layer of a dumped cache, checked against the model (borrowed from
/// the file, not copied).
struct DumpedCache<'f> {
    dtype: DType,
    num_kv_heads: usize,
    n: usize,
    head_dim: usize,
    value_dim: usize,
    k: Vec<&'f Tensor>,
    v: Vec<&'f Tensor>,
}

fn read_cache<'f>(file: &'f TensorFile, model: &ModelConfig) -> Result<DumpedCache<'f>> {
    let name = file.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let k0 = file.get("k.0")?;
    let dtype = match k0.dtype {
        FileDType::Float(d) => d,
        other => return Err(Error::shape(format!("{name}: tensor k.0 dtype"), "F32, F16 or BF16", other)),
    };
    if k0.shape.len() != 3 {
        return Err(Error::shape(format!("{name}: tensor k.0 shape"), "[Hkv, N, D]", format!("{:?}", k0.shape)));
    }
    let n = k0.shape[1];
    let v0 = file.get("v.0")?;
    if v0.shape.len() != 3 {
        return Err(Error::shape(format!("{name}: tensor v.0 shape"), "[Hkv, N, Dv]", format!("{:?}", v0.shape)));
    }
    let value_dim = v0.shape[2];
    let (hkv, d) = (model.num_kv_heads, model.head_dim);
    let mut k = Vec::with_capacity(model.num_layers);
    let mut v = Vec::with_capacity(model.num_layers);
    for l in 0..model.num_layers {
        let dt = [FileDType::Float(dtype)];
        k.push(file.get_checked(&format!("k.{l}"), &dt, &[hkv, n, d])?);
        v.push(file.get_checked(&format!("v.{l}"), &dt, &[hkv, n, value_dim])?);
    }
    if file.tensors.contains_key(&format!("k.{}", model.num_layers)) {
        return Err(Error::shape(
            format!("{name}: layers"),
            format!("{} (num_hidden_layers of the model config)", model.num_layers),
            format!("a tensor k.{} beyond them", model.num_layers),
        ));
    }
    Ok(DumpedCache { dtype, num_kv_heads: hkv, n, head_dim: d, value_dim, k, v })
}

fn meta_u64(file: &TensorFile, key: &str) -> Result<Option<u64>> {
    file.meta_usize(key).map(|v| v.map(|x| x as u64))
}

pub fn compress(a: CompressArgs) -> Result<()> {
    let config = policy_config(&a.policy)?;
    let model = ModelConfig::from_file(&a.model_config)?;
    let stats = Stats::load(&a.stats)?;
    let scorer = Scorer::new(model, stats, a.rope_style.map(style_of))
        .map_err(|e| e.context(format!("{} vs {}", a.stats.display(), a.model_config.display())))?;
    let file = TensorFile::read(&a.kv)?;
    let cache = read_cache(&file, &scorer.model)?;
    let round_start = match a.round_start {
        Some(r) => r,
        None => meta_u64(&file, "round_start")?.unwrap_or(cache.n as u64),
    };
    let prefix_len = match a.prefix_len {
        Some(p) => p,
        None => meta_u64(&file, "prefix_len")?.map(|p| p as usize).unwrap_or(0),
    };
    if round_start < cache.n as u64 {
        return Err(Error::invalid_argument(
            "round_start",
            format!(">= the {} cached slots (a round starts after every cached token)", cache.n),
            round_start,
        ));
    }
    if prefix_len > cache.n {
        return Err(Error::invalid_argument("prefix_len", format!("<= the {} cached slots", cache.n), prefix_len));
    }
    let out = match cache.dtype {
        DType::F32 => compress_typed::<f32>(&a, &config, &scorer, &cache, round_start, prefix_len)?,
        DType::F16 => compress_typed::<half::f16>(&a, &config, &scorer, &cache, round_start, prefix_len)?,
        DType::Bf16 => compress_typed::<half::bf16>(&a, &config, &scorer, &cache, round_start, prefix_len)?,
    };
    out.write(&a.out)
}

/// The backend `--backend` names, if this build has it.
pub(crate) fn round_backend(b: BackendArg) -> Result<Backend> {
    match b {
        BackendArg::Cpu => Ok(Backend::Cpu),
        #[cfg(feature = "emu")]
        BackendArg::Emu => Ok(Backend::Emu),
        #[cfg(not(feature = "emu"))]
        BackendArg::Emu => Err(Error::unsupported(
            "--backend emu: expected a build with the emu feature (cargo build --features emu), got one without",
        )),
        #[cfg(feature = "cuda")]
        BackendArg::Cuda => Ok(Backend::Cuda(std::sync::Arc::new(triattn::cuda::CudaDevice::open(0)?))),
        #[cfg(not(feature = "cuda"))]
        BackendArg::Cuda => Err(Error::unsupported(
            "--backend cuda: expected a build with the cuda feature (cargo build --features cuda), got one without",
        )),
    }
}

/// A finished round and the compacted `k.<l>` / `v.<l>` bytes `[Hkv, kept, dim]`.
struct Compressed {
    result: RoundResult,
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    compact: std::time::Duration,
    /// Kernel symbols per stage and where each choice came from (kernel backends), for
    /// `--verbose`.
    kernels: Vec<(&'static str, String)>,
    /// The cross-rank reductions a sharded round ran, for `--verbose`.
    reductions: Vec<String>,
}

/// The round and an order-preserving gather on the CPU backend.
fn compress_cpu<T: Element>(
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<Compressed> {
    let keys: Vec<Vec<T>> = cache.k.iter().map(|t| T::decode_le(&t.data)).collect();
    let views: Vec<LayerView<'_, T>> = keys
        .iter()
        .enumerate()
        .map(|(l, k)| LayerView::contiguous(&format!("k.{l}"), k, cache.num_kv_heads, cache.n, cache.head_dim))
        .collect::<Result<_>>()?;
    let result = round::run(config, scorer, &views, round_start, prefix_len, Backend::Cpu)?;
    let t0 = Instant::now();
    let (hkv, n, es) = (cache.num_kv_heads, cache.n, cache.dtype.size());
    let kept = result.keep[0].len();
    let gather = |src: &Tensor, layer: usize, dim: usize| {
        let row = dim * es;
        let mut data = vec![0u8; hkv * kept * row];
        for g in 0..hkv {
            let keep = &result.keep[config.mode.set_index(layer, g, hkv)];
            triattn::cpu::compact::gather_rows(
                &src.data[g * n * row..(g + 1) * n * row],
                row,
                row,
                keep,
                &mut data[g * kept * row..(g + 1) * kept * row],
            );
        }
        data
    };
    let k = (0..cache.k.len()).map(|l| gather(cache.k[l], l, cache.head_dim)).collect();
    let v = (0..cache.v.len()).map(|l| gather(cache.v[l], l, cache.value_dim)).collect();
    Ok(Compressed { result, k, v, compact: t0.elapsed(), kernels: Vec::new(), reductions: Vec::new() })
}

/// Every stage, compaction included, as one device round on a kernel backend (emu or cuda).
#[cfg(any(feature = "emu", feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
fn compress_device<T: Element>(
    backend: &Backend,
    dispatch: &triattn::tuning::Dispatch,
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<Compressed> {
    use triattn::cuda::{CacheLayout, Compaction, RoundPlan, RoundShape, RowStrides, Stage};
    let (hkv, n, d, dv) = (cache.num_kv_heads, cache.n, cache.head_dim, cache.value_dim);
    if n == 0 {
        return compress_cpu::<T>(config, scorer, cache, round_start, prefix_len);
    }
    let strides = |dim: usize, slots: usize| RowStrides { head_stride: slots * dim, row_stride: dim };
    let mut shape = RoundShape {
        dtype: T::DTYPE,
        len: n,
        prefix_len,
        value_dim: dv,
        layout: CacheLayout::Contiguous { keys: strides(d, n), values: strides(dv, n) },
        compaction: Compaction::KeepSetsOnly,
        positions: None,
    };
    let kept = config.outcome(n, prefix_len.min(n)).kept(n);
    shape.compaction = Compaction::OutOfPlace { keys: strides(d, kept), values: strides(dv, kept) };
    let plan = RoundPlan::tuned(scorer, config, shape, dispatch)?;
    let keys: Vec<Vec<T>> = cache.k.iter().map(|t| T::decode_le(&t.data)).collect();
    let values: Vec<Vec<T>> = cache.v.iter().map(|t| T::decode_le(&t.data)).collect();
    let zero = T::from_f32(0.0);
    let mut k_out: Vec<Vec<T>> = keys.iter().map(|_| vec![zero; hkv * kept * d]).collect();
    let mut v_out: Vec<Vec<T>> = values.iter().map(|_| vec![zero; hkv * kept * dv]).collect();
    let triattn::cuda::HostRound { mut outputs, timings } = {
        let k_src: Vec<&[T]> = keys.iter().map(Vec::as_slice).collect();
        let v_src: Vec<&[T]> = values.iter().map(Vec::as_slice).collect();
        let mut k_dst: Vec<&mut [T]> = k_out.iter_mut().map(Vec::as_mut_slice).collect();
        let mut v_dst: Vec<&mut [T]> = v_out.iter_mut().map(Vec::as_mut_slice).collect();
        backend.round_out_of_place(&plan, &k_src, &v_src, &mut k_dst, &mut v_dst, &[round_start])?
    };
    let outputs = outputs.swap_remove(0);
    let result = RoundResult {
        n,
        raw: outputs.raw,
        score: outputs.score,
        keep: outputs.keep,
        outcome: plan.outcome(),
        times: round::StageTimes::of(&timings),
    };
    let encode = |rows: Vec<Vec<T>>| rows.iter().map(|x| T::encode_le(x)).collect();
    Ok(Compressed {
        result,
        k: encode(k_out),
        v: encode(v_out),
        compact: timings.get(Stage::Compact),
        kernels: plan
            .stage_kernels()
            .into_iter()
            .zip(plan.stage_sources())
            .map(|((stage, symbol), (_, source))| (stage, format!("{symbol} ({})", dispatch.describe(source))))
            .collect(),
        reductions: Vec::new(),
    })
}

fn compress_typed<T: Element>(
    a: &CompressArgs,
    config: &CompressionConfig,
    scorer: &Scorer,
    cache: &DumpedCache,
    round_start: u64,
    prefix_len: usize,
) -> Result<TensorFile> {
    let backend = round_backend(a.backend)?;
    let dispatch = dispatch_for(&backend, a.tuning.as_deref())?;
    let layout = shard::layout(a, &scorer.model)?;
    let done = match (&backend, &layout) {
        (_, Some(layout)) if cache.n > 0 => {
            shard::compress_sharded::<T>(&backend, &dispatch, layout, config, scorer, cache, round_start, prefix_len)?
        }
        (Backend::Cpu, _) => compress_cpu::<T>(config, scorer, cache, round_start, prefix_len)?,
        #[cfg(any(feature = "emu", feature = "cuda"))]
        (device, _) => compress_device::<T>(device, &dispatch, config, scorer, cache, round_start, prefix_len)?,
    };
    let _ = &dispatch;
    let result = &done.result;
    let name = backend.name();
    let kernel = |stage: &str| {
        done.kernels.iter().find(|(s, _)| *s == stage).map(|(_, k)| format!(" kernel {k}")).unwrap_or_default()
    };
    let model = &scorer.model;
    let (l, h, hkv, n) = (model.num_layers, model.num_heads, model.num_kv_heads, cache.n);
    let key_bytes: usize = cache.k.iter().map(|t| t.data.len()).sum();
    let kept = result.keep[0].len();
    let t = &result.times;
    if a.verbose {
        eprintln!(
            "score: {name} {:.3} ms ({} keys x {h} heads, {} MB of {} keys, {} aggregation, r = {round_start}){}",
            ms(t.score),
            l * hkv * n,
            key_bytes as f64 / 1e6,
            cache.dtype,
            match config.score.aggregation {
                OffsetAggregation::Mean => "mean",
                OffsetAggregation::Max => "max",
            },
            kernel("score"),
        );
        eprintln!(
            "normalize: {name} {:.3} ms ({}){}",
            ms(t.normalize),
            match config.zscore() {
                None => "off".to_string(),
                Some(z) => format!("{z:?} z-score over {} rows", l * h),
            },
            kernel("normalize"),
        );
        eprintln!(
            "reduce: {name} {:.3} ms ({}, {} sets){}",
            ms(t.reduce),
            config.mode.name(),
            result.keep.len(),
            kernel("reduce")
        );
        if let Some(layout) = &layout {
            eprintln!(
                "shards: tp {} x pp {} (layers per stage {:?}), {} cross-rank reduction{}",
                layout.tp_size,
                layout.pp_size(),
                layout.stages.iter().map(|s| s.len()).collect::<Vec<_>>(),
                done.reductions.len(),
                if done.reductions.len() == 1 { "" } else { "s" }
            );
            for r in &done.reductions {
                eprintln!("all-reduce: {r}");
            }
        }
        eprintln!(
            "select: {name} {:.3} ms (budget {}, {:?}){}",
            ms(t.select),
            config.budget,
            result.outcome,
            kernel("select")
        );
    }
    if let RoundOutcome::Skipped(reason) = result.outcome {
        eprintln!("round skipped: {reason}; every slot is kept");
    }

    let mut out = TensorFile::default();
    let keep_flat: Vec<i32> = result.keep.iter().flatten().map(|&s| s as i32).collect();
    let (keep_shape, score_shape) = match config.mode {
        SelectionMode::PerHead => (vec![hkv, kept], vec![hkv, n]),
        SelectionMode::PerLayerPerHead => (vec![l, hkv, kept], vec![l, hkv, n]),
        SelectionMode::Union => (vec![kept], vec![n]),
    };
    out.tensors.insert("keep".into(), Tensor::from_i32(keep_shape, &keep_flat));
    out.tensors.insert("score".into(), Tensor::from_f32(score_shape, &result.score));
    for (layer, raw) in result.raw.iter().enumerate() {
        out.tensors.insert(format!("raw.{layer}"), Tensor::from_f32(vec![h, n], raw));
    }
    for (layer, (k, v)) in done.k.into_iter().zip(done.v).enumerate() {
        out.tensors.insert(format!("k.{layer}"), Tensor::from_raw(cache.dtype, vec![hkv, kept, cache.head_dim], k));
        out.tensors.insert(format!("v.{layer}"), Tensor::from_raw(cache.dtype, vec![hkv, kept, cache.value_dim], v));
    }
    out.metadata.insert("round_start".into(), round_start.to_string());
    out.metadata.insert("prefix_len".into(), prefix_len.to_string());
    if a.verbose {
        eprintln!(
            "compact: {name} {:.3} ms ({n} -> {kept} slots per set, order-preserving){}",
            ms(done.compact),
            kernel("compact")
        );
    }
    Ok(out)
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn kernels(a: KernelsArgs) -> Result<()> {
    let report = triattn::kernels::variant::kernel_report();
    if a.json {
        for r in &report {
            println!("{}", r.to_json_line());
        }
    } else {
        print!("{}", triattn::kernels::variant::kernel_table(&report));
    }
    Ok(())
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    // Where the sums are accumulated: the CPU, or the calibrate kernel (emu or a GPU).
    let backend = match a.backend {
        BackendArg::Cpu => Backend::Cpu,
        other => round_backend(other).map_err(|e| e.context("calibrate"))?,
    };
    // The calibrate kernels have one variant per dtype: a table is read and checked, and names
    // nothing to choose here.
    dispatch_for(&backend, a.tuning.as_deref())?;
    let model = ModelConfig::from_file(&a.model_config)?;
    let style = style_of(a.rope_style);
    let mut acc =
        triattn::stats::calibrate::Accumulator::new(model.num_layers, model.num_heads, model.head_dim, style)?;
    for path in &a.queries {
        let file = TensorFile::read(path)?;
        let name = path.display();
        for l in 0..model.num_layers {
            let t = file.get(&format!("q.{l}"))?;
            let what = format!("{name}: q.{l}");
            match &backend {
                Backend::Cpu => acc.add_named_tensor(l, &what, t)?,
                #[cfg(feature = "emu")]
                Backend::Emu => triattn::kernels::emu::calibrate_tensor(&mut acc, l, &what, t)?,
                #[cfg(feature = "cuda")]
                Backend::Cuda(dev) => dev.calibrate_tensor(&mut acc, l, &what, t)?,
            }
        }
        if a.verbose {
            eprintln!("calibrate: {} read {name}", backend.name());
        }
    }
    let mut stats = acc.finish()?;
    stats.record_model(&model);
    stats.save(&a.out)?;
    if a.verbose {
        eprintln!("calibrate: wrote {} ({} layers x {} heads)", a.out.display(), stats.num_layers, stats.num_heads);
    }
    Ok(())
}

pub fn convert_stats(a: ConvertArgs) -> Result<()> {
    let mut stats = triattn::stats::pt::read_official(&a.input)?;
    if let Some(path) = &a.model_config {
        let model = ModelConfig::from_file(path)?;
        stats.check_model(&model).map_err(|e| e.context(format!("{} vs {}", a.input.display(), path.display())))?;
        stats.record_model(&model);
    }
    stats.save(&a.out)?;
    eprintln!(
        "wrote {}: {} layers x {} heads, head_dim {}, rope_style {}",
        a.out.display(),
        stats.num_layers,
        stats.num_heads,
        stats.head_dim,
        stats.rope_style
    );
    Ok(())
}

pub fn info(a: InfoArgs) -> Result<()> {
    if a.model_config.is_none() && a.stats.is_none() {
        return Err(Error::invalid_argument("info", "--model-config and/or --stats", "neither"));
    }
    let model = match &a.model_config {
        None => None,
        Some(p) => {
            let m = ModelConfig::from_file(p)?;
            println!("model {}", p.display());
            println!("  name                {}", m.name.as_deref().unwrap_or("-"));
            println!("  layers              {}", m.num_layers);
            println!("  attention heads     {}", m.num_heads);
            println!("  KV heads            {} (group size {})", m.num_kv_heads, m.group_size());
            println!("  head_dim            {} ({} rotary pairs)", m.head_dim, m.freq_count());
            println!("  rope_theta          {}", m.rope_theta);
            println!("  rope scaling        {:?}", m.rope_scaling);
            println!("  attention scaling   {} (sigma = {})", m.attention_scaling(), m.attention_scaling().powi(2));
            let w = m.omega();
            println!("  omega               {:.6e} .. {:.6e}", w[0], w[w.len() - 1]);
            Some(m)
        }
    };
    if let Some(p) = &a.stats {
        let stats = if p.extension().is_some_and(|e| e == "pt") {
            triattn::stats::pt::read_official(p)?
        } else {
            Stats::load(p)?
        };
        println!("statistics {}", p.display());
        println!("  layers x heads      {} x {}", stats.num_layers, stats.num_heads);
        println!("  head_dim            {}", stats.head_dim);
        println!("  rope_style          {}", stats.rope_style);
        for (k, v) in &stats.metadata {
            if !matches!(k.as_str(), "format" | "rope_style" | "head_dim") {
                println!("  {k:<19} {v}");
            }
        }
        let mut violations = 0usize;
        let f = stats.freq_count();
        for i in 0..stats.q_abs_mean.len() {
            let m = (stats.q_mean_real[i] as f64).hypot(stats.q_mean_imag[i] as f64);
            if (stats.q_abs_mean[i] as f64) < m * (1.0 - 1e-6) {
                violations += 1;
            }
        }
        println!("validation");
        println!("  format, shapes, finite values: ok");
        println!(
            "  a_f >= |q̄_f| (triangle inequality): {} ({} of {} entries violate)",
            if violations == 0 { "ok" } else { "VIOLATED" },
            violations,
            stats.num_layers * stats.num_heads * f
        );
        if let Some(m) = &model {
            match stats.check_model(m) {
                Ok(()) => println!("  matches the model config: ok"),
                Err(e) => {
                    println!("  matches the model config: NO ({e})");
                    return Err(e.context("statistics do not match the model config"));
                }
            }
        }
    }
    Ok(())
}
