//! Every golden case of `shared/data/golden` through the CLI contract (and the library).
//!
//! The cases come from an independent float64 reference; keep must match exactly, score and raw
//! within 5e-4 of the row's standard deviation, compacted K/V bit-exactly.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{golden_cases, keep_of, max_rel_err};
use triattn::io::TensorFile;

const TOL: f64 = 5e-4;

fn case_args(case: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    v["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

pub(crate) fn run_compress(case: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(common::triattn_bin())
        .current_dir(case)
        .args(["compress", "--model-config", "config.json", "--stats", "stats.safetensors", "--kv", "kv.safetensors"])
        .arg("--out")
        .arg(out)
        .args(case_args(case))
        .args(extra)
        .output()
        .unwrap()
}

/// Compare an output file with the case's expectation; returns (max score err, max raw err).
pub(crate) fn check_case(case: &Path, got: &TensorFile) -> (f64, f64) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let expected = TensorFile::read(case.join("expected.safetensors")).unwrap();
    let kv = TensorFile::read(case.join("kv.safetensors")).unwrap();
    let (shape_g, keep_g) = keep_of(got);
    let (shape_e, keep_e) = keep_of(&expected);
    assert_eq!(shape_g, shape_e, "{name}: keep shape");
    assert_eq!(keep_g, keep_e, "{name}: keep");
    let score_e = expected.get("score").unwrap();
    let n = *score_e.shape.last().unwrap();
    let score_g = got.get("score").unwrap();
    assert_eq!(score_g.shape, score_e.shape, "{name}: score shape");
    let score_err = max_rel_err(&format!("{name} score"), &score_g.to_f32_vec(), &score_e.to_f32_vec(), n);
    assert!(score_err <= TOL, "{name}: score error {score_err:.3e} of the row std");
    let mut raw_err = 0f64;
    for l in 0.. {
        let Some(e) = expected.tensors.get(&format!("raw.{l}")) else { break };
        let g = got.get(&format!("raw.{l}")).unwrap();
        assert_eq!(g.shape, e.shape, "{name}: raw.{l} shape");
        raw_err = raw_err.max(max_rel_err(&format!("{name} raw.{l}"), &g.to_f32_vec(), &e.to_f32_vec(), n));
    }
    assert!(raw_err <= TOL, "{name}: raw error {raw_err:.3e} of the row std");
    // Compacted K/V: input rows gathered by keep, bit-exact.
    let per_layer = shape_g.len() == 3;
    let union = shape_g.len() == 1;
    let kept = *shape_g.last().unwrap();
    for l in 0.. {
        let Some(k_in) = kv.tensors.get(&format!("k.{l}")) else { break };
        for name_kv in ["k", "v"] {
            let src = kv.get(&format!("{name_kv}.{l}")).unwrap();
            let dst = got.get(&format!("{name_kv}.{l}")).unwrap();
            let (hkv, n_in, dim) = (src.shape[0], src.shape[1], src.shape[2]);
            assert_eq!(dst.shape, vec![hkv, kept, dim], "{name}: {name_kv}.{l} shape");
            assert_eq!(dst.dtype, src.dtype, "{name}: {name_kv}.{l} dtype");
            let row = src.data.len() / (hkv * n_in);
            for g in 0..hkv {
                let keep: &[i64] = if union {
                    &keep_g
                } else if per_layer {
                    &keep_g[(l * hkv + g) * kept..(l * hkv + g + 1) * kept]
                } else {
                    &keep_g[g * kept..(g + 1) * kept]
                };
                for (i, &s) in keep.iter().enumerate() {
                    let a = &src.data[(g * n_in + s as usize) * row..(g * n_in + s as usize + 1) * row];
                    let b = &dst.data[(g * kept + i) * row..(g * kept + i + 1) * row];
                    assert_eq!(a, b, "{name}: {name_kv}.{l} head {g} row {i}");
                }
            }
        }
        let _ = k_in;
    }
    (score_err, raw_err)
}

#[test]
fn golden_cases_pass_through_the_cli() {
    let cases = golden_cases();
    let dir = tempfile::tempdir().unwrap();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = run_compress(case, &out, &[]);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let got = TensorFile::read(&out).unwrap();
        let (s, r) = check_case(case, &got);
        eprintln!("{name}: keep exact, score err {s:.2e}, raw err {r:.2e} (of row std)");
    }
}

