//! Sparse decode attention on the emu backend (cuda/decode/*.cuh through `Backend::Emu.decode`)
//! against an f64 evaluation of the formula in `src/decode.rs`: every variant (dtype x
//! head_dim), every list layout with ragged and empty lists, sinks, soft-capping, T > 1 and GQA
//! groups up to 8 (query rows in several blocks), `Dv != D`, one split vs many, paged (NHD, HND)
//! vs contiguous, a batch vs each sequence alone, and a subset of layers.
#![cfg(feature = "emu")]

use half::{bf16, f16};
use triattn::cuda::{
    CacheLayout, DecodeInputs, DecodePlan, DecodeShape, DecodeSpec, HostDecode, ListLengths, PageOrder, SplitPolicy,
};
use triattn::decode::{DecodeOptions, ListLayout};
use triattn::tuning::Dispatch;
use triattn::{Backend, DType, Element};

use crate::decode_problem::{Problem, LSE_TOL, O_TOL};

fn check<T: Element>(what: &str, p: &Problem<T>, splits: SplitPolicy) -> HostDecode {
    crate::decode_problem::check(what, &Backend::Emu, p, splits)
}

/// Every variant of the 16-bit head_dim 64 and 128 families (the tuning candidates), forced
/// through the planning path: one block of rows, rows over several blocks, and splits.
#[test]
fn every_candidate_of_a_decode_family_matches_the_formula() {
    for d in [64, 128] {
        for dtype in [DType::F16, DType::Bf16] {
            let family = triattn::kernels::variant::decode_variant(dtype, d).unwrap().family();
            let members = triattn::kernels::variant::family_members(&family);
            assert_eq!(members.len(), 3, "{family}: the built-in variant and two candidates");
            for v in members {
                let forced = Dispatch::forcing(&[v]);
                let what = v.symbol();
                if dtype == DType::F16 {
                    let p = Problem::<f16>::random(d as u64 + 3, 1, 1, 4, 2, d, 64, 1, 300)
                        .with_lists(ListLayout::PerKvHead, 290, 9)
                        .with_dispatch(forced.clone());
                    check(&format!("{what} G 2"), &p, SplitPolicy::Fixed(1));
                    let p = Problem::<f16>::random(d as u64 + 4, 1, 1, 12, 1, d, 96, 1, 300)
                        .with_lists(ListLayout::Shared, 290, 3)
                        .with_sinks(2)
                        .with_dispatch(forced);
                    check(&format!("{what} G 12 split"), &p, SplitPolicy::Fixed(2));
                } else {
                    let p = Problem::<bf16>::random(d as u64 + 5, 1, 1, 8, 2, d, d, 1, 300)
                        .with_lists(ListLayout::PerKvHead, 290, 9)
                        .with_dispatch(forced.clone());
                    check(&format!("{what} G 4"), &p, SplitPolicy::Fixed(1));
                    let p = Problem::<bf16>::random(d as u64 + 6, 1, 1, 6, 1, d, d, 2, 300).with_dispatch(forced);
                    check(&format!("{what} G 6 T 2 dense split"), &p, SplitPolicy::Fixed(3));
                }
            }
        }
    }
}

#[test]
fn every_variant_matches_the_formula() {
    for d in triattn::kernels::variant::HEAD_DIMS {
        let p = Problem::<f32>::random(d as u64, 1, 1, 4, 2, d, 64, 1, 150).with_lists(ListLayout::PerKvHead, 130, 9);
        check(&format!("f32 d{d}"), &p, SplitPolicy::Fixed(1));
        let p =
            Problem::<f16>::random(d as u64 + 1, 1, 1, 4, 2, d, 64, 1, 150).with_lists(ListLayout::PerKvHead, 130, 9);
        check(&format!("f16 d{d}"), &p, SplitPolicy::Fixed(1));
        let p =
            Problem::<bf16>::random(d as u64 + 2, 1, 1, 4, 2, d, 64, 1, 150).with_lists(ListLayout::PerKvHead, 130, 9);
        check(&format!("bf16 d{d}"), &p, SplitPolicy::Fixed(1));
    }
}

