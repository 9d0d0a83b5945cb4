//! The calibration accumulator against the golden `calibrate-half` case, and its chunking
//! invariance.

use crate::common;

use common::calibrate_case_dir;
use half::bf16;
use triattn::io::{Tensor, TensorFile};
use triattn::stats::calibrate::Accumulator;
use triattn::{DType, ErrorKind, PairingStyle, Stats};

/// Layers of `q.{l}` tensors in a queries file.
fn layers(file: &TensorFile) -> usize {
    (0..).take_while(|l| file.tensors.contains_key(&format!("q.{l}"))).count()
}

/// Largest `|a - b| / max(|b|, floor)` over all entries; `floor` is a small fraction of the
/// tensor's own scale, so entries that are (nearly) zero are compared absolutely.
fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let floor = (scale * 1e-3).max(1e-30);
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs() / (y as f64).abs().max(floor)).fold(0.0, f64::max)
}

fn accumulate_file(file: &TensorFile, style: PairingStyle) -> Stats {
    let q0 = file.get("q.0").unwrap();
    let (h, d) = (q0.shape[0], q0.shape[2]);
    let mut acc = Accumulator::new(layers(file), h, d, style).unwrap();
    for l in 0..layers(file) {
        acc.add_tensor(l, file.get(&format!("q.{l}")).unwrap()).unwrap();
    }
    acc.finish().unwrap()
}

#[test]
fn golden_calibrate_half() {
    let dir = calibrate_case_dir();
    let queries = TensorFile::read(dir.join("queries.safetensors")).unwrap();
    let expected = TensorFile::read(dir.join("expected.safetensors")).unwrap();
    let stats = accumulate_file(&queries, PairingStyle::Half);
    let q0 = queries.get("q.0").unwrap();
    assert_eq!((stats.num_layers, stats.num_heads, stats.head_dim), (layers(&queries), q0.shape[0], q0.shape[2]));
    assert_eq!(stats.metadata["calibration_tokens"], q0.shape[1].to_string());
    for (name, got) in
        [("q_mean_real", &stats.q_mean_real), ("q_mean_imag", &stats.q_mean_imag), ("q_abs_mean", &stats.q_abs_mean)]
    {
        let want = expected.get(name).unwrap();
        assert_eq!(want.shape, vec![stats.num_layers, stats.num_heads, stats.freq_count()], "{name} shape");
        let err = max_rel_err(got, &want.to_f32_vec());
        eprintln!("calibrate-half {name}: max relative error {err:.3e}");
        assert!(err <= 1e-5, "{name}: max relative error {err:e} > 1e-5");
    }
    // Triangle inequality, and a round trip through the native format.
    for i in 0..stats.q_abs_mean.len() {
        let m = (stats.q_mean_real[i] as f64).hypot(stats.q_mean_imag[i] as f64);
        assert!(stats.q_abs_mean[i] as f64 >= m * (1.0 - 1e-6), "entry {i}");
    }
    let back = Stats::from_tensor_file(&TensorFile::parse(&stats.to_tensor_file().to_bytes().unwrap()).unwrap());
    let back = back.unwrap();
    assert!(back.q_mean_real == stats.q_mean_real && back.q_abs_mean == stats.q_abs_mean);
    assert_eq!(back.metadata.get("calibration_tokens"), stats.metadata.get("calibration_tokens"));
}

/// `[H, T, D]` rows `t0..t1` of a tensor's values, as bf16.
fn token_slice(values: &[bf16], h: usize, t: usize, d: usize, t0: usize, t1: usize) -> Vec<bf16> {
    (0..h).flat_map(|head| values[(head * t + t0) * d..(head * t + t1) * d].iter().copied()).collect()
}

fn rel_close(name: &str, a: &[f32], b: &[f32], tol: f64) {
    let err = max_rel_err(a, b);
    assert!(err <= tol, "{name}: max relative error {err:e} > {tol:e}");
}

