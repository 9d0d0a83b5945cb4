//! The device-pointer round of the C ABI (`triattn_context_create_cuda`, `triattn_plan_*`),
//! called from Rust through the `extern "C"` functions.
//!
//! Every build: CUDA contexts refuse cleanly without the `cuda` feature or a GPU. With `emu` or
//! `cuda` (the plan API is available): plans and their workspace layout match [`RoundPlan`], bad
//! shapes are refused naming the field, and binding or running without a GPU returns a status,
//! never a panic. With `cuda` and a GPU: a round through the C ABI on device buffers keeps the
//! same slots as the CPU backend (skips loudly without a GPU; fails when
//! `TRIATTN_REQUIRE_GPU=1`).

mod common;

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::ptr;

use triattn::ffi::*;

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 1024];
    // SAFETY: `buf` has `buf.len()` writable bytes.
    unsafe { triattn_last_error(buf.as_mut_ptr(), buf.len()) };
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8(bytes).unwrap()
}

/// The shipped `data/` folder: next to the crate, else under the current directory (a test
/// binary carried to another machine and run from the repository root).
fn data_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    if root.join("qwen3_8b.config.json").exists() {
        root
    } else {
        std::env::current_dir().unwrap().join("data")
    }
}

fn data(rel: &str) -> CString {
    CString::new(data_dir().join(rel).to_str().unwrap()).unwrap()
}

const N: usize = 320;
const BUDGET: usize = 256;
const PROMPT: usize = 16;

fn cpu_context() -> *mut triattn_context {
    let mut ctx = ptr::null_mut();
    // SAFETY: `ctx` is writable.
    assert_eq!(unsafe { triattn_context_create(triattn_backend::Cpu as u32, &mut ctx) }, triattn_status::Ok);
    ctx
}

/// A compressor over the shipped Qwen3-8B config and statistics (paper preset, budget 256).
fn compressor(ctx: *const triattn_context) -> *mut triattn_compressor {
    let mut cfg = std::mem::MaybeUninit::<triattn_config>::uninit();
    // SAFETY: writable config.
    assert_eq!(unsafe { triattn_config_default(0, cfg.as_mut_ptr()) }, triattn_status::Ok);
    // SAFETY: initialised by the call above.
    let mut cfg = unsafe { cfg.assume_init() };
    cfg.budget = BUDGET;
    cfg.divide_length = 64;
    let (model, stats) = (data("qwen3_8b.config.json"), data("qwen3_8b.safetensors"));
    let mut c = ptr::null_mut();
    // SAFETY: live context, NUL-terminated paths, readable config, writable handle.
    let s = unsafe { triattn_compressor_create(ctx, model.as_ptr(), stats.as_ptr(), &cfg, &mut c) };
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    c
}

/// `[Hkv, N, D]` bf16 keys and values, compacted in place order-preserving.
fn shape(d: usize) -> triattn_round_shape {
    triattn_round_shape {
        dtype: triattn_dtype::Bf16 as u32,
        len: N,
        prefix_len: PROMPT,
        value_dim: d,
        key_head_stride: N * d,
        key_row_stride: d,
        value_head_stride: N * d,
        value_row_stride: d,
        compaction: triattn_compaction::InPlaceOrderPreserving as u32,
        ..Default::default()
    }
}

fn plan_create(c: *const triattn_compressor, s: &triattn_round_shape) -> (triattn_status, *mut triattn_plan) {
    let mut p = ptr::null_mut();
    // SAFETY: live compressor, readable shape, writable handle.
    let status = unsafe { triattn_plan_create(c, s, &mut p) };
    (status, p)
}

