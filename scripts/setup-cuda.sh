#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, headers) from PyPI into a project-local
# folder, so `cargo build --features cuda` works on a machine without a CUDA toolkit.
#
#   scripts/setup-cuda.sh            install if needed, print the CUDA_HOME to use
#   scripts/setup-cuda.sh --tools    also install cuobjdump and nvdisasm (SASS inspection)
#
# Idempotent: a second run with the toolchain in place only prints where it is. When a CUDA
# toolkit is already found (TRIATTN_NVCC, CUDA_HOME/CUDA_PATH, or nvcc on PATH) nothing is
# installed. The place is `$TRIATTN_CUDA_DIR` or `<repo>/.cuda` (ignored by git); build.rs looks
# there too. Wheels are taken from `$TRIATTN_WHEEL_DIR` when it holds them (offline), else from
# PyPI through pip. The versions are pinned in DESIGN.md; change them here and nowhere else.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${TRIATTN_CUDA_DIR:-$repo/.cuda}"
home="$dest/pypi/nvidia/cu13"

pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
# SASS inspection only (`--tools`); newest releases of the 13.x line.
tools=(nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)

want_tools=0
for arg in "$@"; do
  case "$arg" in
    --tools) want_tools=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup-cuda.sh: unknown argument $arg (expected --tools)" >&2; exit 2 ;;
  esac
done

found_toolkit() {
  if [[ -n "${TRIATTN_NVCC:-}" && -x "${TRIATTN_NVCC}" ]]; then echo "${TRIATTN_NVCC}"; return 0; fi
  for h in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [[ -n "$h" && -x "$h/bin/nvcc" ]]; then echo "$h/bin/nvcc"; return 0; fi
  done
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
  return 1
}

pip_install() {
  # $1: target folder; rest: requirements. Offline wheels first, PyPI otherwise.
  local target="$1"; shift
  local py; py="$(command -v python3 || command -v python)"
  local args=(-m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$target")
  if [[ -n "${TRIATTN_WHEEL_DIR:-}" && -d "${TRIATTN_WHEEL_DIR}" ]]; then
    if "$py" "${args[@]}" --no-index --find-links "$TRIATTN_WHEEL_DIR" "$@" 2>/dev/null; then return 0; fi
  fi
  "$py" "${args[@]}" "$@"
}

if [[ $want_tools -eq 0 ]] && nvcc_path="$(found_toolkit)"; then
  echo "setup-cuda.sh: using the CUDA toolkit already present: $nvcc_path"
  exit 0
fi

stamp="$dest/pypi/.triattn-pins"
if [[ -x "$home/bin/nvcc" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  :
else
  echo "setup-cuda.sh: installing ${pins[*]} into $dest/pypi" >&2
  rm -rf "$dest/pypi.tmp"
  mkdir -p "$dest"
  pip_install "$dest/pypi.tmp" "${pins[@]}"
  rm -rf "$dest/pypi"
  mv "$dest/pypi.tmp" "$dest/pypi"
  echo "${pins[*]}" > "$stamp"
fi

if [[ $want_tools -eq 1 && ! -x "$dest/tools/nvidia/cu13/bin/cuobjdump" ]]; then
  echo "setup-cuda.sh: installing ${tools[*]} into $dest/tools" >&2
  rm -rf "$dest/tools.tmp"
  pip_install "$dest/tools.tmp" "${tools[@]}"
  rm -rf "$dest/tools"
  mv "$dest/tools.tmp" "$dest/tools"
fi

"$home/bin/nvcc" --version | tail -n 2 >&2
echo "setup-cuda.sh: CUDA_HOME=$home"
if [[ -d "$dest/tools" ]]; then
  echo "setup-cuda.sh: SASS tools in $(ls -d "$dest"/tools/nvidia/cu*/bin 2>/dev/null | head -n 1)"
fi
