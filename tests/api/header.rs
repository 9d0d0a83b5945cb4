//! `include/triattn.h` must equal what cbindgen generates from src/ffi now.
//! `TRIATTN_BLESS=1 cargo test --test api header` rewrites it.

#[test]
fn header_is_fresh() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{root}/cbindgen.toml")).unwrap();
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(format!("{root}/src/ffi/mod.rs"))
        .with_src(format!("{root}/src/ffi/types.rs"))
        .with_src(format!("{root}/src/ffi/decode.rs"))
        .generate()
        .expect("cbindgen failed on src/ffi")
        .write(&mut fresh);
    let path = format!("{root}/include/triattn.h");
    if std::env::var_os("TRIATTN_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "include/triattn.h is stale: regenerate it with `TRIATTN_BLESS=1 cargo test --test api header` and commit it"
    );
}
