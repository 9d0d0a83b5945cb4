//! `smollm2`: SmolLM2-135M-Instruct decoding on the CPU with TriAttention KV-cache compression —
//! the worked example of wiring triattn into an engine's decode loop (`engine.rs`).
//!
//! ```text
//! smollm2 generate --prompt "..." [--budget 96] [--method full|triattention] [--tokens 200]
//! smollm2 calibrate [--out smollm2/data/smollm2_135m.safetensors]
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use triattn_smollm2::{calibrate, chart, default_stats, engine, eval, fetch, model, tokenizer, AppResult};

#[derive(Parser)]
#[command(
    name = "smollm2",
    version,
    about = "SmolLM2-135M-Instruct with TriAttention KV-cache compression, on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt (chat template), streaming the text; then tokens/s, cache slots vs tokens
    /// seen, memory saved and the time spent in triattn per round.
    Generate {
        #[arg(long)]
        prompt: String,
        /// Cache slots kept per KV head after a round.
        #[arg(long, default_value_t = 96)]
        budget: usize,
        /// Tokens past the budget before a round.
        #[arg(long, default_value_t = 32)]
        divide_length: usize,
        /// `full` (no eviction) or `triattention`.
        #[arg(long, default_value = "triattention")]
        method: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// Statistics (default: the committed calibration of this model).
        #[arg(long)]
        stats: Option<PathBuf>,
    },
    /// Generate `--tokens` greedily with the full cache, then replay them under every method at
    /// the same budget: KL(full || method), top-1 agreement and attention recall per method.
    Eval {
        /// A file with the user prompt (chat template applied).
        #[arg(long)]
        prompt_file: PathBuf,
        #[arg(long, default_value_t = 320)]
        tokens: usize,
        #[arg(long, default_value_t = 96)]
        budget: usize,
        /// Several budgets (comma separated): one reference, every method at each; writes the
        /// rows as CSV and a PNG chart (KL and recall against budget), `eval-<prompt file
        /// stem>.{csv,png}` unless `--csv` / `--chart` say where.
        #[arg(long, value_delimiter = ',')]
        budgets: Option<Vec<usize>>,
        #[arg(long, default_value_t = 32)]
        divide_length: usize,
        /// Methods to run (comma separated; default all six).
        #[arg(long, value_delimiter = ',')]
        methods: Option<Vec<String>>,
        /// One JSON object per method and budget instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write the rows as CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Also draw the rows as a PNG chart: KL and recall against budget, a line per method.
        #[arg(long)]
        chart: Option<PathBuf>,
        #[arg(long)]
        stats: Option<PathBuf>,
    },
    /// Draw a sweep's CSV (what `eval --budgets` writes) as the PNG chart again, without
    /// re-running the eval.
    Chart {
        /// The CSV of a sweep.
        #[arg(long)]
        csv: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// The chart's title.
        #[arg(long, default_value = "SmolLM2-135M eviction methods by budget")]
        title: String,
    },
    /// Query statistics of this model from its own pre-RoPE queries over its own generations on
    /// the calibration prompts kept in the crate.
    Calibrate {
        #[arg(long, default_value = calibrate::DEFAULT_OUT)]
        out: PathBuf,
        /// Tokens generated per calibration prompt.
        #[arg(long, default_value_t = 256)]
        tokens: usize,
    },
}

