//! `triattn bench`: CPU scoring throughput against memcpy, measured in the same process.
//!
//! Shapes are Qwen3-8B's (36 layers, 32 heads, 8 KV heads, head_dim 128) with the real
//! statistics embedded in the binary; keys are random from a concentrated distribution (a centre
//! per (layer, KV head) plus noise). The timed stage is the scoring of `round::run_cpu`:
//! `cpu::score::score_layers` (every layer in one parallel region), with the round's weights built once outside the
//! timed loop (their build time is reported on its own). The ceiling is a memcpy of a buffer of
//! the same byte size as the keys, single-threaded and with the same rayon pool.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use triattn::io::TensorFile;
use triattn::round::Scorer;
use triattn::score::{OffsetAggregation, ScoreConfig};
use triattn::stats::Stats;
use triattn::ModelConfig;
use triattn::{Element, LayerView};
use triattn::{Error, Result};

use super::ms;
use crate::BenchArgs;

/// `println!` that ends the process quietly when stdout is closed (`triattn demo | head`).
macro_rules! say {
    ($($t:tt)*) => {
        $crate::cli::bench::emit(format_args!($($t)*))
    };
}
pub(crate) use say;

/// Write one line to stdout; a closed pipe ends the process with status 0.
pub(crate) fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        panic!("cannot write to stdout: {e}");
    }
}

/// Qwen3-8B statistics (converted from the TriAttention authors' `qwen3_8b.pt`, Apache-2.0).
pub(crate) const QWEN3_8B_STATS: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/qwen3_8b.safetensors"));
/// The parts of Qwen3-8B's `config.json` that a round needs.
pub(crate) const QWEN3_8B_CONFIG: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/qwen3_8b.config.json"));

/// The embedded Qwen3-8B model and statistics, cut to the first `layers` layers.
pub(crate) fn qwen3_8b(layers: usize) -> Result<Scorer> {
    let mut model = ModelConfig::from_json_str(QWEN3_8B_CONFIG).map_err(|e| e.context("embedded Qwen3-8B config"))?;
    let file = TensorFile::parse(QWEN3_8B_STATS).map_err(|e| e.context("embedded Qwen3-8B statistics"))?;
    let mut stats = Stats::from_tensor_file(&file).map_err(|e| e.context("embedded Qwen3-8B statistics"))?;
    if layers == 0 || layers > model.num_layers {
        return Err(Error::invalid_argument("--layers", format!("1..={} (Qwen3-8B)", model.num_layers), layers));
    }
    if layers < model.num_layers {
        let keep = layers * stats.num_heads * stats.freq_count();
        stats.q_mean_real.truncate(keep);
        stats.q_mean_imag.truncate(keep);
        stats.q_abs_mean.truncate(keep);
        if let Some(pairs) = &mut stats.sampled_heads {
            pairs.retain(|p| (p[0] as usize) < layers);
        }
        stats.num_layers = layers;
        stats.metadata.insert("num_layers".into(), layers.to_string());
        model.num_layers = layers;
    }
    Scorer::new(model, stats, None)
}

