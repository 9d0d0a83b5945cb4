//! The variant table is the single source of truth: the emu build compiled exactly its rows,
//! `triattn kernels --json` lists every row on every arch the build compiled, the CUDA build
//! compiled the archs `TRIATTN_CUDA_ARCHS` asks for with a ptxas record for every row on each,
//! with no spills, and the max-mode kernels run on tensor cores (HMMA in the SASS, which
//! build.rs must have inspected).

use crate::common;

use std::collections::BTreeSet;

use serde_json::Value;
use triattn::kernels::variant;

/// The archs `TRIATTN_CUDA_ARCHS` asks for, parsed as build.rs documents it (`;` or `,`
/// separated, `sm_` prefix optional, default `80;86;89;90`): `sm_80`, ..., ascending. Read here,
/// not from the build, so a build that compiled something else fails.
fn requested_archs() -> Vec<String> {
    let list = std::env::var("TRIATTN_CUDA_ARCHS").ok().filter(|v| !v.is_empty());
    let list = list.as_deref().unwrap_or("80;86;89;90");
    let mut archs: Vec<u32> = list
        .split([';', ','])
        .map(|a| a.trim().trim_start_matches("sm_"))
        .filter(|a| !a.is_empty())
        .map(|a| a.parse().unwrap_or_else(|_| panic!("TRIATTN_CUDA_ARCHS: expected numbers like 80;90, got {list:?}")))
        .collect();
    archs.sort_unstable();
    archs.dedup();
    archs.into_iter().map(|a| format!("sm_{a}")).collect()
}

/// `TRIATTN_NO_NVCC` (or docs.rs) as build.rs reads it: the `cuda` feature without kernels.
fn kernels_switched_off() -> bool {
    std::env::var("TRIATTN_NO_NVCC").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::var("DOCS_RS").is_ok_and(|v| !v.is_empty())
}

/// The archs this build should have compiled: none without the `cuda` feature or with
/// `TRIATTN_NO_NVCC`, else what `TRIATTN_CUDA_ARCHS` asks for.
fn expected_archs() -> Vec<String> {
    if cfg!(feature = "cuda") && !kernels_switched_off() {
        requested_archs()
    } else {
        Vec::new()
    }
}

/// `triattn kernels --json`: every line one JSON object with exactly the contract fields, of the
/// contract types, describing its variant; the (symbol, arch) rows are the variant table times
/// the archs compiled (`none` when none were), each once. `triattn kernels` prints the same rows
/// as a table under one header line.
#[test]
fn kernels_json_lists_every_variant_on_every_compiled_arch() {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(common::triattn_bin()).args(args).output().unwrap();
        assert!(o.status.success(), "triattn {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let out = run(&["kernels", "--json"]);
    let table = variant::table();
    let mut archs = expected_archs();
    assert_eq!(variant::built_archs(), archs, "archs build.rs compiled vs expected");
    if archs.is_empty() {
        archs.push("none".into());
    }
    let fields = [
        "symbol",
        "op",
        "family",
        "dtype",
        "knobs",
        "arch",
        "registers",
        "shared_bytes",
        "spill_bytes",
        "stack_bytes",
        "hmma",
    ];
    let mut rows = BTreeSet::new();
    for line in out.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        let obj = v.as_object().unwrap_or_else(|| panic!("expected a JSON object, got {line}"));
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys.iter().copied().collect::<BTreeSet<_>>(), fields.into_iter().collect(), "fields of {line}");
        let text = |k: &str| obj[k].as_str().unwrap_or_else(|| panic!("{k}: expected a string, got {line}"));
        let number = |k: &str| match &obj[k] {
            Value::Null => None,
            n => Some(n.as_u64().unwrap_or_else(|| panic!("{k}: expected a count or null, got {line}"))),
        };
        let (symbol, arch) = (text("symbol"), text("arch"));
        let v = table.iter().find(|v| v.symbol() == symbol).unwrap_or_else(|| panic!("unknown symbol: {line}"));
        assert_eq!((text("op"), text("dtype"), text("knobs")), (v.op(), v.dtype_tag(), v.knobs().as_str()), "{line}");
        assert_eq!(text("family"), v.family(), "{line}");
        assert!(archs.iter().any(|a| a == arch), "arch {arch} not among {archs:?}: {line}");
        assert!(rows.insert((symbol.to_string(), arch.to_string())), "row listed twice: {line}");
        let dynamic = v.dynamic_smem_bytes(variant::MAX_VECTORS) as u64;
        let got = [number("registers"), number("shared_bytes"), number("spill_bytes"), number("stack_bytes")];
        if arch == "none" {
            let shared = Some(v.static_smem_bytes() as u64 + dynamic);
            assert_eq!(got, [None, shared, None, None], "no ptxas numbers without kernels: {line}");
            assert_eq!(number("hmma"), None, "{line}");
        } else {
            // The build record of this row: symbol,arch,registers,smem,stack,spill_stores,spill_loads,hmma.
            let rec: Vec<u64> = env!("TRIATTN_KERNEL_REPORT")
                .split(';')
                .find(|r| r.starts_with(&format!("{symbol},{arch},")))
                .unwrap_or_else(|| panic!("no build record for {symbol} on {arch}"))
                .split(',')
                .skip(2)
                .map(|x| x.parse().unwrap_or(u64::MAX))
                .collect();
            let want = [Some(rec[0]), Some(rec[1] + dynamic), Some(rec[3] + rec[4]), Some(rec[2])];
            assert_eq!(got, want, "registers, shared, spill and stack bytes of the build record: {line}");
            assert_eq!(number("hmma"), rec.get(5).filter(|&&h| h != u64::MAX).copied(), "{line}");
        }
    }
    let want: BTreeSet<(String, String)> =
        table.iter().flat_map(|v| archs.iter().map(move |a| (v.symbol(), a.clone()))).collect();
    let missing: Vec<_> = want.difference(&rows).collect();
    assert!(missing.is_empty(), "`triattn kernels --json` lacks the (symbol, arch) rows {missing:?}");
    let text = run(&["kernels"]);
    assert_eq!(text.lines().count(), want.len() + 1, "one header line and one line per row:\n{text}");
    assert!(text.lines().next().unwrap().split_whitespace().eq([
        "op",
        "family",
        "dtype",
        "knobs",
        "arch",
        "registers",
        "shared_bytes",
        "spill_bytes",
        "hmma",
        "symbol"
    ]));
}

