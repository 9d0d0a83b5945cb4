//! The C examples compiled against `include/triattn.h` and linked against both the static and
//! the shared library, then run: `examples/c/round.c` (CPU backend: a round, a skipped round
//! whose keep rows need `n` slots, versioned structs, errors) and `examples/c/device_round.c`
//! (plans, one binding per sequence, runs, positions; on the emu backend when this build has
//! the `emu` feature, else compiled and linked only, as running it needs a GPU).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Which library a C program links.
#[derive(Clone, Copy, Debug)]
enum Linkage {
    Static,
    Shared,
}

/// The folder holding `libtriattn.a` and `libtriattn.so` of this very build: `cargo test`
/// compiles the library unit once, with every crate type of `Cargo.toml`, into `deps/` next to
/// the CLI it builds (a cdylib's outputs carry no hash), so the C programs link exactly the
/// library the Rust tests link — no second cargo build.
fn library_dir() -> PathBuf {
    let deps = PathBuf::from(env!("CARGO_BIN_EXE_triattn")).parent().unwrap().join("deps");
    for lib in ["libtriattn.a", "libtriattn.so"] {
        assert!(deps.join(lib).is_file(), "{} missing: the crate must build it (crate-type)", deps.join(lib).display());
    }
    deps
}

/// Compile `example` against the header and the library; returns the executable.
fn build(example: &str, linkage: Linkage, extra_args: &[&str], out: &Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = library_dir();
    let exe = out.join(format!("{}-{linkage:?}", example.trim_end_matches(".c")));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = Command::new(&cc);
    cmd.arg(root.join("examples/c").join(example))
        .args(["-std=c11", "-D_ISOC11_SOURCE", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .args(extra_args);
    match linkage {
        Linkage::Static => {
            cmd.arg(lib_dir.join("libtriattn.a"));
            if cfg!(feature = "emu") {
                cmd.arg("-lstdc++");
            }
        }
        Linkage::Shared => {
            cmd.arg("-L").arg(&lib_dir).arg("-ltriattn").arg(format!("-Wl,-rpath,{}", lib_dir.display()));
        }
    }
    let o = cmd.args(["-lpthread", "-ldl", "-lm", "-o"]).arg(&exe).output().expect("a C compiler (cc) is needed");
    assert!(o.status.success(), "compiling {example} ({linkage:?}) failed:\n{}", String::from_utf8_lossy(&o.stderr));
    if let Linkage::Shared = linkage {
        let o = Command::new("ldd").arg(&exe).output();
        if let Ok(o) = o {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("libtriattn.so"), "{example} does not load libtriattn.so:\n{text}");
        }
    }
    exe
}

fn run(exe: &Path, model: &Path, stats: &Path) -> Output {
    // The loader searches LD_LIBRARY_PATH before the executable's RUNPATH, and cargo's includes
    // the target folder, which may hold a `libtriattn.so` of another build: name this build's.
    Command::new(exe).arg(model).arg(stats).env("LD_LIBRARY_PATH", library_dir()).output().unwrap()
}

/// The shipped Qwen3-8B config and statistics.
fn qwen3() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    (root.join("data/qwen3_8b.config.json"), root.join("data/qwen3_8b.safetensors"))
}

/// A small model (2 layers, 8 heads, 2 KV heads, head_dim 64) and random statistics in `dir`:
/// the emu backend runs the kernels on the CPU, far slower than a GPU.
fn small_model(dir: &Path) -> (PathBuf, PathBuf) {
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,"head_dim":64,"rope_theta":1000000.0}"#,
    )
    .unwrap();
    let stats = dir.join("stats.safetensors");
    common::random_stats(2, 8, 64, 3).save(&stats).unwrap();
    (config, stats)
}

#[test]
fn c_example_runs_against_the_static_and_the_shared_library() {
    let dir = tempfile::tempdir().unwrap();
    for linkage in [Linkage::Static, Linkage::Shared] {
        let (model, stats) = qwen3();
        let o = run(&build("round.c", linkage, &[], dir.path()), &model, &stats);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "round.c ({linkage:?}) failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("kept 256 of 320 slots per set"), "{stdout}");
        assert!(stdout.contains("outcome 2, kept 320"), "the skipped round keeps every slot: {stdout}");
        assert!(stdout.lines().last() == Some("ok"), "{stdout}");
    }
}

