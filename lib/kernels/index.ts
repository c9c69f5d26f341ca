/** Compute kernels, exposed for tests, microbenchmarks and advanced users. */
export { gemm, packGemmWeights, PackedGemmWeights } from './gemm.js';
export type { GemmOptions, GemmPrecision, GemmVariant, GemmActivation, PackGemmOptions } from './gemm.js';
export {
  add, sub, mul, div, gelu, silu, sigmoid, tanh, exp, relu, softmax, layerNorm, rmsNorm, argmax, topK, cast,
  broadcastShapes,
} from './elementwise.js';
export type {
  ElementwiseOptions, ElementwiseVariant, GeluOptions, GeluApproximation, SoftmaxOptions, LayerNormOptions,
  RmsNormOptions, ArgmaxOptions, TopKOptions, CastDType,
} from './elementwise.js';
export { quantMatmul, quantizeWeights, dequantize, QuantizedWeights } from './quant.js';
export type { QuantType, QuantVariant, QuantMatmulOptions } from './quant.js';
