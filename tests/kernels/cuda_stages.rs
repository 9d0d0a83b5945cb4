//! The round's stages after scoring on a real GPU: `select` against `cpu::select::select_row`,
//! every variant and the multi-block path of long rows (exact indices, the same run after run);
//! `reduce` against `cpu::reduce::reduce` plus the `+inf` guards
//! (bit for bit); `normalize` against the specification `cpu::normalize` (within the rounding of
//! the f32 tile partials it reads) and bit for bit against `moments_from_partials`, the same
//! combine on the host. Bit-for-bit agreement holds because these kernels have no multiply-add
//! nvcc could contract into an FMA (cuda/README.md "Numerics per kernel": the SASS is the same
//! with `--fmad=false`) and f64 division and square root are correctly rounded on the device.
//! A launch leaves the caller's current context as it found it.
//!
//! Without a GPU these tests skip loudly; with `TRIATTN_REQUIRE_GPU` set a skip is a failure.
#![cfg(feature = "cuda")]

use crate::common;

use common::{gpu_or_skip, max_rel_err, Rng};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use triattn::cpu::normalize::zscore_rows;
use triattn::cpu::reduce::reduce;
use triattn::cpu::select::select_row;
use triattn::kernels::variant::{self, Kernel};
use triattn::kernels::{
    moments_from_partials, NormalizeAddresses, NormalizeSpec, ReduceAddresses, ReduceSpec, RowPartial, SelectAddresses,
    SelectShape, SelectSpec,
};
use triattn::policy::{GroupAggregation, SelectionMode, ZScore};

/// splitmix64 values with many ties and a few NaN / ±inf.
fn row(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let z = rng.next_u64();
            match z % 53 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                3 => -0.0,
                4..=20 => (z % 7) as f32,
                _ => ((z >> 40) as f32) / (1u64 << 20) as f32 - 8.0,
            }
        })
        .collect()
}

#[test]
fn every_select_variant_matches_the_cpu() {
    let Some(gpu) = gpu_or_skip("every_select_variant_matches_the_cpu") else { return };
    let stream = gpu.context().default_stream();
    for v in variant::table().into_iter().filter(|v| matches!(v.kernel, Kernel::Select { .. })) {
        for (rows, len, prefix, window_start, budget) in
            [(8, 1, 0, 1, 1), (64, 2176, 64, 2048, 2048), (3, 16384, 0, 16384, 5000), (2, 131072, 1000, 130000, 4096)]
        {
            let shape = SelectShape {
                rows,
                len,
                prefix,
                window_start,
                budget,
                score_stride: len,
                keep_stride: budget,
                rows_per_seq: 0,
            };
            let spec = SelectSpec::with_variant(shape, v).unwrap();
            let host: Vec<f32> = (0..rows).flat_map(|r| row(r as u64 * 7919 + len as u64, len)).collect();
            let scores = stream.clone_htod(&host).unwrap();
            let mut keep = stream.alloc_zeros::<i32>(spec.keep_len()).unwrap();
            {
                let (s, _s) = scores.device_ptr(&stream);
                let (k, _k) = keep.device_ptr_mut(&stream);
                let at = SelectAddresses { scores: s, keep: k, scratch: 0, prefixes: 0 };
                // SAFETY: both buffers are device memory of this context with the spec's lengths,
                // alive until the copy below synchronises the stream.
                unsafe { gpu.launch_select_raw(&spec, &at, stream.cu_stream()) }.unwrap();
            }
            let got = stream.clone_dtoh(&keep).unwrap();
            for r in 0..rows {
                let want = select_row(&host[r * len..(r + 1) * len], |s| s < prefix || s >= window_start, budget);
                let row: Vec<u32> = got[r * budget..(r + 1) * budget].iter().map(|&s| s as u32).collect();
                assert_eq!(row, want, "{} row {r} N {len} K {budget}", v.symbol());
            }
            eprintln!("parity {} N {len} rows {rows}: exact", v.symbol());
        }
    }
}

