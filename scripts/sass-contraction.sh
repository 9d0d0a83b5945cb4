#!/usr/bin/env bash
# sass-contraction.sh: which kernels nvcc contracts multiply-adds in (cuda/README.md "Numerics
# per kernel"). Compiles the generated instantiation unit for one arch twice, as build.rs does and
# with --fmad=false, and prints the FFMA / DFMA count of every kernel both ways. Kernels that must
# agree with the host bit for bit (normalize, reduce, select, compact, calibrate) must show the
# same counts: the script exits 1 when one does not.
#
# Usage: scripts/sass-contraction.sh [ARCH]   (ARCH default 90; needs a `cargo build --features
# cuda` first, for OUT_DIR/gen/kernels.cu). nvcc and cuobjdump as build.rs finds them under
# TRIATTN_CUDA_DIR (default .cuda).
set -euo pipefail
arch=${1:-90}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${TRIATTN_CUDA_DIR:-$root/.cuda}
nvcc=${TRIATTN_NVCC:-$dir/pypi/nvidia/cu13/bin/nvcc}
cuobjdump=$dir/tools/nvidia/cu13/bin/cuobjdump
[ -x "$cuobjdump" ] || cuobjdump=$(dirname "$nvcc")/cuobjdump
unit=$(ls -t "$root"/target/*/build/triattn-*/out/gen/kernels.cu 2>/dev/null | head -1 || true)
[ -n "$unit" ] || { echo "no generated kernels.cu: run cargo build --features cuda first" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
inc="-I$root/cuda -I$(dirname "$(dirname "$nvcc")")/include"
for mode in default nofma; do
  extra=""
  [ "$mode" = nofma ] && extra="--fmad=false"
  # shellcheck disable=SC2086
  "$nvcc" -std=c++17 -O3 --cubin $extra $inc -gencode="arch=compute_$arch,code=sm_$arch" -o "$tmp/$mode.cubin" "$unit"
  "$cuobjdump" -sass "$tmp/$mode.cubin" | awk '
    /Function : / { f = $3; ffma[f] = 0; dfma[f] = 0; next }
    /FFMA/ { ffma[f]++ } /DFMA/ { dfma[f]++ }
    END { for (f in ffma) print f, ffma[f], dfma[f] }' | sort > "$tmp/$mode.txt"
done
printf '%-52s %17s %17s\n' kernel "FFMA default/off" "DFMA default/off"
status=0
join "$tmp/default.txt" "$tmp/nofma.txt" | while read -r f ff df ff0 df0; do
  mark=""
  if [ "$ff" != "$ff0" ] || [ "$df" != "$df0" ]; then
    mark="contracted"
    case $f in
      triattn_normalize_*|triattn_reduce_*|triattn_select_*|triattn_compact_*|triattn_calibrate_*)
        mark="CONTRACTED: must be exact"; echo "$f" >> "$tmp/bad" ;;
    esac
  fi
  printf '%-52s %8s/%-8s %8s/%-8s %s\n' "$f" "$ff" "$ff0" "$df" "$df0" "$mark"
done
if [ -s "$tmp/bad" ]; then status=1; fi
exit $status
