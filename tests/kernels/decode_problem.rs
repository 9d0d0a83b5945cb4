//! A decode problem on host buffers and its f64 reference (the formula in `src/decode.rs`),
//! shared by the emu and GPU decode tests.

#![cfg(any(feature = "emu", feature = "cuda"))]
#![allow(dead_code)]

use half::bf16;
use triattn::cuda::{
    CacheLayout, DecodeInputs, DecodePlan, DecodeShape, HostDecode, ListLengths, RowStrides, SplitPolicy,
};
use triattn::decode::{DecodeOptions, ListLayout};
use triattn::tuning::Dispatch;
use triattn::{Backend, DType, Element};

use crate::common::Rng;

/// A decode problem on host buffers, contiguous `[Hkv, N, D]` per (sequence, layer).
#[derive(Clone)]
pub struct Problem<T> {
    pub s: usize,
    pub l: usize,
    pub h: usize,
    pub hkv: usize,
    pub d: usize,
    pub dv: usize,
    pub t: usize,
    pub n: usize,
    pub k: Vec<Vec<T>>,
    pub v: Vec<Vec<T>>,
    pub q: Vec<f32>,
    pub sinks: Option<Vec<f32>>,
    pub layout: ListLayout,
    /// Per sequence, per list: the visible slots.
    pub lists: Vec<Vec<Vec<i32>>>,
    pub options: DecodeOptions,
    /// The tables the plan picks its decode variant from (built-in unless a test forces one).
    pub dispatch: Dispatch,
}

impl<T: Element> Problem<T> {
    #[allow(clippy::too_many_arguments)]
    pub fn random(
        seed: u64,
        s: usize,
        l: usize,
        h: usize,
        hkv: usize,
        d: usize,
        dv: usize,
        t: usize,
        n: usize,
    ) -> Self {
        let mut rng = Rng(seed);
        let k = (0..s * l).map(|_| (0..hkv * n * d).map(|_| T::from_f32(rng.unit() * 2.0)).collect()).collect();
        let v = (0..s * l).map(|_| (0..hkv * n * dv).map(|_| T::from_f32(rng.unit() * 3.0)).collect()).collect();
        let q = (0..s * l * h * t * d).map(|_| rng.unit() * 2.0).collect();
        Self {
            s,
            l,
            h,
            hkv,
            d,
            dv,
            t,
            n,
            k,
            v,
            q,
            sinks: None,
            layout: ListLayout::Dense,
            lists: Vec::new(),
            options: DecodeOptions::default(),
            dispatch: Dispatch::built_in(),
        }
    }

    /// Random ascending lists of `layout`, lengths drawn in `0..=max` (some forced empty or full).
    pub fn with_lists(mut self, layout: ListLayout, max: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let count = layout.num_lists(self.l, self.hkv);
        self.layout = layout;
        self.lists = (0..self.s)
            .map(|_| {
                (0..count)
                    .map(|i| {
                        let len = match i % 5 {
                            0 => max,
                            3 if count > 3 => 0,
                            _ => rng.below(max + 1),
                        };
                        common_keep(&mut rng, self.n, len.min(self.n))
                    })
                    .collect()
            })
            .collect();
        self
    }

    /// The same problem decoded by the variant `dispatch` picks.
    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    pub fn with_sinks(mut self, seed: u64) -> Self {
        let mut rng = Rng(seed);
        self.sinks = Some((0..self.l * self.h).map(|_| rng.unit() * 4.0).collect());
        self
    }

