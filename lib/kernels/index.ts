/** Compute kernels, exposed for tests, microbenchmarks and advanced users. */
export { gemm, packGemmWeights, PackedGemmWeights } from './gemm.js';
export type { GemmOptions, GemmPrecision, GemmVariant, GemmActivation, PackGemmOptions } from './gemm.js';