#[test]
fn multi_block_select_matches_the_cpu() {
    let Some(gpu) = gpu_or_skip("multi_block_select_matches_the_cpu") else { return };
    let stream = gpu.context().default_stream();
    for (rows, len, prefix, window_start, budget) in [
        (3, 16_385, 0, 16_385, 1),
        (4, 20_000, 64, 19_872, 19_872),
        (2, 65_536, 0, 65_536, 65_535),
        (8, 100_003, 4, 99_000, 2048),
        (2, 131_072, 1000, 130_000, 4096),
        (1, 131_072, 131_072, 131_072, 131_072),
    ] {
        let shape = SelectShape {
            rows,
            len,
            prefix,
            window_start,
            budget,
            score_stride: len,
            keep_stride: budget,
            rows_per_seq: 0,
        };
        let spec = SelectSpec::new(shape).unwrap();
        assert!(spec.is_multi_block());
        let host: Vec<f32> = (0..rows).flat_map(|r| row(r as u64 * 104_729 + len as u64, len)).collect();
        let scores = stream.clone_htod(&host).unwrap();
        // Scratch deliberately not zeroed: the kernels write every word before reading it.
        let mut scratch = stream.clone_htod(&vec![0xa5a5_a5a5u32; spec.scratch_bytes() / 4]).unwrap();
        let mut outputs = Vec::new();
        for _ in 0..2 {
            let mut keep = stream.alloc_zeros::<i32>(spec.keep_len()).unwrap();
            {
                let (s, _s) = scores.device_ptr(&stream);
                let (k, _k) = keep.device_ptr_mut(&stream);
                let (x, _x) = scratch.device_ptr_mut(&stream);
                let at = SelectAddresses { scores: s, keep: k, scratch: x, prefixes: 0 };
                // SAFETY: the three buffers are device memory of this context with the spec's
                // lengths, alive until the copy below synchronises the stream.
                unsafe { gpu.launch_select_raw(&spec, &at, stream.cu_stream()) }.unwrap();
            }
            outputs.push(stream.clone_dtoh(&keep).unwrap());
        }
        assert_eq!(outputs[0], outputs[1], "multi-block select N {len}: two runs differ");
        for r in 0..rows {
            let want = select_row(&host[r * len..(r + 1) * len], |s| s < prefix || s >= window_start, budget);
            let got: Vec<u32> = outputs[0][r * budget..(r + 1) * budget].iter().map(|&s| s as u32).collect();
            assert_eq!(got, want, "multi-block row {r} N {len} K {budget}");
        }
        eprintln!("parity multi-block select N {len} rows {rows}: exact, deterministic");
    }
}

#[test]
fn reduce_matches_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu_or_skip("reduce_matches_the_cpu_bit_for_bit") else { return };
    let stream = gpu.context().default_stream();
    let (layers, heads, kv, n) = (4, 16, 4, 3001);
    let z: Vec<f32> = row(11, layers * heads * n);
    let dense: Vec<Vec<f32>> = z.chunks(heads * n).map(<[f32]>::to_vec).collect();
    for mode in [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union] {
        for group in [GroupAggregation::Max, GroupAggregation::Mean] {
            let spec = ReduceSpec {
                num_layers: layers,
                num_heads: heads,
                num_kv_heads: kv,
                len: n,
                layer_stride: heads * n,
                head_stride: n,
                out_stride: n,
                mode,
                group,
                prefix: 17,
                window_start: n - 128,
                num_seqs: 1,
                z_seq_stride: 0,
                out_seq_stride: 0,
            };
            let dz = stream.clone_htod(&z).unwrap();
            let mut out = stream.alloc_zeros::<f32>(spec.out_len()).unwrap();
            {
                let (zp, _z) = dz.device_ptr(&stream);
                let (op, _o) = out.device_ptr_mut(&stream);
                // SAFETY: device buffers of this context with the spec's lengths, alive until the
                // copy below synchronises the stream.
                unsafe {
                    gpu.launch_reduce_raw(&spec, &ReduceAddresses { z: zp, out: op, prefixes: 0 }, stream.cu_stream())
                }
                .unwrap();
            }
            let got = stream.clone_dtoh(&out).unwrap();
            let mut want = reduce(&dense, heads, kv, n, mode, group);
            for r in want.chunks_mut(n) {
                for (slot, v) in r.iter_mut().enumerate() {
                    if slot < 17 || slot >= n - 128 {
                        *v = f32::INFINITY;
                    }
                }
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{mode:?} {group:?} {i}: {g} vs {w}");
            }
            eprintln!("parity reduce {mode:?} {group:?}: exact");
        }
    }
}

/// Largest z-score difference `normalize` may show against `cpu::normalize`, in units of the z
/// row's standard deviation (1). The CPU takes the row's mean and M2 in f64 from the raw scores;
/// the kernel combines the scorer's per-tile count, mean and M2, which are f32 (each within
/// 2^-24 relative). So its mean is off by at most 2^-24 of the largest tile mean, its divisor by
/// about 2^-24 (1 + |mean| / std) relative, and z = (x - mean) / divisor by
/// 2^-24 (max|tile mean| / std + |z| (1 + |mean| / std)) plus half an f32 ulp of z. These rows
/// (values in [-8, 8), |z| < 3, |mean| / std < 1) stay below 6e-7; 2e-6 leaves a factor three.
const NORMALIZE_TOL: f64 = 2e-6;

