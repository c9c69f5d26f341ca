#!/usr/bin/env bash
# Shows that the build's Hopper kernels are real wgmma code: lists the cubins of the addon and counts,
# in the sm_90a one, the warpgroup MMA (HGMMA), tensor-copy (UTMALDG) and mbarrier (SYNCS)
# instructions; a GEMM whose sm_90a SASS shows no HGMMA runs on a slower path. Needs cuobjdump
# (CUDA toolkit; not on the development machines, which have nvcc and ptxas only).
set -euo pipefail
addon="${1:-build/Release/sonde.node}"
objdump="${CUOBJDUMP:-$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)}"
[ -x "$objdump" ] || { echo "no cuobjdump (set CUOBJDUMP)" >&2; exit 2; }
"$objdump" --list-elf "$addon"
sass="$("$objdump" --dump-sass --gpu-architecture sm_90a "$addon")"
for op in HGMMA UTMALDG SYNCS USETMAXREG; do
  printf '%-10s %s\n' "$op" "$(grep -c "$op" <<<"$sass" || true)"
done
grep -q HGMMA <<<"$sass" || { echo "no HGMMA in the sm_90a code" >&2; exit 1; }
