#!/bin/sh
# Compiles every native source that an aarch64 build uses (no x86 ISA files, no CUDA) with the
# aarch64 cross compiler, to keep ISA code behind the dispatch. Usage: scripts/check-aarch64.sh [CXX]
set -e
cd "$(dirname "$0")/.."
CXX="${1:-aarch64-linux-gnu-g++}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
inc="-Inative -Inode_modules/node-api-headers/include -Inode_modules/node-addon-api"
defs="-DNAPI_VERSION=8 -DNAPI_CPP_EXCEPTIONS -DNODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS -DNODE_ADDON_API_DISABLE_DEPRECATED"
n=0
for f in native/binding/*.cc native/runtime/*.cc native/ops/*.cc native/formats/*.cc native/kernels/*/*-scalar.cc native/kernels/*/*-config.cc; do
  [ -e "$f" ] || continue
  "$CXX" -std=c++17 -O1 -fPIC -Wall $defs $inc -c "$f" -o "$out/$n.o"
  n=$((n + 1))
done
"$CXX" -shared -o "$out/sonde.node" "$out"/*.o -lpthread
file "$out/sonde.node" 2>/dev/null || true
echo "aarch64: compiled and linked $n files"
