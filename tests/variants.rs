//! The variant table is the single source of truth: the emu build compiled exactly its rows, the
//! CUDA build has a ptxas record for every row on every arch, with no spills, and the max-mode
//! kernels run on tensor cores (HMMA in SASS when cuobjdump was available to build.rs).

use triattn::variant::{self, kernel_report};

#[test]
fn report_lists_every_variant_with_the_contract_fields() {
    let table = variant::table();
    let report = kernel_report();
    for v in &table {
        assert!(report.iter().any(|r| r.symbol == v.symbol()), "{} missing from the report", v.symbol());
    }
    for r in &report {
        let line = r.to_json_line();
        for field in ["symbol", "op", "arch", "registers", "shared_bytes", "spill_bytes"] {
            assert!(line.contains(&format!("\"{field}\":")), "{line}");
        }
        assert!(line.starts_with('{') && line.ends_with('}') && !line.contains('\n'));
    }
    let text = variant::kernel_table(&report);
    assert_eq!(text.lines().count(), report.len() + 1);
}

#[cfg(feature = "emu")]
#[test]
fn emu_build_compiled_exactly_the_table() {
    let table: Vec<String> = variant::table().iter().map(|v| v.symbol()).collect();
    assert_eq!(triattn::emu::compiled_symbols(), table);
}

#[cfg(feature = "emu")]
#[test]
fn shared_memory_formula_matches_the_kernel_source() {
    for v in variant::table() {
        for vectors in 1..=variant::MAX_VECTORS {
            assert_eq!(
                v.dynamic_smem_bytes(vectors),
                triattn::emu::kernel_dynamic_smem_bytes(v, vectors),
                "{} at {vectors} vectors",
                v.symbol()
            );
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_build_has_every_variant_on_every_arch_without_spills() {
    use triattn::variant::{Kernel, ScoreAlgo};
    let report = kernel_report();
    if report.iter().all(|r| r.arch == "none") {
        eprintln!("SKIP cuda_build_has_every_variant_on_every_arch_without_spills: built with TRIATTN_NO_NVCC");
        return;
    }
    let mut archs: Vec<&str> = report.iter().map(|r| r.arch.as_str()).collect();
    archs.sort_unstable();
    archs.dedup();
    for v in variant::table() {
        for arch in &archs {
            let r = report
                .iter()
                .find(|r| r.symbol == v.symbol() && r.arch == *arch)
                .unwrap_or_else(|| panic!("{} not compiled for {arch}", v.symbol()));
            assert_eq!(r.spill_bytes, Some(0), "{} spills on {arch}", r.symbol);
            if let (Kernel::Score { algo: ScoreAlgo::Max, .. }, Some(hmma)) = (v.kernel, r.hmma) {
                assert!(hmma > 0, "{} on {arch} has no HMMA instructions", r.symbol);
            }
        }
    }
}
