//! Every `calibrate` variant on the emu backend against the CPU `Accumulator`, and the golden
//! `calibrate-half` case through the emu path.
//!
//! Tolerance: the kernel sums each (head, pair) in 4 token lanes combined in a fixed order, the
//! CPU in one sequential pass, both in f64 over the same f64 terms, so they differ only by f64
//! rounding order: we require |emu - cpu| <= 1e-12 * Σ|term| (the sum of the magnitudes, which
//! bounds the rounding of any summation order; Re and Im sums may cancel to near zero).
#![cfg(feature = "emu")]

use crate::common;

use common::{calibrate_case_dir, Rng};
use half::{bf16, f16};
use triattn::io::{Tensor, TensorFile};
use triattn::kernels::emu;
use triattn::kernels::variant::{self, Kernel};
use triattn::kernels::CalibrateSpec;
use triattn::stats::calibrate::Accumulator;
use triattn::{DType, Element, PairingStyle};

const REL: f64 = 1e-12;

fn queries<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng(seed);
    (0..n).map(|i| T::from_f32(rng.unit() * 4.0 + (i % 7) as f32 * 0.5)).collect()
}

/// Σ|term| per (layer, head, pair) of the three sums, from the CPU side (an accumulator fed |q|).
fn magnitudes<T: Element>(
    l: usize,
    h: usize,
    d: usize,
    style: PairingStyle,
    chunks: &[(usize, Vec<T>, usize)],
) -> Vec<f64> {
    let mut acc = Accumulator::new(l, h, d, style).unwrap();
    for (layer, q, t) in chunks {
        let abs: Vec<f32> = q.iter().map(|x| x.to_f32().abs()).collect();
        acc.add(*layer, &abs, *t).unwrap();
    }
    // Σ|Re| + Σ|Im| bounds every term of all three sums (|z| <= |Re| + |Im|).
    let (r, i, _) = acc.sums();
    r.iter().zip(i).map(|(a, b)| a + b).collect()
}

fn compare(cpu: &Accumulator, emu: &Accumulator, scale: &[f64], what: &str) {
    let (a, b) = (cpu.sums(), emu.sums());
    for (name, x, y) in [("Re", a.0, b.0), ("Im", a.1, b.1), ("|z|", a.2, b.2)] {
        for (j, ((x, y), s)) in x.iter().zip(y).zip(scale).enumerate() {
            assert!((x - y).abs() <= REL * s.max(1e-300), "{what}: {name} sum {j}: cpu {x} emu {y} (scale {s})");
        }
    }
}

fn check<T: Element>(l: usize, h: usize, d: usize, tokens: &[usize], style: PairingStyle, seed: u64) {
    let chunks: Vec<(usize, Vec<T>, usize)> =
        tokens.iter().enumerate().map(|(i, &t)| (i % l, queries::<T>(h * t * d, seed + i as u64), t)).collect();
    let mut cpu = Accumulator::new(l, h, d, style).unwrap();
    let mut emu_acc = Accumulator::new(l, h, d, style).unwrap();
    for (layer, q, t) in &chunks {
        cpu.add(*layer, q, *t).unwrap();
        emu::calibrate_add(&mut emu_acc, *layer, q, *t).unwrap();
    }
    let what = format!("{:?} L{l} H{h} D{d} T{tokens:?} {style:?}", T::DTYPE);
    compare(&cpu, &emu_acc, &magnitudes(l, h, d, style, &chunks), &what);
    for layer in 0..l {
        assert_eq!(cpu.tokens(layer), emu_acc.tokens(layer), "{what}");
    }
    let (a, b) = (cpu.finish().unwrap(), emu_acc.finish().unwrap());
    // Means rounded to f32: equal unless a sum sits on a rounding boundary (then 1 ulp).
    for (x, y) in a.q_abs_mean.iter().zip(&b.q_abs_mean) {
        assert!((x - y).abs() <= x.abs() * 2e-7, "{what}: |z| mean {x} vs {y}");
    }
}

