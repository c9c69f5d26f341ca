/** Compute kernels, exposed for tests, microbenchmarks and advanced users. */
export { gemm, packGemmWeights, PackedGemmWeights } from './gemm.js';
export type { GemmOptions, GemmPrecision, GemmVariant, GemmActivation, PackGemmOptions } from './gemm.js';
export { toSparse, sparseFromCsr, spmm, SparseWeights } from './sparse.js';
export type { SparseFormat, ToSparseOptions, CsrInput } from './sparse.js';
export {
  add, sub, mul, div, gelu, silu, sigmoid, tanh, exp, relu, softmax, layerNorm, rmsNorm, argmax, topK, cast,
  broadcastShapes,
} from './elementwise.js';
export type {
  ElementwiseOptions, ElementwiseVariant, GeluOptions, GeluApproximation, SoftmaxOptions, LayerNormOptions,
  RmsNormOptions, ArgmaxOptions, TopKOptions, CastDType,
} from './elementwise.js';
export { createConv2d, conv2d, Conv2d, maxPool2d, averagePool2d, globalAveragePool } from './conv.js';
export type {
  Conv2dOptions, Conv2dRunOptions, BatchNormOptions, ConvVariant, ConvAutoPad, ConvActivation, PoolOptions,
  AveragePoolOptions,
} from './conv.js';
export { quantMatmul, quantizeWeights, dequantize, QuantizedWeights } from './quant.js';
export type { QuantType, QuantVariant, QuantAlgorithm, QuantMatmulOptions } from './quant.js';
export { moe, moeRoute } from './moe.js';
export type {
  MoeScoring, MoeMatrix, MoeExperts, MoeRouterSpec, MoeSharedExpert, MoeLayerSpec, MoeRunOptions, MoeOptions, MoeResult,
  MoeRouteResult,
} from './moe.js';
