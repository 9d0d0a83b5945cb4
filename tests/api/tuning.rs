//! Tuning tables through the CLI and the C ABI: a table that forces a non-default candidate for
//! every stage changes the kernels `--verbose` names and every golden case still passes; bad
//! tables are refused by name (explicitly named) or ignored with a warning (found implicitly);
//! stale tables serve with a warning; `triattn autotune --backend emu` writes a table for every
//! op; `triattn kernels` groups variants into families.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use triattn::kernels::variant;
use triattn::tuning::FORMAT;
#[cfg(feature = "emu")]
use triattn::tuning::{Strictness, Tuning};

/// A table choosing the last candidate of every family that has more than one (never the
/// built-in choice, except for `select f32` rows longer than the single-block limit).
fn forcing_table(dir: &Path) -> (PathBuf, Vec<String>) {
    let mut text = format!(
        "[meta]\nformat = \"{FORMAT}\"\narch = \"emu\"\nsource = \"measured\"\nvariant_table = \"{}\"\ncrate_version = \"0.2.0\"\ndate = \"2026-12-03\"\n",
        variant::table_hash()
    );
    let mut forced = Vec::new();
    for family in variant::families() {
        let members = variant::family_members(&family);
        if members.len() > 1 {
            let v = members.last().unwrap().symbol();
            text.push_str(&format!("\n[[entry]]\nfamily = \"{family}\"\nvariant = \"{v}\"\n"));
            forced.push(v);
        }
    }
    let path = dir.join("forcing.toml");
    std::fs::write(&path, text).unwrap();
    (path, forced)
}

fn triattn(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(common::triattn_bin());
    cmd.args(args).env_remove("TRIATTN_TUNING");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The stage lines of `--verbose` stderr naming one of `forced` with the table as their source.
#[cfg(feature = "emu")]
fn forced_lines<'a>(stderr: &'a str, forced: &[String], table: &Path) -> Vec<&'a str> {
    let source = format!("(tuning: {})", table.display());
    stderr.lines().filter(|l| forced.iter().any(|f| l.contains(f.as_str())) && l.contains(&source)).collect()
}

#[cfg(feature = "emu")]
#[test]
fn forcing_tables_change_the_kernels_and_golden_cases_still_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (table, forced) = forcing_table(dir.path());
    let table_arg = table.to_str().unwrap();
    let mut stages_forced = std::collections::BTreeSet::new();
    for case in common::golden_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = crate::golden::run_compress(&case, &out, &["--backend", "emu", "--verbose", "--tuning", table_arg]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{name}: {err}");
        for line in forced_lines(&err, &forced, &table) {
            stages_forced.insert(line.split(':').next().unwrap().to_string());
        }
        let got = triattn::io::TensorFile::read(&out).unwrap();
        let (s, r) = crate::golden::check_case(&case, &got);
        eprintln!("{name} (emu, forced candidates): keep exact, score err {s:.2e}, raw err {r:.2e}");
    }
    for case in crate::decode::cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = dir.path().join(format!("{name}-decode.safetensors"));
        let o = crate::decode::run_case_with(&case, &out, "emu", &["--verbose", "--tuning", table_arg]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{name}: {err}");
        for line in forced_lines(&err, &forced, &table) {
            stages_forced.insert(line.split(':').next().unwrap().to_string());
        }
        let (o_err, lse_err) = crate::decode::check_case(&case, &out);
        eprintln!("decode {name} (emu, forced candidates): o {o_err:.2e}, lse {lse_err:.2e} of tolerance");
    }
    let want: std::collections::BTreeSet<String> =
        ["score", "select", "compact", "decode"].iter().map(|s| s.to_string()).collect();
    assert_eq!(stages_forced, want, "stages whose --verbose line named a forced candidate");
}

