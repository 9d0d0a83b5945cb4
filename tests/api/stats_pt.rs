//! The official `.pt` reader: bit-identical conversion of the shipped files, and hostile inputs
//! refused with errors (never panics).

use std::io::Write;
use std::path::PathBuf;

use triattn::stats::pt::{parse_official, read_official};
use triattn::{ErrorKind, PairingStyle, Stats};

/// `shared/data` next to the crate, or the `tests/data` copies, whichever holds every file of
/// `needed`; panics naming both places if neither does (the fixtures ship in tests/data).
fn data_dir(needed: &[&str]) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let places = [root.join("../shared/data"), root.join("tests/data")];
    places
        .iter()
        .find(|dir| needed.iter().all(|f| dir.join(f).is_file()))
        .cloned()
        .unwrap_or_else(|| panic!("test data {needed:?} missing: expected all of them under one of {places:?}"))
}

fn assert_bits_eq(name: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{name}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{name}[{i}]: {x} vs {y}");
    }
}

#[test]
fn ds_qwen7b_matches_converted_safetensors_bit_for_bit() {
    let data = data_dir(&["official/ds_qwen7b.pt", "calibration/ds_qwen7b.safetensors"]);
    let pt = read_official(data.join("official/ds_qwen7b.pt")).unwrap();
    let st = Stats::load(data.join("calibration/ds_qwen7b.safetensors")).unwrap();
    assert_eq!((pt.num_layers, pt.num_heads, pt.head_dim), (28, 28, 128));
    assert_eq!((pt.num_layers, pt.num_heads, pt.head_dim), (st.num_layers, st.num_heads, st.head_dim));
    assert_eq!(pt.rope_style, PairingStyle::Half);
    assert_eq!(pt.rope_style, st.rope_style);
    assert_bits_eq("q_mean_real", &pt.q_mean_real, &st.q_mean_real);
    assert_bits_eq("q_mean_imag", &pt.q_mean_imag, &st.q_mean_imag);
    assert_bits_eq("q_abs_mean", &pt.q_abs_mean, &st.q_abs_mean);
    assert_eq!(pt.sampled_heads, st.sampled_heads);
    assert_eq!(pt.sampled_heads.as_ref().map(Vec::len), Some(784));
    assert_eq!(pt.metadata.get("model_name").map(String::as_str), Some("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"));
    assert_eq!(pt.metadata.get("source").map(String::as_str), Some("ds_qwen7b.pt"));

    // The converted statistics survive a save/load round trip through the native format.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted.safetensors");
    pt.save(&out).unwrap();
    let back = Stats::load(&out).unwrap();
    assert_bits_eq("round trip q_mean_real", &back.q_mean_real, &pt.q_mean_real);
    assert_eq!(back.sampled_heads, pt.sampled_heads);
}