#[test]
fn list_layouts_ragged_and_empty_lists_sinks_and_softcap() {
    for (i, layout) in [ListLayout::Dense, ListLayout::Shared, ListLayout::PerKvHead, ListLayout::PerLayerKvHead]
        .into_iter()
        .enumerate()
    {
        let base = Problem::<bf16>::random(40 + i as u64, 2, 3, 8, 4, 128, 128, 1, 300);
        let p = if layout == ListLayout::Dense { base } else { base.with_lists(layout, 280, 7 + i as u64) };
        check(&format!("{layout:?}"), &p, SplitPolicy::Fixed(1));
        let p = p.with_sinks(3);
        check(&format!("{layout:?} sinks"), &p, SplitPolicy::Fixed(1));
        check(&format!("{layout:?} sinks split"), &p, SplitPolicy::Fixed(3));
        let p = Problem { options: DecodeOptions { scale: Some(0.3), softcap: Some(5.0) }, ..p };
        check(&format!("{layout:?} softcap"), &p, SplitPolicy::Fixed(2));
    }
}

/// G * T above one block's 8 rows (G = 8, T = 3: 24 rows in 3 blocks), MHA (G = 1), Dv != D.
#[test]
fn query_rows_in_several_blocks_mha_and_value_dims() {
    let p = Problem::<f16>::random(5, 1, 2, 16, 2, 64, 64, 3, 200).with_lists(ListLayout::Shared, 150, 2).with_sinks(8);
    check("G 8 T 3", &p, SplitPolicy::Fixed(2));
    let p = Problem::<bf16>::random(6, 1, 1, 4, 4, 128, 128, 2, 180).with_lists(ListLayout::PerKvHead, 170, 4);
    check("MHA T 2", &p, SplitPolicy::Fixed(1));
    for dv in [32, 96, 256] {
        let p = Problem::<bf16>::random(7, 1, 1, 8, 2, 128, dv, 1, 160).with_lists(ListLayout::PerKvHead, 150, 5);
        check(&format!("Dv {dv}"), &p, SplitPolicy::Fixed(2));
    }
    let p = Problem::<f32>::random(8, 1, 1, 8, 2, 64, 256, 1, 160);
    check("f32 Dv 256 dense", &p, SplitPolicy::Fixed(3));
}

/// The split count changes the result only within f32 rounding; every split count is
/// deterministic run after run; the automatic policy splits a small batch.
#[test]
fn splits_agree_and_are_deterministic() {
    let p = Problem::<bf16>::random(11, 1, 1, 8, 2, 128, 128, 1, 2100).with_lists(ListLayout::PerKvHead, 2048, 3);
    let one = check("1 split", &p, SplitPolicy::Fixed(1));
    for n in [2, 5, 16] {
        let many = check(&format!("{n} splits"), &p, SplitPolicy::Fixed(n));
        let vmax = p.v.iter().flatten().map(|x| x.to_f32().abs()).fold(0f32, f32::max);
        let worst = one.out.iter().zip(&many.out).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * vmax, "{n} splits vs 1: {worst:e}");
        let again = p.run(&Backend::Emu, SplitPolicy::Fixed(n), 0, 1);
        assert!(again.out == many.out && again.lse == many.lse, "{n} splits: not bit-identical run after run");
    }
    let spec = DecodeSpec::new(p.shape(SplitPolicy::Auto { sm_count: 132 }, p.contiguous())).unwrap();
    assert!(spec.splits() > 1 && spec.combine_variant().is_some(), "batch 1, a long list: {} splits", spec.splits());
    let big = Problem { s: 132, ..p.clone() };
    let spec = DecodeSpec::new(big.shape(SplitPolicy::Auto { sm_count: 132 }, big.contiguous())).unwrap();
    assert_eq!(spec.splits(), 1, "132 sequences x 2 KV heads fill two waves of 132 SMs without splitting");
}

/// A batch equals each sequence alone (bit for bit), and a range of layers equals those layers
/// of a whole decode.
#[test]
fn batches_and_layer_ranges_equal_their_parts() {
    let p = Problem::<bf16>::random(21, 3, 2, 8, 2, 64, 64, 1, 260)
        .with_lists(ListLayout::PerLayerKvHead, 250, 6)
        .with_sinks(4);
    let all = check("batch", &p, SplitPolicy::Fixed(2));
    let per_seq = p.h * p.t;
    for s in 0..p.s {
        let alone = Problem {
            s: 1,
            k: p.k[s * p.l..(s + 1) * p.l].to_vec(),
            v: p.v[s * p.l..(s + 1) * p.l].to_vec(),
            q: p.q[s * p.l * per_seq * p.d..(s + 1) * p.l * per_seq * p.d].to_vec(),
            lists: vec![p.lists[s].clone()],
            ..p.clone()
        };
        let got = alone.run(&Backend::Emu, SplitPolicy::Fixed(2), 0, p.l);
        let rows = p.l * per_seq;
        assert_eq!(got.out, all.out[s * rows * p.dv..(s + 1) * rows * p.dv], "sequence {s}: o");
        assert_eq!(got.lse, all.lse[s * rows..(s + 1) * rows], "sequence {s}: lse");
    }
    let one_layer = p.run(&Backend::Emu, SplitPolicy::Fixed(2), 1, 1);
    let (o_err, lse_err) = p.errors(&one_layer, 1, 1);
    assert!(o_err <= O_TOL && lse_err <= LSE_TOL, "layer 1 alone: {o_err:.2e} {lse_err:.2e}");
    for s in 0..p.s {
        let rows = per_seq;
        let from = (s * p.l + 1) * rows;
        assert_eq!(one_layer.lse[s * rows..(s + 1) * rows], all.lse[from..from + rows], "sequence {s}: layer 1 lse");
    }
}