#[test]
fn normalize_matches_the_cpu_within_partial_rounding() {
    let Some(gpu) = gpu_or_skip("normalize_matches_the_cpu_within_partial_rounding") else { return };
    let stream = gpu.context().default_stream();
    let (rows, n, tile) = (24usize, 5000usize, 96usize);
    let tiles = n.div_ceil(tile);
    let raw: Vec<f32> = row(23, rows * n).iter().map(|x| if x.is_finite() { *x } else { 0.5 }).collect();
    // The scorer's partials: count, mean and M2 of each tile, rounded to f32.
    let parts: Vec<RowPartial> = raw
        .chunks(n)
        .flat_map(|r| {
            r.chunks(tile).map(|c| {
                let k = c.len() as f64;
                let m = c.iter().map(|&x| x as f64).sum::<f64>() / k;
                let m2 = c.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>();
                RowPartial { count: k as f32, mean: m as f32, m2: m2 as f32, pad: 0.0 }
            })
        })
        .collect();
    for flavour in [ZScore::PopulationFloor, ZScore::UnbiasedCentreFlat] {
        let spec = NormalizeSpec { rows, len: n, num_tiles: tiles, raw_stride: n, out_stride: n, flavour };
        let dp = stream.clone_htod(&parts).unwrap();
        let dr = stream.clone_htod(&raw).unwrap();
        let mut out = stream.alloc_zeros::<f32>(spec.out_len()).unwrap();
        {
            let (pp, _p) = dp.device_ptr(&stream);
            let (rp, _r) = dr.device_ptr(&stream);
            let (op, _o) = out.device_ptr_mut(&stream);
            let at = NormalizeAddresses { partials: pp, raw: rp, out: op };
            // SAFETY: device buffers of this context with the spec's lengths, alive until the
            // copy below synchronises the stream.
            unsafe { gpu.launch_normalize_raw(&spec, &at, stream.cu_stream()) }.unwrap();
        }
        let got = stream.clone_dtoh(&out).unwrap();
        // The specification: every slot a candidate, moments in f64 from the raw scores.
        let mut want = raw.clone();
        zscore_rows(&mut want, n, &|_| true, flavour);
        let err = max_rel_err(&format!("normalize {flavour:?}"), &got, &want, n);
        assert!(err <= NORMALIZE_TOL, "{flavour:?}: {err:.3e} of the z row's std against cpu::normalize");
        // The kernel's own arithmetic on the host, bit for bit (no contraction, see the header).
        for r in 0..rows {
            let (mean, div) = moments_from_partials(&parts[r * tiles..(r + 1) * tiles], flavour);
            for i in 0..n {
                let exact = ((raw[r * n + i] as f64 - mean) / div) as f32;
                assert_eq!(got[r * n + i].to_bits(), exact.to_bits(), "{flavour:?} row {r} slot {i}");
            }
        }
        eprintln!("parity normalize {flavour:?}: {err:.2e} of the row std from cpu::normalize; exact on its partials");
    }
}

/// A launch makes the backend's context current only for itself: the caller's current context
/// (another context, or none) is current again afterwards.
#[test]
fn a_launch_leaves_the_callers_context_current() {
    use cudarc::driver::result::ctx::{create_v4, get_current, set_current};
    use cudarc::driver::sys::cuCtxDestroy_v2;
    let Some(gpu) = gpu_or_skip("a_launch_leaves_the_callers_context_current") else { return };
    let stream = gpu.context().default_stream();
    let (layers, heads, kv, n) = (2, 4, 2, 300);
    let spec = ReduceSpec {
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        len: n,
        layer_stride: heads * n,
        head_stride: n,
        out_stride: n,
        mode: SelectionMode::PerHead,
        group: GroupAggregation::Max,
        prefix: 0,
        window_start: n,
        num_seqs: 1,
        z_seq_stride: 0,
        out_seq_stride: 0,
    };
    let z = row(5, layers * heads * n);
    let dz = stream.clone_htod(&z).unwrap();
    let mut out = stream.alloc_zeros::<f32>(spec.out_len()).unwrap();
    stream.synchronize().unwrap();
    let other = {
        let (zp, _z) = dz.device_ptr(&stream);
        let (op, _o) = out.device_ptr_mut(&stream);
        let at = ReduceAddresses { z: zp, out: op, prefixes: 0 };
        // An engine's own context, current on this thread (cuCtxCreate makes it current).
        // SAFETY: the device of the backend's context; default flags, no creation parameters.
        let other = unsafe { create_v4(std::ptr::null_mut(), 0, gpu.context().cu_device()) }.unwrap();
        assert_eq!(get_current().unwrap(), Some(other));
        // SAFETY: buffers of the backend's context with the spec's lengths, alive until the
        // stream is synchronised below; the stream belongs to the backend's context.
        unsafe { gpu.launch_reduce_raw(&spec, &at, stream.cu_stream()) }.unwrap();
        assert_eq!(get_current().unwrap(), Some(other), "a launch changed the caller's current context");
        // No context current at all: none afterwards either.
        // SAFETY: null unbinds the calling thread's context.
        unsafe { set_current(std::ptr::null_mut()) }.unwrap();
        // SAFETY: as above.
        unsafe { gpu.launch_reduce_raw(&spec, &at, stream.cu_stream()) }.unwrap();
        assert_eq!(get_current().unwrap(), None, "a launch left its context current on a thread that had none");
        other
    };
    // SAFETY: `other` was created above and is no longer used.
    unsafe { cuCtxDestroy_v2(other) }.result().unwrap();
    stream.synchronize().unwrap();
    let got = stream.clone_dtoh(&out).unwrap();
    let dense: Vec<Vec<f32>> = z.chunks(heads * n).map(<[f32]>::to_vec).collect();
    let want = reduce(&dense, heads, kv, n, SelectionMode::PerHead, GroupAggregation::Max);
    for (g, w) in got.iter().zip(&want) {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{g} vs {w}");
    }
    eprintln!("context: a launch restores the caller's current context (another one, or none)");
}
