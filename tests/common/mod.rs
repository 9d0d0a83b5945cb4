//! Shared helpers of the integration tests: data lookup, comparisons, seeded generators.
#![allow(dead_code)]

use std::path::PathBuf;

use triattn::io::{FileDType, TensorFile};
use triattn::{Element, PairingStyle, Stats};

/// A model config with RoPE base 1e6 and no scaling.
pub fn model(layers: usize, heads: usize, kv_heads: usize, head_dim: usize) -> triattn::ModelConfig {
    triattn::ModelConfig::from_json_str(&format!(
        r#"{{"num_hidden_layers":{layers},"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},
            "head_dim":{head_dim},"rope_theta":1000000.0}}"#
    ))
    .unwrap()
}

/// Element strides of a dense `[Hkv, n, d]` tensor.
pub fn dense_strides(n: usize, d: usize) -> triattn::cuda::RowStrides {
    triattn::cuda::RowStrides { head_stride: n * d, row_stride: d }
}

/// The `triattn` CLI under test: `TRIATTN_BIN` if set (a test binary carried to another machine,
/// as gpu-check does), else the one cargo built with the tests.
pub fn triattn_bin() -> PathBuf {
    std::env::var_os("TRIATTN_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_triattn")))
}

/// `tests/data/<rel>` if present, else `../shared/data/<rel>`, else `tests/data/<rel>` under the
/// current directory (a carried test binary run from the repository root). The fixtures ship with
/// the crate, so a missing one is a broken checkout: panics naming every place looked, never a
/// silent pass.
pub fn data_path(rel: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let here = std::env::current_dir().unwrap_or_default().join("tests/data");
    let places = [root.join("tests/data").join(rel), root.join("../shared/data").join(rel), here.join(rel)];
    places.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!("test data {rel} missing: expected it at one of {places:?} (the fixtures ship in tests/data)")
    })
}

/// The golden compress cases shipped in `tests/data/golden`: every one must be found.
pub const SHIPPED_GOLDEN_CASES: [&str; 6] =
    ["dsqwen-union-raw", "interleaved-max-plph", "llama3-vllm-window", "qwen3-paper", "short-no-op", "yarn-scaled"];

/// The golden compress case folders (`case.json` and `kv.safetensors`) of the golden directory
/// [`data_path`] finds, sorted; panics unless every [`SHIPPED_GOLDEN_CASES`] entry is among them
/// (more cases of the same format may be added).
pub fn golden_cases() -> Vec<PathBuf> {
    let dir = data_path("golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists() && p.join("kv.safetensors").exists())
        .collect();
    cases.sort();
    for name in SHIPPED_GOLDEN_CASES {
        assert!(
            cases.iter().any(|c| c.ends_with(name)),
            "golden case {name} missing: expected {} with case.json and kv.safetensors",
            dir.join(name).display()
        );
    }
    cases
}

/// The golden case folder `calibrate-half` (`shared/data/golden/calibrate-half` next to the
/// crate, or the `tests/data` copy); panics naming both places if neither holds its files.
pub fn calibrate_case_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let places = [root.join("../shared/data/golden/calibrate-half"), root.join("tests/data/golden/calibrate-half")];
    places
        .iter()
        .find(|d| d.join("queries.safetensors").is_file() && d.join("expected.safetensors").is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("golden case calibrate-half missing: expected queries.safetensors and expected.safetensors in one of {places:?}")
        })
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
    /// Uniform in [-1, 1) with 24 bits (the top bits of one draw).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` bytes, the low byte of one draw each.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// The probed GPU, or `None` after a loud `SKIP <test>: <reason>`; panics instead when
/// `TRIATTN_REQUIRE_GPU` is set.
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(test: &str) -> Option<triattn::cuda::CudaBackend> {
    match triattn::cuda::CudaBackend::probe(0) {
        Ok(b) => Some(b),
        Err(e) if std::env::var_os("TRIATTN_REQUIRE_GPU").is_some() => {
            panic!("{test}: GPU required but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP {test}: {e}");
            None
        }
    }
}