/// The device flow: on the emu backend (feature `emu`) it runs — two sequences bound to one
/// plan, each run compacting its own cache and positions; without it, it is compiled and linked.
#[test]
fn c_device_example_runs_on_emu_against_both_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let (model, stats) = small_model(dir.path());
    for linkage in [Linkage::Static, Linkage::Shared] {
        let exe = build("device_round.c", linkage, &[], dir.path());
        if !cfg!(feature = "emu") {
            eprintln!("SKIP running device_round.c: this build has no emu feature (compiled and linked only)");
            continue;
        }
        let o = run(&exe, &model, &stats);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "device_round.c ({linkage:?}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        for s in ["sequence 1: kept 256 of 320", "sequence 2: kept 256 of 320", "misaligned K base -> status 1"] {
            assert!(stdout.contains(s), "{linkage:?}: {s:?} missing:\n{stdout}");
        }
        assert!(stdout.lines().last() == Some("ok"), "{stdout}");
    }
}

/// A sharded round from C: every rank of tp x pp layouts (tp 2, tp 4 replicating each of the
/// 2 KV heads, with pp 2) in one process on emu, parts run around the collectives the plans
/// name, all-reduced by the C program; every rank's keep sets equal one rank's.
#[test]
fn c_sharded_example_runs_on_emu_against_both_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let (model, stats) = small_model(dir.path());
    for linkage in [Linkage::Static, Linkage::Shared] {
        let exe = build("sharded_round.c", linkage, &[], dir.path());
        if !cfg!(feature = "emu") {
            eprintln!("SKIP running sharded_round.c: this build has no emu feature (compiled and linked only)");
            continue;
        }
        for (tp, pp, parts, sets) in [("2", "1", 1, 2), ("4", "2", 3, 8), ("1", "2", 2, 4)] {
            let o = Command::new(&exe)
                .args([model.as_os_str(), stats.as_os_str(), tp.as_ref(), pp.as_ref()])
                .env("LD_LIBRARY_PATH", library_dir())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "sharded_round.c tp {tp} pp {pp} ({linkage:?}) failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            let line = format!("tp {tp} x pp {pp}: {parts} parts, {sets} rank keep sets equal to one rank's");
            assert!(stdout.contains(&line), "{line:?} missing:\n{stdout}");
            assert!(stdout.lines().last() == Some("ok"), "{stdout}");
        }
    }
}

/// Virtual eviction through the C ABI: a round that only selects, then a decode whose lists are
/// the round's keep sets in its workspace. Runs on emu (feature `emu`), else compiled and linked.
#[test]
fn c_decode_example_runs_on_emu_against_both_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let (model, stats) = small_model(dir.path());
    for linkage in [Linkage::Static, Linkage::Shared] {
        let exe = build("decode.c", linkage, &[], dir.path());
        if !cfg!(feature = "emu") {
            eprintln!("SKIP running decode.c: this build has no emu feature (compiled and linked only)");
            continue;
        }
        let o = run(&exe, &model, &stats);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "decode.c ({linkage:?}) failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("decode: ") && stdout.contains("lists 9 -> status 1"), "{stdout}");
        assert!(stdout.lines().last() == Some("ok"), "{stdout}");
    }
}

/// The CUDA-runtime flavour of the device example (cudaMalloc'd memory, a cudaStream_t) compiles
/// and links against both libraries and cudart; running it needs a GPU (`scripts/gpu-check.sh`).
#[cfg(feature = "cuda")]
#[test]
fn c_device_example_compiles_for_the_cuda_runtime() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pinned = std::env::var_os("TRIATTN_CUDA_DIR").map(PathBuf::from).unwrap_or_else(|| root.join(".cuda"));
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain([pinned.join("pypi/nvidia/cu13")]);
    let Some(home) = homes.into_iter().find(|h| h.join("include/cuda_runtime.h").is_file()) else {
        panic!("cuda_runtime.h not found under CUDA_HOME, CUDA_PATH or {} (scripts/setup-cuda.sh)", pinned.display())
    };
    let cudart = ["lib64/libcudart.so", "lib/libcudart.so", "lib/libcudart.so.13"]
        .iter()
        .map(|l| home.join(l))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("libcudart not found under {}", home.display()));
    let dir = tempfile::tempdir().unwrap();
    for linkage in [Linkage::Static, Linkage::Shared] {
        let include = format!("-I{}", home.join("include").display());
        let cudart = cudart.display().to_string();
        for example in ["device_round.c", "decode.c"] {
            build(example, linkage, &["-DTRIATTN_EXAMPLE_CUDA_RUNTIME", &include, &cudart], dir.path());
        }
    }
}