#[test]
fn calibrate_matches_the_accumulator_for_every_dtype() {
    for style in [PairingStyle::Half, PairingStyle::Interleaved] {
        check::<f32>(2, 3, 64, &[17, 5, 1, 40], style, 1);
        check::<f16>(1, 2, 128, &[33, 100], style, 2);
        check::<bf16>(2, 4, 96, &[7, 64, 3, 129], style, 3);
        check::<bf16>(1, 1, 2, &[9], style, 4);
        check::<f32>(1, 2, 256, &[300], style, 5);
    }
}

#[test]
fn calibrate_is_deterministic_and_zero_tokens_is_a_no_op() {
    let q = queries::<bf16>(4 * 50 * 64, 9);
    let run = || {
        let mut acc = Accumulator::new(1, 4, 64, PairingStyle::Half).unwrap();
        emu::calibrate_add(&mut acc, 0, &q, 50).unwrap();
        emu::calibrate_add::<bf16>(&mut acc, 0, &[], 0).unwrap();
        let (r, i, a) = acc.sums();
        (r.to_vec(), i.to_vec(), a.to_vec())
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first);
    }
    let mut acc = Accumulator::new(1, 4, 64, PairingStyle::Half).unwrap();
    assert!(emu::calibrate_add(&mut acc, 1, &q, 50).is_err());
    assert!(emu::calibrate_add(&mut acc, 0, &q[1..], 50).is_err());
}

#[test]
fn calibrate_has_a_variant_per_dtype() {
    for dtype in DType::ALL {
        let v = variant::calibrate_variant(dtype);
        assert!(matches!(v.kernel, Kernel::Calibrate { dtype: t, .. } if t == dtype));
        assert_eq!(CalibrateSpec::new(dtype, 2, 3, 64, PairingStyle::Half).unwrap().variant(), v);
    }
    assert!(CalibrateSpec::new(DType::F32, 2, 3, 7, PairingStyle::Half).is_err());
    assert!(CalibrateSpec::new(DType::F32, 0, 3, 8, PairingStyle::Half).is_err());
}

fn f32s(t: &Tensor) -> Vec<f32> {
    f32::decode_le(&t.data)
}

#[test]
fn golden_calibrate_half_on_emu() {
    let dir = calibrate_case_dir();
    let queries = TensorFile::read(dir.join("queries.safetensors")).unwrap();
    let expected = TensorFile::read(dir.join("expected.safetensors")).unwrap();
    let layers = (0..).take_while(|l| queries.tensors.contains_key(&format!("q.{l}"))).count();
    let q0 = queries.get("q.0").unwrap();
    let (h, d) = (q0.shape[0], q0.shape[2]);
    let mut acc = Accumulator::new(layers, h, d, PairingStyle::Half).unwrap();
    let mut cpu = Accumulator::new(layers, h, d, PairingStyle::Half).unwrap();
    for l in 0..layers {
        let name = format!("q.{l}");
        emu::calibrate_tensor(&mut acc, l, &name, queries.get(&name).unwrap()).unwrap();
        cpu.add_named_tensor(l, &name, queries.get(&name).unwrap()).unwrap();
    }
    // Against the CPU sums (1e-12 of the |z| sums, which bound Re and Im per pair here).
    let (a, b) = (cpu.sums(), acc.sums());
    for (x, y) in [(a.0, b.0), (a.1, b.1), (a.2, b.2)] {
        for ((x, y), s) in x.iter().zip(y).zip(a.2) {
            assert!((x - y).abs() <= 2.0 * REL * s, "golden sums: cpu {x} emu {y}");
        }
    }
    let stats = acc.finish().unwrap();
    assert_eq!(stats.metadata["calibration_tokens"], q0.shape[1].to_string());
    for (name, got) in
        [("q_mean_real", &stats.q_mean_real), ("q_mean_imag", &stats.q_mean_imag), ("q_abs_mean", &stats.q_abs_mean)]
    {
        let want = f32s(expected.get(name).unwrap());
        assert_eq!(got.len(), want.len(), "{name}");
        let scale = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        let floor = (scale * 1e-3).max(1e-30);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y as f64).abs().max(floor))
            .fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{name}: relative error {worst:e} > 1e-5");
    }
}
