#!/bin/sh
# Compiles every native source that an aarch64 build uses (no x86 ISA files, no nvcc; the GPU kernel
# sources are compiled as C++ against the CUDA emulator, as every build does) with the aarch64 cross
# compiler, to keep ISA code behind the dispatch. Usage: scripts/check-aarch64.sh [CXX]
set -e
cd "$(dirname "$0")/.."
CXX="${1:-aarch64-linux-gnu-g++}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
inc="-Inative -Inode_modules/node-api-headers/include -Inode_modules/node-addon-api"
defs="-DNAPI_VERSION=8 -DNAPI_CPP_EXCEPTIONS -DNODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS -DNODE_ADDON_API_DISABLE_DEPRECATED"
# -O0 and one compiler per core: the check is that the code compiles and links with no x86 code,
# and a serial -O1 build of every file took minutes on a loaded 2-core machine.
n=0
for f in native/binding/*.cc native/runtime/*.cc native/runtime/cuda/*.cc native/runtime/cuda/emu/*.cc native/kernels/*/cuda/*.cu native/ops/*.cc native/formats/*.cc native/kernels/*/*-scalar.cc native/kernels/*/*-config.cc; do
  [ -e "$f" ] || continue
  printf '%s\0%s\0' "$f" "$out/$n.o"
  n=$((n + 1))
done | xargs -0 -n 2 -P "$(nproc 2>/dev/null || echo 2)" sh -c "$CXX -x c++ -std=c++17 -O0 -fPIC -Wall $defs $inc -c \"\$0\" -o \"\$1\""
n=$(ls "$out"/*.o | wc -l)
"$CXX" -shared -o "$out/sonde.node" "$out"/*.o -lpthread
file "$out/sonde.node" 2>/dev/null || true
echo "aarch64: compiled and linked $n files"