    pub fn capacity(&self) -> usize {
        self.lists.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1)
    }

    pub fn shape(&self, splits: SplitPolicy, layout: CacheLayout) -> DecodeShape {
        DecodeShape {
            dtype: T::DTYPE,
            query_dtype: DType::F32,
            num_seqs: self.s,
            num_layers: self.l,
            num_heads: self.h,
            num_kv_heads: self.hkv,
            head_dim: self.d,
            value_dim: self.dv,
            num_queries: self.t,
            len: self.n,
            layout,
            lists: self.layout,
            list_capacity: self.capacity(),
            list_lengths: ListLengths::PerList,
            sinks: self.sinks.is_some(),
            options: self.options,
            splits,
        }
    }

    pub fn contiguous(&self) -> CacheLayout {
        CacheLayout::Contiguous {
            keys: RowStrides { head_stride: self.n * self.d, row_stride: self.d },
            values: RowStrides { head_stride: self.n * self.dv, row_stride: self.dv },
        }
    }

    /// Flat lists `[S, lists, capacity]` (padding -7, never read) and lengths `[S, lists]`.
    pub fn flat_lists(&self) -> (Vec<i32>, Vec<i32>) {
        let cap = self.capacity();
        let mut flat = Vec::new();
        let mut lens = Vec::new();
        for list in self.lists.iter().flatten() {
            flat.extend(list.iter().copied().chain(std::iter::repeat_n(-7, cap - list.len())));
            lens.push(list.len() as i32);
        }
        (flat, lens)
    }

    /// Decode layers `first..first + layers` on `backend` over contiguous tensors.
    pub fn run(&self, backend: &Backend, splits: SplitPolicy, first: usize, layers: usize) -> HostDecode {
        let plan = DecodePlan::tuned(self.shape(splits, self.contiguous()), &self.dispatch).unwrap();
        let (flat, lens) = self.flat_lists();
        let k: Vec<&[T]> = self.k.iter().map(Vec::as_slice).collect();
        let v: Vec<&[T]> = self.v.iter().map(Vec::as_slice).collect();
        let q = self.queries(first, layers);
        let seq_lens = vec![self.n as i32; self.s];
        let dense = self.layout == ListLayout::Dense;
        let inputs = DecodeInputs {
            keys: &k,
            values: &v,
            queries: &q,
            sinks: self.sinks.as_deref(),
            lists: (!dense).then_some(&flat[..]),
            list_lens: (!dense).then_some(&lens[..]),
            seq_lens: dense.then_some(&seq_lens[..]),
            block_table: None,
        };
        backend.decode(&plan, &inputs, first, layers).unwrap()
    }

    /// The queries of layers `first..first + layers`, `[S, layers, H, T, D]`.
    pub fn queries(&self, first: usize, layers: usize) -> Vec<f32> {
        let per_layer = self.h * self.t * self.d;
        (0..self.s)
            .flat_map(|s| {
                let base = (s * self.l + first) * per_layer;
                self.q[base..base + layers * per_layer].iter().copied()
            })
            .collect()
    }

    /// The formula in f64: `(o [S, layers, H, T, Dv], lse [S, layers, H, T])`.
    pub fn reference(&self, first: usize, layers: usize) -> (Vec<f64>, Vec<f64>) {
        let (g_size, scale) = (self.h / self.hkv, self.options.scale_for(self.d) as f64);
        let mut o = Vec::new();
        let mut lse = Vec::new();
        for s in 0..self.s {
            for l in first..first + layers {
                let (k, v) = (&self.k[s * self.l + l], &self.v[s * self.l + l]);
                for h in 0..self.h {
                    let g = h / g_size;
                    let slots: Vec<usize> = match self.layout.list_index(l, g, self.hkv) {
                        None => (0..self.n).collect(),
                        Some(i) => self.lists[s][i].iter().map(|&x| x as usize).collect(),
                    };
                    for t in 0..self.t {
                        let qrow = &self.q[(((s * self.l + l) * self.h + h) * self.t + t) * self.d..][..self.d];
                        let logits: Vec<f64> = slots
                            .iter()
                            .map(|&j| {
                                let dot: f64 = (0..self.d)
                                    .map(|i| qrow[i] as f64 * k[(g * self.n + j) * self.d + i].to_f32() as f64)
                                    .sum();
                                let x = dot * scale;
                                match self.options.softcap {
                                    Some(c) => c as f64 * (x / c as f64).tanh(),
                                    None => x,
                                }
                            })
                            .collect();
                        let sink = self.sinks.as_ref().map(|sk| sk[l * self.h + h] as f64);
                        let m = logits.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
                        let den = weights.iter().sum::<f64>() + sink.map_or(0.0, |x| (x - m).exp());
                        for e in 0..self.dv {
                            let acc: f64 = slots
                                .iter()
                                .zip(&weights)
                                .map(|(&j, w)| w * v[(g * self.n + j) * self.dv + e].to_f32() as f64)
                                .sum();
                            o.push(if den > 0.0 { acc / den } else { 0.0 });
                        }
                        lse.push(if den > 0.0 { m + den.ln() } else { f64::NEG_INFINITY });
                    }
                }
            }
        }
        (o, lse)
    }

    /// Largest `|o - reference| / max|v|` and `|lse - reference| / (1 + |reference|)`.
    pub fn errors(&self, got: &HostDecode, first: usize, layers: usize) -> (f64, f64) {
        let (o, lse) = self.reference(first, layers);
        let vmax = self.v.iter().flatten().map(|x| x.to_f32().abs() as f64).fold(1e-30, f64::max);
        assert_eq!((got.out.len(), got.lse.len()), (o.len(), lse.len()));
        let o_err = got.out.iter().zip(&o).map(|(&a, &b)| (a as f64 - b).abs() / vmax).fold(0.0, f64::max);
        let mut lse_err = 0f64;
        for (i, (&a, &b)) in got.lse.iter().zip(&lse).enumerate() {
            if b == f64::NEG_INFINITY {
                assert_eq!(a, f32::NEG_INFINITY, "lse {i}: an empty list gives -inf");
            } else {
                lse_err = lse_err.max((a as f64 - b).abs() / (1.0 + b.abs()));
            }
        }
        (o_err, lse_err)
    }
}

/// `len` distinct ascending slots of `0..n`.
pub fn common_keep(rng: &mut Rng, n: usize, len: usize) -> Vec<i32> {
    crate::common::random_keep_set(rng, n, len)
}

/// o within this much of max |v| of the f64 reference (f32 accumulation).
pub const O_TOL: f64 = 2e-5;
/// lse within this much of `1 + |lse|`.
pub const LSE_TOL: f64 = 2e-5;

/// Decode `p` on `backend` and check it against the formula.
pub fn check<T: Element>(what: &str, backend: &Backend, p: &Problem<T>, splits: SplitPolicy) -> HostDecode {
    let got = p.run(backend, splits, 0, p.l);
    let (o_err, lse_err) = p.errors(&got, 0, p.l);
    assert!(o_err <= O_TOL && lse_err <= LSE_TOL, "{what}: o error {o_err:.2e}, lse error {lse_err:.2e}");
    got
}

/// A bf16 problem of Qwen3-like heads.
pub fn qwen_like(seed: u64) -> Problem<bf16> {
    Problem::<bf16>::random(seed, 2, 2, 32, 8, 128, 128, 1, 700).with_lists(ListLayout::PerKvHead, 600, seed)
}