#[test]
fn bad_tables_are_refused_by_name_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let case = common::golden_cases().into_iter().find(|c| c.ends_with("qwen3-paper")).unwrap();
    let head = format!(
        "[meta]\nformat = \"{FORMAT}\"\narch = \"emu\"\nsource = \"model\"\nvariant_table = \"{}\"\ncrate_version = \"0.2.0\"\ndate = \"2026-12-03\"\n",
        variant::table_hash()
    );
    let cases = [
        ("malformed", format!("{head}\n[[entry]]\nfamily = \"select f32\"\nvariant = 3\n"), "tuning table"),
        (
            "unknown field",
            format!("{head}\n[[entry]]\nfamily = \"select f32\"\nvarient = \"x\"\n"),
            "unknown field `varient`",
        ),
        (
            "not compiled",
            format!("{head}\n[[entry]]\nfamily = \"select f32\"\nvariant = \"triattn_select_f32_nt4096\"\n"),
            "entry 1 (family \"select f32\", variant triattn_select_f32_nt4096): the variant is not compiled",
        ),
        (
            "wrong family",
            format!("{head}\n[[entry]]\nfamily = \"select f32\"\nvariant = \"triattn_reduce_f32_nt256\"\n"),
            "belongs to family \"reduce f32\"",
        ),
        ("bad format", head.replace(FORMAT, "triattn-tuning-v9"), "meta.format"),
    ];
    let backends: &[&str] = if cfg!(feature = "emu") { &["cpu", "emu"] } else { &["cpu"] };
    for (what, text, needle) in cases {
        let table = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&table, text).unwrap();
        for backend in backends {
            for via_env in [false, true] {
                let out = dir.path().join("never.safetensors");
                let extra: Vec<&str> = if via_env {
                    vec!["--backend", backend]
                } else {
                    vec!["--backend", backend, "--tuning", table.to_str().unwrap()]
                };
                let mut cmd = Command::new(common::triattn_bin());
                cmd.current_dir(&case)
                    .args(["compress", "--model-config", "config.json", "--stats", "stats.safetensors"])
                    .args(["--kv", "kv.safetensors", "--out"])
                    .arg(&out)
                    .args(&extra)
                    .env_remove("TRIATTN_TUNING");
                if via_env {
                    cmd.env("TRIATTN_TUNING", &table);
                }
                let o = cmd.output().unwrap();
                let err = String::from_utf8_lossy(&o.stderr);
                // The CPU backend reads only an explicit --tuning; the env variable is for kernels.
                if via_env && *backend == "cpu" {
                    assert!(o.status.success(), "{what} via TRIATTN_TUNING on cpu: {err}");
                    std::fs::remove_file(&out).unwrap();
                    continue;
                }
                assert_eq!(o.status.code(), Some(1), "{what} ({backend}, env {via_env}): {err}");
                assert_eq!(err.lines().count(), 1, "one line: {err}");
                assert!(err.contains(needle) && err.contains("tuning table"), "{what}: {err}");
                assert!(!out.exists(), "{what}: an output was written");
            }
        }
    }
}

#[cfg(feature = "emu")]
#[test]
fn stale_and_implicit_tables_warn_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let case = common::golden_cases().into_iter().find(|c| c.ends_with("qwen3-paper")).unwrap();
    let (forcing, forced) = forcing_table(dir.path());
    // Stale: another build's variant table; the entries that resolve still serve.
    let stale = dir.path().join("stale.toml");
    let text = std::fs::read_to_string(&forcing).unwrap().replace(&variant::table_hash(), "0123456789abcdef");
    std::fs::write(&stale, text).unwrap();
    let out = dir.path().join("o.safetensors");
    let o = crate::golden::run_compress(
        &case,
        &out,
        &["--backend", "emu", "--verbose", "--tuning", stale.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("is stale") && warnings[0].contains("0123456789abcdef"), "{err}");
    assert!(!forced_lines(&err, &forced, &stale).is_empty(), "the stale table still chose kernels: {err}");
    crate::golden::check_case(&case, &triattn::io::TensorFile::read(&out).unwrap());

    // Implicit: a malformed per-device file from an "earlier autotune" is ignored with a warning.
    let config = dir.path().join("config");
    let implicit = config.join("triattn").join("tuning").join("emu.toml");
    std::fs::create_dir_all(implicit.parent().unwrap()).unwrap();
    std::fs::write(&implicit, "[meta]\nformat = 1\n").unwrap();
    let o = Command::new(common::triattn_bin())
        .current_dir(&case)
        .args(["compress", "--model-config", "config.json", "--stats", "stats.safetensors", "--kv", "kv.safetensors"])
        .args(["--backend", "emu", "--out"])
        .arg(&out)
        .env("XDG_CONFIG_HOME", &config)
        .env_remove("TRIATTN_TUNING")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("warning:") && l.contains("emu.toml") && l.ends_with("ignored")),
        "{err}"
    );
    // A good implicit file is used.
    std::fs::copy(&forcing, &implicit).unwrap();
    let o = Command::new(common::triattn_bin())
        .current_dir(&case)
        .args(["compress", "--model-config", "config.json", "--stats", "stats.safetensors", "--kv", "kv.safetensors"])
        .args(["--backend", "emu", "--verbose", "--out"])
        .arg(&out)
        .env("XDG_CONFIG_HOME", &config)
        .env_remove("TRIATTN_TUNING")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!forced_lines(&err, &forced, &implicit).is_empty(), "the implicit table chose kernels: {err}");
}