#[test]
fn cuda_context_refuses_cleanly_or_opens() {
    let mut ctx = ptr::null_mut();
    // SAFETY: writable handle.
    let s = unsafe { triattn_context_create(triattn_backend::Cuda as u32, &mut ctx) };
    let msg = last_error();
    if cfg!(feature = "cuda") {
        assert!(s == triattn_status::Ok || s == triattn_status::NoDevice, "status {s:?}: {msg}");
        if s == triattn_status::NoDevice {
            eprintln!("no GPU here: {msg}");
            assert!(!msg.is_empty() && ctx.is_null());
        }
    } else {
        assert_eq!(s, triattn_status::Unsupported, "{msg}");
        assert!(msg.contains("without the cuda feature"), "{msg}");
        assert!(ctx.is_null());
    }
    // SAFETY: null or a live handle.
    unsafe { triattn_context_destroy(ctx) };
    let mut ctx = ptr::null_mut();
    // SAFETY: writable handle.
    let s = unsafe { triattn_context_create_cuda(4000, &mut ctx) };
    let msg = last_error();
    let want = if cfg!(feature = "cuda") { triattn_status::NoDevice } else { triattn_status::Unsupported };
    assert_eq!(s, want, "device 4000: {msg}");
    assert!(ctx.is_null());
}

/// Planning is host-only: it works in every build.
mod plans {
    use super::*;
    use triattn::cuda::{CacheLayout, Compaction, RoundPlan, RoundShape, RowStrides};
    use triattn::round::Scorer;
    use triattn::variant::CompactMode;
    use triattn::{CompressionConfig, ModelConfig, Preset, Stats};

    fn rust_plan(shape: RoundShape) -> RoundPlan {
        let root = data_dir();
        let model = ModelConfig::from_file(root.join("qwen3_8b.config.json")).unwrap();
        let stats = Stats::load(root.join("qwen3_8b.safetensors")).unwrap();
        let scorer = Scorer::new(model, stats, None).unwrap();
        let config =
            CompressionConfig { budget: BUDGET, divide_length: 64, ..CompressionConfig::preset(Preset::Paper) };
        RoundPlan::new(&scorer, &config, shape).unwrap()
    }

    fn info(p: *const triattn_plan) -> triattn_plan_info {
        let mut out = std::mem::MaybeUninit::uninit();
        // SAFETY: live plan, writable output.
        assert_eq!(unsafe { triattn_plan_get_info(p, out.as_mut_ptr()) }, triattn_status::Ok, "{}", last_error());
        // SAFETY: written on success.
        unsafe { out.assume_init() }
    }

