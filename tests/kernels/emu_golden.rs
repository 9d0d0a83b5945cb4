//! The golden cases' raw scores through the emu backend: what `compress --backend emu` scores.
//!
//! Raw scores must match the independent f64 reference within the CLI contract's 5e-4 of the
//! row's standard deviation, and the CPU backend within 4e-6 (the f32 floor, see emu_score.rs);
//! the stages after scoring are the CPU backend's in both.
#![cfg(feature = "emu")]

use crate::common;

use std::path::Path;

use common::{golden_cases, max_rel_err};
use half::{bf16, f16};
use triattn::io::{FileDType, TensorFile};
use triattn::kernels::emu;
use triattn::round::Scorer;
use triattn::score::{OffsetAggregation, ScoreConfig};
use triattn::{cpu, DType, Element, LayerView, ModelConfig, PairingStyle, Stats};

fn args(case: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    v["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).map(|i| args[i + 1].clone())
}

fn elements<T: Element>(bytes: &[u8]) -> Vec<T> {
    bytes
        .chunks(T::DTYPE.size())
        .map(|c| match T::DTYPE {
            DType::F32 => T::from_f32(f32::from_le_bytes(c.try_into().unwrap())),
            DType::F16 => T::from_f32(f16::from_le_bytes(c.try_into().unwrap()).to_f32()),
            DType::Bf16 => T::from_f32(bf16::from_le_bytes(c.try_into().unwrap()).to_f32()),
        })
        .collect()
}

/// Worst (emu vs expected, emu vs cpu) over every layer of one case.
fn case_errors<T: Element>(case: &Path, kv: &TensorFile, scorer: &Scorer, config: &ScoreConfig, r: u64) -> (f64, f64) {
    let expected = TensorFile::read(case.join("expected.safetensors")).unwrap();
    let weights = scorer.weights(r, config).unwrap();
    let (mut vs_ref, mut vs_cpu) = (0f64, 0f64);
    // Every layer in one launch, as `compress --backend emu` would score them.
    let datas: Vec<Vec<T>> =
        (0..scorer.model.num_layers).map(|l| elements::<T>(&kv.get(&format!("k.{l}")).unwrap().data)).collect();
    let views: Vec<LayerView<'_, T>> = (0..scorer.model.num_layers)
        .map(|l| {
            let s = &kv.get(&format!("k.{l}")).unwrap().shape;
            LayerView::contiguous("k", &datas[l], s[0], s[1], s[2]).unwrap()
        })
        .collect();
    let all = emu::score_layers(&weights, &views, scorer.style).unwrap();
    for (l, one_launch) in all.iter().enumerate() {
        let k = kv.get(&format!("k.{l}")).unwrap();
        let (hkv, n, d) = (k.shape[0], k.shape[1], k.shape[2]);
        let data = elements::<T>(&k.data);
        let view = LayerView::contiguous("k", &data, hkv, n, d).unwrap();
        let h = weights.num_heads;
        // The kernel's output starts poisoned (NaN): every slot must be written.
        let (mut a, mut b) = (vec![f32::NAN; h * n], vec![0f32; h * n]);
        emu::score_layer(&weights, l, &view, scorer.style, &mut a).unwrap();
        cpu::score::score_layer(&weights, l, &view, scorer.style, &mut b).unwrap();
        let e = expected.get(&format!("raw.{l}")).unwrap().to_f32_vec();
        vs_ref = vs_ref.max(max_rel_err(&format!("raw.{l}"), &a, &e, n));
        vs_cpu = vs_cpu.max(max_rel_err(&format!("raw.{l} (cpu)"), &a, &b, n));
        assert_eq!(one_launch, &a, "raw.{l}: one launch for all layers must equal the per-layer launch");
    }
    (vs_ref, vs_cpu)
}

#[test]
fn emu_raw_scores_match_every_golden_case() {
    for case in &golden_cases() {
        let a = args(case);
        let model = ModelConfig::from_file(case.join("config.json")).unwrap();
        let stats = Stats::load(case.join("stats.safetensors")).unwrap();
        let style = flag(&a, "--rope-style").map(|s| PairingStyle::parse("--rope-style", &s).unwrap());
        let scorer = Scorer::new(model, stats, style).unwrap();
        let aggregation = match flag(&a, "--offsets-aggregation").as_deref() {
            Some("max") => OffsetAggregation::Max,
            _ => OffsetAggregation::Mean,
        };
        let config = ScoreConfig { aggregation, ..ScoreConfig::default() };
        let kv = TensorFile::read(case.join("kv.safetensors")).unwrap();
        let n = kv.get("k.0").unwrap().shape[1];
        let r = kv.meta_usize("round_start").unwrap().unwrap_or(n) as u64;
        let (vs_ref, vs_cpu) = match kv.get("k.0").unwrap().dtype {
            FileDType::Float(DType::F32) => case_errors::<f32>(case, &kv, &scorer, &config, r),
            FileDType::Float(DType::F16) => case_errors::<f16>(case, &kv, &scorer, &config, r),
            FileDType::Float(DType::Bf16) => case_errors::<bf16>(case, &kv, &scorer, &config, r),
            other => panic!("{}: key dtype {other:?}", case.display()),
        };
        let name = case.file_name().unwrap().to_string_lossy();
        eprintln!("{name}: emu raw vs reference {vs_ref:.2e} std, vs cpu {vs_cpu:.2e} std");
        assert!(vs_ref <= 5e-4, "{name}: {vs_ref:.3e}");
        assert!(vs_cpu <= 4e-6, "{name}: {vs_cpu:.3e}");
    }
}