/// Paged pools (NHD and HND) give the same bits as contiguous tensors.
#[test]
fn paged_caches_equal_contiguous() {
    let p = Problem::<f16>::random(31, 2, 2, 8, 2, 128, 64, 1, 200).with_lists(ListLayout::PerKvHead, 180, 2);
    let want = p.run(&Backend::Emu, SplitPolicy::Fixed(2), 0, p.l);
    let block = 16;
    let blocks_per_seq = p.n.div_ceil(block);
    let num_blocks = p.s * blocks_per_seq + 3;
    // Sequence s uses blocks in a shuffled order.
    let used = p.s * blocks_per_seq; // coprime with 7: a permutation of 0..used, shifted by 2
    let table: Vec<i32> =
        (0..p.s).flat_map(|s| (0..blocks_per_seq).map(move |b| (((b * p.s + s) * 7) % used + 2) as i32)).collect();
    let mut seen = table.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), table.len(), "distinct blocks");
    for order in [PageOrder::Nhd, PageOrder::Hnd] {
        let pool = |src: &[Vec<f16>], dim: usize| -> Vec<Vec<f16>> {
            (0..p.l)
                .map(|l| {
                    let mut out = vec![f16::from_f32(f32::NAN); num_blocks * block * p.hkv * dim];
                    for s in 0..p.s {
                        for g in 0..p.hkv {
                            for n in 0..p.n {
                                let blk = table[s * blocks_per_seq + n / block] as usize;
                                let row = match order {
                                    PageOrder::Nhd => ((blk * block + n % block) * p.hkv + g) * dim,
                                    PageOrder::Hnd => ((blk * p.hkv + g) * block + n % block) * dim,
                                };
                                out[row..row + dim].copy_from_slice(&src[s * p.l + l][(g * p.n + n) * dim..][..dim]);
                            }
                        }
                    }
                    out
                })
                .collect()
        };
        let (kp, vp) = (pool(&p.k, p.d), pool(&p.v, p.dv));
        let layout = CacheLayout::Paged { block_size: block, order, num_blocks, max_blocks: blocks_per_seq };
        let plan = DecodePlan::new(p.shape(SplitPolicy::Fixed(2), layout)).unwrap();
        let (flat, lens) = p.flat_lists();
        let k: Vec<&[f16]> = kp.iter().map(Vec::as_slice).collect();
        let v: Vec<&[f16]> = vp.iter().map(Vec::as_slice).collect();
        let inputs = DecodeInputs {
            keys: &k,
            values: &v,
            queries: &p.q,
            sinks: None,
            lists: Some(&flat),
            list_lens: Some(&lens),
            seq_lens: None,
            block_table: Some(&table),
        };
        let got = Backend::Emu.decode(&plan, &inputs, 0, p.l).unwrap();
        assert!(got.out == want.out && got.lse == want.lse, "{order:?}: paged differs from contiguous");
    }
}