#[test]
fn chunks_and_documents_give_the_same_statistics() {
    let dir = calibrate_case_dir();
    let queries = TensorFile::read(dir.join("queries.safetensors")).unwrap();
    for style in [PairingStyle::Half, PairingStyle::Interleaved] {
        let whole = accumulate_file(&queries, style);
        let q0 = queries.get("q.0").unwrap();
        let (h, t, d) = (q0.shape[0], q0.shape[1], q0.shape[2]);
        let n = layers(&queries);

        // Two chunks of one document through `add`, split unevenly.
        let mut acc = Accumulator::new(n, h, d, style).unwrap();
        let cut = t / 3;
        for l in 0..n {
            let q = queries.get(&format!("q.{l}")).unwrap();
            assert_eq!(q.dtype, triattn::io::FileDType::Float(DType::Bf16));
            let values: Vec<bf16> = q.data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect();
            acc.add(l, &token_slice(&values, h, t, d, 0, cut), cut).unwrap();
            acc.add(l, &token_slice(&values, h, t, d, cut, t), t - cut).unwrap();
        }
        let chunked = acc.finish().unwrap();

        // Two "documents" (files) through `add_tensor`, with the layers in reverse order.
        let mut acc = Accumulator::new(n, h, d, style).unwrap();
        let half = t / 2;
        for (t0, t1) in [(0, half), (half, t)] {
            for l in (0..n).rev() {
                let q = queries.get(&format!("q.{l}")).unwrap();
                let values: Vec<bf16> = q.data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect();
                let part = token_slice(&values, h, t, d, t0, t1);
                let bytes = part.iter().flat_map(|v| v.to_le_bytes()).collect();
                acc.add_tensor(l, &Tensor::from_raw(DType::Bf16, vec![h, t1 - t0, d], bytes)).unwrap();
            }
        }
        assert_eq!(acc.tokens(0), t as u64);
        let documents = acc.finish().unwrap();

        for other in [&chunked, &documents] {
            rel_close("q_mean_real", &other.q_mean_real, &whole.q_mean_real, 1e-6);
            rel_close("q_mean_imag", &other.q_mean_imag, &whole.q_mean_imag, 1e-6);
            rel_close("q_abs_mean", &other.q_abs_mean, &whole.q_abs_mean, 1e-6);
        }

        // The same values widened to f32 and f16-exact ones give the same result as bf16.
        let mut acc = Accumulator::new(n, h, d, style).unwrap();
        for l in 0..n {
            let q = queries.get(&format!("q.{l}")).unwrap();
            acc.add_tensor(l, &Tensor::from_f32(q.shape.clone(), &q.to_f32_vec())).unwrap();
        }
        let as_f32 = acc.finish().unwrap();
        assert_eq!(as_f32.q_mean_real, whole.q_mean_real);
        assert_eq!(as_f32.q_abs_mean, whole.q_abs_mean);
    }
}

#[test]
fn shape_and_dtype_mismatches_name_the_tensor() {
    let mut acc = Accumulator::new(2, 4, 64, PairingStyle::Half).unwrap();
    let wrong = Tensor::from_f32(vec![4, 3, 32], &[0.0; 4 * 3 * 32]);
    let e = acc.add_tensor(1, &wrong).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ShapeMismatch);
    assert!(e.message().contains("tensor q.1 shape: expected [4, T, 64]"), "{e}");
    assert!(e.message().contains("got [4, 3, 32]"), "{e}");

    let e = acc.add_named_tensor(0, "q.0 of doc.safetensors", &Tensor::from_f32(vec![4, 64], &[0.0; 256])).unwrap_err();
    assert!(e.message().contains("tensor q.0 of doc.safetensors shape"), "{e}");

    let ints = Tensor::from_i32(vec![4, 1, 64], &[0; 256]);
    let e = acc.add_tensor(0, &ints).unwrap_err();
    assert!(e.message().contains("tensor q.0 dtype: expected F32, F16 or BF16, got I32"), "{e}");

    let short = Tensor::from_raw(DType::F16, vec![4, 2, 64], vec![0; 10]);
    let e = acc.add_tensor(0, &short).unwrap_err();
    assert!(e.message().contains("tensor q.0 data"), "{e}");

    let e = acc.add_tensor(2, &Tensor::from_f32(vec![4, 1, 64], &[0.0; 256])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("layer: expected < 2"), "{e}");

    let e = acc.add(0, &[0f32; 100], 1).unwrap_err();
    assert!(e.message().contains("queries of layer 0: expected 4 x 1 x 64"), "{e}");
    assert!(e.message().contains("got 100 elements"), "{e}");

    // No tokens for layer 1: finish names it.
    acc.add(0, &[1f32; 4 * 64], 1).unwrap();
    let e = acc.finish().unwrap_err();
    assert!(e.message().contains("layer 1"), "{e}");
}
