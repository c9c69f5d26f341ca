/**
 * Load-time graph optimisation (the session's `optimization` option). Runs once per loaded model,
 * before the per-shape compiler, and returns a new graph with the same inputs and outputs that
 * computes the same values:
 *   'none'   the graph as parsed.
 *   'basic'  Identity/Dropout removal, constant folding, dead nodes and unused initializers dropped.
 *   'all'    basic, then BatchNormalization folded into Conv/Gemm/MatMul weights, LayerNormalization
 *            and GELU recognised from their decompositions, and Conv / Gemm / MatMul fused with bias,
 *            activation and residual Add into sonde.FusedConv / sonde.FusedGemm (lib/session/fused.ts).
 * The passes live in lib/session/passes/.
 */
import type { OnnxGraph } from '../onnx/model.js';
import { InvalidArgumentError } from '../errors.js';
import { evaluateConstantNode } from './compile.js';
import { foldConstants, removeDead, removeIdentities, type ConstantEvaluator } from './passes/basic.js';
import { foldBatchNorms } from './passes/fold-bn.js';
import { fuseConvs, fuseGemms } from './passes/fuse.js';
import { WorkGraph } from './passes/graph.js';
import { recogniseGelus, recogniseLayerNorms } from './passes/recognise.js';
import { inferShapes } from './passes/shapes.js';

export type OptimizationLevel = 'none' | 'basic' | 'all';
export const OPTIMIZATION_LEVELS: readonly OptimizationLevel[] = ['none', 'basic', 'all'];

export interface OptimizeOptions {
  /**
   * Whether initializers that are also listed as graph inputs are constants. ONNX IR < 4 lists
   * every initializer as an input; from IR 4 onnxruntime lets a feed override such an initializer.
   * sonde's Session takes them as constants, not inputs (lib/session/session.ts), hence the default
   * true; false keeps them out of every fold and fusion.
   */
  initializerInputsAreConstant?: boolean;
  /** Evaluates a node on constant inputs (default: the compiler's own ops, evaluateConstantNode). */
  evaluate?: ConstantEvaluator;
}

export function optimize(graph: OnnxGraph, level: OptimizationLevel, opset: number, options: OptimizeOptions = {}): OnnxGraph {
  if (!OPTIMIZATION_LEVELS.includes(level)) {
    throw new InvalidArgumentError(`optimization must be one of ${OPTIMIZATION_LEVELS.map((l) => `'${l}'`).join(', ')}, got ${JSON.stringify(level)}`);
  }
  if (level === 'none') return { ...graph };
  const g = new WorkGraph(graph, opset, options.initializerInputsAreConstant ?? true);
  removeIdentities(g);
  // Folding makes Reshape targets known, which makes more shapes static, which folds more Shape
  // nodes (PyTorch's Shape -> Gather -> Unsqueeze -> Concat -> Reshape); a few rounds reach the end.
  let shapes = inferShapes(g);
  for (let round = 0; round < 4 && foldConstants(g, options.evaluate ?? evaluateConstantNode, shapes); round++) {
    g.compact();
    shapes = inferShapes(g);
  }
  removeDead(g);
  if (level === 'all') {
    foldBatchNorms(g, shapes);
    g.compact();
    recogniseLayerNorms(g, shapes);
    g.compact();
    recogniseGelus(g);
    g.compact();
    // GEMMs first: a Gelu/LayerNorm recognised above can now be a GEMM's activation.
    fuseGemms(g, shapes);
    g.compact();
    fuseConvs(g, shapes);
    removeDead(g);
  }
  return g.toGraph();
}
