//! Every `compact` variant on the emu backend against the CPU reference (`cpu::compact`),
//! bit-exact: whole K and V buffers (untouched rows and padding included), slot maps and
//! positions. Keep sets: random, K = N, K = 1, the kept prefix, the kept suffix; per-head,
//! per-layer-per-head and union sets; K and V dims that differ; 2- and 4-byte elements (f16/bf16
//! and f32 rows are the same byte copies); padded strides; paged pools (NHD and HND).
#![cfg(feature = "emu")]

use crate::common;

use common::{random_keep_set, Rng};
use triattn::cpu::compact::{compact_in_place, gather_rows, hole_fill_in_place, hole_filling_plan};
use triattn::cuda::{PageOrder, PositionType, RowStrides};
use triattn::kernels::emu::{self, CompactExtras, KeepSets, Positions, PositionsRef};
use triattn::kernels::variant::{self, CompactMode, Kernel, COMPACT_TILES};
use triattn::kernels::{CompactLayout, CompactShape, CompactSpec, CompactTarget};
use triattn::tuning::Dispatch;

#[derive(Clone, Copy, Debug)]
enum KeepKind {
    Random,
    Prefix,
    Suffix,
}

fn keep_set(rng: &mut Rng, n: usize, k: usize, kind: KeepKind) -> Vec<i32> {
    match kind {
        KeepKind::Prefix => (0..k as i32).collect(),
        KeepKind::Suffix => ((n - k) as i32..n as i32).collect(),
        KeepKind::Random => random_keep_set(rng, n, k),
    }
}

#[derive(Clone, Copy, Debug)]
enum SetKind {
    PerHead,
    PerLayerPerHead,
    Union,
}