/// splitmix64: a tiny deterministic generator (Steele, Lea, Flood 2014).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for `seed` and a stream index (so parallel rows get independent streams).
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut s = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[-1, 1)`, f32 (cheap noise).
    pub(crate) fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }

    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Model name of the first CPU in `/proc/cpuinfo`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Time one call of `f`.
fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.reps == 0 {
        return Err(Error::invalid_argument("--reps", ">= 1", 0));
    }
    if a.n == 0 {
        return Err(Error::invalid_argument("--n", ">= 1", 0));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads.unwrap_or(cores);
    if threads == 0 {
        return Err(Error::invalid_argument("--threads", ">= 1", 0));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::unsupported(format!("cannot start {threads} worker threads: {e}")))?;
    if a.round {
        let scorer = qwen3_8b(a.layers)?;
        return match a.dtype.to_ascii_lowercase().as_str() {
            "f32" => pool.install(|| round_bench::<f32>(&a, &scorer, cores, threads)),
            "f16" => pool.install(|| round_bench::<half::f16>(&a, &scorer, cores, threads)),
            "bf16" => pool.install(|| round_bench::<half::bf16>(&a, &scorer, cores, threads)),
            other => Err(Error::invalid_argument("--dtype", "f32, f16 or bf16", other)),
        };
    }
    match a.op.as_str() {
        "score" => {}
        "decode" => return pool.install(|| decode_bench(&a, cores, threads)),
        other => return Err(Error::invalid_argument("--op", "score or decode", other)),
    }
    let scorer = qwen3_8b(a.layers)?;
    match a.dtype.to_ascii_lowercase().as_str() {
        "f32" => pool.install(|| run::<f32>(&a, &scorer, cores, threads)),
        "f16" => pool.install(|| run::<half::f16>(&a, &scorer, cores, threads)),
        "bf16" => pool.install(|| run::<half::bf16>(&a, &scorer, cores, threads)),
        other => Err(Error::invalid_argument("--dtype", "f32, f16 or bf16", other)),
    }
}

/// Random keys `[Hkv, N, D]` per layer: a centre per (layer, KV head) (standard normal per
/// dimension) plus uniform noise of half-width 0.5.
fn random_keys<T: Element>(layers: usize, kv_heads: usize, n: usize, d: usize, seed: u64) -> Vec<Vec<T>> {
    (0..layers)
        .map(|l| {
            let mut k = vec![T::from_f32(0.0); kv_heads * n * d];
            k.par_chunks_mut(n * d).enumerate().for_each(|(g, head)| {
                let mut rng = SplitMix64::new(seed, (l * kv_heads + g) as u64);
                let centre: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
                for row in head.chunks_mut(d) {
                    for (x, c) in row.iter_mut().zip(&centre) {
                        *x = T::from_f32(c + 0.5 * rng.symmetric());
                    }
                }
            });
            k
        })
        .collect()
}

struct ModeResult {
    weights: Duration,
    score: Duration,
    flops: f64,
}

fn run<T: Element>(a: &BenchArgs, scorer: &Scorer, cores: usize, threads: usize) -> Result<()> {
    let m = &scorer.model;
    let (l, h, hkv, d, n) = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, a.n);
    let f = d / 2;
    let esize = std::mem::size_of::<T>();
    let key_bytes = l * hkv * n * d * esize;

    let t = Instant::now();
    let keys = random_keys::<T>(l, hkv, n, d, 0x7412_a771);
    let gen_time = t.elapsed();
    let views: Vec<LayerView<'_, T>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| LayerView::contiguous(&format!("k.{i}"), k, hkv, n, d))
        .collect::<Result<_>>()?;
    let mut raw = vec![vec![0f32; h * n]; l];
    let round_start = n.max(32_768) as u64;
    use triattn::cpu::score::ScoreKernel;
    let kernel = match a.score_kernel.as_deref() {
        None => ScoreKernel::best(d),
        Some(name) => [ScoreKernel::Portable, ScoreKernel::Avx2, ScoreKernel::Avx512]
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| Error::invalid_argument("--score-kernel", "portable, avx2 or avx512", name))?,
    };

    // memcpy ceilings: the same byte count, one direction counted.
    let src = vec![0x5au8; key_bytes];
    let mut dst = vec![0u8; key_bytes];
    let chunk = key_bytes.div_ceil(threads).div_ceil(64) * 64;
    let modes = [OffsetAggregation::Mean, OffsetAggregation::Max];
    let configs = modes.map(|agg| ScoreConfig { aggregation: agg, ..ScoreConfig::default() });
    let weights = configs.iter().map(|c| scorer.weights(round_start, c)).collect::<Result<Vec<_>>>()?;

    // Every measurement once per repetition, interleaved, so that the copies and the scoring see
    // the same machine state; repetition 0 is the warm-up (page faults, caches, thread start).
    let (mut copy1, mut copy_n) = (Vec::new(), Vec::new());
    let mut weight_times = [Vec::new(), Vec::new()];
    let mut score_times = [Vec::new(), Vec::new()];
    for rep in 0..=a.reps {
        let c1 = timed(|| {
            dst.copy_from_slice(&src);
            std::hint::black_box(&mut dst);
        });
        let cn = timed(|| {
            dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(o, i)| o.copy_from_slice(i));
            std::hint::black_box(&mut dst);
        });
        if rep > 0 {
            copy1.push(c1);
            copy_n.push(cn);
        }
        for (i, config) in configs.iter().enumerate() {
            let t = Instant::now();
            std::hint::black_box(scorer.weights(round_start, config)?);
            let wt = t.elapsed();
            let t = Instant::now();
            triattn::cpu::score::score_layers_with(kernel, &weights[i], &views, scorer.style, &mut raw)?;
            std::hint::black_box(&mut raw);
            let st = t.elapsed();
            if rep > 0 {
                weight_times[i].push(wt);
                score_times[i].push(st);
            }
        }
    }
    drop((src, dst));
    let (copy1, copy_n) = (median(copy1), median(copy_n));
    let j = triattn::score::geometric_offsets(configs[1].offset_max_length)?.len();
    let mut results = Vec::new();
    for (i, agg) in modes.into_iter().enumerate() {
        let vectors = match agg {
            OffsetAggregation::Mean => 1,
            OffsetAggregation::Max => j,
        };
        let per_token_layer = (2 * d * h * vectors + 2 * f * h + 4 * f * hkv) as f64;
        results.push((
            agg,
            ModeResult {
                weights: median(std::mem::take(&mut weight_times[i])),
                score: median(std::mem::take(&mut score_times[i])),
                flops: per_token_layer * (l * n) as f64,
            },
        ));
    }

    let gbs = |bytes: usize, t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
    let (copy1_gbs, copy_n_gbs) = (gbs(key_bytes, copy1), gbs(key_bytes, copy_n));
    say!("triattn bench: CPU scoring throughput vs memcpy (same process)");
    say!("statistics  Qwen/Qwen3-8B, TriAttention authors (arXiv:2604.04921), Apache-2.0 (embedded)");
    say!("kernel      CPU score kernel {}", kernel.name());
    say!("machine     {} ({cores} logical CPUs), {threads} worker threads", cpu_model());
    say!(
        "shapes      {l} layers x {h} heads ({hkv} KV heads, G = {}), head_dim {d}, N = {n}, {} keys: {:.1} MB",
        h / hkv,
        T::DTYPE,
        key_bytes as f64 / 1e6
    );
    say!(
        "method      median of {} reps after 1 warm-up, all measurements interleaved per rep; round_start {round_start}; keys made in {:.0} ms",
        a.reps,
        ms(gen_time)
    );
    say!("");
    say!("{:<28} {:>10} {:>10}", "memcpy (same bytes)", "ms", "GB/s");
    say!("{:<28} {:>10.3} {:>10.2}", "1 thread", ms(copy1), copy1_gbs);
    say!("{:<28} {:>10.3} {:>10.2}", format!("{threads} threads (rayon chunks)"), ms(copy_n), copy_n_gbs);
    say!("");
    say!(
        "{:<6} {:>11} {:>10} {:>11} {:>10} {:>10} {:>14} {:>14}",
        "mode",
        "weights ms",
        "score ms",
        "keys GB/s",
        "GFLOP/s",
        "stage ms",
        "vs memcpy 1t",
        format!("vs memcpy {threads}t")
    );
    for (agg, r) in &results {
        let kg = gbs(key_bytes, r.score);
        say!(
            "{:<6} {:>11.3} {:>10.3} {:>11.2} {:>10.2} {:>10.3} {:>13.1}% {:>13.1}%",
            match agg {
                OffsetAggregation::Mean => "mean",
                OffsetAggregation::Max => "max",
            },
            ms(r.weights),
            ms(r.score),
            kg,
            r.flops / r.score.as_secs_f64() / 1e9,
            ms(r.weights + r.score),
            100.0 * kg / copy1_gbs,
            100.0 * kg / copy_n_gbs,
        );
    }
    say!("");
    say!("definitions");
    say!("  memcpy GB/s   bytes copied / time (one direction: {key_bytes} bytes read, the same written)");
    say!("  keys GB/s     key bytes read by scoring / score time");
    say!(
        "  ratio         keys GB/s / memcpy GB/s; the ceiling is the {threads}-thread memcpy (last column, target >= 50% for mean)"
    );
    say!("  GFLOP/s       L*N*(2*D*H*J + 2*F*H + 4*F*Hkv) / score time, J = 1 (mean, folded) or the number of offsets (max)");
    say!("  stage ms      weights + score: the score stage of one round as round::run_cpu runs it");
    Ok(())
}

/// `triattn bench --op decode`: one layer of Qwen3-8B-like heads (H 32, Hkv 8, D = Dv = 128,
/// bf16 cache of 32K slots per sequence, one query per head), per-KV-head lists of 2048 kept
/// slots, batches of 1 and 16 sequences (in parallel), against a memcpy of the listed K+V bytes
/// measured in the same loop.
fn decode_bench(a: &BenchArgs, cores: usize, threads: usize) -> Result<()> {
    use half::bf16;
    use triattn::cpu::decode::{decode_layer, SlotLists};
    use triattn::decode::{DecodeOptions, ListLayout};
    const H: usize = 32;
    const HKV: usize = 8;
    const D: usize = 128;
    const N: usize = 32 * 1024;
    const KEPT: usize = 2048;
    say!("triattn bench --op decode: CPU sparse decode throughput vs memcpy (same process)");
    say!("machine     {} ({cores} logical CPUs), {threads} worker threads", cpu_model());
    say!("shapes      one layer, H {H}, Hkv {HKV}, D = Dv = {D}, bf16 cache of {N} slots per sequence, T = 1, per-KV-head lists of {KEPT}");
    say!("method      median of {} reps after 1 warm-up, decode and memcpy interleaved per rep", a.reps);
    say!("");
    say!("{:>5} {:>12} {:>11} {:>11} {:>13} {:>9}", "batch", "listed MB", "decode ms", "GB/s", "memcpy GB/s", "ratio");
    for batch in [1usize, 16] {
        let caches: Vec<(Vec<bf16>, Vec<bf16>)> = (0..batch)
            .into_par_iter()
            .map(|s| {
                let mut rng = SplitMix64::new(0xdec0, s as u64);
                let k = (0..HKV * N * D).map(|_| bf16::from_f32(rng.symmetric())).collect();
                let v = (0..HKV * N * D).map(|_| bf16::from_f32(rng.symmetric())).collect();
                (k, v)
            })
            .collect();
        let lists: Vec<SlotLists> = (0..batch)
            .map(|s| {
                let mut rng = SplitMix64::new(0x1157, s as u64);
                let per_head = (0..HKV)
                    .map(|_| {
                        let mut all: Vec<u32> = (0..N as u32).collect();
                        for i in 0..KEPT {
                            let j = i + (rng.next_u64() % (N - i) as u64) as usize;
                            all.swap(i, j);
                        }
                        let mut kept = all[..KEPT].to_vec();
                        kept.sort_unstable();
                        kept
                    })
                    .collect();
                SlotLists::new(ListLayout::PerKvHead, per_head, 1, HKV, N)
            })
            .collect::<Result<_>>()?;
        let queries: Vec<Vec<f32>> = (0..batch)
            .map(|s| {
                let mut rng = SplitMix64::new(0x9e5, s as u64);
                (0..H * D).map(|_| rng.symmetric()).collect()
            })
            .collect();
        let bytes = batch * HKV * KEPT * D * 2 * 2;
        let src = vec![0x5au8; bytes];
        let mut dst = vec![0u8; bytes];
        let chunk = bytes.div_ceil(threads).div_ceil(64) * 64;
        let (mut dec, mut copy) = (Vec::new(), Vec::new());
        for rep in 0..=a.reps {
            let cn = timed(|| {
                dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(o, i)| o.copy_from_slice(i));
                std::hint::black_box(&mut dst);
            });
            let t = Instant::now();
            let out: Vec<_> = (0..batch)
                .into_par_iter()
                .map(|s| {
                    let (k, v) = &caches[s];
                    let kv = LayerView::contiguous("k", k, HKV, N, D)?;
                    let vv = LayerView::contiguous("v", v, HKV, N, D)?;
                    decode_layer(&queries[s], 1, &kv, &vv, &lists[s], 0, None, &DecodeOptions::default())
                })
                .collect::<Result<_>>()?;
            std::hint::black_box(out);
            if rep > 0 {
                dec.push(t.elapsed());
                copy.push(cn);
            }
        }
        let (dec, copy) = (median(dec), median(copy));
        let gbs = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
        say!(
            "{batch:>5} {:>12.1} {:>11.3} {:>11.2} {:>13.2} {:>8.1}%",
            bytes as f64 / 1e6,
            ms(dec),
            gbs(dec),
            gbs(copy),
            100.0 * gbs(dec) / gbs(copy)
        );
    }
    say!("");
    say!("definitions");
    say!("  GB/s          listed K+V bytes (batch x Hkv x {KEPT} rows x 2 x {D} x 2 bytes) / decode time");
    say!("  memcpy GB/s   the same byte count copied with {threads} threads (one direction counted); ratio: decode / memcpy (target >= 40%)");
    Ok(())
}

/// One stage of the round bench: its times over the repetitions and the bytes it must move.
struct StageRow {
    stage: &'static str,
    times: Vec<Duration>,
    copies: Vec<Duration>,
    bytes: usize,
    what: String,
}

/// `triattn bench --round`: every stage of one CPU round over a Qwen3-8B-shaped cache, as
/// `Compressor::compress` runs it (paper preset, per-head, budget N - 128, a 64-token prompt,
/// order-preserving compaction of K and V in place), each stage next to a memcpy of the bytes
/// that stage must read and write at least, measured in the same repetition. The cache is
/// restored from a pristine copy before every repetition (not timed).
fn round_bench<T: Element>(a: &BenchArgs, scorer: &Scorer, cores: usize, threads: usize) -> Result<()> {
    use triattn::{CompressionConfig, Compressor, KvCache, RoundOutcome, SequenceState};
    let m = &scorer.model;
    let (l, h, hkv, d, n) = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, a.n);
    if n <= 192 {
        return Err(Error::invalid_argument("--n", "> 192 (the round keeps N - 128 slots of a 64-token prompt)", n));
    }
    let es = std::mem::size_of::<T>();
    let prompt = 64;
    let config = CompressionConfig { budget: n - 128, divide_length: 128, ..CompressionConfig::default() };
    let compressor = Compressor::new(config, scorer.clone())?;
    let t = Instant::now();
    let mut pristine = KvCache::<T>::new(l, hkv, d, d, n);
    pristine.k = random_keys::<T>(l, hkv, n, d, 0x7412_a771);
    pristine.v = random_keys::<T>(l, hkv, n, d, 0x0a1b_c3d4);
    pristine.len = n;
    let gen_time = t.elapsed();
    let mut cache = pristine.clone();
    let sets = config.mode.num_sets(l, hkv);
    let kept = config.budget;
    // The bytes each stage must move at least.
    let key_bytes = l * hkv * n * d * es;
    let rows = l * h * n * 4;
    let mut stages = [
        StageRow {
            stage: "weights",
            times: vec![],
            copies: vec![],
            bytes: 3 * l * h * (d / 2) * 4,
            what: "statistics read".into(),
        },
        StageRow {
            stage: "score",
            times: vec![],
            copies: vec![],
            bytes: key_bytes + rows,
            what: "keys read, raw scores written".into(),
        },
        StageRow {
            stage: "normalize",
            times: vec![],
            copies: vec![],
            bytes: 2 * rows,
            what: "raw read, z-scores written".into(),
        },
        StageRow {
            stage: "reduce",
            times: vec![],
            copies: vec![],
            bytes: rows + sets * n * 4,
            what: "z-scores read, set rows written".into(),
        },
        StageRow {
            stage: "select",
            times: vec![],
            copies: vec![],
            bytes: sets * n * 4 + sets * kept * 4,
            what: "set rows read, keep sets written".into(),
        },
        StageRow {
            stage: "compact",
            times: vec![],
            copies: vec![],
            bytes: 0,
            what: "moved K and V rows read and written".into(),
        },
    ];
    let largest = key_bytes + rows;
    let src = vec![0x5au8; largest];
    let mut dst = vec![0u8; largest];
    let copy = |dst: &mut [u8], bytes: usize| {
        let chunk = bytes.div_ceil(threads).div_ceil(64).max(1) * 64;
        timed(|| {
            dst[..bytes]
                .par_chunks_mut(chunk)
                .zip(src[..bytes].par_chunks(chunk))
                .for_each(|(o, i)| o.copy_from_slice(i));
            std::hint::black_box(&mut *dst);
        })
    };
    let mut total = Vec::new();
    for rep in 0..=a.reps {
        for (c, p) in cache.k.iter_mut().zip(&pristine.k).chain(cache.v.iter_mut().zip(&pristine.v)) {
            c.copy_from_slice(p);
        }
        cache.len = n;
        let mut seq = SequenceState::new(l, hkv, prompt);
        seq.advance(n);
        let t = Instant::now();
        let report = compressor.compress(&mut cache, &mut seq)?;
        let round_time = t.elapsed();
        if !matches!(report.round.outcome, RoundOutcome::Compressed { .. }) {
            return Err(Error::invalid_argument(
                "--n",
                "a round that compresses",
                format!("{:?}", report.round.outcome),
            ));
        }
        // Order-preserving in place: every kept row past the first evicted slot moves.
        let moved: usize =
            report.round.keep.iter().map(|k| k.iter().enumerate().filter(|(i, &s)| s as usize != *i).count()).sum();
        let per_set_layers = l * hkv / sets;
        stages[5].bytes = 2 * moved * per_set_layers * 2 * d * es;
        let times = &report.round.times;
        let measured = [times.weights, times.score, times.normalize, times.reduce, times.select, report.compact];
        if rep > 0 {
            total.push(round_time);
            for (row, t) in stages.iter_mut().zip(measured) {
                row.times.push(t);
                let bytes = row.bytes.min(largest).max(64);
                row.copies.push(copy(&mut dst, bytes));
            }
        }
    }
    let gbs = |bytes: usize, t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
    let rows_out: Vec<(&StageRow, Duration, Duration)> =
        stages.iter().map(|r| (r, median(r.times.clone()), median(r.copies.clone()))).collect();
    let total = median(total);
    if a.json {
        for (r, t, c) in &rows_out {
            let memcpy = gbs(r.bytes.max(64), *c);
            say!(
                "{}",
                serde_json::json!({
                    "stage": r.stage,
                    "ms": ms(*t),
                    "bytes": r.bytes,
                    "memcpy_gbps": memcpy,
                    "ratio": gbs(r.bytes, *t) / memcpy,
                })
            );
        }
        return Ok(());
    }
    say!("triattn bench --round: one CPU round, stage by stage, vs memcpy of each stage's bytes (same process)");
    say!("machine     {} ({cores} logical CPUs), {threads} worker threads", cpu_model());
    say!(
        "shapes      {l} layers x {h} heads ({hkv} KV heads), head_dim {d}, N = {n}, {} K and V: {:.1} MB each; budget {kept}, prompt {prompt}, per-head",
        T::DTYPE,
        key_bytes as f64 / 1e6
    );
    say!(
        "method      median of {} reps after 1 warm-up; cache made in {:.0} ms and restored before each rep",
        a.reps,
        ms(gen_time)
    );
    say!("");
    say!("{:<10} {:>10} {:>12} {:>10} {:>13} {:>8}  {}", "stage", "ms", "MB", "GB/s", "memcpy GB/s", "ratio", "bytes");
    for (r, t, c) in &rows_out {
        let memcpy = gbs(r.bytes.max(64), *c);
        say!(
            "{:<10} {:>10.3} {:>12.2} {:>10.2} {:>13.2} {:>7.1}%  {}",
            r.stage,
            ms(*t),
            r.bytes as f64 / 1e6,
            gbs(r.bytes, *t),
            memcpy,
            100.0 * gbs(r.bytes, *t) / memcpy,
            r.what
        );
    }
    say!("{:<10} {:>10.3}", "round", ms(total));
    say!("");
    say!("definitions");
    say!("  score includes weights (the stage as a round runs it); bytes: what the stage must read and write at least");
    say!("  memcpy GB/s: those bytes copied with {threads} threads in the same repetition; ratio: stage GB/s / memcpy GB/s");
    Ok(())
}
