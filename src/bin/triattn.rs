//! `triattn`: TriAttention KV-cache compression from the command line.
//!
//! Subcommands: `compress` (one round over a dumped cache), `decode` (sparse decode attention
//! over a dumped cache through kept-slot lists), `calibrate` (statistics from
//! pre-RoPE queries), `convert-stats` (official `.pt` to safetensors), `info` (model and
//! statistics summary), `bench` (CPU scoring throughput against memcpy), `demo` (a simulated long
//! decode with the shipped Qwen3-8B statistics). Errors print one line on stderr and exit 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod cli;

#[derive(Parser)]
#[command(name = "triattn", version, about = "TriAttention KV-cache compression", propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one compression round over a dumped KV cache and write the kept cache.
    Compress(CompressArgs),
    /// Sparse decode attention over a dumped cache through each KV head's list of kept slots.
    Decode(DecodeArgs),
    /// Accumulate per-head query statistics from pre-RoPE queries.
    Calibrate(CalibrateArgs),
    /// Convert an official TriAttention `.pt` statistics file to safetensors.
    ConvertStats(ConvertArgs),
    /// Summarise and validate a model config and/or a statistics file.
    Info(InfoArgs),
    /// Measure CPU scoring (or sparse decode) throughput against memcpy in the same process.
    Bench(BenchArgs),
    /// Simulate a long decode with the shipped Qwen3-8B statistics and print every round.
    Demo(DemoArgs),
    /// List every compiled kernel variant with its ptxas report (registers, shared memory, spills).
    Kernels(KernelsArgs),
    /// Time every candidate kernel variant of the ops a model uses, per shape bucket, on this
    /// GPU (or emu), and write a tuning table.
    Autotune(AutotuneArgs),
}

