//! The device-pointer round of the C ABI (`triattn_context_create_cuda`, `triattn_plan_*`,
//! `triattn_binding_*`), called from Rust through the `extern "C"` functions.
//!
//! Every build: CUDA contexts refuse cleanly without the `cuda` feature or a GPU; plans and
//! their workspace layout match [`RoundPlan`], bad shapes are refused naming the field, a plan
//! of a CPU context is refused at bind time with a status, never a panic. With `emu`: the whole
//! device flow (plan, one binding per sequence, runs) over host memory on the emu backend —
//! two paged sequences with positions bound to one plan each keep their own slots, rows and
//! positions, equal to the CPU backend's; misaligned or missing addresses are refused by name.
//! With `cuda` and a GPU: a round through the C ABI on device buffers keeps the same slots as
//! the CPU backend (skips loudly without a GPU; fails when `TRIATTN_REQUIRE_GPU=1`).

#[cfg(any(feature = "emu", feature = "cuda"))]
use crate::common;

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
        struct_size: std::mem::size_of::<triattn_round_shape>() as u32,
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

fn info(p: *const triattn_plan) -> triattn_plan_info {
    // SAFETY: every field of the info is an integer or a C enum whose 0 is a value.
    let mut out: triattn_plan_info = unsafe { std::mem::zeroed() };
    out.struct_size = std::mem::size_of::<triattn_plan_info>() as u32;
    // SAFETY: live plan, writable output with its size set.
    assert_eq!(unsafe { triattn_plan_get_info(p, &mut out) }, triattn_status::Ok, "{}", last_error());
    out
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
    use triattn::kernels::variant::CompactMode;
    use triattn::round::Scorer;
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
            assert!(got.keep_offset.is_multiple_of(256) && got.keep_offset + got.keep_bytes <= got.workspace_bytes);
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

    /// A plan of a CPU context can be inspected but not bound: a status and a message, never a
    /// panic; null handles and outputs are refused by name.
    #[test]
    fn bind_of_a_cpu_plan_refuses_cleanly() {
        let ctx = cpu_context();
        let c = compressor(ctx);
        let (s, p) = plan_create(c, &shape(128));
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let fake = 0x1000usize as *mut std::ffi::c_void;
        let keys = [fake; 36];
        let cache = triattn_cache_pointers { keys: keys.as_ptr(), values: keys.as_ptr(), ..Default::default() };
        let mut b = ptr::null_mut();
        // SAFETY: the call refuses before touching any of the (fake) device addresses.
        let s = unsafe { triattn_plan_bind(p, &cache, fake, ptr::null_mut(), &mut b) };
        let msg = last_error();
        assert_eq!(s, triattn_status::NoDevice, "{msg}");
        assert!(msg.contains("triattn_plan_bind") && msg.contains("TRIATTN_BACKEND_CPU"), "{msg}");
        assert!(b.is_null());
        // SAFETY: null pointers are checked.
        unsafe {
            assert_eq!(
                triattn_plan_bind(ptr::null(), &cache, fake, ptr::null_mut(), &mut b),
                triattn_status::InvalidArgument
            );
            assert_eq!(
                triattn_plan_bind(p, &cache, fake, ptr::null_mut(), ptr::null_mut()),
                triattn_status::InvalidArgument
            );
            assert!(last_error().contains("out"));
            assert_eq!(
                triattn_binding_run(ptr::null(), 0x2000usize as *const i64, ptr::null_mut()),
                triattn_status::InvalidArgument
            );
            assert!(last_error().contains("binding"));
            assert_eq!(triattn_plan_get_info(p, ptr::null_mut()), triattn_status::InvalidArgument);
        }
        // A struct of another size is refused by name (a header of another version).
        let mut wrong = info(p);
        wrong.struct_size -= 8;
        // SAFETY: live plan, writable output.
        assert_eq!(unsafe { triattn_plan_get_info(p, &mut wrong) }, triattn_status::InvalidArgument);
        let msg = last_error();
        assert!(msg.contains("out.struct_size") && msg.contains("sizeof(triattn_plan_info)"), "{msg}");
        let (s, _) = plan_create(c, &triattn_round_shape { struct_size: 8, ..shape(128) });
        assert_eq!(s, triattn_status::InvalidArgument);
        assert!(last_error().contains("shape.struct_size"), "{}", last_error());
        // SAFETY: live handles, destroyed once; null is ignored.
        unsafe {
            triattn_binding_destroy(ptr::null_mut());
            triattn_plan_destroy(p);
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }
}

/// The device flow on the emu backend: host memory stands in for device memory, so the C ABI's
/// own plan / bind / run path runs here, in every CI run.
#[cfg(feature = "emu")]
mod emu {
    use super::*;
    use half::bf16;
    use triattn::round::{run_cpu, Scorer};
    use triattn::{CompressionConfig, LayerView, Preset};

    const L: usize = 2;
    const H: usize = 8;
    const HKV: usize = 2;
    const D: usize = 64;
    const LEN: usize = 128;
    const KEEP: usize = 96;
    const BLOCK: usize = 16;
    const BLOCKS: usize = 20;
    const MAX_BLOCKS: usize = 9;

    use crate::common::Aligned;

    /// A small model and random statistics written to `dir`: (config path, stats path, scorer).
    fn small_model(dir: &std::path::Path) -> (CString, CString, Scorer) {
        let cfg = dir.join("config.json");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"num_hidden_layers":{L},"num_attention_heads":{H},"num_key_value_heads":{HKV},"head_dim":{D},"rope_theta":1000000.0}}"#
            ),
        )
        .unwrap();
        let stats = common::random_stats(L, H, D, 77);
        let stats_path = dir.join("stats.safetensors");
        stats.save(&stats_path).unwrap();
        let scorer = Scorer::new(common::model(L, H, HKV, D), stats, None).unwrap();
        let c = |p: std::path::PathBuf| CString::new(p.to_str().unwrap()).unwrap();
        (c(cfg), c(stats_path), scorer)
    }

    fn emu_compressor(
        config: &triattn_config,
        model: &CString,
        stats: &CString,
    ) -> (*mut triattn_context, *mut triattn_compressor) {
        let mut ctx = ptr::null_mut();
        // SAFETY: writable handle.
        let s = unsafe { triattn_context_create(triattn_backend::Emu as u32, &mut ctx) };
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let mut c = ptr::null_mut();
        // SAFETY: live context, NUL-terminated paths, readable config, writable handle.
        let s = unsafe { triattn_compressor_create(ctx, model.as_ptr(), stats.as_ptr(), config, &mut c) };
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        (ctx, c)
    }

    fn config() -> (triattn_config, CompressionConfig) {
        let rust = CompressionConfig { budget: KEEP, divide_length: 32, ..CompressionConfig::preset(Preset::Paper) };
        let mut cfg = std::mem::MaybeUninit::<triattn_config>::uninit();
        // SAFETY: writable config.
        assert_eq!(unsafe { triattn_config_default(0, cfg.as_mut_ptr()) }, triattn_status::Ok);
        // SAFETY: initialised by the call above.
        let mut cfg = unsafe { cfg.assume_init() };
        cfg.budget = KEEP;
        cfg.divide_length = 32;
        (cfg, rust)
    }

    fn paged_shape() -> triattn_round_shape {
        triattn_round_shape {
            dtype: triattn_dtype::Bf16 as u32,
            len: LEN,
            prefix_len: 8,
            value_dim: D,
            compaction: triattn_compaction::InPlaceOrderPreserving as u32,
            layout: triattn_layout::PagedNhd as u32,
            block_size: BLOCK,
            num_blocks: BLOCKS,
            max_blocks: MAX_BLOCKS,
            positions: triattn_positions::I64 as u32,
            ..Default::default()
        }
    }

    /// Row `slot` of KV head `g` in an NHD pool `[blocks, BLOCK, HKV, D]` under `table`.
    fn pool_row(table: &[i32], g: usize, slot: usize) -> usize {
        ((table[slot / BLOCK] as usize * BLOCK + slot % BLOCK) * HKV + g) * D
    }

    /// Two sequences of one paged shape bound to one plan (each its own workspace, block-table
    /// row and positions), run in the reverse order of binding after the plan handle is gone:
    /// each keeps the CPU backend's slots, its own rows move inside its own blocks, its own
    /// positions follow them, and the other sequence's blocks are untouched.
    #[test]
    fn two_sequences_bound_to_one_plan_keep_their_own_caches() {
        let dir = tempfile::tempdir().unwrap();
        let (model_path, stats_path, scorer) = small_model(dir.path());
        let (cfg, rust_config) = config();
        let (ctx, c) = emu_compressor(&cfg, &model_path, &stats_path);
        let (s, p) = plan_create(c, &paged_shape());
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let info = info(p);
        assert_eq!((info.outcome, info.sets, info.kept), (triattn_outcome::Compressed, HKV, KEEP));

        // Shared pools, one per layer for K and V; sequence 0 holds blocks 11, 2, 17, ...,
        // sequence 1 others, interleaved, none shared.
        let tables: [Vec<i32>; 2] = [vec![11, 2, 17, 5, 0, 13, 8, 19, -1], vec![3, 14, 6, 1, 16, 9, 12, 4, -1]];
        let mut rng = common::Rng(5);
        let pool_elems = BLOCKS * BLOCK * HKV * D;
        let k_host: Vec<Vec<bf16>> =
            (0..L).map(|_| (0..pool_elems).map(|_| bf16::from_f32(rng.unit() * 3.0)).collect()).collect();
        let v_host: Vec<Vec<bf16>> =
            (0..L).map(|_| (0..pool_elems).map(|_| bf16::from_f32(rng.unit())).collect()).collect();
        let k_pools: Vec<Aligned> = k_host.iter().map(|k| Aligned::of(k)).collect();
        let v_pools: Vec<Aligned> = v_host.iter().map(|v| Aligned::of(v)).collect();
        let k_ptrs: Vec<_> = k_pools.iter().map(Aligned::addr).collect();
        let v_ptrs: Vec<_> = v_pools.iter().map(Aligned::addr).collect();
        let positions: [Vec<i64>; 2] =
            [0, 1].map(|seq| (0..HKV * LEN).map(|i| 10_000 * (seq as i64 + 1) + (i % LEN) as i64).collect());
        let pos_dev: Vec<Aligned> = positions.iter().map(|p| Aligned::of(p)).collect();
        let table_dev: Vec<Aligned> = tables.iter().map(|t| Aligned::of(t)).collect();
        let workspaces: Vec<Aligned> = (0..2).map(|_| Aligned::new(info.workspace_bytes)).collect();
        let round_starts = [Aligned::of(&[4000i64]), Aligned::of(&[9000i64])];

        let mut bindings = [ptr::null_mut(); 2];
        for seq in 0..2 {
            let cache = triattn_cache_pointers {
                keys: k_ptrs.as_ptr(),
                values: v_ptrs.as_ptr(),
                block_table: table_dev[seq].addr().cast(),
                positions: pos_dev[seq].addr(),
                ..Default::default()
            };
            // SAFETY: host memory of the planned shape (emu), alive to the end of the test.
            let s =
                unsafe { triattn_plan_bind(p, &cache, workspaces[seq].addr(), ptr::null_mut(), &mut bindings[seq]) };
            assert_eq!(s, triattn_status::Ok, "bind {seq}: {}", last_error());
        }
        // SAFETY: live plan, destroyed once; the bindings keep what they need.
        unsafe { triattn_plan_destroy(p) };
        for seq in [1, 0] {
            // SAFETY: a live binding; its cache, workspace and round_start are alive.
            let s = unsafe { triattn_binding_run(bindings[seq], round_starts[seq].addr().cast(), ptr::null_mut()) };
            assert_eq!(s, triattn_status::Ok, "run {seq}: {}", last_error());
        }

        let k_after: Vec<Vec<bf16>> = k_pools.iter().map(|k| k.read(0, pool_elems)).collect();
        for seq in 0..2 {
            let table = &tables[seq];
            // The sequence's keys as a dense [HKV, LEN, D] tensor per layer, for the CPU backend.
            let dense: Vec<Vec<bf16>> = (0..L)
                .map(|l| {
                    (0..HKV)
                        .flat_map(|g| (0..LEN).flat_map(move |n| (0..D).map(move |i| (g, n, i))))
                        .map(|(g, n, i)| k_host[l][pool_row(table, g, n) + i])
                        .collect()
                })
                .collect();
            let views: Vec<_> = dense.iter().map(|k| LayerView::contiguous("k", k, HKV, LEN, D).unwrap()).collect();
            let start = [4000u64, 9000][seq];
            let want = run_cpu(&rust_config, &scorer, &views, start, 8).unwrap();
            let keep: Vec<Vec<u32>> = workspaces[seq]
                .read::<i32>(info.keep_offset, HKV * KEEP)
                .chunks(KEEP)
                .map(|r| r.iter().map(|&x| x as u32).collect())
                .collect();
            assert_eq!(keep, want.keep, "sequence {seq}: keep sets through the C ABI on emu vs the CPU backend");
            for l in 0..L {
                for g in 0..HKV {
                    for (i, &slot) in keep[g].iter().enumerate() {
                        let got = &k_after[l][pool_row(table, g, i)..pool_row(table, g, i) + D];
                        let was = &k_host[l][pool_row(table, g, slot as usize)..pool_row(table, g, slot as usize) + D];
                        assert_eq!(got, was, "sequence {seq} layer {l} head {g} row {i}");
                    }
                }
            }
            let pos: Vec<i64> = pos_dev[seq].read(0, HKV * LEN);
            for g in 0..HKV {
                for (i, &slot) in keep[g].iter().enumerate() {
                    assert_eq!(pos[g * LEN + i], positions[seq][g * LEN + slot as usize], "sequence {seq} positions");
                }
            }
        }
        // The spare blocks (in neither table) are untouched.
        for l in 0..L {
            for b in [7, 10, 15, 18] {
                let range = b * BLOCK * HKV * D..(b + 1) * BLOCK * HKV * D;
                assert_eq!(&k_after[l][range.clone()], &k_host[l][range], "layer {l} spare block {b}");
            }
        }
        // SAFETY: live handles, destroyed once.
        unsafe {
            triattn_binding_destroy(bindings[0]);
            triattn_binding_destroy(bindings[1]);
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }

    /// Every address a binding or a run reads is checked before anything is written: misaligned
    /// K/V bases (16 bytes), positions (their type), block table (4), workspace (256),
    /// round_start (8), and missing tables, each refused by name.
    #[test]
    fn misaligned_and_missing_addresses_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (model_path, stats_path, _) = small_model(dir.path());
        let (cfg, _) = config();
        let (ctx, c) = emu_compressor(&cfg, &model_path, &stats_path);
        let (s, p) = plan_create(c, &paged_shape());
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let info = info(p);
        let pool = Aligned::new(BLOCKS * BLOCK * HKV * D * 2 + 64);
        let table = Aligned::of(&[0i32, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let positions = Aligned::new(HKV * LEN * 8 + 64);
        let workspace = Aligned::new(info.workspace_bytes + 512);
        let base = |a: &Aligned, off: usize| a.ptr.wrapping_add(off).cast::<std::ffi::c_void>();
        let good_k = [base(&pool, 0); L];
        let bad_k = [base(&pool, 0), base(&pool, 8)];
        // A cache from its parts (None: a NULL table or pointer).
        let cache = |keys: &[*mut std::ffi::c_void; L],
                     values: Option<&[*mut std::ffi::c_void; L]>,
                     block_table: Option<*mut std::ffi::c_void>,
                     positions: Option<*mut std::ffi::c_void>| triattn_cache_pointers {
            keys: keys.as_ptr(),
            values: values.map_or(ptr::null(), |v| v.as_ptr()),
            block_table: block_table.map_or(ptr::null(), |t| t.cast()),
            positions: positions.unwrap_or(ptr::null_mut()),
            ..Default::default()
        };
        let (t, pos, ws) = (Some(table.addr()), Some(positions.addr()), workspace.addr());
        let cases: Vec<(&str, triattn_cache_pointers, *mut std::ffi::c_void)> = vec![
            ("K layer addresses [1]", cache(&bad_k, Some(&good_k), t, pos), ws),
            ("V layer addresses [1]", cache(&good_k, Some(&bad_k), t, pos), ws),
            ("positions address", cache(&good_k, Some(&good_k), t, Some(base(&positions, 4))), ws),
            ("block table address", cache(&good_k, Some(&good_k), Some(base(&table, 2)), pos), ws),
            ("workspace", cache(&good_k, Some(&good_k), t, pos), base(&workspace, 128)),
            ("cache.values", cache(&good_k, None, t, pos), ws),
            ("cache.block_table", cache(&good_k, Some(&good_k), None, pos), ws),
            ("positions address", cache(&good_k, Some(&good_k), t, None), ws),
        ];
        let untouched = workspace.read::<u8>(0, info.workspace_bytes);
        for (what, cache, ws) in cases {
            let mut b = ptr::null_mut();
            // SAFETY: host memory large enough for the plan; the call refuses before writing.
            let s = unsafe { triattn_plan_bind(p, &cache, ws, ptr::null_mut(), &mut b) };
            let msg = last_error();
            assert_eq!(s, triattn_status::InvalidArgument, "{what}: {msg}");
            assert!(msg.contains(what) && msg.contains("expected"), "{what}: {msg}");
            assert!(b.is_null(), "{what}: no binding on failure");
            assert!(workspace.read::<u8>(0, info.workspace_bytes) == untouched, "{what}: nothing written");
        }
        // A good binding, then a misaligned round_start at run time.
        let good = cache(&good_k, Some(&good_k), t, pos);
        let mut b = ptr::null_mut();
        // SAFETY: as above.
        assert_eq!(unsafe { triattn_plan_bind(p, &good, ws, ptr::null_mut(), &mut b) }, triattn_status::Ok);
        let rs = Aligned::of(&[5000i64, 5000]);
        // SAFETY: the run refuses the misaligned address before any launch.
        let s = unsafe { triattn_binding_run(b, base(&rs, 4).cast(), ptr::null_mut()) };
        let msg = last_error();
        assert_eq!(s, triattn_status::InvalidArgument, "{msg}");
        assert!(msg.contains("round_start") && msg.contains("aligned to 8"), "{msg}");
        // SAFETY: live handles, destroyed once.
        unsafe {
            triattn_binding_destroy(b);
            triattn_plan_destroy(p);
            triattn_compressor_destroy(c);
            triattn_context_destroy(ctx);
        }
    }

    /// A decode through the C ABI (plan, bind, run on emu) equals the Rust decode plan run by
    /// `Backend::Emu.decode` bit for bit: paged HND pools, ragged per-KV-head lists, sinks, two
    /// splits and one layer of two; bad shape fields are refused by name.
    #[test]
    fn decode_through_the_c_abi_equals_the_rust_plan() {
        use triattn::cuda::{CacheLayout, DecodeInputs, DecodePlan, DecodeShape, ListLengths, PageOrder, SplitPolicy};
        use triattn::decode::{DecodeOptions, ListLayout};
        let mut ctx = ptr::null_mut();
        // SAFETY: writable handle.
        assert_eq!(unsafe { triattn_context_create(triattn_backend::Emu as u32, &mut ctx) }, triattn_status::Ok);
        let (t, cap, len) = (2, 140, MAX_BLOCKS * BLOCK);
        let c_shape = triattn_decode_shape {
            struct_size: std::mem::size_of::<triattn_decode_shape>() as u32,
            dtype: triattn_dtype::Bf16 as u32,
            query_dtype: triattn_dtype::F32 as u32,
            layout: triattn_layout::PagedHnd as u32,
            num_seqs: 1,
            num_layers: L,
            num_heads: H,
            num_kv_heads: HKV,
            head_dim: D,
            value_dim: D,
            num_queries: t,
            len,
            key_head_stride: 0,
            key_row_stride: 0,
            value_head_stride: 0,
            value_row_stride: 0,
            block_size: BLOCK,
            num_blocks: BLOCKS,
            max_blocks: MAX_BLOCKS,
            lists: triattn_list_layout::PerKvHead as u32,
            ragged: 1,
            list_capacity: cap,
            sinks: 1,
            scale: 0.0,
            softcap: 0.0,
            splits: 2,
        };
        let rust_shape = DecodeShape {
            dtype: triattn::DType::Bf16,
            query_dtype: triattn::DType::F32,
            num_seqs: 1,
            num_layers: L,
            num_heads: H,
            num_kv_heads: HKV,
            head_dim: D,
            value_dim: D,
            num_queries: t,
            len,
            layout: CacheLayout::Paged {
                block_size: BLOCK,
                order: PageOrder::Hnd,
                num_blocks: BLOCKS,
                max_blocks: MAX_BLOCKS,
            },
            lists: ListLayout::PerKvHead,
            list_capacity: cap,
            list_lengths: ListLengths::PerList,
            sinks: true,
            options: DecodeOptions::default(),
            splits: SplitPolicy::Fixed(2),
        };
        let mut plan = ptr::null_mut();
        // SAFETY: live context, readable shape, writable handle.
        assert_eq!(
            unsafe { triattn_decode_plan_create(ctx, &c_shape, &mut plan) },
            triattn_status::Ok,
            "{}",
            last_error()
        );
        // SAFETY: every field of the info is an integer.
        let mut info: triattn_decode_info = unsafe { std::mem::zeroed() };
        info.struct_size = std::mem::size_of::<triattn_decode_info>() as u32;
        // SAFETY: live plan, writable output.
        assert_eq!(unsafe { triattn_decode_plan_get_info(plan, &mut info) }, triattn_status::Ok);
        let rust = DecodePlan::new(rust_shape).unwrap();
        assert_eq!((info.workspace_bytes, info.splits), (rust.workspace_bytes(), 2));

        let mut rng = common::Rng(17);
        let pool = BLOCKS * BLOCK * HKV * D;
        let k: Vec<Vec<bf16>> = (0..L).map(|_| (0..pool).map(|_| bf16::from_f32(rng.unit())).collect()).collect();
        let v: Vec<Vec<bf16>> = (0..L).map(|_| (0..pool).map(|_| bf16::from_f32(rng.unit() * 2.0)).collect()).collect();
        let table: Vec<i32> = vec![4, 9, 0, 13, 2, 7, 11, 5, 17];
        let lens = [cap as i32, 37];
        let lists: Vec<i32> = (0..HKV)
            .flat_map(|g| {
                let n = lens[g] as usize;
                (0..cap).map(move |i| if i < n { (i * len / n) as i32 } else { -1 })
            })
            .collect();
        let sinks: Vec<f32> = (0..L * H).map(|i| (i % 5) as f32 - 2.0).collect();
        let q: Vec<f32> = (0..H * t * D).map(|_| rng.unit()).collect(); // layer 1 only

        let kd: Vec<Aligned> = k.iter().map(|x| Aligned::of(x)).collect();
        let vd: Vec<Aligned> = v.iter().map(|x| Aligned::of(x)).collect();
        let (kp, vp): (Vec<_>, Vec<_>) =
            (kd.iter().map(Aligned::addr).collect(), vd.iter().map(Aligned::addr).collect());
        let (table_d, lists_d, lens_d, sinks_d, q_d) =
            (Aligned::of(&table), Aligned::of(&lists), Aligned::of(&lens), Aligned::of(&sinks), Aligned::of(&q));
        let cache = triattn_decode_cache {
            struct_size: std::mem::size_of::<triattn_decode_cache>() as u32,
            keys: kp.as_ptr(),
            values: vp.as_ptr(),
            sinks: sinks_d.addr().cast(),
            lists: lists_d.addr().cast(),
            list_lens: lens_d.addr().cast(),
            seq_lens: ptr::null(),
            block_table: table_d.addr().cast(),
        };
        let ws = Aligned::new(info.workspace_bytes);
        let mut b = ptr::null_mut();
        // SAFETY: host memory of the planned shape (emu), alive to the end of the test.
        let s = unsafe { triattn_decode_plan_bind(plan, &cache, ws.addr(), ptr::null_mut(), &mut b) };
        assert_eq!(s, triattn_status::Ok, "{}", last_error());
        let (out, lse) = (Aligned::new(H * t * D * 4), Aligned::new(H * t * 4));
        // SAFETY: live binding; q, out and lse hold one layer of the shape.
        let s = unsafe {
            triattn_decode_binding_run(b, q_d.addr(), out.addr().cast(), lse.addr().cast(), 1, 1, ptr::null_mut())
        };
        assert_eq!(s, triattn_status::Ok, "{}", last_error());

        let kr: Vec<&[bf16]> = k.iter().map(Vec::as_slice).collect();
        let vr: Vec<&[bf16]> = v.iter().map(Vec::as_slice).collect();
        let inputs = DecodeInputs {
            keys: &kr,
            values: &vr,
            queries: &q,
            sinks: Some(&sinks),
            lists: Some(&lists),
            list_lens: Some(&lens),
            seq_lens: None,
            block_table: Some(&table),
        };
        let want = triattn::Backend::Emu.decode(&rust, &inputs, 1, 1).unwrap();
        assert!(out.read::<f32>(0, H * t * D) == want.out, "o through the C ABI");
        assert!(lse.read::<f32>(0, H * t) == want.lse, "lse through the C ABI");

        // Bad fields are refused by name.
        for (field, bad) in [
            ("shape.lists", triattn_decode_shape { lists: 7, ..c_shape }),
            ("shape.ragged", triattn_decode_shape { ragged: 2, ..c_shape }),
            ("shape.scale", triattn_decode_shape { scale: -1.0, ..c_shape }),
            ("attention heads", triattn_decode_shape { num_heads: 7, ..c_shape }),
            ("shape.struct_size", triattn_decode_shape { struct_size: 4, ..c_shape }),
        ] {
            let mut p = ptr::null_mut();
            // SAFETY: live context, readable shape, writable handle.
            let s = unsafe { triattn_decode_plan_create(ctx, &bad, &mut p) };
            let msg = last_error();
            assert_eq!(s, triattn_status::InvalidArgument, "{field}: {msg}");
            assert!(msg.contains(field), "{field}: {msg}");
            assert!(p.is_null());
        }
        // A missing list-lengths address for ragged lists is refused at bind.
        let mut b2 = ptr::null_mut();
        let no_lens = triattn_decode_cache { list_lens: ptr::null(), ..cache };
        // SAFETY: as above; the call refuses before writing.
        let s = unsafe { triattn_decode_plan_bind(plan, &no_lens, ws.addr(), ptr::null_mut(), &mut b2) };
        assert_eq!(s, triattn_status::InvalidArgument);
        assert!(last_error().contains("list lengths address"), "{}", last_error());
        // SAFETY: live handles, destroyed once.
        unsafe {
            triattn_decode_binding_destroy(b);
            triattn_decode_plan_destroy(plan);
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
    let info = info(p);
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
    let cache = triattn_cache_pointers { keys: k_ptrs.as_ptr(), values: v_ptrs.as_ptr(), ..Default::default() };
    let mut binding = ptr::null_mut();
    // SAFETY: device buffers of the plan's shape on this context, alive to the end of the test.
    let s = unsafe { triattn_plan_bind(p, &cache, ws, cu_stream, &mut binding) };
    assert_eq!(s, triattn_status::Ok, "{}", last_error());
    // SAFETY: as above; the workspace was bound to this cache.
    let s = unsafe { triattn_binding_run(binding, rs, cu_stream) };
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
        struct_size: std::mem::size_of::<triattn_host_round>() as u32,
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
        triattn_binding_destroy(binding);
        triattn_plan_destroy(p);
        triattn_compressor_destroy(c);
        triattn_context_destroy(ctx);
    }
}