    #[test]
    fn plan_info_matches_round_plan() {
        let ctx = cpu_context();
        let c = compressor(ctx);
        let d = 128;
        let st = RowStrides { head_stride: N * d, row_stride: d };
        let cases = [
            (shape(d), Compaction::InPlace(CompactMode::OrderPreserving), N),
            (
                triattn_round_shape { compaction: triattn_compaction::KeepSetsOnly as u32, ..shape(d) },
                Compaction::KeepSetsOnly,
                N,
            ),
            (
                triattn_round_shape { compaction: triattn_compaction::InPlaceHoleFilling as u32, ..shape(d) },
                Compaction::InPlace(CompactMode::HoleFilling),
                N,
            ),
            (
                triattn_round_shape {
                    compaction: triattn_compaction::OutOfPlace as u32,
                    dst_key_head_stride: BUDGET * d,
                    dst_key_row_stride: d,
                    dst_value_head_stride: BUDGET * d,
                    dst_value_row_stride: d,
                    ..shape(d)
                },
                Compaction::OutOfPlace {
                    keys: RowStrides { head_stride: BUDGET * d, row_stride: d },
                    values: RowStrides { head_stride: BUDGET * d, row_stride: d },
                },
                N,
            ),
            // Within budget: every slot kept, nothing compacted in place.
            (
                triattn_round_shape { len: 200, key_head_stride: 200 * d, value_head_stride: 200 * d, ..shape(d) },
                Compaction::InPlace(CompactMode::OrderPreserving),
                200,
            ),
        ];
        for (i, (c_shape, compaction, len)) in cases.into_iter().enumerate() {
            let (s, p) = plan_create(c, &c_shape);
            assert_eq!(s, triattn_status::Ok, "case {i}: {}", last_error());
            let got = info(p);
            let strides = RowStrides { head_stride: len * d, ..st };
            let want = rust_plan(RoundShape {
                dtype: triattn::DType::Bf16,
                len,
                prefix_len: PROMPT,
                value_dim: d,
                layout: CacheLayout::Contiguous { keys: strides, values: strides },
                compaction,
                positions: None,
            });
            let w = want.layout();
            assert_eq!(got.workspace_bytes, want.workspace_bytes(), "case {i}");
            assert_eq!(got.workspace_alignment, 256, "case {i}");
            assert_eq!(got.constants_bytes, w.constants_bytes, "case {i}");
            assert_eq!((got.sets, got.kept), (want.sets(), want.kept()), "case {i}");
            assert_eq!((got.keep_offset, got.keep_bytes), (w.keep.offset, w.keep.bytes), "case {i}");
            assert_eq!((got.score_offset, got.score_bytes), (w.score.offset, w.score.bytes), "case {i}");
            assert_eq!((got.raw_offset, got.raw_bytes), (w.raw.offset, w.raw.bytes), "case {i}");
            assert_eq!(got.slot_map_bytes, w.slot_map.bytes, "case {i}");
            if w.slot_map.bytes > 0 {
                assert_eq!(got.slot_map_offset, w.slot_map.offset, "case {i}");
            }
            assert_eq!(got.keep_bytes, got.sets * got.kept * 4, "case {i}");
            assert_eq!(got.score_bytes, got.sets * len * 4, "case {i}");
            assert_eq!(got.raw_bytes, 36 * 32 * len * 4, "case {i}: raw is [L, H, N] f32");
            assert!(got.keep_offset % 256 == 0 && got.keep_offset + got.keep_bytes <= got.workspace_bytes);
            if len > BUDGET {
                assert_eq!(got.outcome, triattn_outcome::Compressed, "case {i}");
                assert_eq!((got.sets, got.kept), (8, BUDGET), "case {i}: per-head sets of Qwen3-8B");
            } else {
                assert_eq!(got.outcome, triattn_outcome::WithinBudget, "case {i}");
                assert_eq!(got.slot_map_bytes, 0, "case {i}: nothing compacted in place");
            }
            // SAFETY: live plan, destroyed once.
            unsafe { triattn_plan_destroy(p) };
        }
        // SAFETY: live handles, destroyed once; null is ignored.
        unsafe {
            triattn_plan_destroy(ptr::null_mut());
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }

    /// A batch plan through the C ABI: its info says how many sequences, and sizes equal
    /// `RoundPlan::new_batch`'s; a batch member whose prompt reaches the budget is refused by name.
    #[test]
    fn batch_plans_through_the_c_abi() {
        let ctx = cpu_context();
        let c = compressor(ctx);
        let d = 128;
        let prefixes = [0usize, PROMPT, 40];
        let mut p = ptr::null_mut();
        // SAFETY: live compressor, readable shape and prefixes, writable handle.
        let s = unsafe { triattn_plan_create_batch(c, &shape(d), prefixes.as_ptr(), prefixes.len(), &mut p) };
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let got = info(p);
        assert_eq!(got.num_seqs, 3);
        let st = RowStrides { head_stride: N * d, row_stride: d };
        let want = {
            let root = data_dir();
            let scorer = Scorer::new(
                ModelConfig::from_file(root.join("qwen3_8b.config.json")).unwrap(),
                Stats::load(root.join("qwen3_8b.safetensors")).unwrap(),
                None,
            )
            .unwrap();
            let config =
                CompressionConfig { budget: BUDGET, divide_length: 64, ..CompressionConfig::preset(Preset::Paper) };
            let shape = RoundShape {
                dtype: triattn::DType::Bf16,
                len: N,
                prefix_len: 0,
                value_dim: d,
                layout: CacheLayout::Contiguous { keys: st, values: st },
                compaction: Compaction::InPlace(CompactMode::OrderPreserving),
                positions: None,
            };
            RoundPlan::new_batch(&scorer, &config, shape, &prefixes).unwrap()
        };
        assert_eq!(got.workspace_bytes, want.workspace_bytes());
        assert_eq!((got.keep_offset, got.keep_bytes), (want.layout().keep.offset, want.layout().keep.bytes));
        // SAFETY: live plan, destroyed once.
        unsafe { triattn_plan_destroy(p) };
        let big = [0usize, N];
        let mut p = ptr::null_mut();
        // SAFETY: as above.
        let s = unsafe { triattn_plan_create_batch(c, &shape(d), big.as_ptr(), big.len(), &mut p) };
        let msg = last_error();
        assert_eq!(s, triattn_status::InvalidArgument, "{msg}");
        assert!(msg.contains("sequence 1"), "{msg}");
        assert!(p.is_null());
        // SAFETY: live handles, destroyed once.
        unsafe {
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let ctx = cpu_context();
        let c = compressor(ctx);
        let d = 128;
        let cases: Vec<(&str, triattn_round_shape, triattn_status)> = vec![
            ("shape.dtype", triattn_round_shape { dtype: 9, ..shape(d) }, triattn_status::InvalidArgument),
            ("shape.compaction", triattn_round_shape { compaction: 4, ..shape(d) }, triattn_status::InvalidArgument),
            ("shape.len", triattn_round_shape { len: 0, ..shape(d) }, triattn_status::InvalidArgument),
            (
                "shape.prefix_len",
                triattn_round_shape { prefix_len: N + 1, ..shape(d) },
                triattn_status::InvalidArgument,
            ),
            (
                "shape.key_row_stride",
                triattn_round_shape { key_row_stride: 64, ..shape(d) },
                triattn_status::InvalidArgument,
            ),
            (
                "shape.key_head_stride",
                triattn_round_shape { key_head_stride: N * d + 3, ..shape(d) },
                triattn_status::InvalidArgument,
            ),
            ("shape.value_dim", triattn_round_shape { value_dim: 0, ..shape(d) }, triattn_status::InvalidArgument),
            (
                "shape.value_row_stride",
                triattn_round_shape { value_row_stride: 100, ..shape(d) },
                triattn_status::InvalidArgument,
            ),
            (
                "shape.dst_key_row_stride",
                triattn_round_shape { compaction: triattn_compaction::OutOfPlace as u32, ..shape(d) },
                triattn_status::InvalidArgument,
            ),
        ];
        for (field, s, status) in cases {
            let (got, p) = plan_create(c, &s);
            let msg = last_error();
            assert_eq!(got, status, "{field}: {msg}");
            assert!(msg.contains(field), "{field}: the message must name the field: {msg}");
            assert!(msg.contains("expected"), "{field}: the message must say what was expected: {msg}");
            assert!(p.is_null(), "{field}: no handle on failure");
        }
        // Null pointers.
        let (got, _) = plan_create(ptr::null(), &shape(d));
        assert_eq!(got, triattn_status::InvalidArgument);
        assert!(last_error().contains("compressor"));
        let mut p = ptr::null_mut();
        // SAFETY: a null shape is checked.
        assert_eq!(unsafe { triattn_plan_create(c, ptr::null(), &mut p) }, triattn_status::InvalidArgument);
        assert!(last_error().contains("shape"));
        // SAFETY: live handles, destroyed once.
        unsafe {
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }

    /// A plan of a CPU context (the only kind on a machine without a GPU) can be inspected but
    /// not bound or run: a status and a message, never a panic.
    #[test]
    fn bind_and_run_without_a_gpu_refuse_cleanly() {
        let ctx = cpu_context();
        let c = compressor(ctx);
        let (s, p) = plan_create(c, &shape(128));
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let fake = 0x1000usize as *mut std::ffi::c_void;
        let keys = [fake; 36];
        let cache = triattn_cache_pointers {
            keys: keys.as_ptr(),
            values: keys.as_ptr(),
            keys_out: ptr::null(),
            values_out: ptr::null(),
            block_table: ptr::null(),
            positions: ptr::null_mut(),
            positions_out: ptr::null_mut(),
        };
        let round_start = 0x2000usize as *const i64;
        // SAFETY: the calls refuse before touching any of the (fake) device addresses.
        let (bind, bind_msg) = (unsafe { triattn_plan_bind(p, &cache, fake, ptr::null_mut()) }, last_error());
        // SAFETY: as above.
        let (run, run_msg) = (unsafe { triattn_plan_run(p, fake, round_start, ptr::null_mut()) }, last_error());
        for (what, s, msg) in [("triattn_plan_bind", bind, bind_msg), ("triattn_plan_run", run, run_msg)] {
            assert!(msg.contains(what), "{what}: {msg}");
            if cfg!(feature = "cuda") {
                assert_eq!(s, triattn_status::NoDevice, "{what}: {msg}");
                assert!(msg.contains("TRIATTN_BACKEND_CUDA"), "{what}: {msg}");
            } else {
                assert_eq!(s, triattn_status::Unsupported, "{what}: {msg}");
                assert!(msg.contains("without the cuda feature"), "{what}: {msg}");
            }
        }
        // Null handles are refused before anything else.
        // SAFETY: null pointers are checked.
        assert_eq!(
            unsafe { triattn_plan_bind(ptr::null_mut(), &cache, fake, ptr::null_mut()) },
            triattn_status::InvalidArgument
        );
        // SAFETY: null pointers are checked.
        assert_eq!(
            unsafe { triattn_plan_run(ptr::null(), fake, round_start, ptr::null_mut()) },
            triattn_status::InvalidArgument
        );
        // SAFETY: null pointers are checked.
        assert_eq!(unsafe { triattn_plan_get_info(p, ptr::null_mut()) }, triattn_status::InvalidArgument);
        // SAFETY: live handles, destroyed once.
        unsafe {
            triattn_plan_destroy(p);
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }
}

/// A round through the C ABI on device buffers keeps the CPU backend's slots and compacts K in
/// place (order-preserving) to the kept rows.
#[cfg(feature = "cuda")]
#[test]
fn c_abi_device_round_matches_cpu() {
    use cudarc::driver::{CudaContext, DevicePtr};
    use half::bf16;
    use triattn::round::{run_cpu, Scorer};
    use triattn::{CompressionConfig, LayerView, ModelConfig, Preset, Stats};

    if common::gpu_or_skip("c_abi_device_round_matches_cpu").is_none() {
        return;
    }
    let mut ctx = ptr::null_mut();
    // SAFETY: writable handle.
    let s = unsafe { triattn_context_create_cuda(0, &mut ctx) };
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    let c = compressor(ctx);
    let (l, hkv, d) = (36, 8, 128);
    let (s, p) = plan_create(c, &shape(d));
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    let mut info = std::mem::MaybeUninit::uninit();
    // SAFETY: live plan, writable output.
    assert_eq!(unsafe { triattn_plan_get_info(p, info.as_mut_ptr()) }, triattn_status::Ok);
    // SAFETY: written on success.
    let info = unsafe { info.assume_init() };
    assert_eq!(info.outcome, triattn_outcome::Compressed);

    // The engine's side: device memory and a stream of the same (primary) context.
    let cuda = CudaContext::new(0).unwrap();
    let stream = cuda.new_stream().unwrap();
    let keys: Vec<Vec<bf16>> = (0..l).map(|i| common::random_keys(hkv * N * d, d, 300 + i as u64)).collect();
    let values: Vec<Vec<bf16>> = (0..l).map(|i| common::random_keys(hkv * N * d, d, 500 + i as u64)).collect();
    let k_dev: Vec<_> = keys.iter().map(|k| stream.clone_htod(k).unwrap()).collect();
    let v_dev: Vec<_> = values.iter().map(|v| stream.clone_htod(v).unwrap()).collect();
    let workspace = stream.alloc_zeros::<u8>(info.workspace_bytes).unwrap();
    let round_start = 5000i64;
    let rs_dev = stream.clone_htod(&[round_start]).unwrap();
    let addr = |a: u64| a as usize as *mut std::ffi::c_void;
    let k_ptrs: Vec<_> = k_dev.iter().map(|k| addr(k.device_ptr(&stream).0)).collect();
    let v_ptrs: Vec<_> = v_dev.iter().map(|v| addr(v.device_ptr(&stream).0)).collect();
    let ws = addr(workspace.device_ptr(&stream).0);
    let rs = rs_dev.device_ptr(&stream).0 as usize as *const i64;
    let cu_stream = stream.cu_stream() as *mut std::ffi::c_void;
    let cache = triattn_cache_pointers {
        keys: k_ptrs.as_ptr(),
        values: v_ptrs.as_ptr(),
        keys_out: ptr::null(),
        values_out: ptr::null(),
        block_table: ptr::null(),
        positions: ptr::null_mut(),
        positions_out: ptr::null_mut(),
    };
    // SAFETY: device buffers of the plan's shape on this context, alive to the end of the test.
    let s = unsafe { triattn_plan_bind(p, &cache, ws, cu_stream) };
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    // SAFETY: as above; the workspace was bound to this cache.
    let s = unsafe { triattn_plan_run(p, ws, rs, cu_stream) };
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    stream.synchronize().unwrap();
    let host = stream.clone_dtoh(&workspace).unwrap();
    let keep: Vec<Vec<u32>> = host[info.keep_offset..info.keep_offset + info.keep_bytes]
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
        .collect::<Vec<_>>()
        .chunks(info.kept)
        .map(<[u32]>::to_vec)
        .collect();

    let root = data_dir();
    let scorer = Scorer::new(
        ModelConfig::from_file(root.join("qwen3_8b.config.json")).unwrap(),
        Stats::load(root.join("qwen3_8b.safetensors")).unwrap(),
        None,
    )
    .unwrap();
    let config = CompressionConfig { budget: BUDGET, divide_length: 64, ..CompressionConfig::preset(Preset::Paper) };
    let views: Vec<LayerView<'_, bf16>> =
        keys.iter().map(|k| LayerView::contiguous("k", k, hkv, N, d).unwrap()).collect();
    let want = run_cpu(&config, &scorer, &views, round_start as u64, PROMPT).unwrap();
    // Random keys: the GPU's last-bit differences may swap slots at the boundary (common.rs).
    let what = "keep sets through the C ABI vs the CPU backend";
    common::assert_keep_sets_match(what, &want.score, &want.keep, &keep, common::KEEP_SWAP_TOL);

    // K of layer 0, KV head 0 was compacted in place to the kept rows, in slot order.
    let k0 = stream.clone_dtoh(&k_dev[0]).unwrap();
    for (i, &slot) in keep[0].iter().enumerate() {
        assert_eq!(&k0[i * d..(i + 1) * d], &keys[0][slot as usize * d..(slot as usize + 1) * d], "row {i}");
    }
    // A host round on the CUDA compressor: every stage on the GPU, the same keep sets.
    let host_keys: Vec<*const std::ffi::c_void> = keys.iter().map(|k| k.as_ptr().cast()).collect();
    let mut host_keep = vec![-1i32; want.keep.len() * BUDGET];
    let args = triattn_host_round {
        dtype: triattn_dtype::Bf16 as u32,
        keys: host_keys.as_ptr(),
        n: N,
        round_start: round_start as u64,
        prefix_len: PROMPT,
        keep: host_keep.as_mut_ptr(),
        keep_row_stride: BUDGET,
        score: ptr::null_mut(),
    };
    let (mut kept, mut outcome) = (0usize, triattn_outcome::WithinBudget);
    // SAFETY: host buffers of the compressor's shape, alive for the call.
    let s = unsafe { triattn_round_host(c, &args, &mut kept, &mut outcome) };
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    let host_sets: Vec<Vec<u32>> =
        host_keep.chunks(BUDGET).map(|r| r[..kept].iter().map(|&x| x as u32).collect()).collect();
    let what = "triattn_round_host on a CUDA context";
    common::assert_keep_sets_match(what, &want.score, &want.keep, &host_sets, common::KEEP_SWAP_TOL);
    // SAFETY: live handles, destroyed once (the round has finished).
    unsafe {
        triattn_plan_destroy(p);
        triattn_compressor_destroy(c);
        triattn_context_destroy(ctx);
    }
}