#[cfg(feature = "emu")]
#[test]
fn emu_build_compiled_exactly_the_table() {
    let table: Vec<String> = variant::table().iter().map(|v| v.symbol()).collect();
    assert_eq!(triattn::kernels::emu::compiled_symbols(), table);
}

#[cfg(feature = "emu")]
#[test]
fn shared_memory_formula_matches_the_kernel_source() {
    for v in variant::table() {
        for vectors in 1..=variant::MAX_VECTORS {
            assert_eq!(
                v.dynamic_smem_bytes(vectors),
                triattn::kernels::emu::kernel_dynamic_smem_bytes(v, vectors),
                "{} at {vectors} vectors",
                v.symbol()
            );
        }
    }
}

/// The raw build record (`TRIATTN_KERNEL_REPORT`): build.rs compiled exactly the archs
/// `TRIATTN_CUDA_ARCHS` asks for, every variant has one record on each and no record names an
/// unknown symbol or arch; no variant spills; the SASS was inspected (every record has its HMMA
/// count: cuobjdump from `scripts/setup-cuda.sh --tools`) and every max-mode score kernel uses
/// tensor cores. A build with `TRIATTN_NO_NVCC` has no records and skips, loudly.
#[cfg(feature = "cuda")]
#[test]
fn cuda_build_has_every_variant_on_every_arch_without_spills() {
    let report = env!("TRIATTN_KERNEL_REPORT");
    if kernels_switched_off() {
        assert!(report.is_empty() && variant::built_archs().is_empty(), "TRIATTN_NO_NVCC, yet kernels: {report}");
        eprintln!("SKIP cuda_build_has_every_variant_on_every_arch_without_spills: built with TRIATTN_NO_NVCC");
        return;
    }
    let archs = requested_archs();
    assert_eq!(variant::built_archs(), archs, "build.rs compiled other archs than TRIATTN_CUDA_ARCHS asks for");
    let table: Vec<String> = variant::table().iter().map(|v| v.symbol()).collect();
    let mut seen = BTreeSet::new();
    for rec in report.split(';') {
        let f: Vec<&str> = rec.split(',').collect();
        assert_eq!(f.len(), 8, "expected symbol,arch,registers,smem,stack,spill_stores,spill_loads,hmma, got {rec:?}");
        assert!(table.iter().any(|s| s == f[0]), "record for a symbol not in the variant table: {rec}");
        assert!(archs.iter().any(|a| a == f[1]), "record for an arch not in {archs:?}: {rec}");
        assert!(seen.insert((f[0], f[1])), "two records for {} on {}", f[0], f[1]);
        for (i, what) in [(2, "registers"), (3, "smem"), (4, "stack")] {
            assert!(f[i].parse::<u32>().is_ok(), "{what}: expected a number, got {rec}");
        }
        assert_eq!((f[5], f[6]), ("0", "0"), "{} spills on {} (stores, loads bytes)", f[0], f[1]);
        assert!(
            !f[7].is_empty(),
            "{} on {}: no HMMA count, the SASS was not inspected: build.rs found no cuobjdump \
             (install it with scripts/setup-cuda.sh --tools)",
            f[0],
            f[1]
        );
    }
    for v in variant::table() {
        for arch in &archs {
            let sym = v.symbol();
            assert!(seen.contains(&(sym.as_str(), arch.as_str())), "{sym} not compiled for {arch}");
            if let variant::Kernel::Score { algo: variant::ScoreAlgo::Max, .. } = v.kernel {
                let rec = report.split(';').find(|r| r.starts_with(&format!("{sym},{arch},"))).unwrap();
                let hmma: u32 = rec.rsplit(',').next().unwrap().parse().unwrap();
                assert!(hmma > 0, "{sym} on {arch} has no HMMA instructions");
            }
        }
    }
}
