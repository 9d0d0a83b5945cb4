//! `triattn decode` and `cpu::decode` against the contract (`tests/data/decode/README.md`): every
//! golden case through the CLI on the CPU backend and, with the `emu` feature, on the kernels
//! (tolerances of the contract; the errors we measure are printed); the CPU backend against an
//! f64 evaluation of the formula on random shapes (list layouts, ragged and empty lists, sinks,
//! soft-capping, T > 1, MHA and GQA up to 8, `Dv != D`); a decode through a keep list equals a
//! dense decode of the cache compacted by it; bad input exits 1 with one line naming the tensor or
//! flag and writes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use half::bf16;
use triattn::cpu::decode::{decode_layer, LayerDecode, SlotLists};
use triattn::decode::{DecodeOptions, ListLayout};
use triattn::io::TensorFile;
use triattn::LayerView;

use crate::common::{self, Rng};

/// The case folders: the shipped copies in tests/data/decode and any others in ../shared.
pub(crate) fn cases() -> Vec<PathBuf> {
    let shipped = common::data_path("decode");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&shipped)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    for name in ["decode-dense-bf16", "decode-per-head-qwen3", "decode-union-sinks-f16"] {
        assert!(cases.iter().any(|c| c.ends_with(name)), "decode case {name} missing under {}", shipped.display());
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/decode");
    if let Ok(dir) = std::fs::read_dir(shared) {
        for p in dir.map(|e| e.unwrap().path()).filter(|p| p.join("case.json").is_file()) {
            if !cases.iter().any(|c| c.file_name() == p.file_name()) {
                cases.push(p);
            }
        }
    }
    cases.sort();
    cases
}

fn run_case(case: &Path, out: &Path, backend: &str) -> Output {
    run_case_with(case, out, backend, &[])
}

/// [`run_case`] with `extra` flags.
pub(crate) fn run_case_with(case: &Path, out: &Path, backend: &str, extra: &[&str]) -> Output {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    let mut cmd = Command::new(common::triattn_bin());
    cmd.current_dir(case).args(["decode", "--q", "q.safetensors", "--kv", "kv.safetensors", "--out"]).arg(out);
    for (flag, file) in [("--keep", "keep.safetensors"), ("--sinks", "sinks.safetensors")] {
        if case.join(file).is_file() {
            cmd.args([flag, file]);
        }
    }
    for a in json["args"].as_array().into_iter().flatten() {
        cmd.arg(a.as_str().unwrap());
    }
    cmd.args(["--backend", backend]).args(extra).output().unwrap()
}

/// `(o error / max|v|, lse error / (1e-3 + 1e-5 |lse|))` of one case's output; panics past the
/// contract's tolerances.
pub(crate) fn check_case(case: &Path, out: &Path) -> (f64, f64) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let (got, want, kv) = (
        TensorFile::read(out).unwrap(),
        TensorFile::read(case.join("expected.safetensors")).unwrap(),
        TensorFile::read(case.join("kv.safetensors")).unwrap(),
    );
    let (mut o_worst, mut lse_worst) = (0f64, 0f64);
    for l in 0.. {
        let Ok(o_want) = want.get(&format!("o.{l}")) else { break };
        let o_got = got.get(&format!("o.{l}")).unwrap();
        assert_eq!(o_got.shape, o_want.shape, "{name}: o.{l} shape");
        let v = kv.get(&format!("v.{l}")).unwrap();
        let (hkv, dv) = (v.shape[0], v.shape[2]);
        let vals = v.to_f32_vec();
        let vmax: Vec<f64> = (0..hkv)
            .map(|g| {
                vals[g * v.shape[1] * dv..(g + 1) * v.shape[1] * dv].iter().map(|x| x.abs() as f64).fold(0.0, f64::max)
            })
            .collect();
        let (h, t) = (o_want.shape[0], o_want.shape[1]);
        let (a, b) = (o_got.to_f32_vec(), o_want.to_f32_vec());
        for i in 0..a.len() {
            let g = i / (t * dv) / (h / hkv);
            let err = (a[i] as f64 - b[i] as f64).abs() / vmax[g].max(1e-30);
            assert!(err <= 4e-3, "{name}: o.{l}[{i}] = {} vs {} ({err:.2e} of max|v|)", a[i], b[i]);
            o_worst = o_worst.max(err);
        }
        let (a, b) =
            (got.get(&format!("lse.{l}")).unwrap().to_f32_vec(), want.get(&format!("lse.{l}")).unwrap().to_f32_vec());
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            if y == f32::NEG_INFINITY {
                assert_eq!(x, f32::NEG_INFINITY, "{name}: lse.{l}[{i}]");
                continue;
            }
            let err = (x as f64 - y as f64).abs();
            let tol = 1e-3 + 1e-5 * (y as f64).abs();
            assert!(err <= tol, "{name}: lse.{l}[{i}] = {x} vs {y}");
            lse_worst = lse_worst.max(err / tol);
        }
    }
    (o_worst, lse_worst)
}