/// Random half-pairing statistics from `Rng(seed)`: means of Re and Im uniform in [-2, 2), and
/// `q_abs_mean` = |mean| plus a margin in [0, 1).
pub fn random_stats(layers: usize, heads: usize, d: usize, seed: u64) -> Stats {
    let n = layers * heads * (d / 2);
    let mut rng = Rng(seed);
    let qr: Vec<f32> = (0..n).map(|_| rng.unit() * 2.0).collect();
    let qi: Vec<f32> = (0..n).map(|_| rng.unit() * 2.0).collect();
    let qa: Vec<f32> = (0..n).map(|i| (qr[i] * qr[i] + qi[i] * qi[i]).sqrt() + 0.5 * (rng.unit() + 1.0)).collect();
    Stats {
        num_layers: layers,
        num_heads: heads,
        head_dim: d,
        rope_style: PairingStyle::Half,
        q_mean_real: qr,
        q_mean_imag: qi,
        q_abs_mean: qa,
        sampled_heads: None,
        metadata: Default::default(),
    }
}

/// RoPE frequencies of base 1e6 for head dim `d`.
pub fn omega(d: usize) -> Vec<f64> {
    (0..d / 2).map(|f| 1e6f64.powf(-2.0 * f as f64 / d as f64)).collect()
}

/// Keys from `Rng(seed)` with a common centre, spread and a few outliers, rounded to `T`.
pub fn random_keys<T: Element>(count: usize, d: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng(seed);
    let centre: Vec<f32> = (0..d).map(|_| rng.unit() * 3.0).collect();
    (0..count)
        .map(|i| {
            let x = centre[i % d] + rng.unit();
            let x = if rng.next_u64().is_multiple_of(97) { x * 8.0 } else { x };
            T::from_f32(x)
        })
        .collect()
}

