//! Sparse decode attention on a real GPU against the formula in f64 and against emu: every
//! variant, list layouts with sinks and soft-capping, splits, a batch of Qwen3-like heads (o
//! within 2e-5 of max |v|, lse within 2e-5 of 1 + |lse|; the device contracts multiply-adds, so
//! emu and GPU agree within f32 rounding, not bit for bit). Skips loudly without a GPU.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use half::{bf16, f16};
use triattn::cuda::SplitPolicy;
use triattn::decode::{DecodeOptions, ListLayout};
use triattn::tuning::Dispatch;
use triattn::Backend;

use crate::common::gpu_or_skip;
use crate::decode_problem::{check, qwen_like, Problem};

fn gpu(test: &str) -> Option<Backend> {
    gpu_or_skip(test)?;
    Some(Backend::Cuda(Arc::new(triattn::cuda::CudaDevice::open(0).unwrap())))
}

#[test]
fn cuda_decode_matches_the_formula() {
    let Some(gpu) = gpu("cuda_decode_matches_the_formula") else { return };
    for d in triattn::kernels::variant::HEAD_DIMS {
        let p = Problem::<f32>::random(d as u64, 1, 1, 4, 2, d, 64, 1, 150).with_lists(ListLayout::PerKvHead, 130, 9);
        check(&format!("f32 d{d}"), &gpu, &p, SplitPolicy::Fixed(1));
        let p = Problem::<f16>::random(d as u64 + 1, 1, 1, 4, 2, d, 64, 1, 150).with_lists(ListLayout::Shared, 130, 9);
        check(&format!("f16 d{d}"), &gpu, &p, SplitPolicy::Fixed(2));
        let p = Problem::<bf16>::random(d as u64 + 2, 1, 1, 4, 2, d, 64, 1, 150);
        check(&format!("bf16 d{d} dense"), &gpu, &p, SplitPolicy::Fixed(1));
        println!("parity decode d{d}: f32, f16, bf16 within tolerance");
    }
    for layout in [ListLayout::Dense, ListLayout::Shared, ListLayout::PerKvHead, ListLayout::PerLayerKvHead] {
        let base = Problem::<bf16>::random(40, 2, 3, 8, 4, 128, 128, 2, 300);
        let p = if layout == ListLayout::Dense { base } else { base.with_lists(layout, 280, 7) }.with_sinks(3);
        check(&format!("{layout:?} sinks"), &gpu, &p, SplitPolicy::Fixed(3));
        let p = Problem { options: DecodeOptions { scale: Some(0.3), softcap: Some(5.0) }, ..p };
        check(&format!("{layout:?} softcap"), &gpu, &p, SplitPolicy::Auto { sm_count: 132 });
        println!("parity decode {layout:?}: sinks, softcap, splits within tolerance");
    }
    // Every tuning candidate of the 16-bit families, forced through the planning path.
    for d in [64, 128] {
        let family = triattn::kernels::variant::decode_variant(triattn::DType::Bf16, d).unwrap().family();
        for v in triattn::kernels::variant::family_members(&family) {
            let p = Problem::<bf16>::random(d as u64 + 9, 1, 1, 12, 2, d, d, 1, 400)
                .with_lists(ListLayout::PerKvHead, 390, 4)
                .with_sinks(1)
                .with_dispatch(Dispatch::forcing(&[v]));
            check(&v.symbol(), &gpu, &p, SplitPolicy::Fixed(2));
            println!("parity decode {}: within tolerance", v.symbol());
        }
    }
    let p = qwen_like(5).with_sinks(2);
    let cuda = check("Qwen3-like", &gpu, &p, SplitPolicy::Auto { sm_count: 132 });
    let emu_like = check("Qwen3-like one split", &gpu, &p, SplitPolicy::Fixed(1));
    let vmax = p.v.iter().flatten().map(|x| x.to_f32().abs()).fold(0f32, f32::max);
    let worst = cuda.out.iter().zip(&emu_like.out).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("parity decode Qwen3-like: auto splits vs one split {:.2e} of max|v|", worst / vmax);
}