fn set_index(kind: SetKind, l: usize, hkv: usize) -> (usize, Vec<i32>) {
    match kind {
        SetKind::PerHead => (hkv, (0..l * hkv).map(|i| (i % hkv) as i32).collect()),
        SetKind::PerLayerPerHead => (l * hkv, (0..(l * hkv) as i32).collect()),
        SetKind::Union => (1, vec![0; l * hkv]),
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    layers: usize,
    hkv: usize,
    n: usize,
    k: usize,
    d: usize,
    dv: usize,
    eb: usize,
    pad: usize,
    sets: SetKind,
    keep: KeepKind,
    positions: Option<PositionType>,
    seed: u64,
}

fn cases() -> Vec<Case> {
    let base = Case {
        layers: 3,
        hkv: 2,
        n: 77,
        k: 40,
        d: 64,
        dv: 32,
        eb: 2,
        pad: 0,
        sets: SetKind::PerHead,
        keep: KeepKind::Random,
        positions: Some(PositionType::I64),
        seed: 1,
    };
    let mut v = vec![base];
    v.push(Case { k: 77, seed: 2, ..base });
    v.push(Case { k: 1, seed: 3, ..base });
    v.push(Case { keep: KeepKind::Prefix, seed: 4, ..base });
    v.push(Case { keep: KeepKind::Suffix, seed: 5, ..base });
    v.push(Case { sets: SetKind::PerLayerPerHead, positions: Some(PositionType::I32), seed: 6, ..base });
    v.push(Case { sets: SetKind::Union, eb: 4, d: 128, dv: 96, pad: 8, seed: 7, ..base });
    v.push(Case { eb: 4, d: 256, dv: 256, n: 300, k: 170, positions: None, seed: 8, ..base });
    v.push(Case { eb: 2, d: 128, dv: 256, n: 1000, k: 900, pad: 16, seed: 9, ..base });
    v.push(Case { eb: 2, d: 128, dv: 128, n: 1000, k: 100, layers: 2, hkv: 4, seed: 10, ..base });
    v.push(Case { n: 1, k: 1, seed: 11, ..base });
    v
}

/// Contiguous `[Hkv, N, dim]` strides in elements: rows padded by `pad`, heads by one more row.
fn strides(c: &Case, dim: usize, rows: usize) -> RowStrides {
    let row_stride = dim + c.pad;
    RowStrides { head_stride: rows * row_stride + if c.pad > 0 { row_stride } else { 0 }, row_stride }
}

/// The `compact` variant of `mode` with tile `tile` of [`COMPACT_TILES`] (cases cycle through
/// them, so every variant of both families runs).
fn forced(mode: CompactMode, tile: usize) -> Dispatch {
    let (threads, chunks) = COMPACT_TILES[tile % COMPACT_TILES.len()];
    let v = variant::table()
        .into_iter()
        .find(|v| v.kernel == Kernel::Compact { mode, threads, chunks })
        .expect("every compact tile is compiled for both modes");
    Dispatch::forcing(&[v])
}

fn spec(c: &Case, mode: CompactMode, target: CompactTarget, num_sets: usize) -> CompactSpec {
    let (k, v) = (strides(c, c.d, c.n), strides(c, c.dv, c.n));
    let (k_dst, v_dst) = match target {
        CompactTarget::InPlace => (k, v),
        CompactTarget::OutOfPlace => (strides(c, c.d, c.k), strides(c, c.dv, c.k)),
    };
    let (spec, _) = CompactSpec::tuned(
        CompactShape {
            mode,
            target,
            elem_bytes: c.eb,
            num_layers: c.layers,
            num_kv_heads: c.hkv,
            num_sets,
            num_slots: c.n,
            keep_len: c.k,
            key_dim: c.d,
            value_dim: c.dv,
            layout: CompactLayout::Contiguous { k, v, k_dst, v_dst },
            positions: c.positions,
            num_seqs: 1,
        },
        &forced(mode, c.seed as usize),
    )
    .unwrap();
    let (threads, chunks) = COMPACT_TILES[c.seed as usize % COMPACT_TILES.len()];
    assert_eq!(spec.variant().kernel, Kernel::Compact { mode, threads, chunks }, "the forced variant runs");
    spec
}

fn buffer_len(st: RowStrides, hkv: usize, rows: usize, dim: usize, eb: usize) -> usize {
    ((hkv - 1) * st.head_stride + (rows - 1) * st.row_stride + dim) * eb + 24
}

/// Expected slot map of a set.
fn slot_map(mode: CompactMode, keep: &[i32]) -> Vec<i32> {
    match mode {
        CompactMode::OrderPreserving => keep.to_vec(),
        CompactMode::HoleFilling => {
            let k: Vec<u32> = keep.iter().map(|&s| s as u32).collect();
            hole_filling_plan(&k).1.iter().map(|&s| s as i32).collect()
        }
    }
}

fn run_in_place(c: &Case, mode: CompactMode) {
    let mut rng = Rng(c.seed * 1000 + mode as u64);
    let (num_sets, index) = set_index(c.sets, c.layers, c.hkv);
    let keep: Vec<i32> = (0..num_sets).flat_map(|_| keep_set(&mut rng, c.n, c.k, c.keep)).collect();
    let sp = spec(c, mode, CompactTarget::InPlace, num_sets);
    let (ks, vs) = (strides(c, c.d, c.n), strides(c, c.dv, c.n));
    let mut k: Vec<Vec<u8>> = (0..c.layers).map(|_| rng.bytes(buffer_len(ks, c.hkv, c.n, c.d, c.eb))).collect();
    let mut v: Vec<Vec<u8>> = (0..c.layers).map(|_| rng.bytes(buffer_len(vs, c.hkv, c.n, c.dv, c.eb))).collect();
    let pos64: Vec<i64> = (0..num_sets * c.n).map(|_| rng.next_u64() as i64).collect();
    let pos32: Vec<i32> = pos64.iter().map(|&p| p as i32).collect();

    // CPU reference, head by head.
    let (mut k_ref, mut v_ref) = (k.clone(), v.clone());
    for l in 0..c.layers {
        for g in 0..c.hkv {
            let set = index[l * c.hkv + g] as usize;
            let ks_u: Vec<u32> = keep[set * c.k..(set + 1) * c.k].iter().map(|&s| s as u32).collect();
            for (buf, st, dim) in [(&mut k_ref[l], ks, c.d), (&mut v_ref[l], vs, c.dv)] {
                let (rs, row) = (st.row_stride * c.eb, dim * c.eb);
                let start = g * st.head_stride * c.eb;
                let rows = &mut buf[start..start + (c.n - 1) * rs + row];
                match mode {
                    CompactMode::OrderPreserving => compact_in_place(rows, rs, row, &ks_u).unwrap(),
                    CompactMode::HoleFilling => {
                        hole_fill_in_place(rows, rs, row, &ks_u).unwrap();
                    }
                }
            }
        }
    }
    let map_ref: Vec<i32> = keep.chunks(c.k).flat_map(|s| slot_map(mode, s)).collect();

    let mut map = vec![-7i32; num_sets * c.k];
    let (mut p64, mut p32) = (pos64.clone(), pos32.clone());
    let positions = match c.positions {
        Some(PositionType::I64) => Some(Positions::I64(&mut p64)),
        Some(PositionType::I32) => Some(Positions::I32(&mut p32)),
        None => None,
    };
    {
        let mut kk: Vec<&mut [u8]> = k.iter_mut().map(|b| &mut b[..]).collect();
        let mut vv: Vec<&mut [u8]> = v.iter_mut().map(|b| &mut b[..]).collect();
        let sets = KeepSets { keep: &keep, set_index: &index, block_table: None };
        emu::compact_in_place(&sp, &mut kk, &mut vv, &sets, Some(&mut map), positions).unwrap();
    }
    let what = format!("{c:?} {mode:?} in place");
    assert!(k == k_ref, "{what}: K differs");
    assert!(v == v_ref, "{what}: V differs");
    assert_eq!(map, map_ref, "{what}: slot map");
    for set in 0..num_sets {
        for i in 0..c.n {
            let at = set * c.n + i;
            let want = if i < c.k { pos64[set * c.n + map_ref[set * c.k + i] as usize] } else { pos64[at] };
            match c.positions {
                Some(PositionType::I64) => assert_eq!(p64[at], want, "{what}: position ({set}, {i})"),
                Some(PositionType::I32) => assert_eq!(p32[at], want as i32, "{what}: position ({set}, {i})"),
                None => assert_eq!(p64[at], pos64[at]),
            }
        }
    }
}

fn run_out_of_place(c: &Case) {
    let mut rng = Rng(c.seed * 7919);
    let (num_sets, index) = set_index(c.sets, c.layers, c.hkv);
    let keep: Vec<i32> = (0..num_sets).flat_map(|_| keep_set(&mut rng, c.n, c.k, c.keep)).collect();
    let sp = spec(c, CompactMode::OrderPreserving, CompactTarget::OutOfPlace, num_sets);
    let (ks, vs) = (strides(c, c.d, c.n), strides(c, c.dv, c.n));
    let (kd, vd) = (strides(c, c.d, c.k), strides(c, c.dv, c.k));
    let k: Vec<Vec<u8>> = (0..c.layers).map(|_| rng.bytes(buffer_len(ks, c.hkv, c.n, c.d, c.eb))).collect();
    let v: Vec<Vec<u8>> = (0..c.layers).map(|_| rng.bytes(buffer_len(vs, c.hkv, c.n, c.dv, c.eb))).collect();
    let mut k_out: Vec<Vec<u8>> = (0..c.layers).map(|_| rng.bytes(buffer_len(kd, c.hkv, c.k, c.d, c.eb))).collect();
    let mut v_out: Vec<Vec<u8>> = (0..c.layers).map(|_| rng.bytes(buffer_len(vd, c.hkv, c.k, c.dv, c.eb))).collect();
    // Reference: the untouched destination with the gathered rows placed at its strides.
    let (mut k_ref, mut v_ref) = (k_out.clone(), v_out.clone());
    for l in 0..c.layers {
        for g in 0..c.hkv {
            let set = index[l * c.hkv + g] as usize;
            let ks_u: Vec<u32> = keep[set * c.k..(set + 1) * c.k].iter().map(|&s| s as u32).collect();
            for (src, dst, st, dt, dim) in [(&k[l], &mut k_ref[l], ks, kd, c.d), (&v[l], &mut v_ref[l], vs, vd, c.dv)] {
                let (rs, row) = (st.row_stride * c.eb, dim * c.eb);
                let start = g * st.head_stride * c.eb;
                let mut dense = vec![0u8; c.k * row];
                gather_rows(&src[start..start + (c.n - 1) * rs + row], rs, row, &ks_u, &mut dense);
                for i in 0..c.k {
                    let o = (g * dt.head_stride + i * dt.row_stride) * c.eb;
                    dst[o..o + row].copy_from_slice(&dense[i * row..(i + 1) * row]);
                }
            }
        }
    }
    let pos64: Vec<i64> = (0..num_sets * c.n).map(|_| rng.next_u64() as i64).collect();
    let pos32: Vec<i32> = pos64.iter().map(|&p| p as i32).collect();
    let mut out64 = vec![-1i64; num_sets * c.k];
    let mut out32 = vec![-1i32; num_sets * c.k];
    let mut map = vec![-7i32; num_sets * c.k];
    let positions = match c.positions {
        Some(PositionType::I64) => Some((PositionsRef::I64(&pos64), Positions::I64(&mut out64))),
        Some(PositionType::I32) => Some((PositionsRef::I32(&pos32), Positions::I32(&mut out32))),
        None => None,
    };
    {
        let kk: Vec<&[u8]> = k.iter().map(|b| &b[..]).collect();
        let vv: Vec<&[u8]> = v.iter().map(|b| &b[..]).collect();
        let mut ko: Vec<&mut [u8]> = k_out.iter_mut().map(|b| &mut b[..]).collect();
        let mut vo: Vec<&mut [u8]> = v_out.iter_mut().map(|b| &mut b[..]).collect();
        let sets = KeepSets { keep: &keep, set_index: &index, block_table: None };
        let extras = CompactExtras { slot_map: Some(&mut map), positions };
        emu::compact_into(&sp, &kk, &vv, &mut ko, &mut vo, &sets, extras).unwrap();
    }
    let what = format!("{c:?} out of place");
    assert!(k_out == k_ref, "{what}: K differs");
    assert!(v_out == v_ref, "{what}: V differs");
    assert_eq!(map, keep, "{what}: slot map");
    for set in 0..num_sets {
        for i in 0..c.k {
            let want = pos64[set * c.n + keep[set * c.k + i] as usize];
            match c.positions {
                Some(PositionType::I64) => assert_eq!(out64[set * c.k + i], want, "{what}"),
                Some(PositionType::I32) => assert_eq!(out32[set * c.k + i], want as i32, "{what}"),
                None => {}
            }
        }
    }
}

#[test]
fn compact_contiguous_matches_cpu_bit_exact() {
    for c in cases() {
        run_in_place(&c, CompactMode::OrderPreserving);
        run_in_place(&c, CompactMode::HoleFilling);
        run_out_of_place(&c);
    }
}

#[test]
fn compact_paged_matches_cpu_bit_exact() {
    for (i, (order, bs, n, k, eb)) in [
        (PageOrder::Nhd, 16, 100, 37, 2),
        (PageOrder::Hnd, 16, 100, 64, 4),
        (PageOrder::Nhd, 256, 300, 299, 2),
        (PageOrder::Hnd, 32, 64, 64, 2),
        (PageOrder::Hnd, 64, 500, 1, 4),
    ]
    .into_iter()
    .enumerate()
    {
        for mode in [CompactMode::OrderPreserving, CompactMode::HoleFilling] {
            let (layers, hkv, d, dv) = (2, 3, 64, 32);
            let mut rng = Rng(i as u64 * 31 + mode as u64);
            let (num_sets, index) = set_index(SetKind::PerLayerPerHead, layers, hkv);
            let keep: Vec<i32> = (0..num_sets).flat_map(|_| keep_set(&mut rng, n, k, KeepKind::Random)).collect();
            let used = n.div_ceil(bs);
            let num_blocks = used + 3;
            let mut table: Vec<i32> = (0..num_blocks as i32).collect();
            for j in (1..num_blocks).rev() {
                let r = rng.below(j + 1);
                table.swap(j, r);
            }
            let (sp, _) = CompactSpec::tuned(
                CompactShape {
                    mode,
                    target: CompactTarget::InPlace,
                    elem_bytes: eb,
                    num_layers: layers,
                    num_kv_heads: hkv,
                    num_sets,
                    num_slots: n,
                    keep_len: k,
                    key_dim: d,
                    value_dim: dv,
                    layout: CompactLayout::Paged { block_size: bs, order, num_blocks, max_blocks: num_blocks },
                    positions: None,
                    num_seqs: 1,
                },
                &forced(mode, i),
            )
            .unwrap();
            let mut kbuf: Vec<Vec<u8>> = (0..layers).map(|_| rng.bytes(num_blocks * bs * hkv * d * eb)).collect();
            let mut vbuf: Vec<Vec<u8>> = (0..layers).map(|_| rng.bytes(num_blocks * bs * hkv * dv * eb)).collect();
            // Reference: the CPU plan applied row by row through the block table.
            let (mut k_ref, mut v_ref) = (kbuf.clone(), vbuf.clone());
            for l in 0..layers {
                for g in 0..hkv {
                    let set = index[l * hkv + g] as usize;
                    let ks: Vec<u32> = keep[set * k..(set + 1) * k].iter().map(|&s| s as u32).collect();
                    let moves: Vec<(u32, u32)> = match mode {
                        CompactMode::OrderPreserving => ks.iter().enumerate().map(|(i, &s)| (s, i as u32)).collect(),
                        CompactMode::HoleFilling => hole_filling_plan(&ks).0,
                    };
                    for (buf, dim) in [(&mut k_ref[l], d), (&mut v_ref[l], dv)] {
                        let row = dim * eb;
                        let at = |slot: u32| {
                            let (blk, r) = (table[slot as usize / bs] as usize, slot as usize % bs);
                            let within = match order {
                                PageOrder::Nhd => (r * hkv + g) * dim,
                                PageOrder::Hnd => (g * bs + r) * dim,
                            };
                            (blk * bs * hkv * dim + within) * eb
                        };
                        for &(from, to) in &moves {
                            if from != to {
                                buf.copy_within(at(from)..at(from) + row, at(to));
                            }
                        }
                    }
                }
            }
            let mut map = vec![-1i32; num_sets * k]; // poisoned (0xFF bytes): every entry must be written
            {
                let mut kk: Vec<&mut [u8]> = kbuf.iter_mut().map(|b| &mut b[..]).collect();
                let mut vv: Vec<&mut [u8]> = vbuf.iter_mut().map(|b| &mut b[..]).collect();
                let sets = KeepSets { keep: &keep, set_index: &index, block_table: Some(&table) };
                emu::compact_in_place(&sp, &mut kk, &mut vv, &sets, Some(&mut map), None).unwrap();
            }
            let what = format!("paged {order:?} bs {bs} n {n} k {k} eb {eb} {mode:?}");
            assert!(kbuf == k_ref, "{what}: K differs");
            assert!(vbuf == v_ref, "{what}: V differs");
            let map_ref: Vec<i32> = keep.chunks(k).flat_map(|s| slot_map(mode, s)).collect();
            assert_eq!(map, map_ref, "{what}: slot map");
        }
    }
}

#[test]
fn compact_has_both_modes_in_the_table() {
    let modes: Vec<CompactMode> = variant::table()
        .iter()
        .filter_map(|v| match v.kernel {
            Kernel::Compact { mode, .. } => Some(mode),
            _ => None,
        })
        .collect();
    let per_mode = COMPACT_TILES.len();
    let mut want = vec![CompactMode::OrderPreserving; per_mode];
    want.extend(vec![CompactMode::HoleFilling; per_mode]);
    assert_eq!(modes, want, "every tile of both modes");
    for mode in [CompactMode::OrderPreserving, CompactMode::HoleFilling] {
        let family = variant::compact_variant(mode).family();
        assert_eq!(variant::family_members(&family).len(), per_mode, "{family}");
    }
}

#[test]
fn compact_rejects_bad_keep_sets() {
    let c = cases()[0];
    let sp = spec(&c, CompactMode::HoleFilling, CompactTarget::InPlace, c.hkv);
    let (_, index) = set_index(c.sets, c.layers, c.hkv);
    let ks = strides(&c, c.d, c.n);
    let vs = strides(&c, c.dv, c.n);
    let mut k: Vec<Vec<u8>> = (0..c.layers).map(|_| vec![0u8; buffer_len(ks, c.hkv, c.n, c.d, c.eb)]).collect();
    let mut v: Vec<Vec<u8>> = (0..c.layers).map(|_| vec![0u8; buffer_len(vs, c.hkv, c.n, c.dv, c.eb)]).collect();
    let mut kk: Vec<&mut [u8]> = k.iter_mut().map(|b| &mut b[..]).collect();
    let mut vv: Vec<&mut [u8]> = v.iter_mut().map(|b| &mut b[..]).collect();
    let mut keep: Vec<i32> = (0..(c.hkv * c.k) as i32).map(|i| i % c.k as i32).collect();
    keep[3] = keep[2];
    let sets = KeepSets { keep: &keep, set_index: &index, block_table: None };
    assert!(emu::compact_in_place(&sp, &mut kk, &mut vv, &sets, None, None).is_err());
    let keep: Vec<i32> = (0..(c.hkv * c.k) as i32).map(|i| i % c.k as i32 + c.n as i32).collect();
    let sets = KeepSets { keep: &keep, set_index: &index, block_table: None };
    assert!(emu::compact_in_place(&sp, &mut kk, &mut vv, &sets, None, None).is_err());
}

#[test]
fn gather_kv_matches_gather_rows() {
    let (layers, hkv, n, k, d, dv, eb) = (3, 2, 90, 33, 64, 128, 2);
    let mut rng = Rng(77);
    let keep: Vec<Vec<u32>> =
        (0..hkv).map(|_| keep_set(&mut rng, n, k, KeepKind::Random).iter().map(|&s| s as u32).collect()).collect();
    let index: Vec<usize> = (0..layers * hkv).map(|i| i % hkv).collect();
    let kb: Vec<Vec<u8>> = (0..layers).map(|_| rng.bytes(hkv * n * d * eb)).collect();
    let vb: Vec<Vec<u8>> = (0..layers).map(|_| rng.bytes(hkv * n * dv * eb)).collect();
    let kk: Vec<&[u8]> = kb.iter().map(|b| &b[..]).collect();
    let vv: Vec<&[u8]> = vb.iter().map(|b| &b[..]).collect();
    let dims = emu::KvDims { elem_bytes: eb, num_kv_heads: hkv, num_slots: n, key_dim: d, value_dim: dv };
    let (ko, vo) = emu::gather_kv(dims, &kk, &vv, &keep, &index).unwrap();
    for l in 0..layers {
        for (src, out, dim) in [(&kb[l], &ko[l], d), (&vb[l], &vo[l], dv)] {
            let row = dim * eb;
            let mut want = vec![0u8; hkv * k * row];
            for g in 0..hkv {
                let set = &keep[index[l * hkv + g]];
                gather_rows(
                    &src[g * n * row..(g + 1) * n * row],
                    row,
                    row,
                    set,
                    &mut want[g * k * row..(g + 1) * k * row],
                );
            }
            assert!(out == &want, "layer {l}");
        }
    }
}

/// CPU reference of one sequence's in-place compaction of contiguous `[Hkv, N, dim]` buffers.
fn cpu_in_place_seq(c: &Case, mode: CompactMode, k: &mut [Vec<u8>], v: &mut [Vec<u8>], keep: &[i32], index: &[i32]) {
    let (ks, vs) = (strides(c, c.d, c.n), strides(c, c.dv, c.n));
    for l in 0..c.layers {
        for g in 0..c.hkv {
            let set = index[l * c.hkv + g] as usize;
            let ks_u: Vec<u32> = keep[set * c.k..(set + 1) * c.k].iter().map(|&s| s as u32).collect();
            for (buf, st, dim) in [(&mut k[l], ks, c.d), (&mut v[l], vs, c.dv)] {
                let (rs, row) = (st.row_stride * c.eb, dim * c.eb);
                let start = g * st.head_stride * c.eb;
                let rows = &mut buf[start..start + (c.n - 1) * rs + row];
                match mode {
                    CompactMode::OrderPreserving => compact_in_place(rows, rs, row, &ks_u).unwrap(),
                    CompactMode::HoleFilling => {
                        hole_fill_in_place(rows, rs, row, &ks_u).unwrap();
                    }
                }
            }
        }
    }
}

/// S = 3 sequences in one launch, in place (both modes) and out of place, contiguous: each
/// sequence equals its own CPU compaction, slot maps and positions included.
#[test]
fn compact_batched_sequences_match_cpu_per_sequence() {
    let seqs = 3;
    for c in [cases()[0], cases()[5], cases()[6], cases()[9]] {
        let (num_sets, index) = set_index(c.sets, c.layers, c.hkv);
        for mode in [CompactMode::OrderPreserving, CompactMode::HoleFilling] {
            let mut rng = Rng(c.seed * 99 + mode as u64);
            let keep: Vec<i32> = (0..seqs * num_sets).flat_map(|_| keep_set(&mut rng, c.n, c.k, c.keep)).collect();
            let base = spec(&c, mode, CompactTarget::InPlace, num_sets);
            let sp = CompactSpec::new(CompactShape { num_seqs: seqs, ..*base.shape() }).unwrap();
            assert_eq!(sp.grid().2, seqs as u32);
            assert_eq!((sp.keep_seq_stride(), sp.pos_seq_stride()), (num_sets * c.k, num_sets * c.n));
            let (ks, vs) = (strides(&c, c.d, c.n), strides(&c, c.dv, c.n));
            let mut k: Vec<Vec<u8>> =
                (0..seqs * c.layers).map(|_| rng.bytes(buffer_len(ks, c.hkv, c.n, c.d, c.eb))).collect();
            let mut v: Vec<Vec<u8>> =
                (0..seqs * c.layers).map(|_| rng.bytes(buffer_len(vs, c.hkv, c.n, c.dv, c.eb))).collect();
            let pos64: Vec<i64> = (0..seqs * num_sets * c.n).map(|_| rng.next_u64() as i64).collect();
            let (mut k_ref, mut v_ref) = (k.clone(), v.clone());
            let per = num_sets * c.k;
            for s in 0..seqs {
                let ls = s * c.layers..(s + 1) * c.layers;
                cpu_in_place_seq(
                    &c,
                    mode,
                    &mut k_ref[ls.clone()],
                    &mut v_ref[ls],
                    &keep[s * per..(s + 1) * per],
                    &index,
                );
            }
            let map_ref: Vec<i32> = keep.chunks(c.k).flat_map(|s| slot_map(mode, s)).collect();
            let mut map = vec![-7i32; seqs * per];
            let mut p64 = pos64.clone();
            let mut p32: Vec<i32> = pos64.iter().map(|&p| p as i32).collect();
            let positions = match c.positions {
                Some(PositionType::I64) => Some(Positions::I64(&mut p64)),
                Some(PositionType::I32) => Some(Positions::I32(&mut p32)),
                None => None,
            };
            {
                let mut kk: Vec<&mut [u8]> = k.iter_mut().map(|b| &mut b[..]).collect();
                let mut vv: Vec<&mut [u8]> = v.iter_mut().map(|b| &mut b[..]).collect();
                let sets = KeepSets { keep: &keep, set_index: &index, block_table: None };
                emu::compact_in_place(&sp, &mut kk, &mut vv, &sets, Some(&mut map), positions).unwrap();
            }
            let what = format!("{c:?} {mode:?} batched in place");
            assert!(k == k_ref, "{what}: K differs");
            assert!(v == v_ref, "{what}: V differs");
            assert_eq!(map, map_ref, "{what}: slot map");
            for s in 0..seqs {
                for set in 0..num_sets {
                    for i in 0..c.n {
                        let at = (s * num_sets + set) * c.n + i;
                        let row = s * num_sets + set;
                        let want = if i < c.k { pos64[row * c.n + map_ref[row * c.k + i] as usize] } else { pos64[at] };
                        match c.positions {
                            Some(PositionType::I64) => assert_eq!(p64[at], want, "{what}: position"),
                            Some(PositionType::I32) => assert_eq!(p32[at], want as i32, "{what}: position"),
                            None => {}
                        }
                    }
                }
            }
        }

        // Out of place, order-preserving.
        let mut rng = Rng(c.seed * 101);
        let keep: Vec<i32> = (0..seqs * num_sets).flat_map(|_| keep_set(&mut rng, c.n, c.k, c.keep)).collect();
        let base = spec(&c, CompactMode::OrderPreserving, CompactTarget::OutOfPlace, num_sets);
        let sp = CompactSpec::new(CompactShape { num_seqs: seqs, ..*base.shape() }).unwrap();
        assert_eq!(sp.pos_seq_stride(), num_sets * c.k);
        let (ks, vs) = (strides(&c, c.d, c.n), strides(&c, c.dv, c.n));
        let (kd, vd) = (strides(&c, c.d, c.k), strides(&c, c.dv, c.k));
        let k: Vec<Vec<u8>> = (0..seqs * c.layers).map(|_| rng.bytes(buffer_len(ks, c.hkv, c.n, c.d, c.eb))).collect();
        let v: Vec<Vec<u8>> = (0..seqs * c.layers).map(|_| rng.bytes(buffer_len(vs, c.hkv, c.n, c.dv, c.eb))).collect();
        let mut k_out: Vec<Vec<u8>> =
            (0..seqs * c.layers).map(|_| rng.bytes(buffer_len(kd, c.hkv, c.k, c.d, c.eb))).collect();
        let mut v_out: Vec<Vec<u8>> =
            (0..seqs * c.layers).map(|_| rng.bytes(buffer_len(vd, c.hkv, c.k, c.dv, c.eb))).collect();
        let (mut k_ref, mut v_ref) = (k_out.clone(), v_out.clone());
        let per = num_sets * c.k;
        for s in 0..seqs {
            for l in 0..c.layers {
                let b = s * c.layers + l;
                for g in 0..c.hkv {
                    let set = index[l * c.hkv + g] as usize;
                    let ks_u: Vec<u32> =
                        keep[s * per + set * c.k..s * per + (set + 1) * c.k].iter().map(|&x| x as u32).collect();
                    for (src, dst, st, dt, dim) in
                        [(&k[b], &mut k_ref[b], ks, kd, c.d), (&v[b], &mut v_ref[b], vs, vd, c.dv)]
                    {
                        let (rs, row) = (st.row_stride * c.eb, dim * c.eb);
                        let start = g * st.head_stride * c.eb;
                        let mut dense = vec![0u8; c.k * row];
                        gather_rows(&src[start..start + (c.n - 1) * rs + row], rs, row, &ks_u, &mut dense);
                        for i in 0..c.k {
                            let o = (g * dt.head_stride + i * dt.row_stride) * c.eb;
                            dst[o..o + row].copy_from_slice(&dense[i * row..(i + 1) * row]);
                        }
                    }
                }
            }
        }
        let pos64: Vec<i64> = (0..seqs * num_sets * c.n).map(|_| rng.next_u64() as i64).collect();
        let pos32: Vec<i32> = pos64.iter().map(|&p| p as i32).collect();
        let mut out64 = vec![-1i64; seqs * per];
        let mut out32 = vec![-1i32; seqs * per];
        let mut map = vec![-7i32; seqs * per];
        let positions = match c.positions {
            Some(PositionType::I64) => Some((PositionsRef::I64(&pos64), Positions::I64(&mut out64))),
            Some(PositionType::I32) => Some((PositionsRef::I32(&pos32), Positions::I32(&mut out32))),
            None => None,
        };
        {
            let kk: Vec<&[u8]> = k.iter().map(|b| &b[..]).collect();
            let vv: Vec<&[u8]> = v.iter().map(|b| &b[..]).collect();
            let mut ko: Vec<&mut [u8]> = k_out.iter_mut().map(|b| &mut b[..]).collect();
            let mut vo: Vec<&mut [u8]> = v_out.iter_mut().map(|b| &mut b[..]).collect();
            let sets = KeepSets { keep: &keep, set_index: &index, block_table: None };
            let extras = CompactExtras { slot_map: Some(&mut map), positions };
            emu::compact_into(&sp, &kk, &vv, &mut ko, &mut vo, &sets, extras).unwrap();
        }
        let what = format!("{c:?} batched out of place");
        assert!(k_out == k_ref, "{what}: K differs");
        assert!(v_out == v_ref, "{what}: V differs");
        assert_eq!(map, keep, "{what}: slot map");
        for row in 0..seqs * num_sets {
            for i in 0..c.k {
                let want = pos64[row * c.n + keep[row * c.k + i] as usize];
                match c.positions {
                    Some(PositionType::I64) => assert_eq!(out64[row * c.k + i], want, "{what}"),
                    Some(PositionType::I32) => assert_eq!(out32[row * c.k + i], want as i32, "{what}"),
                    None => {}
                }
            }
        }
    }
}

/// S = 3 paged sequences sharing the pools (distinct blocks per sequence) in one launch.
#[test]
fn compact_batched_paged_matches_cpu_per_sequence() {
    let (seqs, layers, hkv, d, dv) = (3, 2, 3, 64, 32);
    for (i, (order, bs, n, k, eb)) in
        [(PageOrder::Nhd, 16, 100, 37, 2), (PageOrder::Hnd, 32, 64, 40, 4)].into_iter().enumerate()
    {
        for mode in [CompactMode::OrderPreserving, CompactMode::HoleFilling] {
            let mut rng = Rng(i as u64 * 57 + mode as u64);
            let (num_sets, index) = set_index(SetKind::PerHead, layers, hkv);
            let keep: Vec<i32> =
                (0..seqs * num_sets).flat_map(|_| keep_set(&mut rng, n, k, KeepKind::Random)).collect();
            let max_blocks = n.div_ceil(bs) + 1;
            let num_blocks = seqs * max_blocks + 2;
            let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
            for j in (1..num_blocks).rev() {
                let r = rng.below(j + 1);
                pool.swap(j, r);
            }
            let table: Vec<i32> = pool[..seqs * max_blocks].to_vec();
            let (sp, _) = CompactSpec::tuned(
                CompactShape {
                    mode,
                    target: CompactTarget::InPlace,
                    elem_bytes: eb,
                    num_layers: layers,
                    num_kv_heads: hkv,
                    num_sets,
                    num_slots: n,
                    keep_len: k,
                    key_dim: d,
                    value_dim: dv,
                    layout: CompactLayout::Paged { block_size: bs, order, num_blocks, max_blocks },
                    positions: None,
                    num_seqs: seqs,
                },
                &forced(mode, i + 1),
            )
            .unwrap();
            let mut kbuf: Vec<Vec<u8>> = (0..layers).map(|_| rng.bytes(num_blocks * bs * hkv * d * eb)).collect();
            let mut vbuf: Vec<Vec<u8>> = (0..layers).map(|_| rng.bytes(num_blocks * bs * hkv * dv * eb)).collect();
            let (mut k_ref, mut v_ref) = (kbuf.clone(), vbuf.clone());
            let per = num_sets * k;
            for s in 0..seqs {
                let tab = &table[s * max_blocks..(s + 1) * max_blocks];
                for l in 0..layers {
                    for g in 0..hkv {
                        let set = index[l * hkv + g] as usize;
                        let ks: Vec<u32> =
                            keep[s * per + set * k..s * per + (set + 1) * k].iter().map(|&x| x as u32).collect();
                        let moves: Vec<(u32, u32)> = match mode {
                            CompactMode::OrderPreserving => {
                                ks.iter().enumerate().map(|(i, &x)| (x, i as u32)).collect()
                            }
                            CompactMode::HoleFilling => hole_filling_plan(&ks).0,
                        };
                        for (buf, dim) in [(&mut k_ref[l], d), (&mut v_ref[l], dv)] {
                            let row = dim * eb;
                            let at = |slot: u32| {
                                let (blk, r) = (tab[slot as usize / bs] as usize, slot as usize % bs);
                                let within = match order {
                                    PageOrder::Nhd => (r * hkv + g) * dim,
                                    PageOrder::Hnd => (g * bs + r) * dim,
                                };
                                (blk * bs * hkv * dim + within) * eb
                            };
                            for &(from, to) in &moves {
                                if from != to {
                                    buf.copy_within(at(from)..at(from) + row, at(to));
                                }
                            }
                        }
                    }
                }
            }
            let mut map = vec![-1i32; seqs * per]; // poisoned (0xFF bytes): every entry must be written
            {
                let mut kk: Vec<&mut [u8]> = kbuf.iter_mut().map(|b| &mut b[..]).collect();
                let mut vv: Vec<&mut [u8]> = vbuf.iter_mut().map(|b| &mut b[..]).collect();
                let sets = KeepSets { keep: &keep, set_index: &index, block_table: Some(&table) };
                emu::compact_in_place(&sp, &mut kk, &mut vv, &sets, Some(&mut map), None).unwrap();
            }
            let what = format!("batched paged {order:?} bs {bs} n {n} k {k} {mode:?}");
            assert!(kbuf == k_ref, "{what}: K differs");
            assert!(vbuf == v_ref, "{what}: V differs");
            let map_ref: Vec<i32> = keep.chunks(k).flat_map(|s| slot_map(mode, s)).collect();
            assert_eq!(map, map_ref, "{what}: slot map");
        }
    }
}

/// On a GPU a misaligned 16-byte row access or 8-byte position access is a sticky fault; the emu
/// fails the launch the same way, naming the address (the raw launch path checks no alignment).
#[test]
fn misaligned_bases_fail_the_launch() {
    use triattn::kernels::CompactAddresses;
    let (layers, hkv, n, k, d, eb) = (1, 2, 64, 48, 64, 2);
    let st = RowStrides { head_stride: n * d, row_stride: d };
    let sp = CompactSpec::new(CompactShape {
        mode: CompactMode::HoleFilling,
        target: CompactTarget::InPlace,
        elem_bytes: eb,
        num_layers: layers,
        num_kv_heads: hkv,
        num_sets: hkv,
        num_slots: n,
        keep_len: k,
        key_dim: d,
        value_dim: d,
        layout: CompactLayout::Contiguous { k: st, v: st, k_dst: st, v_dst: st },
        positions: Some(PositionType::I64),
        num_seqs: 1,
    })
    .unwrap();
    let mut rng = Rng(3);
    let keep: Vec<i32> = (0..hkv).flat_map(|_| random_keep_set(&mut rng, n, k)).collect();
    let index: Vec<i32> = (0..(layers * hkv) as i32).collect();
    // u128 buffers are 16-byte aligned; one spare unit lets a base move off the alignment.
    let units = hkv * n * d * eb / 16 + 1;
    let (mut kb, mut vb) = (vec![0u128; units], vec![0u128; units]);
    let mut pos = vec![0u64; hkv * n + 1];
    let run = |k_off: u64, pos_off: u64, kb: &mut Vec<u128>, vb: &mut Vec<u128>, pos: &mut Vec<u64>| {
        let k_table = [kb.as_mut_ptr() as u64 + k_off];
        let v_table = [vb.as_mut_ptr() as u64];
        let p = pos.as_mut_ptr() as u64 + pos_off;
        let at = CompactAddresses {
            k_src: k_table.as_ptr() as u64,
            k_dst: k_table.as_ptr() as u64,
            v_src: v_table.as_ptr() as u64,
            v_dst: v_table.as_ptr() as u64,
            keep: keep.as_ptr() as u64,
            set_index: index.as_ptr() as u64,
            block_table: 0,
            slot_map: 0,
            pos_src: p,
            pos_dst: p,
        };
        // SAFETY: every buffer holds the spec's rows and positions from its (possibly moved)
        // base, the spare unit covering the move; keep sets ascending in 0..n, set indices < sets;
        // the tables and buffers outlive the synchronous launch.
        unsafe { emu::launch_compact(&sp, &at) }
    };
    run(0, 0, &mut kb, &mut vb, &mut pos).expect("aligned bases");
    let err = run(8, 0, &mut kb, &mut vb, &mut pos).expect_err("a K base 8 bytes off must fail");
    let msg = err.to_string();
    assert_eq!(err.kind(), triattn::ErrorKind::Driver, "{msg}");
    assert!(msg.contains("misaligned 16-byte access at 0x") && msg.contains("compact"), "{msg}");
    let err = run(0, 4, &mut kb, &mut vb, &mut pos).expect_err("positions 4 bytes off must fail");
    assert!(err.to_string().contains("misaligned 8-byte access"), "{err}");
    println!("emu: {msg}");
}