/// Bad inputs are refused by name before any launch.
#[test]
fn bad_inputs_are_refused_by_name() {
    let p = Problem::<bf16>::random(51, 1, 1, 4, 2, 64, 64, 1, 100).with_lists(ListLayout::PerKvHead, 50, 1);
    let shape = p.shape(SplitPolicy::Fixed(1), p.contiguous());
    let e = DecodeSpec::new(DecodeShape { num_heads: 5, ..shape }).unwrap_err().to_string();
    assert!(e.contains("attention heads"), "{e}");
    let e = DecodeSpec::new(DecodeShape { head_dim: 48, ..shape }).unwrap_err().to_string();
    assert!(e.contains("head_dim 48"), "{e}");
    let e = DecodeSpec::new(DecodeShape { value_dim: 300, ..shape }).unwrap_err().to_string();
    assert!(e.contains("value dim 300"), "{e}");
    let bad = DecodeOptions { scale: Some(-1.0), softcap: None };
    let e = DecodeSpec::new(DecodeShape { options: bad, ..shape }).unwrap_err().to_string();
    assert!(e.contains("scale"), "{e}");
    let plan = DecodePlan::new(shape).unwrap();
    let (mut flat, lens) = p.flat_lists();
    flat[3] = 100;
    let k: Vec<&[bf16]> = p.k.iter().map(Vec::as_slice).collect();
    let v: Vec<&[bf16]> = p.v.iter().map(Vec::as_slice).collect();
    let inputs = DecodeInputs {
        keys: &k,
        values: &v,
        queries: &p.q,
        sinks: None,
        lists: Some(&flat),
        list_lens: Some(&lens),
        seq_lens: None,
        block_table: None,
    };
    let e = Backend::Emu.decode(&plan, &inputs, 0, 1).unwrap_err().to_string();
    assert!(e.contains("list 0 entry 3") && e.contains("0..100"), "{e}");
    let short = &p.q[1..];
    let e = Backend::Emu.decode(&plan, &DecodeInputs { queries: short, ..inputs }, 0, 1).unwrap_err().to_string();
    assert!(e.contains("queries"), "{e}");
    let e = Backend::Emu.decode(&plan, &inputs, 1, 1).unwrap_err().to_string();
    assert!(e.contains("decode layers") && e.contains("1..2"), "layers are checked first: {e}");
}

/// A round that ends with keep sets, then a decode that reads them where the round left them
/// (its workspace), both launched on emu over host memory with no copy in between; the decode
/// through the lists equals a dense decode of the cache compacted by them, bit for bit.
#[test]
fn a_round_then_a_decode_read_the_keep_sets_in_place() {
    use crate::common::Aligned;
    use triattn::cuda::{DecodeCache, DecodeRun, RoundAddresses, RoundPlan, RoundShape};
    use triattn::kernels::emu::EmuLauncher;
    use triattn::round::Scorer;
    use triattn::{CompressionConfig, SelectionMode};

    let (l, h, hkv, d, n, budget) = (2, 8, 2, 64, 160, 96);
    let scorer =
        Scorer::new(crate::common::model(l, h, hkv, d), crate::common::random_stats(l, h, d, 5), None).unwrap();
    let p = Problem::<bf16>::random(61, 1, l, h, hkv, d, d, 1, n);
    for mode in [SelectionMode::PerHead, SelectionMode::PerLayerPerHead, SelectionMode::Union] {
        let config = CompressionConfig { budget, divide_length: 32, mode, ..CompressionConfig::default() };
        let round = RoundPlan::new(&scorer, &config, RoundShape::dense(DType::Bf16, n, 8, d, d, n)).unwrap();
        let k: Vec<Aligned> = p.k.iter().map(|t| Aligned::of(t)).collect();
        let v: Vec<Aligned> = p.v.iter().map(|t| Aligned::of(t)).collect();
        let k_addr: Vec<u64> = k.iter().map(|a| a.addr() as u64).collect();
        let v_addr: Vec<u64> = v.iter().map(|a| a.addr() as u64).collect();
        let cache = triattn::cuda::CacheAddresses { keys: k_addr.clone(), ..Default::default() };
        let round_ws = Aligned::new(round.workspace_bytes());
        let image = round.workspace_image(&cache).unwrap();
        // SAFETY: the workspace holds workspace_bytes >= image.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), round_ws.ptr, image.len()) };
        let round_start = Aligned::of(&[5000i64]);
        let at = RoundAddresses::bound(round_ws.addr() as u64, round_start.addr() as u64, &cache);
        // SAFETY: every address is live host memory of the planned shape.
        unsafe { round.run(&mut EmuLauncher::default(), &at) }.unwrap();

        let kept = round.kept();
        let shape = DecodeShape {
            lists: ListLayout::of_selection(mode),
            list_capacity: kept,
            list_lengths: ListLengths::Full,
            ..p.shape(SplitPolicy::Fixed(1), p.contiguous())
        };
        let decode = DecodePlan::new(shape).unwrap();
        let dcache = DecodeCache {
            keys: k_addr,
            values: v_addr,
            lists: round_ws.addr() as u64 + round.layout().keep.offset as u64,
            ..Default::default()
        };
        let ws = Aligned::new(decode.workspace_bytes());
        let image = decode.workspace_image(&dcache).unwrap();
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), ws.ptr, image.len()) };
        let q = Aligned::of(&p.q);
        let rows = l * h;
        let (out, lse) = (Aligned::new(rows * d * 4), Aligned::new(rows * 4));
        let run = DecodeRun {
            workspace: ws.addr() as u64,
            queries: q.addr() as u64,
            out: out.addr() as u64,
            lse: lse.addr() as u64,
            first_layer: 0,
            layers: l,
        };
        // SAFETY: the lists are the round's keep sets (slots in 0..n), every buffer live.
        unsafe { decode.run(&mut EmuLauncher::default(), &dcache, &run) }.unwrap();
        let (got_o, got_lse): (Vec<f32>, Vec<f32>) = (out.read(0, rows * d), lse.read(0, rows));

        // The same keep sets read back, the cache compacted by them, a dense decode of it.
        let sets: Vec<Vec<i32>> = round_ws
            .read::<i32>(round.layout().keep.offset, round.sets() * kept)
            .chunks(kept)
            .map(<[i32]>::to_vec)
            .collect();
        let compact = |src: &[Vec<bf16>], dim: usize| -> Vec<Vec<bf16>> {
            (0..l)
                .map(|layer| {
                    (0..hkv)
                        .flat_map(|g| {
                            let set = &sets[mode.set_index(layer, g, hkv)];
                            set.iter()
                                .flat_map(move |&j| src[layer][(g * n + j as usize) * dim..][..dim].iter().copied())
                        })
                        .collect()
                })
                .collect()
        };
        let dense = Problem { n: kept, k: compact(&p.k, d), v: compact(&p.v, d), ..p.clone() };
        let want = dense.run(&Backend::Emu, SplitPolicy::Fixed(1), 0, l);
        assert!(got_o == want.out && got_lse == want.lse, "{mode:?}: lists from the round vs the compacted cache");
    }
}

