//! The C examples compiled against the header and the static library: examples/c/round.c is
//! also run (CPU backend); examples/c/device_round.c (the device-pointer flow) is compiled and
//! linked only, as running it needs a GPU.

use std::path::PathBuf;
use std::process::Command;

/// Build the staticlib (default features) and return its path.
fn staticlib() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // `cargo test` builds the library as an rlib only; build the staticlib into the same target
    // folder (the profile folder that holds the test binaries).
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_triattn")).parent().unwrap().to_path_buf();
    let target_dir = bin_dir.parent().unwrap();
    let o = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--lib", "--quiet"])
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "cargo build --lib failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let lib = bin_dir.join("libtriattn.a");
    assert!(lib.exists(), "{} missing: the crate must build its staticlib", lib.display());
    lib
}

#[test]
fn c_device_example_compiles_and_links() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = staticlib();
    let dir = tempfile::tempdir().unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .arg(root.join("examples/c/device_round.c"))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(dir.path().join("device_round"))
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(o.status.success(), "compiling the device C example failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn c_example_builds_and_runs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = staticlib();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("round");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .arg(root.join("examples/c/round.c"))
        .arg("-std=c11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-I")
        .arg(root.join("include"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(o.status.success(), "compiling the C example failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(&exe)
        .arg(root.join("data/qwen3_8b.config.json"))
        .arg(root.join("data/qwen3_8b.safetensors"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "C example failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("kept 256 of 320 slots per set"), "{stdout}");
    assert!(stdout.lines().last() == Some("ok"), "{stdout}");
}