#[test]
fn verbose_prints_one_line_per_stage() {
    let case =
        golden_cases().into_iter().find(|c| c.ends_with("qwen3-paper")).expect("golden_cases checks qwen3-paper");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = run_compress(&case, &out, &["--verbose"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for stage in ["score", "normalize", "reduce", "select", "compact"] {
        assert!(err.lines().any(|l| l.starts_with(&format!("{stage}: cpu"))), "no {stage} line in:\n{err}");
    }
}

#[test]
fn calibration_case_passes_through_the_cli() {
    check_calibration_case(&[]);
}

/// `calibrate --backend emu`: the calibrate kernel on the CPU SIMT layer.
#[cfg(feature = "emu")]
#[test]
fn calibration_case_passes_with_the_emu_backend() {
    check_calibration_case(&["--backend", "emu"]);
}

fn check_calibration_case(extra: &[&str]) {
    let case = common::calibrate_case_dir();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stats.safetensors");
    let o = Command::new(common::triattn_bin())
        .current_dir(&case)
        .args(["calibrate", "--model-config", "config.json", "--queries", "queries.safetensors", "--out"])
        .arg(&out)
        .args(case_args(&case))
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = triattn::Stats::load(&out).unwrap();
    let expected = TensorFile::read(case.join("expected.safetensors")).unwrap();
    for (name, values) in
        [("q_mean_real", &got.q_mean_real), ("q_mean_imag", &got.q_mean_imag), ("q_abs_mean", &got.q_abs_mean)]
    {
        let e = expected.get(name).unwrap().to_f32_vec();
        let worst = values
            .iter()
            .zip(&e)
            .map(|(&g, &x)| (g as f64 - x as f64).abs() / (x as f64).abs().max(1e-6))
            .fold(0f64, f64::max);
        assert!(worst <= 1e-5, "{name}: relative error {worst:.2e}");
    }
}

#[test]
fn convert_stats_is_bit_exact_through_the_cli() {
    let pt = common::data_path("official/ds_qwen7b.pt");
    let reference = common::data_path("calibration/ds_qwen7b.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds_qwen7b.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_triattn"))
        .arg("convert-stats")
        .arg(&pt)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (got, want) = (triattn::Stats::load(&out).unwrap(), triattn::Stats::load(&reference).unwrap());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.q_mean_real), bits(&want.q_mean_real));
    assert_eq!(bits(&got.q_mean_imag), bits(&want.q_mean_imag));
    assert_eq!(bits(&got.q_abs_mean), bits(&want.q_abs_mean));
    assert_eq!(got.sampled_heads, want.sampled_heads);
}

