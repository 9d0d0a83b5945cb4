//! SmolLM2-135M-Instruct decoding on the CPU with TriAttention KV-cache compression: the worked
//! example of wiring triattn into an engine's decode loop. The model runs on candle's quantized
//! matmuls with our own forward pass (`model`), the engine owns the KV cache and runs triattn
//! rounds on it (`engine`); `fetch` brings the model file, `tokenizer` reads the GGUF's own
//! vocabulary, `calibrate` makes this model's statistics.

pub mod calibrate;
pub mod engine;
pub mod eval;
pub mod fetch;
pub mod model;
pub mod tokenizer;

use std::path::PathBuf;

/// Errors of this crate: one message each.
pub type AppError = Box<dyn std::error::Error + Send + Sync>;
/// `Result` with [`AppError`].
pub type AppResult<T> = Result<T, AppError>;

/// The committed statistics of this model (`smollm2 calibrate` writes them).
pub fn default_stats() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data").join("smollm2_135m.safetensors")
}
