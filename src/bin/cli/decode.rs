//! `triattn decode`: sparse decode attention over a dumped cache (the contract in
//! `shared/data/decode/README.md`): `q.{l}` `[H, T, D]` against `k.{l}` `[Hkv, N, D]` and
//! `v.{l}` `[Hkv, N, Dv]` through the `keep` lists (or every slot), with optional sinks; writes
//! `o.{l}` F32 `[H, T, Dv]` and `lse.{l}` F32 `[H, T]`.

use std::collections::BTreeMap;
use std::time::Instant;

use triattn::cpu::decode::{LayerDecode, SlotLists};
use triattn::decode::DecodeOptions;
use triattn::io::{FileDType, Tensor, TensorFile};
use triattn::round::Backend;
use triattn::tuning::Dispatch;
use triattn::{DType, Element, Error, LayerView, Result};

use super::round_backend;
use crate::DecodeArgs;

/// A positive finite number given to `flag`, or `None`.
fn positive(flag: &str, value: &Option<String>) -> Result<Option<f32>> {
    let Some(text) = value else { return Ok(None) };
    match text.trim().parse::<f32>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
        _ => Err(Error::invalid_argument(flag, "a positive finite number", text)),
    }
}

/// The float dtype of tensor `name` in `file`.
fn float_dtype(file: &TensorFile, name: &str) -> Result<DType> {
    let t = file.get(name)?;
    match t.dtype {
        FileDType::Float(d) => Ok(d),
        other => Err(Error::shape(format!("{}: tensor {name} dtype", file_name(file)), "F32, F16 or BF16", other)),
    }
}

fn file_name(file: &TensorFile) -> String {
    file.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// What a decode reads, checked against each other.
struct Inputs<'f> {
    layers: usize,
    heads: usize,
    queries_per_head: usize,
    kv_heads: usize,
    slots: usize,
    head_dim: usize,
    value_dim: usize,
    q_dtype: DType,
    kv_dtype: DType,
    q: Vec<&'f Tensor>,
    k: Vec<&'f Tensor>,
    v: Vec<&'f Tensor>,
}

fn read_inputs<'f>(qf: &'f TensorFile, kvf: &'f TensorFile) -> Result<Inputs<'f>> {
    let (qn, kvn) = (file_name(qf), file_name(kvf));
    let layers = (0..).take_while(|l| qf.tensors.contains_key(&format!("q.{l}"))).count();
    if layers == 0 {
        return Err(Error::format(format!("{qn}: tensor q.0 missing (expected q.{{l}} [H, T, D] per layer)")));
    }
    let q_dtype = float_dtype(qf, "q.0")?;
    let kv_dtype = float_dtype(kvf, "k.0")?;
    let q0 = qf.get("q.0")?;
    let k0 = kvf.get("k.0")?;
    let v0 = kvf.get("v.0")?;
    let three = |file: &str, name: &str, t: &Tensor, want: &str| -> Result<()> {
        if t.shape.len() != 3 {
            return Err(Error::shape(format!("{file}: tensor {name} shape"), want, triattn::io::shape_str(&t.shape)));
        }
        Ok(())
    };
    three(&qn, "q.0", q0, "[H, T, D]")?;
    three(&kvn, "k.0", k0, "[Hkv, N, D]")?;
    three(&kvn, "v.0", v0, "[Hkv, N, Dv]")?;
    let (h, t, d) = (q0.shape[0], q0.shape[1], q0.shape[2]);
    let (hkv, n, kd) = (k0.shape[0], k0.shape[1], k0.shape[2]);
    let dv = v0.shape[2];
    if kd != d {
        return Err(Error::shape(format!("{kvn}: tensor k.0 head_dim"), format!("{d} (the head_dim of q.0)"), kd));
    }
    if hkv == 0 || h % hkv != 0 || h == 0 {
        return Err(Error::shape(
            format!("{qn}: tensor q.0 heads"),
            format!("a multiple of the {hkv} KV heads of k.0"),
            h,
        ));
    }
    if t == 0 || n == 0 {
        return Err(Error::shape(format!("{qn}/{kvn}: queries and slots"), ">= 1 each", format!("T {t}, N {n}")));
    }
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for l in 0..layers {
        for name in [format!("k.{l}"), format!("v.{l}")] {
            if !kvf.tensors.contains_key(&name) {
                return Err(Error::format(format!(
                    "{kvn}: tensor {name}: expected one per layer of {qn} ({layers} layers), got none"
                )));
            }
        }
        q.push(qf.get_checked(&format!("q.{l}"), &[FileDType::Float(q_dtype)], &[h, t, d])?);
        k.push(kvf.get_checked(&format!("k.{l}"), &[FileDType::Float(kv_dtype)], &[hkv, n, d])?);
        v.push(kvf.get_checked(&format!("v.{l}"), &[FileDType::Float(kv_dtype)], &[hkv, n, dv])?);
    }
    if kvf.tensors.contains_key(&format!("k.{layers}")) {
        return Err(Error::shape(
            format!("{kvn}: layers"),
            format!("{layers} (the layers of {qn})"),
            format!("a tensor k.{layers} beyond them"),
        ));
    }
    Ok(Inputs {
        layers,
        heads: h,
        queries_per_head: t,
        kv_heads: hkv,
        slots: n,
        head_dim: d,
        value_dim: dv,
        q_dtype,
        kv_dtype,
        q,
        k,
        v,
    })
}