/// `compress --backend emu`: every stage (score, normalize, reduce, select, compact) runs the CUDA
/// kernels on the CPU as one planned device round; every golden case must still pass, and
/// `--verbose` must say that each stage ran on emu and with which kernel.
#[cfg(feature = "emu")]
#[test]
fn golden_cases_pass_with_the_emu_backend() {
    let cases = golden_cases();
    let dir = tempfile::tempdir().unwrap();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = run_compress(case, &out, &["--backend", "emu", "--verbose"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        for stage in ["score", "normalize", "reduce", "select", "compact"] {
            let line = err
                .lines()
                .find(|l| l.starts_with(&format!("{stage}: ")))
                .unwrap_or_else(|| panic!("{name}: no {stage} line in {err}"));
            assert!(line.starts_with(&format!("{stage}: emu ")), "{name}: {line}");
            let skipped_normalize = stage == "normalize" && line.contains("(off)");
            assert!(skipped_normalize || line.contains("kernel triattn_"), "{name}: {line}");
        }
        let got = TensorFile::read(&out).unwrap();
        let (s, r) = check_case(case, &got);
        eprintln!("{name} (emu): keep exact, score err {s:.2e}, raw err {r:.2e} (of row std)");
    }
}

/// `compress --backend cuda`: on a GPU every golden case passes with every stage on the device;
/// without one the CLI stops with one clear error line (never a panic) and writes nothing.
/// Keep sets are compared exactly even though device arithmetic differs from the CPU's in the
/// last bits (FMA contraction, device `sincos`, tensor-core order, about 1e-6 of a row's std):
/// every golden boundary is a gap of at least 2e-4 of the row's std or an exact tie between
/// identical keys, which get identical scores on any one backend (shared/data/golden/README.md).
#[cfg(feature = "cuda")]
#[test]
fn golden_cases_with_the_cuda_backend() {
    let cases = golden_cases();
    let dir = tempfile::tempdir().unwrap();
    let have_gpu =
        common::gpu_or_skip("golden_cases_with_the_cuda_backend (checking the error path instead)").is_some();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = run_compress(case, &out, &["--backend", "cuda", "--verbose"]);
        let err = String::from_utf8_lossy(&o.stderr);
        if !have_gpu {
            assert_eq!(o.status.code(), Some(1), "{name}: {err}");
            let lines: Vec<&str> = err.lines().collect();
            assert_eq!(lines.len(), 1, "{name}: one line expected: {err}");
            assert!(lines[0].starts_with("error:") && lines[0].contains("CUDA"), "{name}: {err}");
            assert!(!out.exists(), "{name}: no output on failure");
            continue;
        }
        assert!(o.status.success(), "{name}: {err}");
        for stage in ["score", "normalize", "reduce", "select", "compact"] {
            assert!(err.lines().any(|l| l.starts_with(&format!("{stage}: cuda "))), "{name}: {stage}: {err}");
        }
        let got = TensorFile::read(&out).unwrap();
        let (s, r) = check_case(case, &got);
        println!("parity golden {name} (cuda): keep exact, score err {s:.2e}, raw err {r:.2e} (of row std)");
    }
}

/// `calibrate --backend cuda`: the calibrate kernel on the GPU (the golden case within 1e-5);
/// without a GPU one clear error line.
#[cfg(feature = "cuda")]
#[test]
fn calibration_case_with_the_cuda_backend() {
    if common::gpu_or_skip("calibration_case_with_the_cuda_backend (checking the error path instead)").is_some() {
        check_calibration_case(&["--backend", "cuda"]);
        println!("parity golden calibrate-half (cuda): within 1e-5");
        return;
    }
    let case = common::calibrate_case_dir();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stats.safetensors");
    let o = Command::new(common::triattn_bin())
        .current_dir(&case)
        .args(["calibrate", "--model-config", "config.json", "--queries", "queries.safetensors", "--backend", "cuda"])
        .arg("--out")
        .arg(&out)
        .args(case_args(&case))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error:") && err.contains("CUDA"), "{err}");
    assert!(!out.exists());
}

/// `triattn demo --backend emu`: a simulated decode whose rounds run every stage on the kernels
/// keeps exactly the slots the CPU backend keeps (the table's columns before the stage times).
#[cfg(feature = "emu")]
#[test]
fn demo_on_emu_keeps_what_the_cpu_keeps() {
    let run = |backend: &str| {
        let o = Command::new(common::triattn_bin())
            .args(["demo", "--layers", "2", "--tokens", "900", "--backend", backend])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{backend}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains(&format!("({backend} backend)")), "{out}");
        // Round rows: "<round> <r> <before> <after> ... | <times>".
        let rows: Vec<String> = out
            .lines()
            .filter(|l| l.contains('|') && l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .map(|l| l.split('|').next().unwrap().trim().to_string())
            .collect();
        rows
    };
    let (cpu, emu) = (run("cpu"), run("emu"));
    assert!(cpu.len() >= 2, "expected rounds: {cpu:?}");
    assert_eq!(cpu, emu);
}
