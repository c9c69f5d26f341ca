// Types of onnxruntime.js, for test/gemm-ort.test.ts (the bench harness itself is plain JS).
export interface OrtGemm {
  run(aData: Float32Array): Promise<Float32Array>;
  release(): Promise<void>;
}
export interface OrtGemmOptions {
  threads?: number;
  relu?: boolean;
  /** Leave ORT's intra-op threads spinning between runs (ORT's default). */
  spin?: boolean;
}
export const version: string;
export function gemmModel(m: number, k: number, n: number, bData: Float32Array,
  options?: { biasData?: Float32Array | null; relu?: boolean }): Uint8Array;
export function prepareWith(m: number, k: number, n: number, b: Float32Array,
  options?: OrtGemmOptions & { bias?: Float32Array | null }): Promise<OrtGemm>;
export function prepare(m: number, k: number, n: number,
  options?: OrtGemmOptions & { bias?: boolean; weights?: { b: Float32Array; bias?: Float32Array | null } }):
  Promise<OrtGemm & { weights: { b: Float32Array; bias: Float32Array | null } }>;
export interface ConvGeometry {
  strides?: number[]; pads?: number[]; dilations?: number[]; group?: number; relu?: boolean;
}
export function convModel(xDims: number[], wDims: number[], wData: Float32Array, bData: Float32Array,
  options?: ConvGeometry): { bytes: Uint8Array; outDims: number[] };
export function prepareConv(xDims: number[], wDims: number[], wData: Float32Array, bData: Float32Array,
  options?: ConvGeometry & { threads?: number; spin?: boolean }): Promise<{
    outDims: number[]; run(xData: Float32Array): Promise<Float32Array>; release(): Promise<void> }>;
export interface FloatFeed { data: Float32Array; dims: readonly number[] }
export interface OrtModel {
  inputNames: readonly string[];
  outputNames: readonly string[];
  run(feeds: Record<string, FloatFeed>): Promise<Record<string, { data: Float32Array; dims: number[] }>>;
  release(): Promise<void>;
}
export function prepareModel(bytes: Uint8Array, options?: { threads?: number; spin?: boolean;
  optimization?: 'disabled' | 'basic' | 'extended' | 'all' }): Promise<OrtModel>;