fn read_lists(a: &DecodeArgs, x: &Inputs) -> Result<SlotLists> {
    let Some(path) = &a.keep else { return Ok(SlotLists::dense()) };
    let file = TensorFile::read(path)?;
    let t = file.get("keep")?;
    if !matches!(t.dtype, FileDType::I32 | FileDType::I64) {
        return Err(Error::shape(format!("{}: tensor keep dtype", file_name(&file)), "I32 or I64", t.dtype));
    }
    SlotLists::from_keep(
        &format!("{}: tensor keep", file_name(&file)),
        &t.shape,
        &t.to_i64_vec(),
        x.layers,
        x.kv_heads,
        x.slots,
    )
}

fn read_sinks(a: &DecodeArgs, x: &Inputs) -> Result<Option<Vec<Vec<f32>>>> {
    let Some(path) = &a.sinks else { return Ok(None) };
    let file = TensorFile::read(path)?;
    (0..x.layers)
        .map(|l| Ok(file.get_checked(&format!("sinks.{l}"), &[FileDType::Float(DType::F32)], &[x.heads])?.to_f32_vec()))
        .collect::<Result<_>>()
        .map(Some)
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    let options = DecodeOptions { scale: positive("--scale", &a.scale)?, softcap: positive("--softcap", &a.softcap)? };
    let backend = round_backend(a.backend)?;
    let dispatch = super::dispatch_for(&backend, a.tuning.as_deref())?;
    let qf = TensorFile::read(&a.q)?;
    let kvf = TensorFile::read(&a.kv)?;
    let x = read_inputs(&qf, &kvf)?;
    let lists = read_lists(&a, &x)?;
    let sinks = read_sinks(&a, &x)?;
    let t0 = Instant::now();
    let (outputs, kernels) = match x.q_dtype {
        DType::F32 => by_cache::<f32>(&x, &lists, sinks.as_deref(), &options, &backend, &dispatch)?,
        DType::F16 => by_cache::<half::f16>(&x, &lists, sinks.as_deref(), &options, &backend, &dispatch)?,
        DType::Bf16 => by_cache::<half::bf16>(&x, &lists, sinks.as_deref(), &options, &backend, &dispatch)?,
    };
    let elapsed = t0.elapsed();
    if a.verbose {
        let rows = x.layers * x.heads * x.queries_per_head;
        match kernels {
            None => eprintln!(
                "decode: cpu {:.3} ms, {} layers, {} query rows, lists {}",
                elapsed.as_secs_f64() * 1e3,
                x.layers,
                rows,
                lists.layout().name()
            ),
            Some(launches) => {
                for (stage, symbol, time) in launches {
                    eprintln!("{stage}: {} {symbol} {:.3} ms", backend.name(), time.as_secs_f64() * 1e3);
                }
            }
        }
    }
    let mut tensors = BTreeMap::new();
    for (l, out) in outputs.into_iter().enumerate() {
        let (h, t, dv) = (x.heads, x.queries_per_head, x.value_dim);
        tensors.insert(format!("o.{l}"), Tensor::from_f32(vec![h, t, dv], &out.o));
        tensors.insert(format!("lse.{l}"), Tensor::from_f32(vec![h, t], &out.lse));
    }
    TensorFile { path: a.out.clone(), tensors, metadata: BTreeMap::new() }.write(&a.out)
}

