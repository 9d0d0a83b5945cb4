//! SmolLM2-135M-Instruct decoding on the CPU with TriAttention KV-cache compression: the worked
//! example of wiring triattn into an engine's decode loop. The model runs on candle's quantized
//! matmuls with our own forward pass (`model`), the engine owns the KV cache and runs triattn
//! rounds on it (`engine`); `fetch` brings the model file, `tokenizer` reads the GGUF's own
//! vocabulary, `calibrate` makes this model's statistics.

pub mod calibrate;
pub mod chart;
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

/// A hidden file beside `path` to write before renaming onto it: `dir/.name.tmp<pid>`.
pub fn temp_sibling(path: &std::path::Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write `bytes` to `path` whole or not at all: a temporary sibling, renamed on success.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> AppResult<()> {
    let tmp = temp_sibling(path);
    let written = std::fs::write(&tmp, bytes)
        .map_err(|e| format!("{}: {e}", tmp.display()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display())));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(Into::into)
}
