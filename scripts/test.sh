#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine (2 cores, no GPU).
#
#   scripts/test.sh
#
# Installs what it needs: cargo fetches the crates; scripts/setup-cuda.sh installs the pinned
# CUDA 13.0 compiler (and cuobjdump for the SASS check) from PyPI into .cuda/. The Rust
# toolchain, python3 with pip, and g++ are on every machine of this project.
#   TRIATTN_CUDA_ARCHS   archs compiled here (default "80;90" in this script; the crate's default is 80;86;89;90)
#   TRIATTN_SKIP_CUDA=1  skip the nvcc build (no PyPI access)
set -euo pipefail
cd "$(dirname "$0")/.."
export TRIATTN_CUDA_ARCHS="${TRIATTN_CUDA_ARCHS:-80;90}"
features="emu"

if [[ "${TRIATTN_SKIP_CUDA:-0}" != 1 ]]; then
  echo "== CUDA toolchain (pinned, from PyPI)"
  scripts/setup-cuda.sh --tools
  features="emu,cuda"
fi

echo "== format and lints (default build, and with --features $features)"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features "$features" -- -D warnings

echo "== tests: CPU backend (golden, properties, bad input, C ABI), emu parity of every kernel variant,"
echo "   and with cuda: every variant compiled by nvcc for sm_${TRIATTN_CUDA_ARCHS//;/ sm_} with no spills and HMMA in max mode"
echo "   (GPU parity tests skip loudly without a GPU; TRIATTN_REQUIRE_GPU=1 makes them fail instead)"
cargo test --features "$features"
if [[ "$features" == *cuda* ]]; then
  echo "== GPU parity tests (print SKIP without a GPU)"
  cargo test --features "$features" --test cuda_score --test cuda_stages --test cuda_compact --test cuda_round \
    -- --nocapture 2>&1 | grep -E "SKIP|test result" || true
fi
