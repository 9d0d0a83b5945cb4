//! Shared helpers of the integration tests: data lookup, comparisons, seeded generators.
#![allow(dead_code)]

use std::path::PathBuf;

use triattn::io::{FileDType, TensorFile};

/// `tests/data/<rel>` if present, else `../shared/data/<rel>`; `None` (with a loud message) if neither.
pub fn data_path(rel: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for base in [root.join("tests/data"), root.join("../shared/data")] {
        let p = base.join(rel);
        if p.exists() {
            return Some(p);
        }
    }
    eprintln!("SKIP: test data {rel} not found under tests/data or ../shared/data");
    None
}

/// The golden case folders present (tests/data/golden or ../shared/data/golden).
pub fn golden_cases() -> Vec<PathBuf> {
    let Some(dir) = data_path("golden") else { return Vec::new() };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists() && p.join("kv.safetensors").exists())
        .collect();
    cases.sort();
    cases
}

/// Standard deviation of the finite values of `row` (population).
pub fn finite_std(row: &[f32]) -> f64 {
    let v: Vec<f64> = row.iter().filter(|x| x.is_finite()).map(|&x| x as f64).collect();
    if v.is_empty() {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Largest `|got - expected| / std(expected row)` over rows of length `n`; infinities must match
/// exactly. Panics with `what` on a mismatch of infinities or NaNs.
pub fn max_rel_err(what: &str, got: &[f32], expected: &[f32], n: usize) -> f64 {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    let mut worst = 0f64;
    for (r, (g, e)) in got.chunks(n).zip(expected.chunks(n)).enumerate() {
        let std = finite_std(e).max(1e-30);
        for (i, (&x, &y)) in g.iter().zip(e).enumerate() {
            if y.is_infinite() || x.is_infinite() || y.is_nan() || x.is_nan() {
                assert!(x == y || (x.is_nan() && y.is_nan()), "{what}: row {r} slot {i}: got {x}, expected {y}");
                continue;
            }
            worst = worst.max((x as f64 - y as f64).abs() / std);
        }
    }
    worst
}

/// The `keep` tensor as i64 values and its shape.
pub fn keep_of(file: &TensorFile) -> (Vec<usize>, Vec<i64>) {
    let t = file.get("keep").unwrap();
    assert!(matches!(t.dtype, FileDType::I32 | FileDType::I64), "keep dtype {}", t.dtype);
    (t.shape.clone(), t.to_i64_vec())
}

/// A deterministic generator (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