/// The launches of a kernel decode, for `--verbose`: stage, kernel symbol, time.
type Launches = Vec<(&'static str, String, std::time::Duration)>;

fn by_cache<Q: Element>(
    x: &Inputs,
    lists: &SlotLists,
    sinks: Option<&[Vec<f32>]>,
    options: &DecodeOptions,
    backend: &Backend,
    dispatch: &Dispatch,
) -> Result<(Vec<LayerDecode>, Option<Launches>)> {
    match x.kv_dtype {
        DType::F32 => typed::<Q, f32>(x, lists, sinks, options, backend, dispatch),
        DType::F16 => typed::<Q, half::f16>(x, lists, sinks, options, backend, dispatch),
        DType::Bf16 => typed::<Q, half::bf16>(x, lists, sinks, options, backend, dispatch),
    }
}

fn typed<Q: Element, T: Element>(
    x: &Inputs,
    lists: &SlotLists,
    sinks: Option<&[Vec<f32>]>,
    options: &DecodeOptions,
    backend: &Backend,
    dispatch: &Dispatch,
) -> Result<(Vec<LayerDecode>, Option<Launches>)> {
    let q: Vec<Vec<Q>> = x.q.iter().map(|t| Q::decode_le(&t.data)).collect();
    let k: Vec<Vec<T>> = x.k.iter().map(|t| T::decode_le(&t.data)).collect();
    let v: Vec<Vec<T>> = x.v.iter().map(|t| T::decode_le(&t.data)).collect();
    if backend.is_cpu() {
        let kv = layer_views("k", &k, x.kv_heads, x.slots, x.head_dim)?;
        let vv = layer_views("v", &v, x.kv_heads, x.slots, x.value_dim)?;
        let qs: Vec<&[Q]> = q.iter().map(Vec::as_slice).collect();
        let ss: Option<Vec<&[f32]>> = sinks.map(|s| s.iter().map(Vec::as_slice).collect());
        let out = triattn::cpu::decode::decode(&qs, x.queries_per_head, &kv, &vv, lists, ss.as_deref(), options)?;
        return Ok((out, None));
    }
    kernel_decode::<Q, T>(x, lists, sinks, options, backend, dispatch, &q, &k, &v)
}

/// `[Hkv, N, dim]` views of every layer's tensor.
fn layer_views<'a, T: Element>(
    what: &str,
    tensors: &'a [Vec<T>],
    kv_heads: usize,
    slots: usize,
    dim: usize,
) -> Result<Vec<LayerView<'a, T>>> {
    tensors
        .iter()
        .enumerate()
        .map(|(l, d)| LayerView::contiguous(&format!("{what}.{l}"), d, kv_heads, slots, dim))
        .collect()
}