#[test]
fn gpt_oss_reads_with_rich_metadata() {
    let data = data_dir(&["official/gpt_oss_120b_stats.pt"]);
    let s = read_official(data.join("official/gpt_oss_120b_stats.pt")).unwrap();
    assert_eq!((s.num_layers, s.num_heads, s.head_dim), (36, 64, 64));
    assert_eq!(s.q_mean_real.len(), 36 * 64 * 32);
    assert_eq!(s.rope_style, PairingStyle::Half);
    let meta = |k: &str| s.metadata.get(k).map(String::as_str);
    assert_eq!(meta("model_name"), Some("openai/gpt-oss-120b"));
    assert_eq!(meta("rope_type"), Some("yarn"));
    assert_eq!(meta("rope_theta"), Some("150000"));
    assert_eq!(meta("num_kv_heads"), Some("8"));
    assert_eq!(meta("num_key_value_heads"), Some("8"));
    assert_eq!(meta("use_chat_template"), Some("false"));
    assert_eq!(meta("system_prompt"), Some(""));
    let scaling: serde_json::Value = serde_json::from_str(meta("rope_scaling").unwrap()).unwrap();
    assert_eq!(scaling["rope_type"], "yarn");
    assert_eq!(scaling["factor"], 32.0);
    assert_eq!(scaling["beta_fast"], 32.0);
    assert_eq!(scaling["original_max_position_embeddings"], 4096);
    assert_eq!(scaling["truncate"], false);
    assert!(!meta("rope_scaling").unwrap().contains(' '), "compact JSON: {:?}", meta("rope_scaling"));
    assert_eq!(s.sampled_heads.as_ref().map(Vec::len), Some(36 * 64));
    // a >= |mean| (triangle inequality) holds for the shipped file.
    for i in 0..s.q_abs_mean.len() {
        let m = (s.q_mean_real[i] as f64).hypot(s.q_mean_imag[i] as f64);
        assert!(s.q_abs_mean[i] as f64 >= m * (1.0 - 1e-6), "entry {i}");
    }
    // The metadata is accepted by the native format's validation.
    let file = s.to_tensor_file();
    Stats::from_tensor_file(&file).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Hostile inputs, built with a small pickle writer and the zip crate.

/// Build a torch.save-style archive: `folder/data.pkl`, `folder/byteorder` and `folder/data/<key>`.
fn archive(folder: &str, pickle: &[u8], storages: &[(&str, Vec<u8>)], byteorder: Option<&[u8]>) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file(format!("{folder}/data.pkl"), opts).unwrap();
    w.write_all(pickle).unwrap();
    if let Some(b) = byteorder {
        w.start_file(format!("{folder}/byteorder"), opts).unwrap();
        w.write_all(b).unwrap();
    }
    for (key, bytes) in storages {
        w.start_file(format!("{folder}/data/{key}"), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A minimal pickle writer for the opcodes the official files use.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: i32) -> &mut Self {
        self.0.push(b'J');
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `_rebuild_tensor_v2(storage(key, numel), offset, (len,), (1,), False, OrderedDict())`.
    fn tensor(&mut self, key: &str, numel: i32, offset: i32, len: i32) -> &mut Self {
        self.op(b"ctorch._utils\n_rebuild_tensor_v2\n(")
            .op(b"(")
            .str("storage")
            .op(b"ctorch\nFloatStorage\n")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .int(len)
            .op(b"\x85")
            .int(1)
            .op(b"\x85\x89ccollections\nOrderedDict\n)R")
            .op(b"tR")
    }
}

/// A complete, valid statistics pickle: `heads` heads of one layer, head_dim 4, storages `0..`.
fn valid_pickle(heads: usize) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut p = Pickle::default();
    p.op(b"\x80\x02}(").str("metadata").op(b"}(");
    p.str("rope_style").str("half").str("head_dim").int(4).str("model_name").str("toy");
    p.str("sampled_heads").op(b"](");
    for h in 0..heads {
        p.op(b"](").int(0).int(h as i32).op(b"e");
    }
    p.op(b"eu").str("stats").op(b"}(");
    let mut storages = Vec::new();
    for h in 0..heads {
        p.str(&format!("layer00_head{h:02}")).op(b"}(");
        for (j, field) in ["q_mean_real", "q_mean_imag", "q_abs_mean"].into_iter().enumerate() {
            let key = (h * 3 + j).to_string();
            p.str(field).tensor(&key, 2, 0, 2);
            let values = [h as f32 + j as f32 * 0.25, -1.5 - h as f32];
            storages.push((key, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
        p.op(b"u");
    }
    p.op(b"uu.");
    (p.0, storages)
}

fn build(pickle: &[u8], storages: &[(String, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, Vec<u8>)> = storages.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    archive("archive", pickle, &refs, Some(b"little"))
}

#[test]
fn synthetic_archive_reads() {
    let (pickle, storages) = valid_pickle(2);
    let s = parse_official(&build(&pickle, &storages)).unwrap();
    assert_eq!((s.num_layers, s.num_heads, s.head_dim), (1, 2, 4));
    assert_eq!(s.q_mean_real, vec![0.0, -1.5, 1.0, -2.5]);
    assert_eq!(s.q_mean_imag, vec![0.25, -1.5, 1.25, -2.5]);
    assert_eq!(s.q_abs_mean, vec![0.5, -1.5, 1.5, -2.5]);
    assert_eq!(s.sampled_heads, Some(vec![[0, 0], [0, 1]]));
    assert_eq!(s.metadata.get("model_name").map(String::as_str), Some("toy"));
}

fn refused(bytes: &[u8], needle: &str) -> triattn::Error {
    let e = parse_official(bytes).expect_err("hostile input accepted");
    assert!(e.message().contains(needle), "expected {needle:?} in: {e}");
    e
}

#[test]
fn truncated_zip_is_refused() {
    let (pickle, storages) = valid_pickle(1);
    let bytes = build(&pickle, &storages);
    for cut in [0, 1, 4, 30, bytes.len() / 2, bytes.len() - 1] {
        let e = parse_official(&bytes[..cut]).expect_err("truncated archive accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
    }
    refused(&bytes[..bytes.len() - 10], "not a torch.save zip archive");
}

#[test]
fn truncated_pickle_is_refused() {
    let (pickle, storages) = valid_pickle(1);
    for cut in [0, 1, 2, 10, pickle.len() / 2, pickle.len() - 1] {
        let e = parse_official(&build(&pickle[..cut], &storages)).expect_err("truncated pickle accepted");
        assert!(e.message().contains("archive/data.pkl"), "{e}");
    }
}

#[test]
fn forbidden_globals_and_opcodes_are_refused() {
    // GLOBAL os system + REDUCE: the classic code-execution pickle.
    let mut p = Pickle::default();
    p.op(b"\x80\x02cos\nsystem\n").str("echo pwned").op(b"\x85R.");
    let e = refused(&archive("archive", &p.0, &[], None), "global os.system is not allowed");
    assert!(e.message().contains("0x63 (GLOBAL) at offset 2"), "{e}");
    assert!(e.message().contains("archive/data.pkl"), "{e}");

    // builtins via GLOBAL, even an innocuous-looking one.
    let e = refused(&archive("x", b"\x80\x02c__builtin__\neval\n.", &[], None), "__builtin__.eval is not allowed");
    assert_eq!(e.kind(), ErrorKind::InvalidFormat);

    // INST, OBJ, BUILD, STACK_GLOBAL, NEWOBJ: refused by name and offset.
    for (pickle, needle) in [
        (&b"\x80\x02(ios\nsystem\n."[..], "0x69 (INST) at offset 3"),
        (&b"\x80\x02(}o."[..], "0x6f (OBJ) at offset 4"),
        (&b"\x80\x02}}b."[..], "0x62 (BUILD) at offset 4"),
        (&b"\x80\x04\x8c\x02os\x8c\x06system\x93."[..], "0x93 (STACK_GLOBAL) at offset 14"),
        (&b"\x80\x02)\x81."[..], "0x81 (NEWOBJ) at offset 3"),
        (&b"\x80\x02\xfe."[..], "0xfe (unknown opcode) at offset 2"),
    ] {
        refused(&archive("archive", pickle, &[], None), needle);
    }

    // An allowed global used the wrong way: calling a storage class.
    refused(&archive("a", b"\x80\x02ctorch\nFloatStorage\n)R.", &[], None), "may only appear in a persistent id");
    // A persistent id that is not a storage tuple.
    let mut p = Pickle::default();
    p.op(b"\x80\x02(").str("module").str("os").op(b"tQ.");
    refused(&archive("a", &p.0, &[], None), "persistent id");
}

#[test]
fn huge_string_length_is_refused() {
    let mut pickle = b"\x80\x02X".to_vec();
    pickle.extend_from_slice(&u32::MAX.to_le_bytes());
    pickle.extend_from_slice(b"abc.");
    let e = refused(&archive("archive", &pickle, &[], None), "truncated pickle");
    assert!(e.message().contains("0x58 (BINUNICODE) at offset 2"), "{e}");
    // Same through the memo: an undefined memo entry.
    refused(&archive("archive", b"\x80\x02j\xff\xff\xff\x7f.", &[], None), "memo entry 2147483647 is not defined");
}

#[test]
fn missing_storage_is_refused() {
    let (pickle, mut storages) = valid_pickle(2);
    storages.retain(|(k, _)| k != "4");
    refused(&build(&pickle, &storages), "archive entry archive/data/4 is missing");
}

#[test]
fn wrong_storage_size_and_out_of_bounds_views_are_refused() {
    let (pickle, mut storages) = valid_pickle(1);
    storages[0].1.pop();
    refused(&build(&pickle, &storages), "archive/data/0: expected 8 bytes, got 7");

    // A view reaching past its storage.
    let mut p = Pickle::default();
    p.op(b"\x80\x02").tensor("0", 2, 1, 2).op(b".");
    refused(&archive("a", &p.0, &[("0", vec![0; 8])], None), "storage_offset + numel <= 2");

    // An absurd storage numel is refused before any allocation.
    let mut p = Pickle::default();
    p.op(b"\x80\x02}(").str("metadata").op(b"}(").str("rope_style").str("half").str("head_dim").int(4);
    p.op(b"u").str("stats").op(b"}(").str("layer00_head00").op(b"}(").str("q_mean_real");
    p.tensor("0", i32::MAX, 0, 2).op(b"uuu.");
    refused(&archive("a", &p.0, &[("0", vec![0; 8])], None), "storage 0: expected at most 1073741824 bytes");
}

#[test]
fn missing_head_and_bad_metadata_are_refused() {
    // sampled_heads names head 2, which has no statistics.
    let (pickle, storages) = valid_pickle(2);
    let mut hacked = pickle.clone();
    // Replace the last sampled pair (0, 1) by (0, 2): find the BININT 1 that follows BININT 0.
    let needle = [b'J', 0, 0, 0, 0, b'J', 1, 0, 0, 0];
    let at = hacked.windows(needle.len()).position(|w| w == needle).unwrap();
    hacked[at + 6] = 2;
    let e = refused(&build(&hacked, &storages), "layer00_head02 missing");
    assert_eq!(e.kind(), ErrorKind::Unsupported);

    // Big-endian archives are refused.
    let refs: Vec<(&str, Vec<u8>)> = storages.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    refused(&archive("archive", &pickle, &refs, Some(b"big")), "archive/byteorder: expected \"little\", got \"big\"");

    // Two folders with data.pkl.
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for f in ["a/data.pkl", "b/data.pkl"] {
        w.start_file(f, opts).unwrap();
        w.write_all(b"\x80\x02N.").unwrap();
    }
    refused(&w.finish().unwrap().into_inner(), "expected exactly one <folder>/data.pkl entry, got 2");

    // A root that is not a dict.
    refused(&archive("a", b"\x80\x02N.", &[], None), "pickle root: expected a dict, got None");
}

#[test]
fn garbage_never_panics() {
    // Deterministic pseudo-random mutations of a valid archive and of its pickle.
    let (pickle, storages) = valid_pickle(2);
    let bytes = build(&pickle, &storages);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..300 {
        let mut p = pickle.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % p.len() as u64) as usize;
            p[i] = next() as u8;
        }
        let _ = parse_official(&build(&p, &storages));
        let mut b = bytes.clone();
        let i = (next() % b.len() as u64) as usize;
        b[i] = next() as u8;
        let _ = parse_official(&b);
    }
}
