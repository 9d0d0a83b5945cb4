#!/usr/bin/env bash
# The GPU check: CUDA-vs-CPU parity for every kernel variant, whole rounds (graph capture and
# replay, per-stage times) and sparse decode, and scoring and decode throughput against a device
# copy, in one call on a lent GPU machine.
#
#   scripts/gpu-check.sh build       here: build the test and bench binaries (nvcc from
#                                    setup-cuda.sh), strip them into target/gpu-check/
#   scripts/gpu-check.sh run         on the GPU machine: run them, print the parity lines and the
#                                    throughput table; logs under $OUT (or target/gpu-check/logs)
#   scripts/gpu-check.sh dry-run     here: `run` without requiring a GPU (tests skip loudly)
#
# The device call, with target/gpu-check carried (it is ignored by git):
#   run(command="bash scripts/gpu-check.sh run", carry=["target/gpu-check"], timeout_s=300)
# Environment: TRIATTN_CUDA_ARCHS (default "90": the H200 is sm_90, and one arch keeps the pack
# under the 64 MiB a device call carries; the binaries travel as one gzip tarball).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pack="$repo/target/gpu-check"
mode="${1:-}"

build() {
  cd "$repo"
  local home
  # --tools: cuobjdump, so the variants check can see HMMA in the SASS.
  home="$(bash scripts/setup-cuda.sh --tools | sed -n 's/^setup-cuda.sh: CUDA_HOME=//p')"
  if [[ -n "$home" ]]; then export CUDA_HOME="$home"; fi
  export TRIATTN_CUDA_ARCHS="${TRIATTN_CUDA_ARCHS:-90}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
  rm -rf "$pack"
  mkdir -p "$pack/bin"
  local json
  json="$(mktemp)"
  cargo test --release --features cuda --test kernels --test api --no-run --message-format=json >"$json"
  cargo bench --features cuda --bench score_gpu --bench decode_gpu --no-run --message-format=json >>"$json"
  cargo build --release --features cuda --bin triattn --message-format=json >>"$json"
  python3 - "$json" "$pack/bin" <<'PY'
import json, shutil, sys, os
src, dst = sys.argv[1], sys.argv[2]
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("kernels", "api", "score_gpu", "decode_gpu", "triattn"):
        shutil.copy(m["executable"], os.path.join(dst, m["target"]["name"]))
PY
  rm -f "$json"
  for b in "$pack"/bin/*; do strip --strip-debug "$b" 2>/dev/null || true; done
  tar -C "$pack" -czf "$pack/bin.tar.gz" bin
  rm -rf "$pack/bin"
  printf '%s\n' "built $(date -u +%FT%TZ) for sm ${TRIATTN_CUDA_ARCHS}" >"$pack/BUILD"
  printf '%s\n' "${TRIATTN_CUDA_ARCHS}" >"$pack/ARCHS"
  tar -tvzf "$pack/bin.tar.gz"
  du -sh "$pack"
}

run() {
  local require="$1"
  [[ -f "$pack/bin.tar.gz" ]] || { echo "gpu-check: $pack/bin.tar.gz missing: run 'scripts/gpu-check.sh build' first" >&2; exit 2; }
  local unpacked
  unpacked="$(mktemp -d)"
  tar -C "$unpacked" -xzf "$pack/bin.tar.gz"
  local bin="$unpacked/bin"
  local logs="${OUT:-$pack/logs}"
  mkdir -p "$logs"
  cat "$pack/BUILD"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  local env=()
  [[ "$require" == 1 ]] && env=(env TRIATTN_REQUIRE_GPU=1)
  local status=0
  # One step per theme: the module filter of the test binary, the log, what to show.
  step() {
    local title="$1" log="$2" show="$3"
    shift 3
    echo "== $title"
    "$@" 2>&1 | tee "$logs/$log" | grep -E "$show|SKIP|panicked|test result" || status=1
    grep -q "test result: ok" "$logs/$log" || status=1
  }
  local t=(--test-threads 1 --nocapture)
  step "parity: CUDA vs CPU, every variant" parity.txt "^parity" "${env[@]}" "$bin/kernels" "${t[@]}" cuda_score::
  step "parity: normalize, reduce, select: CUDA vs CPU" stages.txt "^parity" "${env[@]}" "$bin/kernels" "${t[@]}" cuda_stages::
  step "parity: compact and calibrate: CUDA vs CPU" compact.txt "^parity" "${env[@]}" "$bin/kernels" "${t[@]}" cuda_compact::
  step "round: every stage on the device vs CPU, graph capture and replay, per-stage times" round.txt \
    "^parity|^round|^stage" "${env[@]}" "$bin/kernels" "${t[@]}" cuda_round::
  step "CLI, Compressor and C ABI on the cuda backend: golden cases (compress, calibrate), batched rounds, device rounds through bindings" \
    api.txt "^parity" "${env[@]}" env TRIATTN_BIN="$bin/triattn" "$bin/api" "${t[@]}" cuda c_abi_device --skip capi:: --skip variants::
  # The archs the binaries were built for: the variants test checks the build against them.
  step "variants: ptxas report (no spills, HMMA in max mode)" variants.txt "^variants" \
    env TRIATTN_CUDA_ARCHS="$(cat "$pack/ARCHS")" TRIATTN_BIN="$bin/triattn" "$bin/api" variants::
  step "parity: sparse decode: CUDA vs the formula" decode.txt "^parity" "${env[@]}" "$bin/kernels" "${t[@]}" cuda_decode::
  echo "== throughput: score vs device copy"
  "${env[@]}" "$bin/score_gpu" 2>&1 | tee "$logs/bench.txt" || status=1
  echo "== throughput: sparse decode vs device copy and dense decode"
  "${env[@]}" "$bin/decode_gpu" 2>&1 | tee "$logs/decode_bench.txt" || status=1
  echo "== autotune --quick (Qwen3-8B shapes): default vs best variant per family and bucket"
  if [[ "$require" == 1 ]]; then
    "$bin/triattn" autotune --quick --model-config "$repo/data/qwen3_8b.config.json" --out "$logs/tuning.toml" \
      2>&1 | tee "$logs/autotune.txt" | grep -v "^autotune: \[" || status=1
    [[ -s "$logs/tuning.toml" ]] || status=1
  else
    echo "SKIP autotune: dry-run (no GPU required)"
  fi
  echo "gpu-check: $([[ $status == 0 ]] && echo PASS || echo FAIL); logs in $logs"
  return $status
}

case "$mode" in
  build) build ;;
  run) run 1 ;;
  dry-run) run 0 ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
