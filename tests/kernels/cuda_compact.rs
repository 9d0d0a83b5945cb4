//! `compact` and `calibrate` on a real GPU against the CPU reference (`scripts/gpu-check.sh`):
//! compaction bit-exact (both modes, slot map, positions), calibration sums within 1e-12 of
//! the sum of term magnitudes.
//!
//! Without a GPU these tests skip loudly; with `TRIATTN_REQUIRE_GPU` set a skip is a failure.
#![cfg(feature = "cuda")]

use crate::common;

use std::sync::Arc;

use common::{gpu_or_skip, random_keep_set, Rng};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use triattn::cpu::compact::{compact_in_place, hole_fill_in_place, hole_filling_plan};
use triattn::cuda::{PositionType, RowStrides};
use triattn::kernels::variant::CompactMode;
use triattn::kernels::{
    CalibrateAddresses, CalibrateSpec, CompactAddresses, CompactLayout, CompactShape, CompactSpec, CompactTarget,
};
use triattn::stats::calibrate::Accumulator;
use triattn::{Element, PairingStyle};

fn addresses(stream: &Arc<CudaStream>, bufs: &[CudaSlice<u8>]) -> CudaSlice<u64> {
    let a: Vec<u64> = bufs.iter().map(|b| b.device_ptr(stream).0).collect();
    stream.clone_htod(&a).unwrap()
}

#[test]
fn cuda_compact_in_place_matches_cpu_bit_exact() {
    let Some(gpu) = gpu_or_skip("cuda_compact_in_place_matches_cpu_bit_exact") else { return };
    let stream = gpu.context().default_stream();
    let (layers, hkv, n, k, d, dv, eb) = (4, 8, 2176, 2048, 128, 128, 2);
    // Every variant of both families (the tuning candidates too), forced through the planning path.
    let variants: Vec<_> = triattn::kernels::variant::table()
        .into_iter()
        .filter(|v| matches!(v.kernel, triattn::kernels::variant::Kernel::Compact { .. }))
        .collect();
    for v in variants {
        let triattn::kernels::variant::Kernel::Compact { mode, .. } = v.kernel else { unreachable!() };
        let mut rng = Rng(mode as u64 + 1);
        let st = RowStrides { head_stride: n * d, row_stride: d };
        let (spec, _) = CompactSpec::tuned(
            CompactShape {
                mode,
                target: CompactTarget::InPlace,
                elem_bytes: eb,
                num_layers: layers,
                num_kv_heads: hkv,
                num_sets: hkv,
                num_slots: n,
                keep_len: k,
                key_dim: d,
                value_dim: dv,
                layout: CompactLayout::Contiguous { k: st, v: st, k_dst: st, v_dst: st },
                positions: Some(PositionType::I64),
                num_seqs: 1,
            },
            &triattn::tuning::Dispatch::forcing(&[v]),
        )
        .unwrap();
        assert_eq!(spec.variant(), v);
        let keep: Vec<i32> = (0..hkv).flat_map(|_| random_keep_set(&mut rng, n, k)).collect();
        let index: Vec<i32> = (0..layers * hkv).map(|i| (i % hkv) as i32).collect();
        let host: Vec<Vec<u8>> = (0..2 * layers).map(|_| rng.bytes(hkv * n * d * eb)).collect();
        let pos: Vec<i64> = (0..hkv * n).map(|i| i as i64 * 3 + 1).collect();
        let mut reference = host.clone();
        for buf in reference.iter_mut() {
            for g in 0..hkv {
                let ks: Vec<u32> = keep[g * k..(g + 1) * k].iter().map(|&s| s as u32).collect();
                let rows = &mut buf[g * n * d * eb..(g + 1) * n * d * eb];
                match mode {
                    CompactMode::OrderPreserving => compact_in_place(rows, d * eb, d * eb, &ks).unwrap(),
                    CompactMode::HoleFilling => {
                        hole_fill_in_place(rows, d * eb, d * eb, &ks).unwrap();
                    }
                }
            }
        }
        let dev: Vec<CudaSlice<u8>> = host.iter().map(|b| stream.clone_htod(b).unwrap()).collect();
        let (kd, vd) = dev.split_at(layers);
        let (kt, vt) = (addresses(&stream, kd), addresses(&stream, vd));
        let keep_d = stream.clone_htod(&keep).unwrap();
        let index_d = stream.clone_htod(&index).unwrap();
        let map_d = stream.alloc_zeros::<i32>(hkv * k).unwrap();
        let pos_d = stream.clone_htod(&pos).unwrap();
        let at = CompactAddresses {
            k_src: kt.device_ptr(&stream).0,
            k_dst: kt.device_ptr(&stream).0,
            v_src: vt.device_ptr(&stream).0,
            v_dst: vt.device_ptr(&stream).0,
            keep: keep_d.device_ptr(&stream).0,
            set_index: index_d.device_ptr(&stream).0,
            block_table: 0,
            slot_map: map_d.device_ptr(&stream).0,
            pos_src: pos_d.device_ptr(&stream).0,
            pos_dst: pos_d.device_ptr(&stream).0,
        };
        // SAFETY: every buffer above was allocated to the spec's lengths on this context and
        // lives until the copies back below, which synchronise the stream.
        unsafe { gpu.launch_compact_raw(&spec, &at, stream.cu_stream()) }.unwrap();
        for (t, d_buf) in dev.iter().enumerate() {
            assert!(stream.clone_dtoh(d_buf).unwrap() == reference[t], "{mode:?}: tensor {t} differs");
        }
        let map = stream.clone_dtoh(&map_d).unwrap();
        let got_pos = stream.clone_dtoh(&pos_d).unwrap();
        for g in 0..hkv {
            let set = &keep[g * k..(g + 1) * k];
            let want: Vec<i32> = match mode {
                CompactMode::OrderPreserving => set.to_vec(),
                CompactMode::HoleFilling => {
                    let s: Vec<u32> = set.iter().map(|&x| x as u32).collect();
                    hole_filling_plan(&s).1.iter().map(|&x| x as i32).collect()
                }
            };
            assert_eq!(&map[g * k..(g + 1) * k], &want[..], "{mode:?}: slot map");
            for i in 0..k {
                assert_eq!(got_pos[g * n + i], pos[g * n + want[i] as usize], "{mode:?}: position");
            }
        }
        println!("parity compact {}: K, V, slot map and positions bit-exact", v.symbol());
    }
}

