//! Kernel parity, one test binary: every kernel variant and whole rounds on the emu backend
//! against the CPU backend (feature `emu`), and on a GPU against the CPU backend (feature `cuda`;
//! the GPU tests skip loudly without one, and fail when `TRIATTN_REQUIRE_GPU` is set). One module
//! per op or stage: `cargo test --features emu --test kernels emu_round::` runs one.

#[path = "../common/mod.rs"]
mod common;

mod cuda_compact;
mod cuda_decode;
mod cuda_round;
mod cuda_score;
mod cuda_stages;
mod decode_problem;
mod emu_calibrate;
mod emu_compact;
mod emu_decode;
mod emu_golden;
mod emu_normalize;
mod emu_reduce;
mod emu_round;
mod emu_score;
mod emu_select;
