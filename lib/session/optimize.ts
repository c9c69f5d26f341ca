/**
 * Load-time graph optimisation. PLACEHOLDER OWNED BY ENGINEER B (branch ts-opt): until that branch
 * is merged every level returns the graph unchanged, which is correct (the compiler runs any
 * graph) but does no folding or fusion. Engineer B's file replaces this one whole.
 */
import type { OnnxGraph } from '../onnx/model.js';

export type OptimizationLevel = 'none' | 'basic' | 'all';

export function optimize(graph: OnnxGraph, level: OptimizationLevel, opset: number): OnnxGraph {
  void level;
  void opset;
  return graph;
}
