#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine (2 cores, no GPU).
#
#   scripts/test.sh
#
# Installs nothing beyond what cargo fetches (the Rust toolchain and g++ are on every machine of
# this project); the CUDA steps install the pinned compiler with scripts/setup-cuda.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

echo "== CPU backend: unit, golden, property, bad-input and doc tests"
cargo test
