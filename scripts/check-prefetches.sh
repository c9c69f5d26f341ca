#!/bin/sh
# Finds software prefetches the compiler deleted. GCC removes a loop whose only effect is
# prefetching (a prefetch has no observable effect): the NCHWc conv tiles' residual prefetch was such
# a loop and compiled to nothing, silently (see native/kernels/prefetch.h). This compiles every x86
# kernel file twice with the flags of the current build (build/build.ninja, from `npm run
# build:native`): as built, and with _mm_prefetch redefined as an asm statement, which the compiler
# keeps; a file whose prefetch count differs has prefetches that vanish in the real build. Prefetches
# written with PrefetchL1/PrefetchL2 (kernels/prefetch.h) are asm already and count the same.
# Usage: [CXX=g++] scripts/check-prefetches.sh [kernel .cc files; default all x86 ones] (about 3
# minutes for all on 2 cores); exits 1 when a file differs.
set -e
cd "$(dirname "$0")/.."
CXX="${CXX:-g++}"
ninja=build/build.ninja
[ -f "$ninja" ] || { echo "no $ninja: run npm run build:native first" >&2; exit 2; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cat > "$out/asm-prefetch.h" <<'EOF'
#include <immintrin.h>
#undef _mm_prefetch
static inline void sonde_check_prefetch(const void* p, int hint) {
  if (hint == 3) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char*)p));
  else if (hint == 2) __asm__ volatile("prefetcht1 %0" : : "m"(*(const char*)p));
  else if (hint == 1) __asm__ volatile("prefetcht2 %0" : : "m"(*(const char*)p));
  else __asm__ volatile("prefetchnta %0" : : "m"(*(const char*)p));
}
#define _mm_prefetch(P, I) sonde_check_prefetch((const void*)(P), (I) & 3)
EOF
status=0
checked=0
[ $# -gt 0 ] || set -- native/kernels/*/*-avx2.cc native/kernels/*/*-avx512*.cc native/kernels/*/*-amx.cc
for f in "$@"; do
  [ -e "$f" ] || continue
  # This file's compile line: the FLAGS and INCLUDES lines under its build statement.
  flags=$(awk -v src="/$f " 'index($0, "build ") == 1 && index($0, src) { on = 1; next }
    on && /^  FLAGS = / { sub(/^  FLAGS = /, ""); f = $0 }
    on && /^  INCLUDES = / { sub(/^  INCLUDES = /, ""); i = $0 }
    on && /^build / { exit } END { print f, i }' "$ninja")
  [ -n "$(echo "$flags" | tr -d ' ')" ] || { echo "skip $f: not in $ninja" >&2; continue; }
  # shellcheck disable=SC2086
  $CXX $flags -w -S -o "$out/a.s" "$f"
  # shellcheck disable=SC2086
  $CXX $flags -w -include "$out/asm-prefetch.h" -S -o "$out/b.s" "$f"
  # Instructions only: GCC marks each inline asm with a line comment naming its file.
  a=$(grep -cE '^[[:space:]]+prefetch' "$out/a.s" || true)
  b=$(grep -cE '^[[:space:]]+prefetch' "$out/b.s" || true)
  checked=$((checked + 1))
  if [ "$a" != "$b" ]; then
    echo "$f: $a prefetch instructions as built, $b with _mm_prefetch as asm"
    status=1
  fi
done
echo "$checked kernel files checked"
exit $status