/// The decode on a kernel backend: one plan for every layer, the lists flattened.
#[allow(clippy::too_many_arguments)]
fn kernel_decode<Q: Element, T: Element>(
    x: &Inputs,
    lists: &SlotLists,
    sinks: Option<&[Vec<f32>]>,
    options: &DecodeOptions,
    backend: &Backend,
    dispatch: &Dispatch,
    q: &[Vec<Q>],
    k: &[Vec<T>],
    v: &[Vec<T>],
) -> Result<(Vec<LayerDecode>, Option<Launches>)> {
    #[cfg(not(any(feature = "emu", feature = "cuda")))]
    {
        let _ = (x, lists, sinks, options, dispatch, q, k, v);
        Err(Error::invalid_argument("--backend", "cpu (this build has no kernel backend)", backend.name()))
    }
    #[cfg(any(feature = "emu", feature = "cuda"))]
    kernel_decode_on(x, lists, sinks, options, backend, dispatch, q, k, v)
}

#[cfg(any(feature = "emu", feature = "cuda"))]
#[allow(clippy::too_many_arguments)]
fn kernel_decode_on<Q: Element, T: Element>(
    x: &Inputs,
    lists: &SlotLists,
    sinks: Option<&[Vec<f32>]>,
    options: &DecodeOptions,
    backend: &Backend,
    dispatch: &Dispatch,
    q: &[Vec<Q>],
    k: &[Vec<T>],
    v: &[Vec<T>],
) -> Result<(Vec<LayerDecode>, Option<Launches>)> {
    use triattn::cuda::{
        CacheLayout, DecodeInputs, DecodePlan, DecodeShape, ListLengths, RowStrides, SplitPolicy, Stage,
    };
    use triattn::decode::ListLayout;
    let (flat, lens, capacity) = lists.flat();
    let dense = lists.layout() == ListLayout::Dense;
    let strides = |dim: usize| RowStrides { head_stride: x.slots * dim, row_stride: dim };
    let sm_count = match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => dev.backend().sm_count(),
        _ => 16,
    };
    let plan = DecodePlan::tuned(
        DecodeShape {
            dtype: T::DTYPE,
            query_dtype: Q::DTYPE,
            num_seqs: 1,
            num_layers: x.layers,
            num_heads: x.heads,
            num_kv_heads: x.kv_heads,
            head_dim: x.head_dim,
            value_dim: x.value_dim,
            num_queries: x.queries_per_head,
            len: x.slots,
            layout: CacheLayout::Contiguous { keys: strides(x.head_dim), values: strides(x.value_dim) },
            lists: lists.layout(),
            list_capacity: capacity,
            list_lengths: ListLengths::PerList,
            sinks: sinks.is_some(),
            options: *options,
            splits: SplitPolicy::Auto { sm_count },
        },
        dispatch,
    )?;
    let queries: Vec<Q> = q.iter().flatten().copied().collect();
    let sink_flat: Option<Vec<f32>> = sinks.map(|s| s.iter().flatten().copied().collect());
    let keys: Vec<&[T]> = k.iter().map(Vec::as_slice).collect();
    let values: Vec<&[T]> = v.iter().map(Vec::as_slice).collect();
    let seq_lens = [x.slots as i32];
    let inputs = DecodeInputs {
        keys: &keys,
        values: &values,
        queries: &queries,
        sinks: sink_flat.as_deref(),
        lists: (!dense).then_some(&flat[..]),
        list_lens: (!dense).then_some(&lens[..]),
        seq_lens: dense.then_some(&seq_lens[..]),
        block_table: None,
    };
    let got = backend.decode(&plan, &inputs, 0, x.layers)?;
    let per_layer = x.heads * x.queries_per_head;
    let outputs = (0..x.layers)
        .map(|l| LayerDecode {
            o: got.out[l * per_layer * x.value_dim..(l + 1) * per_layer * x.value_dim].to_vec(),
            lse: got.lse[l * per_layer..(l + 1) * per_layer].to_vec(),
        })
        .collect();
    let spec = plan.spec();
    let source = dispatch.describe(plan.variant_source());
    let mut launches =
        vec![("decode", format!("{} ({source})", spec.variant().symbol()), got.timings.get(Stage::Decode))];
    if let Some(v) = spec.combine_variant() {
        launches.push(("combine", format!("{} (built-in)", v.symbol()), got.timings.get(Stage::Combine)));
    }
    Ok((outputs, Some(launches)))
}