#[derive(Args, Debug)]
struct AutotuneArgs {
    /// Hugging Face config.json of the model to tune for (head_dim, heads, KV heads, layers).
    #[arg(long)]
    model_config: PathBuf,
    /// Where the kernels run: a GPU, or the kernels executed on the CPU (times meaningless).
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendArg,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Ops to tune, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "score,select,compact,decode")]
    ops: Vec<String>,
    /// Bucket lengths (slots per row; list entries for decode), comma separated [default:
    /// budget + divide_length, 8192, 32768, 131072; with --quick the first and 32768].
    #[arg(long, value_delimiter = ',')]
    lengths: Option<Vec<usize>>,
    /// Bucket batch sizes (sequences), comma separated [default: 1,16,64; with --quick 1,16].
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<usize>>,
    /// Key/value dtype.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Fewer buckets and repetitions.
    #[arg(long)]
    quick: bool,
    /// Timed repetitions per candidate (the median is kept) [default: 15; --quick 5; emu 1].
    #[arg(long)]
    reps: Option<usize>,
    /// Most GiB of keys and values one measured shape holds (layers are reduced to fit; at
    /// most 1 with --quick).
    #[arg(long, default_value_t = 4.0)]
    max_gb: f64,
    /// Output table [default: the per-device file under the user's config folder, which later
    /// runs on this device find by themselves].
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct KernelsArgs {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Backend that runs the round's stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The CPU backend (the specification).
    Cpu,
    /// The CUDA kernel sources executed on the CPU (needs the `emu` feature).
    Emu,
    /// A CUDA GPU (needs the `cuda` feature).
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PresetArg {
    Paper,
    Vllm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    PerHead,
    PerLayerPerHead,
    Union,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AggArg {
    Mean,
    Max,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StyleArg {
    Half,
    Interleaved,
}

/// Policy knobs shared by `compress`, `demo` and `bench`.
#[derive(Args, Debug, Clone)]
struct PolicyArgs {
    /// Semantics preset; the other flags override its defaults.
    #[arg(long, value_enum, default_value = "paper")]
    preset: PresetArg,
    /// Slots kept per set, protected ones included.
    #[arg(long)]
    budget: Option<usize>,
    /// Selection mode.
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Aggregation over the geometric offsets.
    #[arg(long, value_enum)]
    offsets_aggregation: Option<AggArg>,
    /// Reduction over a KV group's query heads (per-layer-per-head mode).
    #[arg(long, value_enum)]
    group_aggregation: Option<AggArg>,
    /// Most recent slots always kept.
    #[arg(long)]
    window: Option<usize>,
    /// z-score raw scores per (layer, head) row.
    #[arg(long, overrides_with = "no_normalize")]
    normalize: bool,
    /// Rank raw scores.
    #[arg(long)]
    no_normalize: bool,
    /// Always keep the prompt.
    #[arg(long, overrides_with = "no_protect_prefix")]
    protect_prefix: bool,
    /// Let prompt slots compete.
    #[arg(long)]
    no_protect_prefix: bool,
    /// Slack above the budget before a round is due.
    #[arg(long)]
    divide_length: Option<usize>,
    /// Largest geometric offset (offsets 1, 2, 4, ... up to it).
    #[arg(long)]
    offset_max_length: Option<u64>,
    /// Use `a_f` instead of `a_f - |q̄_f|` as the norm coefficient.
    #[arg(long)]
    disable_mlr: bool,
    /// Score the norm term only.
    #[arg(long)]
    disable_trig: bool,
}

#[derive(Args, Debug)]
struct CompressArgs {
    /// Hugging Face config.json of the model.
    #[arg(long)]
    model_config: PathBuf,
    /// Statistics (triattention-calibration-v1 safetensors).
    #[arg(long)]
    stats: PathBuf,
    /// Dumped cache: `k.{l}` `[Hkv, N, D]`, `v.{l}` `[Hkv, N, Dv]`; metadata round_start, prefix_len.
    #[arg(long)]
    kv: PathBuf,
    /// Output safetensors (keep, score, raw.{l}, k.{l}, v.{l}).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Override the cache's round_start (tokens seen so far).
    #[arg(long)]
    round_start: Option<u64>,
    /// Override the cache's prompt length.
    #[arg(long)]
    prefix_len: Option<usize>,
    /// Override the statistics' pairing style.
    #[arg(long, value_enum)]
    rope_style: Option<StyleArg>,
    /// Backend for the round's stages.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Tuning table choosing among interchangeable kernel variants (over the shipped table of
    /// the GPU's arch and the built-in rule); also `TRIATTN_TUNING`. Refused when malformed.
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
    /// Run the round as R tensor-parallel rank-local rounds (query heads split evenly; KV heads
    /// split, or replicated when R exceeds them), joined only through the exposed cross-rank
    /// reductions (an in-process all-reduce stands in for NCCL). The outputs equal one rank's.
    #[arg(long, value_name = "R", default_value_t = 1)]
    tp_size: usize,
    /// Pipeline stages of equal layer counts (see --pp-layers for an uneven split).
    #[arg(long, value_name = "P", default_value_t = 1)]
    pp_size: usize,
    /// Layers of each pipeline stage, comma separated (an uneven split; sets the stage count).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', conflicts_with = "pp_size")]
    pp_layers: Option<Vec<usize>>,
    /// Print one line per stage.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args, Debug)]
struct DecodeArgs {
    /// Queries: `q.{l}` `[H, T, D]` (F32, F16 or BF16), post-RoPE.
    #[arg(long)]
    q: PathBuf,
    /// Cache: `k.{l}` `[Hkv, N, D]`, `v.{l}` `[Hkv, N, Dv]`.
    #[arg(long)]
    kv: PathBuf,
    /// Output: `o.{l}` F32 `[H, T, Dv]`, `lse.{l}` F32 `[H, T]`.
    #[arg(long)]
    out: PathBuf,
    /// Visible slots: `keep` I32/I64 `[K]`, `[Hkv, K]` or `[L, Hkv, K]`, ascending, -1 padded
    /// (default: every slot).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Sink logits: `sinks.{l}` F32 `[H]`.
    #[arg(long)]
    sinks: Option<PathBuf>,
    /// Logit scale (default 1/sqrt(D)).
    #[arg(long, allow_hyphen_values = true)]
    scale: Option<String>,
    /// Soft-capping C: logits become C * tanh(s / C).
    #[arg(long, allow_hyphen_values = true)]
    softcap: Option<String>,
    /// Backend of the decode.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Tuning table choosing among interchangeable kernel variants (over the shipped table of
    /// the GPU's arch and the built-in rule); also `TRIATTN_TUNING`. Refused when malformed.
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
    /// Print one line per launch (or the CPU time).
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args, Debug)]
struct CalibrateArgs {
    /// Hugging Face config.json of the model.
    #[arg(long)]
    model_config: PathBuf,
    /// Pre-RoPE queries, `q.{l}` `[H, T, D]`; repeat for several documents.
    #[arg(long, required = true)]
    queries: Vec<PathBuf>,
    /// Output statistics file.
    #[arg(long)]
    out: PathBuf,
    /// Pairing style of the model's RoPE.
    #[arg(long, value_enum, default_value = "half")]
    rope_style: StyleArg,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// Tuning table choosing among interchangeable kernel variants (over the shipped table of
    /// the GPU's arch and the built-in rule); also `TRIATTN_TUNING`. Refused when malformed.
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
    /// Print progress.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// Official `.pt` statistics file.
    input: PathBuf,
    /// Output safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Model config to check the statistics against and record in the metadata.
    #[arg(long)]
    model_config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Hugging Face config.json.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Statistics file (.safetensors, or an official .pt).
    #[arg(long)]
    stats: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// What to measure: `score` (the scoring stage of a round) or `decode` (sparse decode
    /// attention over kept-slot lists, one layer of Qwen3-8B shapes, batches of 1 and 16).
    #[arg(long, default_value = "score")]
    op: String,
    /// Layers.
    #[arg(long, default_value_t = 36)]
    layers: usize,
    /// Cached slots per (layer, KV head).
    #[arg(long, default_value_t = 2176)]
    n: usize,
    /// Key dtype.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Time every stage of one CPU round (weights, score, normalize, reduce, select, compact)
    /// as `Compressor::compress` runs it, each next to a memcpy of its own bytes.
    #[arg(long)]
    round: bool,
    /// The CPU scoring kernel of `--op score`: portable, avx2 or avx512 (default: the fastest
    /// this CPU runs; all are bit-identical).
    #[arg(long)]
    score_kernel: Option<String>,
    /// With --round: one JSON object per stage instead of a table.
    #[arg(long, requires = "round")]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Prompt tokens.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Generated tokens to simulate.
    #[arg(long, default_value_t = 1536)]
    tokens: usize,
    /// Layers of Qwen3-8B to simulate (1..=36).
    #[arg(long, default_value_t = 36)]
    layers: usize,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Random seed of the simulated keys.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where the rounds run: every stage on the CPU, or on the kernels (emu, or a GPU).
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// Tuning table choosing among interchangeable kernel variants (over the shipped table of
    /// the GPU's arch and the built-in rule); also `TRIATTN_TUNING`. Refused when malformed.
    #[arg(long, value_name = "FILE")]
    tuning: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A panic is a bug; report it as one line, never as a backtrace.
    std::panic::set_hook(Box::new(|info| {
        // `println!` panics when the reader of stdout went away (`triattn kernels | head`): that is
        // the reader's choice, not a bug; stop quietly as a SIGPIPE'd program would.
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") {
            std::process::exit(141);
        }
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{location} (a bug in triattn; please report it with the command line)");
    }));
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Compress(a) => cli::compress(a),
        Command::Decode(a) => cli::decode(a),
        Command::Calibrate(a) => cli::calibrate(a),
        Command::ConvertStats(a) => cli::convert_stats(a),
        Command::Info(a) => cli::info(a),
        Command::Bench(a) => cli::bench(a),
        Command::Demo(a) => cli::demo(a),
        Command::Kernels(a) => cli::kernels(a),
        Command::Autotune(a) => cli::autotune(a),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(2),
    }
}
