#!/bin/sh
# prebuildify calls this in place of node-gyp (it has no cmake-js backend). It passes node-gyp
# arguments, which cmake-js does not need: the addon is N-API, so one build serves every Node.
# Release prebuilds carry SASS for every architecture nvcc 13 supports unless SONDE_CUDA_ARCHS says otherwise;
# the wgmma sources (CMakeLists.txt, SONDE_SM90A_SOURCES) carry sm_90a in place of sm_90.
# A build tree configured the same way (CI builds it at npm install just before) is compiled
# incrementally, so its objects are not built twice; any other configuration is rebuilt from scratch.
set -e
: "${SONDE_CUDA_ARCHS:=75;80;86;89;90;100;120}"
export SONDE_CUDA_ARCHS
want="SONDE_CUDA=${SONDE_CUDA:-auto};archs=${SONDE_CUDA_ARCHS};sm90a=${SONDE_CUDA_SM90A:-}"
if [ -f build/sonde-config.txt ] && [ "$(cat build/sonde-config.txt)" = "$want" ]; then
  echo "prebuildify-build: build/ is configured as $want; compiling incrementally"
  exec npx cmake-js compile
fi
exec npx cmake-js rebuild
