// Types of digits.js, for test/digits.test.ts (the demo itself is plain JS).
export const modelPath: string;
export const testSplitPath: string;
export const reportPath: string;
export interface DigitsReport {
  test_accuracy: number;
  test_correct: number;
  test_size: number;
  train_size: number;
  min_top1_margin_relative: number;
  seed: number;
  opset: number;
  onnx_ops: Record<string, number>;
  versions: Record<string, string>;
}
export interface DigitsSplit {
  n: number;
  height: number;
  width: number;
  images: Float32Array;
  labels: Uint8Array;
}
export function readReport(path?: string): DigitsReport;
export function readTestSplit(path?: string): DigitsSplit;
export function argmaxRow(logits: ArrayLike<number>, row: number, classes: number): number;
export function countCorrect(logits: ArrayLike<number>, labels: ArrayLike<number>, classes?: number): number;