#[test]
fn golden_cases_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let backends: &[&str] = if cfg!(feature = "emu") { &["cpu", "emu"] } else { &["cpu"] };
    for case in cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        for backend in backends {
            let out = dir.path().join(format!("{name}-{backend}.safetensors"));
            let o = run_case(&case, &out, backend);
            assert!(o.status.success(), "{name} ({backend}): {}", String::from_utf8_lossy(&o.stderr));
            let (o_err, lse_err) = check_case(&case, &out);
            println!("decode golden {name} ({backend}): o {o_err:.2e} of max|v|, lse {lse_err:.2e} of its tolerance");
        }
    }
}

/// `--verbose` names the kernel of each launch on a kernel backend, the CPU time otherwise.
#[test]
fn verbose_names_the_launches() {
    let case = common::data_path("decode/decode-union-sinks-f16");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let backends: &[&str] = if cfg!(feature = "emu") { &["cpu", "emu"] } else { &["cpu"] };
    for backend in backends {
        let o = Command::new(common::triattn_bin())
            .current_dir(&case)
            .args(["decode", "--q", "q.safetensors", "--kv", "kv.safetensors", "--keep", "keep.safetensors"])
            .args(["--sinks", "sinks.safetensors", "--verbose", "--backend", backend, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.lines().any(|l| l.starts_with(&format!("decode: {backend}"))), "{err}");
        if *backend == "emu" {
            assert!(err.contains("triattn_decode_f16_d64"), "{err}");
        }
    }
}

/// A small random decode problem: `[Hkv, N, dim]` tensors per layer and queries `[H, T, D]`.
struct Random {
    h: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    t: usize,
    n: usize,
    layers: usize,
    k: Vec<Vec<bf16>>,
    v: Vec<Vec<bf16>>,
    q: Vec<Vec<f32>>,
}

impl Random {
    #[allow(clippy::too_many_arguments)]
    fn new(seed: u64, layers: usize, h: usize, hkv: usize, d: usize, dv: usize, t: usize, n: usize) -> Self {
        let mut rng = Rng(seed);
        let mut tensor = |count: usize, s: f32| (0..count).map(|_| bf16::from_f32(rng.unit() * s)).collect::<Vec<_>>();
        let k = (0..layers).map(|_| tensor(hkv * n * d, 2.0)).collect();
        let v = (0..layers).map(|_| tensor(hkv * n * dv, 3.0)).collect();
        let q = (0..layers).map(|_| (0..h * t * d).map(|_| rng.unit() * 2.0).collect()).collect();
        Self { h, hkv, d, dv, t, n, layers, k, v, q }
    }

    fn run(&self, layer: usize, lists: &SlotLists, sinks: Option<&[f32]>, options: &DecodeOptions) -> LayerDecode {
        let k = LayerView::contiguous("k", &self.k[layer], self.hkv, self.n, self.d).unwrap();
        let v = LayerView::contiguous("v", &self.v[layer], self.hkv, self.n, self.dv).unwrap();
        decode_layer(&self.q[layer], self.t, &k, &v, lists, layer, sinks, options).unwrap()
    }

    /// The formula in f64.
    fn reference(
        &self,
        layer: usize,
        lists: &SlotLists,
        sinks: Option<&[f32]>,
        options: &DecodeOptions,
    ) -> (Vec<f64>, Vec<f64>) {
        let (g_size, scale) = (self.h / self.hkv, options.scale_for(self.d) as f64);
        let (mut o, mut lse) = (Vec::new(), Vec::new());
        for h in 0..self.h {
            let g = h / g_size;
            let slots: Vec<usize> = match lists.list(layer, g, self.hkv) {
                Some(l) => l.iter().map(|&s| s as usize).collect(),
                None => (0..self.n).collect(),
            };
            for t in 0..self.t {
                let q = &self.q[layer][(h * self.t + t) * self.d..][..self.d];
                let s: Vec<f64> = slots
                    .iter()
                    .map(|&j| {
                        let x = (0..self.d)
                            .map(|i| q[i] as f64 * self.k[layer][(g * self.n + j) * self.d + i].to_f64())
                            .sum::<f64>()
                            * scale;
                        options.softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh())
                    })
                    .collect();
                let sink = sinks.map(|s| s[h] as f64);
                let m = s.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let den = w.iter().sum::<f64>() + sink.map_or(0.0, |x| (x - m).exp());
                for e in 0..self.dv {
                    let a: f64 = slots
                        .iter()
                        .zip(&w)
                        .map(|(&j, w)| w * self.v[layer][(g * self.n + j) * self.dv + e].to_f64())
                        .sum();
                    o.push(if den > 0.0 { a / den } else { 0.0 });
                }
                lse.push(if den > 0.0 { m + den.ln() } else { f64::NEG_INFINITY });
            }
        }
        (o, lse)
    }

    fn check(&self, what: &str, lists: &SlotLists, sinks: Option<&[f32]>, options: &DecodeOptions) {
        for layer in 0..self.layers {
            let got = self.run(layer, lists, sinks, options);
            let (o, lse) = self.reference(layer, lists, sinks, options);
            let vmax = self.v[layer].iter().map(|x| x.to_f32().abs() as f64).fold(1e-30, f64::max);
            let o_err = got.o.iter().zip(&o).map(|(&a, &b)| (a as f64 - b).abs() / vmax).fold(0.0, f64::max);
            assert!(o_err < 2e-6, "{what} layer {layer}: o error {o_err:.2e} of max|v|");
            for (i, (&a, &b)) in got.lse.iter().zip(&lse).enumerate() {
                if b == f64::NEG_INFINITY {
                    assert_eq!(a, f32::NEG_INFINITY, "{what}: lse {i}");
                } else {
                    assert!((a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{what}: lse {i} {a} vs {b}");
                }
            }
        }
    }

    /// Random ascending lists of `layout`; list 3 (when there is one) empty.
    fn lists(&self, layout: ListLayout, max: usize, seed: u64) -> SlotLists {
        let mut rng = Rng(seed);
        let count = layout.num_lists(self.layers, self.hkv);
        let lists = (0..count)
            .map(|i| {
                let len = if i == 3 {
                    0
                } else if i % 2 == 0 {
                    max
                } else {
                    rng.below(max + 1)
                };
                common::random_keep_set(&mut rng, self.n, len).into_iter().map(|s| s as u32).collect()
            })
            .collect();
        SlotLists::new(layout, lists, self.layers, self.hkv, self.n).unwrap()
    }
}

#[test]
fn cpu_decode_matches_the_formula() {
    let sinks: Vec<f32> = (0..16).map(|i| i as f32 * 0.5 - 3.0).collect();
    let cap = DecodeOptions { scale: Some(0.2), softcap: Some(4.0) };
    for (h, hkv, t) in [(4, 4, 1), (8, 2, 1), (16, 2, 3), (8, 1, 2)] {
        let p = Random::new(h as u64 * 7 + t as u64, 2, h, hkv, 64, 96, t, 90);
        for layout in [ListLayout::Dense, ListLayout::Shared, ListLayout::PerKvHead, ListLayout::PerLayerKvHead] {
            let lists = if layout == ListLayout::Dense { SlotLists::dense() } else { p.lists(layout, 70, 3) };
            let what = format!("H{h} Hkv{hkv} T{t} {layout:?}");
            p.check(&what, &lists, None, &DecodeOptions::default());
            p.check(&format!("{what} sinks"), &lists, Some(&sinks[..h]), &DecodeOptions::default());
            p.check(&format!("{what} softcap"), &lists, None, &cap);
        }
    }
}

/// Through a list == dense over the cache compacted by it; a list of every slot == dense.
#[test]
fn a_keep_list_equals_the_compacted_cache() {
    let p = Random::new(3, 2, 8, 2, 128, 128, 1, 200);
    let lists = p.lists(ListLayout::PerLayerKvHead, 150, 9);
    for layer in 0..2 {
        let got = p.run(layer, &lists, None, &DecodeOptions::default());
        let gather = |src: &Vec<bf16>, dim: usize| -> (Vec<bf16>, usize) {
            let kept = lists.list(layer, 0, p.hkv).unwrap().len().max(lists.list(layer, 1, p.hkv).unwrap().len());
            let mut out = vec![bf16::ZERO; p.hkv * kept * dim];
            for g in 0..p.hkv {
                for (i, &s) in lists.list(layer, g, p.hkv).unwrap().iter().enumerate() {
                    out[(g * kept + i) * dim..][..dim].copy_from_slice(&src[(g * p.n + s as usize) * dim..][..dim]);
                }
            }
            (out, kept)
        };
        let ((k, kept), (v, _)) = (gather(&p.k[layer], p.d), gather(&p.v[layer], p.dv));
        // Compacted heads of different lengths: decode each KV head's rows through 0..len.
        let per_head: Vec<Vec<u32>> =
            (0..p.hkv).map(|g| (0..lists.list(layer, g, p.hkv).unwrap().len() as u32).collect()).collect();
        let compacted = SlotLists::new(ListLayout::PerKvHead, per_head, 1, p.hkv, kept).unwrap();
        let kv = LayerView::contiguous("k", &k, p.hkv, kept, p.d).unwrap();
        let vv = LayerView::contiguous("v", &v, p.hkv, kept, p.dv).unwrap();
        let want = decode_layer(&p.q[layer], 1, &kv, &vv, &compacted, 0, None, &DecodeOptions::default()).unwrap();
        assert_eq!(got, want, "layer {layer}: through the list vs compacted");
    }
    let all: Vec<Vec<u32>> = vec![(0..p.n as u32).collect()];
    let full = SlotLists::new(ListLayout::Shared, all, 2, p.hkv, p.n).unwrap();
    assert_eq!(
        p.run(1, &full, None, &DecodeOptions::default()),
        p.run(1, &SlotLists::dense(), None, &DecodeOptions::default()),
        "a list of every slot is dense"
    );
}

/// The `keep` parser of the contract: the three shapes, -1 padding only after the entries,
/// out-of-range and unsorted slots refused by name.
#[test]
fn keep_tensors_parse_as_the_contract_says() {
    let ok = SlotLists::from_keep("keep", &[2, 3], &[0, 4, -1, -1, -1, -1], 5, 2, 10).unwrap();
    assert_eq!(
        (ok.layout(), ok.list(3, 0, 2), ok.list(0, 1, 2)),
        (ListLayout::PerKvHead, Some(&[0u32, 4][..]), Some(&[][..]))
    );
    let one = SlotLists::from_keep("keep", &[2], &[1, 2], 5, 2, 10).unwrap();
    assert_eq!(one.layout(), ListLayout::Shared);
    let per_layer = SlotLists::from_keep("keep", &[1, 2, 1], &[3, 5], 1, 2, 10).unwrap();
    assert_eq!(per_layer.list(0, 1, 2), Some(&[5u32][..]));
    for (shape, values, want) in [
        (vec![2, 2], vec![-1, 0, 3, 4], "padding only after"),
        (vec![2], vec![3, 3], "strictly ascending"),
        (vec![2], vec![4, 2], "strictly ascending"),
        (vec![2], vec![0, 10], "a slot in 0..10"),
        (vec![3, 1], vec![0, 1, 2], "[K], [2, K] or [5, 2, K]"),
    ] {
        let e = SlotLists::from_keep("keep", &shape, &values, 5, 2, 10).unwrap_err().to_string();
        assert!(e.contains("keep") && e.contains(want), "{shape:?} {values:?}: {e}");
    }
}

/// Bad input through the CLI: exit 1, one line naming the tensor or flag, no output file.
#[test]
fn bad_input_is_refused_by_name() {
    let case = common::data_path("decode/decode-per-head-qwen3");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let write = |name: &str, tensors: Vec<(&str, triattn::io::Tensor)>| {
        let t = TensorFile {
            path: path(name),
            tensors: tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            metadata: Default::default(),
        };
        t.write(path(name)).unwrap();
        path(name)
    };
    let q = TensorFile::read(case.join("q.safetensors")).unwrap();
    let keep = TensorFile::read(case.join("keep.safetensors")).unwrap().get("keep").unwrap().to_i64_vec();
    let i32s = |v: &[i64]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
    let mut unsorted = keep.clone();
    unsorted.swap(0, 1);
    let mut out_of_range = keep.clone();
    out_of_range[5] = 1500;
    let mut early_pad = keep.clone();
    early_pad[2] = -1;
    let small_q: Vec<f32> = vec![0.5; 32 * 64];
    let odd_q: Vec<f32> = vec![0.5; 12 * 128];
    let files = [
        (
            "unsorted keep",
            write(
                "unsorted.safetensors",
                vec![("keep", triattn::io::Tensor::from_i32(vec![8, 1024], &i32s(&unsorted)))],
            ),
            "keep",
        ),
        (
            "out-of-range keep",
            write(
                "range.safetensors",
                vec![("keep", triattn::io::Tensor::from_i32(vec![8, 1024], &i32s(&out_of_range)))],
            ),
            "keep",
        ),
        (
            "-1 before an entry",
            write("pad.safetensors", vec![("keep", triattn::io::Tensor::from_i32(vec![8, 1024], &i32s(&early_pad)))]),
            "keep",
        ),
        (
            "keep of no layout",
            write(
                "shape.safetensors",
                vec![("keep", triattn::io::Tensor::from_i32(vec![3, 8, 1024 / 3], &i32s(&keep[..3 * 8 * 341])))],
            ),
            "keep",
        ),
    ];
    let run = |args: &[&std::ffi::OsStr]| -> Output {
        let out = path("o.safetensors");
        let o = Command::new(common::triattn_bin())
            .current_dir(&case)
            .arg("decode")
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!out.exists(), "{args:?}: an output file was left behind");
        o
    };
    let base = ["--q", "q.safetensors", "--kv", "kv.safetensors"].map(std::ffi::OsStr::new);
    let mut cases: Vec<(String, Vec<std::ffi::OsString>, &str)> = Vec::new();
    for (what, file, needle) in &files {
        cases.push((what.to_string(), vec!["--keep".into(), file.clone().into()], needle));
    }
    let q_small = write(
        "qd.safetensors",
        vec![
            ("q.0", triattn::io::Tensor::from_f32(vec![32, 1, 64], &small_q)),
            ("q.1", triattn::io::Tensor::from_f32(vec![32, 1, 64], &small_q)),
        ],
    );
    let q_odd = write(
        "qh.safetensors",
        vec![
            ("q.0", triattn::io::Tensor::from_f32(vec![12, 1, 128], &odd_q)),
            ("q.1", triattn::io::Tensor::from_f32(vec![12, 1, 128], &odd_q)),
        ],
    );
    let mut three = q.tensors.clone();
    three.insert("q.2".into(), three["q.0"].clone());
    let q_extra = {
        let t = TensorFile { path: path("q3.safetensors"), tensors: three, metadata: Default::default() };
        t.write(path("q3.safetensors")).unwrap();
        path("q3.safetensors")
    };
    let sinks_bad = write(
        "sinks.safetensors",
        vec![
            ("sinks.0", triattn::io::Tensor::from_f32(vec![31], &[0.0; 31])),
            ("sinks.1", triattn::io::Tensor::from_f32(vec![31], &[0.0; 31])),
        ],
    );
    let mut flag_cases: Vec<(String, Vec<std::ffi::OsString>, &str)> = vec![
        ("head_dim mismatch".into(), vec!["--q".into(), q_small.into_os_string()], "head_dim"),
        ("H not a multiple of Hkv".into(), vec!["--q".into(), q_odd.into_os_string()], "heads"),
        ("a missing layer".into(), vec!["--q".into(), q_extra.into_os_string()], "k.2"),
        ("sinks shape".into(), vec!["--sinks".into(), sinks_bad.into_os_string()], "sinks.0"),
        ("scale 0".into(), vec!["--scale".into(), "0".into()], "--scale"),
        ("scale nan".into(), vec!["--scale".into(), "nan".into()], "--scale"),
        ("softcap -1".into(), vec!["--softcap".into(), "-1".into()], "--softcap"),
        ("softcap text".into(), vec!["--softcap".into(), "abc".into()], "--softcap"),
    ];
    cases.append(&mut flag_cases);
    for (what, extra, needle) in cases {
        // Later flags of the same name replace earlier ones only for --q; the rest add to base.
        let mut args: Vec<&std::ffi::OsStr> = Vec::new();
        if extra.first().is_some_and(|a| a == "--q") {
            args.extend(["--q".as_ref(), extra[1].as_os_str(), "--kv".as_ref(), "kv.safetensors".as_ref()]);
        } else {
            args.extend(base);
            args.extend(extra.iter().map(|a| a.as_os_str()));
        }
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
        assert!(err.contains(needle) && err.contains("expected"), "{what}: {err}");
    }
}
