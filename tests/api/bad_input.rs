//! Bad input through the CLI: one clear line on stderr naming the field, a non-zero exit, no
//! panic, and no output file.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use triattn::io::{Tensor, TensorFile};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    /// A copy of the short-no-op golden case that can be corrupted file by file.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "stats.safetensors", "kv.safetensors"] {
            std::fs::copy(common::data_path(&format!("golden/short-no-op/{f}")), dir.path().join(f)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn write(&self, f: &str, bytes: &[u8]) {
        std::fs::write(self.path(f), bytes).unwrap();
    }

    fn edit(&self, f: &str, change: impl FnOnce(&mut TensorFile)) {
        let mut t = TensorFile::read(self.path(f)).unwrap();
        change(&mut t);
        t.write(self.path(f)).unwrap();
    }

    fn edit_config(&self, change: impl FnOnce(&mut serde_json::Value)) {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path("config.json")).unwrap()).unwrap();
        change(&mut v);
        self.write("config.json", v.to_string().as_bytes());
    }

    /// Run `compress` with `extra` flags; assert a clean failure mentioning every `needles`.
    fn fails(&self, extra: &[&str], needles: &[&str]) {
        let out = self.path("out.safetensors");
        let o = Command::new(env!("CARGO_BIN_EXE_triattn"))
            .current_dir(self.dir.path())
            .args(["compress", "--model-config", "config.json", "--stats", "stats.safetensors"])
            .args(["--kv", "kv.safetensors", "--out", "out.safetensors"])
            .args(extra)
            .output()
            .unwrap();
        check_failure(&o, needles);
        assert!(!out.exists(), "a failed command must not leave an output file");
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

fn check_failure(o: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "clean error exit expected, stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

#[test]
fn truncated_safetensors() {
    let c = Case::new();
    let bytes = std::fs::read(c.path("kv.safetensors")).unwrap();
    c.write("kv.safetensors", &bytes[..bytes.len() / 2]);
    c.fails(&[], &["kv.safetensors"]);
}

#[test]
fn garbage_and_absurd_header_length() {
    let c = Case::new();
    c.write("stats.safetensors", b"this is not a safetensors file at all");
    c.fails(&[], &["stats.safetensors", "header length"]);
    let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":1}");
    c.write("stats.safetensors", &bytes);
    c.fails(&[], &["stats.safetensors", "header length"]);
    let c = Case::new();
    c.write("kv.safetensors", &[]);
    c.fails(&[], &["kv.safetensors"]);
}

#[test]
fn shape_and_dtype_mismatches_name_the_tensor() {
    let c = Case::new();
    c.edit("kv.safetensors", |t| {
        t.tensors.insert("k.1".into(), Tensor::from_f32(vec![2, 99, 32], &vec![0.0; 2 * 99 * 32]));
    });
    c.fails(&[], &["k.1", "[2, 100, 32]", "[2, 99, 32]"]);
    let c = Case::new();
    c.edit("kv.safetensors", |t| {
        t.tensors
            .insert("v.0".into(), Tensor::from_raw(triattn::DType::F16, vec![2, 100, 32], vec![0; 2 * 100 * 32 * 2]));
    });
    c.fails(&[], &["v.0", "F32", "F16"]);
}

#[test]
fn missing_tensor_is_named() {
    let c = Case::new();
    c.edit("kv.safetensors", |t| {
        t.tensors.remove("v.1");
    });
    c.fails(&[], &["v.1", "missing"]);
    let c = Case::new();
    c.edit("stats.safetensors", |t| {
        t.tensors.remove("q_abs_mean");
    });
    c.fails(&[], &["q_abs_mean", "missing"]);
}

#[test]
fn statistics_contradicting_the_config() {
    let c = Case::new();
    c.edit_config(|v| v["num_hidden_layers"] = 3.into());
    c.fails(&[], &["layers", "expected 3", "got 2"]);
    let c = Case::new();
    c.edit_config(|v| v["num_attention_heads"] = 8.into());
    c.fails(&[], &["attention heads", "expected 8", "got 4"]);
}

#[test]
fn bad_model_configs() {
    let c = Case::new();
    c.edit_config(|v| v["head_dim"] = 31.into());
    c.fails(&[], &["head_dim", "even", "31"]);
    let c = Case::new();
    c.edit_config(|v| v["num_key_value_heads"] = 3.into());
    c.fails(&[], &["num_key_value_heads", "3"]);
    let c = Case::new();
    c.edit_config(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 2.0}));
    c.fails(&[], &["rope_type", "longrope"]);
    let c = Case::new();
    c.write("config.json", b"num_hidden_layers = 2");
    c.fails(&[], &["config.json", "JSON"]);
}

#[test]
fn bad_arguments() {
    let c = Case::new();
    c.fails(&["--budget", "0"], &["budget", ">= 1", "0"]);
    c.fails(&["--budget", "64", "--window", "64"], &["window", "budget"]);
    c.fails(&["--round-start", "50"], &["round_start", "50"]);
    let o = Command::new(env!("CARGO_BIN_EXE_triattn"))
        .current_dir(c.dir.path())
        .args(["compress", "--model-config", "config.json", "--stats", "nope.safetensors"])
        .args(["--kv", "kv.safetensors", "--out", "out.safetensors"])
        .output()
        .unwrap();
    check_failure(&o, &["nope.safetensors"]);
}

#[test]
fn calibrate_and_convert_fail_cleanly() {
    let c = Case::new();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_triattn")).current_dir(c.dir.path()).args(args).output().unwrap()
    };
    // Queries of the wrong head count.
    let mut q = TensorFile::default();
    for l in 0..2 {
        q.tensors.insert(format!("q.{l}"), Tensor::from_f32(vec![3, 5, 32], &vec![0.5; 3 * 5 * 32]));
    }
    q.write(c.path("q.safetensors")).unwrap();
    let o =
        run(&["calibrate", "--model-config", "config.json", "--queries", "q.safetensors", "--out", "s.safetensors"]);
    check_failure(&o, &["q.0"]);
    assert!(!c.path("s.safetensors").exists());
    c.write("bad.pt", b"PK\x03\x04 not really a zip");
    let o = run(&["convert-stats", "bad.pt", "--out", "s.safetensors"]);
    check_failure(&o, &["bad.pt"]);
    assert!(!Path::new(&c.path("s.safetensors")).exists());
}