/// The emu kernels against the CPU backend (the specification): within f32 rounding.
#[test]
fn emu_matches_the_cpu_backend() {
    use triattn::cpu::decode::{decode, SlotLists};
    use triattn::LayerView;
    let p = Problem::<bf16>::random(71, 1, 2, 16, 2, 128, 64, 2, 400)
        .with_lists(ListLayout::PerLayerKvHead, 300, 8)
        .with_sinks(6);
    let emu = p.run(&Backend::Emu, SplitPolicy::Fixed(3), 0, p.l);
    let lists = SlotLists::new(
        p.layout,
        p.lists[0].iter().map(|l| l.iter().map(|&s| s as u32).collect()).collect(),
        p.l,
        p.hkv,
        p.n,
    )
    .unwrap();
    let k: Vec<LayerView<'_, bf16>> =
        p.k.iter().map(|t| LayerView::contiguous("k", t, p.hkv, p.n, p.d).unwrap()).collect();
    let v: Vec<LayerView<'_, bf16>> =
        p.v.iter().map(|t| LayerView::contiguous("v", t, p.hkv, p.n, p.dv).unwrap()).collect();
    let per_layer = p.h * p.t * p.d;
    let q: Vec<&[f32]> = (0..p.l).map(|l| &p.q[l * per_layer..(l + 1) * per_layer]).collect();
    let sinks = p.sinks.as_ref().unwrap();
    let s: Vec<&[f32]> = (0..p.l).map(|l| &sinks[l * p.h..(l + 1) * p.h]).collect();
    let cpu = decode(&q, p.t, &k, &v, &lists, Some(&s), &p.options).unwrap();
    let cpu_o: Vec<f32> = cpu.iter().flat_map(|x| x.o.iter().copied()).collect();
    let cpu_lse: Vec<f32> = cpu.iter().flat_map(|x| x.lse.iter().copied()).collect();
    let vmax = p.v.iter().flatten().map(|x| x.to_f32().abs()).fold(0f32, f32::max);
    let o_err = emu.out.iter().zip(&cpu_o).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / vmax;
    let lse_err = emu
        .lse
        .iter()
        .zip(&cpu_lse)
        .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / (1.0 + b.abs()) })
        .fold(0f32, f32::max);
    assert!(o_err < 2e-6 && lse_err < 2e-6, "emu vs cpu: o {o_err:.2e} of max|v|, lse {lse_err:.2e}");
}