/// Population standard deviation.
pub fn std_dev(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    (x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
}

/// `k` distinct slots of `0..n` drawn by a partial Fisher-Yates shuffle, sorted.
pub fn random_keep_set(rng: &mut Rng, n: usize, k: usize) -> Vec<i32> {
    let mut all: Vec<i32> = (0..n as i32).collect();
    for i in 0..k {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    let mut s = all[..k].to_vec();
    s.sort_unstable();
    s
}

/// Swaps at the selection boundary a GPU round may make, as a fraction of the standard deviation
/// of the ranked (reduced) score row: a kernel backend's keep sets may differ from the CPU's only
/// between slots whose CPU scores lie this close to the row's boundary.
///
/// Why this much: the device contracts multiply-adds into FMA, its `sincos` is not glibc's and
/// tensor cores accumulate in their own order, so scores differ from the CPU's in the last bits:
/// DESIGN promises about 1e-6 of the raw row's standard deviation, the GPU tests allow up to
/// 1e-5. A z-score carries that error in units of its row's deviation, and the group and layer
/// reductions (max, mean) do not enlarge it, so a reduced score is off by at most 1e-5 (z units).
/// Two slots trade places only if their CPU scores differ by at most twice that, each then within
/// 2e-5 of the boundary; the reduced rows of these tests spread at least 0.1 (a mean of group
/// maxima over <= 36 layers), which makes 2e-4 of their deviation — ten times what the expected
/// 1e-6 error gives. A real bug (a wrong term, row or slot) moves scores by far more than that.
pub const KEEP_SWAP_TOL: f64 = 2e-4;

/// Compare a kernel backend's keep sets (`got`) with the CPU's (`cpu_keep`, ranked by
/// `cpu_score`, `[sets, N]` with protected slots `+inf`), accepting a difference only as swaps
/// between slots whose CPU scores lie within `tol_of_std` x the row's standard deviation (finite
/// values) of the CPU's boundary — the lowest score the CPU kept. Prints every swap and returns
/// how many there were (0 when the sets are equal); panics with `what` on anything else.
pub fn assert_keep_sets_match(
    what: &str,
    cpu_score: &[f32],
    cpu_keep: &[Vec<u32>],
    got: &[Vec<u32>],
    tol_of_std: f64,
) -> usize {
    assert_eq!(got.len(), cpu_keep.len(), "{what}: number of keep sets");
    if cpu_keep.is_empty() {
        return 0;
    }
    assert_eq!(cpu_score.len() % cpu_keep.len(), 0, "{what}: scores are not [sets, N]");
    let n = cpu_score.len() / cpu_keep.len();
    let mut swaps = 0;
    let mut farthest = 0f64;
    for (set, ((want, have), row)) in cpu_keep.iter().zip(got).zip(cpu_score.chunks(n)).enumerate() {
        assert_eq!(have.len(), want.len(), "{what}: set {set}: kept count");
        assert!(have.windows(2).all(|w| w[0] < w[1]), "{what}: set {set}: slots not strictly ascending");
        assert!(have.iter().all(|&s| (s as usize) < n), "{what}: set {set}: slot out of range");
        if have == want {
            continue;
        }
        let only_cpu: Vec<u32> = want.iter().copied().filter(|s| have.binary_search(s).is_err()).collect();
        let only_got: Vec<u32> = have.iter().copied().filter(|s| want.binary_search(s).is_err()).collect();
        let boundary = want.iter().map(|&s| row[s as usize]).fold(f32::INFINITY, f32::min);
        let tol = tol_of_std * finite_std(row);
        let show = |slots: &[u32]| slots.iter().map(|&s| format!("{s} ({:e})", row[s as usize])).collect::<Vec<_>>();
        let detail = format!(
            "{what}: set {set}: CPU boundary {boundary:e}, tolerance {tol:.3e} ({tol_of_std:e} of the row std); \
             kept only by the CPU {:?}, only by the kernel {:?}",
            show(&only_cpu),
            show(&only_got)
        );
        for &s in only_cpu.iter().chain(&only_got) {
            let x = row[s as usize];
            let distance = (x as f64 - boundary as f64).abs();
            assert!(
                x.is_finite() && boundary.is_finite() && distance <= tol,
                "keep sets differ beyond the boundary: {detail}"
            );
            farthest = farthest.max(distance / finite_std(row).max(f64::MIN_POSITIVE));
        }
        println!("parity swap {detail}");
        swaps += only_cpu.len();
    }
    println!(
        "parity keep {what}: the CPU's keep sets with {swaps} swap(s) at the boundary (farthest {farthest:.2e} of the row std, allowed {tol_of_std:e})"
    );
    swaps
}

/// 256-byte aligned host memory, poisoned (0xff) like the raw device memory an engine hands in.
pub struct Aligned {
    pub ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    pub fn new(bytes: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 256).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `bytes` writable bytes.
        unsafe { ptr.write_bytes(0xff, layout.size()) };
        Self { ptr, layout }
    }
    pub fn of<T: Copy>(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        let a = Self::new(bytes);
        // SAFETY: both hold `bytes` bytes; distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), a.ptr, bytes) };
        a
    }
    pub fn addr(&self) -> *mut std::ffi::c_void {
        self.ptr.cast()
    }
    pub fn read<T: Copy>(&self, offset: usize, count: usize) -> Vec<T> {
        assert!(offset + count * std::mem::size_of::<T>() <= self.layout.size());
        // SAFETY: in bounds (checked), aligned for T at these offsets, initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset).cast::<T>(), count).to_vec() }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Median milliseconds per call of `f` on `stream`: CUDA-event time of 5 batches of 10 calls after
/// 3 warm-up calls (the benches' timing).
#[cfg(feature = "cuda")]
pub fn gpu_time_ms(stream: &std::sync::Arc<cudarc::driver::CudaStream>, mut f: impl FnMut()) -> f64 {
    const BATCHES: usize = 5;
    const PER_BATCH: usize = 10;
    for _ in 0..3 {
        f();
    }
    stream.synchronize().unwrap();
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let start = stream.record_event(timing).unwrap();
            for _ in 0..PER_BATCH {
                f();
            }
            let end = stream.record_event(timing).unwrap();
            end.synchronize().unwrap();
            start.elapsed_ms(&end).unwrap() as f64 / PER_BATCH as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[BATCHES / 2]
}
