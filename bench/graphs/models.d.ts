// Types of models.js, for test/models.test.ts (the generators themselves are plain JS).
export type ModelName = 'resnet50' | 'mobilenetv2' | 'mlp' | 'transformer';
export interface FloatTensorData { dtype: 'float32'; dims: number[]; data: Float32Array }
export interface ModelParams { batch?: number | string; seed?: number; [k: string]: unknown }
export function resnet50(params?: ModelParams): Uint8Array;
export function mobilenetv2(params?: ModelParams): Uint8Array;
export function mlp(params?: ModelParams & { sizes?: number[] }): Uint8Array;
export function transformerEncoder(params?: ModelParams & { layers?: number; dModel?: number; heads?: number; tokens?: number; ffn?: number }): Uint8Array;
export const MODELS: Record<ModelName, {
  generate(params?: ModelParams): Uint8Array;
  inputDims(batch: number, params?: ModelParams): number[];
  outputDims(batch: number, params?: ModelParams): number[];
  reductions(params?: ModelParams): number[];
}>;
export function roundingTolerance(name: ModelName, params?: ModelParams): number;
export function relativeDifference(got: ArrayLike<number>, want: ArrayLike<number>): number;
export function modelPath(name: ModelName, params?: ModelParams): string;
export function modelBytes(name: ModelName, params?: ModelParams): Uint8Array;
export function modelInput(name: ModelName, batch: number, seed?: number, params?: ModelParams): FloatTensorData;
export const BF16_RESNET50_BOUND: number;
export function roundToBf16(values: Float32Array): Float32Array;
export function emulateBf16(bytes: Uint8Array): Uint8Array;
