//! The crate as its users see it, one test binary: the CLI against the golden cases, the
//! `Compressor` and batches on every backend, property and accuracy tests, bad input, statistics
//! files, the C ABI (its header, the C examples against both libraries, device rounds through
//! bindings), and the kernel report. One module per theme: `cargo test --test api golden::` runs
//! one.

#[path = "../common/mod.rs"]
mod common;

mod accuracy;
mod bad_input;
mod batch;
mod calibrate;
mod capi;
mod capi_device;
mod decode;
mod golden;
mod header;
mod properties;
mod shard;
mod stats_pt;
mod tuning;
mod variants;