/// `triattn autotune --backend emu --quick` on a small model: a table with entries for score,
/// select, compact and decode, each variant in its family, that a later run reads.
#[cfg(feature = "emu")]
#[test]
fn autotune_on_emu_writes_a_table_for_every_op() {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::data_path("golden/qwen3-paper/config.json")).unwrap())
            .unwrap();
    config["num_hidden_layers"] = 2.into();
    config["num_attention_heads"] = 4.into();
    config["num_key_value_heads"] = 2.into();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = dir.path().join("emu.toml");
    let o = triattn(
        &[
            "autotune",
            "--backend",
            "emu",
            "--model-config",
            config_path.to_str().unwrap(),
            "--quick",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("speed-up") && stdout.contains(&format!("wrote {}", out.display())), "{stdout}");
    assert!(stderr.contains("meaningless") || stderr.contains("say nothing"), "emu timings are labelled: {stderr}");
    let table = Tuning::load(&out).unwrap();
    assert_eq!(table.meta().arch, "emu");
    assert!(table.warnings().is_empty(), "{:?}", table.warnings());
    let mut ops = std::collections::BTreeSet::new();
    for e in table.entries() {
        let v = variant::variant_by_symbol(&e.variant).unwrap();
        assert_eq!(v.family(), e.family, "{e:?}");
        assert!(e.time_us.is_some(), "{e:?}");
        ops.insert(v.op());
    }
    assert_eq!(ops.into_iter().collect::<Vec<_>>(), ["compact", "decode", "score", "select"]);
    // Reparsed strictly, as a user table.
    Tuning::parse(&std::fs::read_to_string(&out).unwrap(), "emu.toml", Strictness::Explicit).unwrap();
}

#[test]
fn kernels_name_families_of_interchangeable_variants() {
    let o = triattn(&["kernels", "--json"], &[]);
    assert!(o.status.success());
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!rows.is_empty());
    let mut by_family: std::collections::BTreeMap<String, Vec<&serde_json::Value>> = Default::default();
    for r in &rows {
        by_family.entry(r["family"].as_str().unwrap().to_string()).or_default().push(r);
    }
    for (family, members) in &by_family {
        assert!(family.starts_with(members[0]["op"].as_str().unwrap()), "{family}");
        assert!(members.iter().all(|m| m["op"] == members[0]["op"] && m["dtype"] == members[0]["dtype"]), "{family}");
    }
    assert!(by_family.contains_key("score bf16 d128 mean"));
    assert!(by_family["score bf16 d128 mean"].len() >= 3, "candidates of the common families");
    let text = triattn(&["kernels"], &[]);
    assert!(String::from_utf8_lossy(&text.stdout).lines().next().unwrap().contains("family"));
}

/// `triattn_context_load_tuning`: a good table is taken, a bad one refused by name (the context
/// keeps its tables), a CPU context checks the table.
#[test]
fn c_abi_loads_tuning_tables() {
    use std::ffi::CString;
    use triattn::ffi::*;
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = forcing_table(dir.path());
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[meta]\nformat = \"triattn-tuning-v1\"\n").unwrap();
    let last_error = || {
        let mut buf = vec![0 as std::ffi::c_char; 1024];
        // SAFETY: the buffer holds 1024 chars.
        unsafe { triattn_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: triattn_last_error NUL-terminates within the buffer.
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().to_string()
    };
    let mut backends = vec![triattn_backend::Cpu];
    if cfg!(feature = "emu") {
        backends.push(triattn_backend::Emu);
    }
    for backend in backends {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `ctx` is writable.
        assert_eq!(unsafe { triattn_context_create(backend as u32, &mut ctx) }, triattn_status::Ok, "{}", last_error());
        let good_c = CString::new(good.to_str().unwrap()).unwrap();
        let bad_c = CString::new(bad.to_str().unwrap()).unwrap();
        // SAFETY: a live context and NUL-terminated paths.
        assert_eq!(
            unsafe { triattn_context_load_tuning(ctx, good_c.as_ptr()) },
            triattn_status::Ok,
            "{}",
            last_error()
        );
        // SAFETY: as above.
        assert_eq!(unsafe { triattn_context_load_tuning(ctx, bad_c.as_ptr()) }, triattn_status::InvalidFormat);
        let msg = last_error();
        assert!(msg.contains("bad.toml") && msg.contains("missing field"), "{msg}");
        // SAFETY: as above; null path refused by name.
        assert_eq!(unsafe { triattn_context_load_tuning(ctx, std::ptr::null()) }, triattn_status::InvalidArgument);
        assert!(last_error().contains("path"));
        // SAFETY: created above, destroyed once.
        unsafe { triattn_context_destroy(ctx) };
    }
}