#[test]
fn cuda_calibrate_matches_the_accumulator() {
    let Some(gpu) = gpu_or_skip("cuda_calibrate_matches_the_accumulator") else { return };
    let stream = gpu.context().default_stream();
    let (h, t, d) = (32, 1000, 128);
    let mut rng = Rng(5);
    let q: Vec<bf16> = (0..h * t * d).map(|_| bf16::from_f32((rng.next_u64() >> 40) as f32 / 4e6 - 2.0)).collect();
    for style in [PairingStyle::Half, PairingStyle::Interleaved] {
        let mut cpu = Accumulator::new(1, h, d, style).unwrap();
        cpu.add(0, &q, t).unwrap();
        let spec = CalibrateSpec::new(bf16::DTYPE, h, t, d, style).unwrap();
        let q_d = stream.clone_htod(&q).unwrap();
        let sums: Vec<CudaSlice<f64>> = (0..3).map(|_| stream.alloc_zeros::<f64>(spec.sums_len()).unwrap()).collect();
        let at = CalibrateAddresses {
            queries: q_d.device_ptr(&stream).0,
            sum_real: sums[0].device_ptr(&stream).0,
            sum_imag: sums[1].device_ptr(&stream).0,
            sum_abs: sums[2].device_ptr(&stream).0,
        };
        // SAFETY: buffers sized by the spec on this context; the copies back synchronise.
        unsafe { gpu.launch_calibrate_raw(&spec, &at, stream.cu_stream()) }.unwrap();
        let (r, i, a) = cpu.sums();
        for (want, got) in [(r, &sums[0]), (i, &sums[1]), (a, &sums[2])] {
            let got = stream.clone_dtoh(got).unwrap();
            for ((x, y), s) in want.iter().zip(&got).zip(a) {
                assert!((x - y).abs() <= 2e-12 * s, "{style:?}: cpu {x} gpu {y}");
            }
        }
    }
}