fn generate(
    prompt: &str,
    budget: usize,
    divide_length: usize,
    method: &str,
    tokens: usize,
    stats: Option<PathBuf>,
) -> AppResult<()> {
    let method = engine::Method::parse(method)?;
    let t_load = Instant::now();
    let (model, tokenizer) = model::Model::load(&fetch::model_path()?)?;
    let stats = match method {
        engine::Method::Full => None,
        engine::Method::TriAttention => Some(triattn::Stats::load(stats.unwrap_or_else(default_stats))?),
    };
    eprintln!("smollm2: model loaded in {:.2} s", t_load.elapsed().as_secs_f64());
    let ids = tokenizer::encode(&tokenizer, &tokenizer::chat_prompt(prompt))?;
    let mut session =
        engine::Session::new(&model, method, budget, divide_length, stats.as_ref(), ids.len(), ids.len() + tokens)?;
    let t_prefill = Instant::now();
    let mut logits = Vec::new();
    for &t in &ids {
        logits = session.feed(t, &mut model::Nobody)?;
    }
    let prefill = t_prefill.elapsed();
    let t_decode = Instant::now();
    let mut generated: Vec<u32> = Vec::new();
    let mut shown = 0;
    let mut out = std::io::stdout();
    for _ in 0..tokens {
        let next = model::argmax(&logits);
        if next == model.config.eos || tokenizer.id_to_token(next).as_deref() == Some("<|im_end|>") {
            break;
        }
        generated.push(next);
        let text = tokenizer.decode(&generated, true).map_err(|e| format!("decode: {e}"))?;
        if text.len() > shown && text.is_char_boundary(shown) {
            write!(out, "{}", &text[shown..])?;
            out.flush()?;
            shown = text.len();
        }
        logits = session.feed(next, &mut model::Nobody)?;
    }
    writeln!(out)?;
    let decode = t_decode.elapsed();
    let c = &model.config;
    let per_slot = 2 * c.layers * c.kv_heads * c.head_dim * 4;
    let max_slots = session.cache.capacity;
    let round_time: f64 = session.rounds.iter().map(|r| r.time.as_secs_f64()).sum();
    eprintln!(
        "prefill {} tokens in {:.2} s ({:.1} tok/s); decode {} tokens in {:.2} s ({:.1} tok/s)",
        ids.len(),
        prefill.as_secs_f64(),
        ids.len() as f64 / prefill.as_secs_f64(),
        generated.len(),
        decode.as_secs_f64(),
        generated.len() as f64 / decode.as_secs_f64().max(1e-9)
    );
    eprintln!(
        "cache: {} slots now, at most {max_slots}, for {} tokens seen; f32 K+V {:.1} KiB per slot: {:.2} MiB instead of {:.2} MiB ({:.0}% saved)",
        session.cache.len,
        session.seen,
        per_slot as f64 / 1024.0,
        (max_slots * per_slot) as f64 / (1 << 20) as f64,
        (session.seen * per_slot) as f64 / (1 << 20) as f64,
        100.0 * (1.0 - max_slots as f64 / session.seen.max(1) as f64).max(0.0)
    );
    if !session.rounds.is_empty() {
        eprintln!(
            "triattn: {} rounds, {:.2} ms per round ({:.1}% of the time), e.g. {} -> {} slots",
            session.rounds.len(),
            1e3 * round_time / session.rounds.len() as f64,
            100.0 * round_time / (prefill + decode).as_secs_f64(),
            session.rounds[0].before,
            session.rounds[0].after
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_eval(
    prompt_file: &std::path::Path,
    tokens: usize,
    budgets: Vec<usize>,
    divide_length: usize,
    methods: Option<Vec<String>>,
    json: bool,
    outputs: EvalOutputs,
    stats: Option<PathBuf>,
) -> AppResult<()> {
    let prompt = std::fs::read_to_string(prompt_file).map_err(|e| format!("{}: {e}", prompt_file.display()))?;
    let methods: Vec<&'static str> = match methods {
        None => eval::METHODS.to_vec(),
        Some(m) => m
            .iter()
            .map(|x| {
                eval::METHODS.iter().chain(&eval::ABLATIONS).copied().find(|k| k == x).ok_or_else(|| {
                    format!(
                        "--methods: unknown method {x}; expected one of {:?} or {:?}",
                        eval::METHODS,
                        eval::ABLATIONS
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    if tokens < 2 || budgets.iter().any(|&b| b < 8) {
        return Err(format!("--tokens >= 2 and budgets >= 8 expected, got {tokens} and {budgets:?}").into());
    }
    if outputs.chart.is_some() {
        chart::register_font()?;
    }
    let (model, tok) = model::Model::load(&fetch::model_path()?)?;
    let stats = triattn::Stats::load(stats.unwrap_or_else(default_stats))?;
    let ids = tokenizer::encode(&tok, &tokenizer::chat_prompt(prompt.trim()))?;
    let reference = eval::reference(&model, &ids, tokens)?;
    eprintln!(
        "eval: {} prompt tokens, {} reference tokens in {:.1} s ({}...)",
        ids.len(),
        reference.tokens.len(),
        reference.seconds,
        tok.decode(&reference.tokens[..reference.tokens.len().min(24)], true).unwrap_or_default().replace('\n', " ")
    );
    let mut rows = Vec::new();
    for &budget in &budgets {
        for &m in &methods {
            let s = eval::run(&model, &stats, &reference, m, budget, divide_length)?;
            if json {
                println!("{}", s.json());
            } else {
                eprintln!("eval: {m} at budget {budget}: {:.1} s", s.seconds);
            }
            rows.push(s);
        }
    }
    if !json {
        println!("{:<14} {:>6} {:>10} {:>7} {:>7} {:>7}", "method", "budget", "KL", "top-1", "recall", "rounds");
        for s in &rows {
            println!(
                "{:<14} {:>6} {:>10.5} {:>7.3} {:>7.3} {:>7}",
                s.method, s.budget, s.kl, s.top1, s.recall, s.rounds
            );
        }
    }
    if let Some(path) = outputs.csv {
        let mut text = String::from("method,budget,kl,top1,recall,rounds\n");
        for s in &rows {
            text.push_str(&format!("{},{},{},{},{},{}\n", s.method, s.budget, s.kl, s.top1, s.recall, s.rounds));
        }
        triattn_smollm2::write_atomic(&path, text.as_bytes())?;
        eprintln!("eval: wrote {}", path.display());
    }
    if let Some(path) = outputs.chart {
        let name = prompt_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let title =
            format!("SmolLM2-135M, {name}: {} replayed tokens, divide_length {divide_length}", reference.tokens.len());
        chart::write_png(&path, &rows, &title)?;
        eprintln!("eval: wrote {}", path.display());
    }
    Ok(())
}

/// Where `eval` writes its rows besides stdout.
struct EvalOutputs {
    csv: Option<PathBuf>,
    chart: Option<PathBuf>,
}

impl EvalOutputs {
    /// A sweep (`--budgets`) always writes both, named after the prompt file unless given.
    fn new(prompt_file: &std::path::Path, sweep: bool, csv: Option<PathBuf>, chart: Option<PathBuf>) -> Self {
        let stem = prompt_file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "prompt".into());
        let default = |ext: &str| sweep.then(|| PathBuf::from(format!("eval-{stem}.{ext}")));
        EvalOutputs { csv: csv.or_else(|| default("csv")), chart: chart.or_else(|| default("png")) }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate { prompt, budget, divide_length, method, tokens, stats } => {
            generate(&prompt, budget, divide_length, &method, tokens, stats)
        }
        Command::Calibrate { out, tokens } => calibrate::run(&out, tokens),
        Command::Chart { csv, out, title } => {
            chart::read_csv(&csv).and_then(|rows| chart::write_png(&out, &rows, &title))
        }
        Command::Eval { prompt_file, tokens, budget, budgets, divide_length, methods, json, csv, chart, stats } => {
            let outputs = EvalOutputs::new(&prompt_file, budgets.is_some(), csv, chart);
            run_eval(
                &prompt_file,
                tokens,
                budgets.unwrap_or(vec![budget]),
                divide_length,
                methods,
                json,
                outputs,
                stats,
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
