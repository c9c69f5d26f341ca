/**
 * The nodes the load-time optimiser (lib/session/optimize.ts) emits in place of ONNX patterns, and
 * that the compiler (lib/session/compile.ts) lowers. They live in domain 'sonde' so they can never
 * clash with a model's own nodes; a model file that uses domain 'sonde' itself is rejected at load.
 *
 * sonde.FusedConv
 *   inputs  [X, W, B?, R?]  (W, B initializers; '' marks an absent B; R = residual, same shape as Y)
 *   attrs   every attribute of ONNX Conv (auto_pad, dilations, group, kernel_shape, pads, strides),
 *           activation: FusedActivation (default 'none'), alpha, beta: floats (Clip min/max,
 *           LeakyRelu alpha), residual_before_activation: 0 | 1 (1: Y = act(conv + B + R),
 *           0: Y = act(conv + B) + R).
 *   BatchNormalization has already been folded into W and B (new initializers).
 *
 * sonde.FusedGemm
 *   inputs  [A, B, C?, R?]  (B, C initializers)
 *   attrs   trans_b: 0 | 1, activation, alpha, beta, residual_before_activation as above.
 *   Y = act(A . B' + C) (+ R) with A of any rank >= 1 whose last dim is K (leading dims are rows),
 *   B' = B [K, N] or B^T when trans_b; C broadcast to [N] (a [1, N] or [N] initializer).
 *   Gemm's alpha and beta are folded into B and C; Gemm's transA is a Transpose in front.
 *
 * Decomposed patterns are recognised as the standard ops (accepted by the compiler at any opset):
 *   LayerNormalization (opset-17 semantics, axis = -1, epsilon, inputs [X, Scale, Bias?]) and
 *   Gelu (opset-20 semantics, approximate = 'none' | 'tanh').
 */
export const SONDE_DOMAIN = 'sonde';

export type FusedActivation = 'none' | 'relu' | 'clip' | 'leakyRelu' | 'sigmoid' | 'silu' | 'hardSwish' | 'gelu' | 'geluTanh';
