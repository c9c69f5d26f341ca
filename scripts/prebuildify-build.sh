#!/bin/sh
# prebuildify calls this in place of node-gyp (it has no cmake-js backend). It passes node-gyp
# arguments, which cmake-js does not need: the addon is N-API, so one build serves every Node.
# Release prebuilds carry SASS for every architecture nvcc 13 supports unless SONDE_CUDA_ARCHS says otherwise;
# the wgmma sources (CMakeLists.txt, SONDE_SM90A_SOURCES) carry sm_90a in place of sm_90.
set -e
: "${SONDE_CUDA_ARCHS:=75;80;86;89;90;100;120}"
export SONDE_CUDA_ARCHS
exec npx cmake-js rebuild
