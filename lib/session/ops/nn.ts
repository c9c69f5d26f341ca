/**
 * Neural-network ops: convolution and GEMM families (weights folded and packed once at load by
 * `prepare`), pooling, normalisation, softmax. Conv and Gemm/MatMul with initializer weights run on
 * the packed kernels of sonde.kernels; everything else is one plan step per node.
 */
import { native, type NativeConvHandle, type NativePackedGemm, type NativePackedGemmLowp } from '../../binding.js';
import { InternalError, UnsupportedOperatorError, ModelFormatError, fromNative } from '../../errors.js';
import type { OnnxNode } from '../../onnx/model.js';
import { Tensor } from '../../tensor.js';
import { makeAttrs, nodeWhere } from '../attrs.js';
import type { FusedActivation } from '../fused.js';
import type { PlanActivation, PlanStep } from '../plan.js';
import {
  maybeSparse, sparseConvScratch, sparseConvSteps, timeConvLayer, timeGemmLayer, timeSparseConvLayer, useSparse, type SparseChoice, type SparsePrepared,
} from '../sparse.js';
import { broadcastShapes, broadcastStrides, stridesOf, mergeAxes, normAxis, sizeOf } from './util.js';
import type { Attrs, DistributiveOmit, Emitter, OpContext, OpDef, PrepareOptions, Prepared, ValueId } from './types.js';
import { GpuLayer } from '../gpu.js';

// ------------------------------------------------------------------------------------------------
// Windows (Conv, pooling): 1-D windows are lifted to 2-D with a height of 1.

type AutoPad = 'NOTSET' | 'SAME_UPPER' | 'SAME_LOWER' | 'VALID';
const AUTO_PADS: readonly AutoPad[] = ['NOTSET', 'SAME_UPPER', 'SAME_LOWER', 'VALID'];

interface Window {
  kernel: [number, number];
  strides: [number, number];
  dilations: [number, number];
  /** [top, left, bottom, right] as given (NOTSET); resolved per input size otherwise. */
  pads: [number, number, number, number];
  autoPad: AutoPad;
  ceil: boolean;
}

function fail(node: OnnxNode, message: string): never {
  throw new ModelFormatError(`${nodeWhere(node)}: ${message}`);
}

/** Reads a window of `spatial` (1 or 2) dims from a Conv/pool node's attributes. */
function readWindow(node: OnnxNode, attrs: Attrs, kernel: number[], spatial: number): Window {
  if (spatial !== 1 && spatial !== 2) {
    throw new UnsupportedOperatorError(`${nodeWhere(node)}: ${spatial}-D windows are not supported (1-D and 2-D are)`);
  }
  const rawPad = attrs.string('auto_pad', 'NOTSET') || 'NOTSET';
  if (!AUTO_PADS.includes(rawPad as AutoPad)) fail(node, `auto_pad '${rawPad}' is not one of ${AUTO_PADS.join(', ')}`);
  const list = (name: string, len: number, def: number, min: number) => {
    const v = attrs.ints(name, new Array<number>(len).fill(def));
    if (v.length !== len) fail(node, `attribute '${name}' must have ${len} values, got ${v.length}`);
    v.forEach((x, i) => { if (x < min) fail(node, `${name}[${i}] must be >= ${min}, got ${x}`); });
    return v;
  };
  if (kernel.length !== spatial) fail(node, `kernel_shape must have ${spatial} values, got [${kernel.join(', ')}]`);
  kernel.forEach((k, i) => { if (k < 1) fail(node, `kernel_shape[${i}] must be >= 1, got ${k}`); });
  const strides = list('strides', spatial, 1, 1);
  const dilations = list('dilations', spatial, 1, 1);
  const pads = list('pads', 2 * spatial, 0, 0);
  const ceil = attrs.int('ceil_mode', 0) !== 0;
  if (spatial === 1) {
    return { kernel: [1, kernel[0]!], strides: [1, strides[0]!], dilations: [1, dilations[0]!], pads: [0, pads[0]!, 0, pads[1]!],
      autoPad: rawPad as AutoPad, ceil };
  }
  return { kernel: kernel as [number, number], strides: strides as [number, number], dilations: dilations as [number, number],
    pads: pads as [number, number, number, number], autoPad: rawPad as AutoPad, ceil };
}

/** Output size and concrete pads of a window over h x w (ONNX rules; ceil_mode as onnxruntime). */
function resolveWindow(ctx: OpContext, win: Window, h: number, w: number): { out: [number, number]; pads: [number, number, number, number] } {
  const out: number[] = [];
  const pads = [...win.pads] as [number, number, number, number];
  for (const [axis, size] of [[0, h], [1, w]] as const) {
    const ext = (win.kernel[axis] - 1) * win.dilations[axis] + 1;
    const s = win.strides[axis];
    let o: number;
    if (win.autoPad === 'SAME_UPPER' || win.autoPad === 'SAME_LOWER') {
      o = Math.ceil(size / s);
      const total = Math.max(0, (o - 1) * s + ext - size);
      const small = Math.floor(total / 2);
      pads[axis] = win.autoPad === 'SAME_UPPER' ? small : total - small;
      pads[axis + 2] = total - pads[axis]!;
    } else {
      if (win.autoPad === 'VALID') { pads[axis] = 0; pads[axis + 2] = 0; }
      const padded = size + pads[axis]! + pads[axis + 2]!;
      if (padded < ext) o = 0;
      else if (win.ceil) {
        o = Math.ceil((padded - ext) / s) + 1;
        // The last window must start inside the input or its begin padding.
        if ((o - 1) * s >= size + pads[axis]!) o--;
        pads[axis + 2] = Math.max(pads[axis + 2]!, (o - 1) * s + ext - size - pads[axis]!);
      } else o = Math.floor((padded - ext) / s) + 1;
    }
    if (o <= 0) {
      ctx.fail(`output ${axis ? 'width' : 'height'} would be ${o} (input ${size}, dilated kernel ${ext})`, { input: true });
    }
    out.push(o);
  }
  return { out: out as [number, number], pads };
}

/** [n, c, h, w] of a 3-D (1-D window) or 4-D input. */
function spatialDims(ctx: OpContext, shape: readonly number[]): [number, number, number, number] {
  if (shape.length === 4) return shape as unknown as [number, number, number, number];
  if (shape.length === 3) return [shape[0]!, shape[1]!, 1, shape[2]!];
  return ctx.fail(`input 0 must be 3-D [N, C, W] or 4-D [N, C, H, W], got [${shape.join(', ')}]`, { input: true });
}

function outShape(inRank: number, n: number, c: number, oh: number, ow: number): number[] {
  return inRank === 3 ? [n, c, ow] : [n, c, oh, ow];
}

// ------------------------------------------------------------------------------------------------
// Conv and sonde.FusedConv

// GemmActivation codes of native/kernels/gemm/gemm.h (the conv epilogue is the GEMM's).
const ACTIVATION_CODE: Record<FusedActivation, number> = {
  none: 0, relu: 1, clip: 2, silu: 3, gelu: 4, geluTanh: 5, sigmoid: 6, leakyRelu: 7, hardSwish: 8,
};

/** Convolutions that can read and write blocked (NCHW16c) activations, by handle. */
const directConvs = new WeakMap<NativeConvHandle, { cIn: number; cOut: number; win: Window; needsBlockedY: boolean; nchwX: boolean; bf16: boolean }>();

/** What the layout pass (lib/session/layout.ts) needs of a conv that can run on blocked operands. */
export interface BlockedConvGeometry {
  cIn: number;
  cOut: number;
  oh: number;
  ow: number;
  /** The border [t, l, b, r] a blocked x needs around its h x w interior: every tap in range. */
  border: [number, number, number, number];
  /** It reads a blocked x only when it also writes a blocked y (depthwise). */
  needsBlockedY: boolean;
  /** It reads an NCHW x only, and may write a blocked y (a stem). */
  nchwX: boolean;
  /** It also reads and writes bf16 blocked operands (the bf16 direct path). */
  bf16: boolean;
}

/** Undefined unless the handle can run on blocked activations (the direct path, blocked depthwise). */
export function blockedConvGeometry(handle: NativeConvHandle, h: number, w: number): BlockedConvGeometry | undefined {
  const d = directConvs.get(handle);
  if (!d) return undefined;
  const ctx = { fail: (m: string) => { throw new InternalError(`blocked conv: ${m}`); } } as unknown as OpContext;
  const { out: [oh, ow], pads } = resolveWindow(ctx, { ...d.win, ceil: false }, h, w);
  // The direct path has no dilation: the last output row reads rows up to (oh-1)*sh + kh of the padded input.
  const needB = Math.max(pads[0] + h, (oh - 1) * d.win.strides[0] + d.win.kernel[0]) - pads[0] - h;
  const needR = Math.max(pads[1] + w, (ow - 1) * d.win.strides[1] + d.win.kernel[1]) - pads[1] - w;
  return { cIn: d.cIn, cOut: d.cOut, oh, ow, border: [pads[0], pads[1], needB, needR], needsBlockedY: d.needsBlockedY, nchwX: d.nchwX, bf16: d.bf16 };
}

/**
 * What a conv can be in a fused inverted-residual chain (native ConvChain) on an h x w input: a 1x1
 * stride-1 unpadded fp32 conv on the direct path ('pointwise'), or a blocked depthwise conv.
 */
export function chainRole(handle: NativeConvHandle, h: number, w: number): 'pointwise' | 'depthwise' | undefined {
  const d = directConvs.get(handle);
  if (!d || d.bf16 || d.nchwX) return undefined;
  if (d.needsBlockedY) return 'depthwise';
  const g = blockedConvGeometry(handle, h, w)!;
  const unit = (v: number[]) => v.every((k) => k === 1);
  return unit(d.win.kernel) && unit(d.win.strides) && unit(d.win.dilations) && g.border.every((p) => p === 0)
    ? 'pointwise' : undefined;
}

interface ConvPrepared extends Prepared, SparsePrepared {
  /** The CPU's packed conv; absent in a GPU session, whose weights are `gpu`. */
  handle?: NativeConvHandle;
  gpu?: GpuLayer;
  group: number;
  cOut: number;
  cIn: number;
  win: Window;
  /** For the sparse path: the conv's bias and fused activation, applied by the SpMM epilogue. */
  bias?: Float32Array;
  act: { activation: FusedActivation; alpha: number; beta: number };
}

/** A 1x1 convolution is a GEMM per image: the only convolutions that run on SpMM (stride 1, no padding, one group). */
function isPointwise(win: Window, group: number): boolean {
  return group === 1 && win.kernel.every((k) => k === 1) && win.strides.every((s) => s === 1)
    && (win.autoPad !== 'NOTSET' || win.pads.every((p) => p === 0));
}

/**
 * Other convolutions on SpMM (KxK, or a strided 1x1): one group, 2-D, explicit or VALID pads (the
 * load-time timing needs the pads before any input size is known), through im2col panels.
 */
function isSparseKxK(win: Window, group: number, spatial: number): boolean {
  return group === 1 && spatial === 2 && (win.autoPad === 'NOTSET' || win.autoPad === 'VALID');
}

function fusedActivation(node: OnnxNode, attrs: Attrs): { activation: FusedActivation; alpha: number; beta: number } {
  const activation = attrs.string('activation', 'none') as FusedActivation;
  if (!(activation in ACTIVATION_CODE)) fail(node, `activation '${activation}' is not one of ${Object.keys(ACTIVATION_CODE).join(', ')}`);
  let alpha = attrs.float('alpha', activation === 'leakyRelu' ? 0.01 : 0);
  let beta = attrs.float('beta', 0);
  if (activation === 'clip') {
    alpha = attrs.float('alpha', -Infinity);
    beta = attrs.float('beta', Infinity);
  }
  return { activation, alpha, beta };
}

function prepareConv(fused: boolean) {
  return (node: OnnxNode, inputs: (Tensor | undefined)[], options: PrepareOptions): ConvPrepared => {
    const w = inputs[1];
    if (!w) throw new UnsupportedOperatorError(`${nodeWhere(node)}: the weights (input 1, '${node.inputs[1]}') must be an initializer`);
    if (w.dtype !== 'float32') fail(node, `weights must be float32, got ${w.dtype}`);
    if (w.dims.length !== 3 && w.dims.length !== 4) fail(node, `weights must be 3-D or 4-D, got [${w.dims.join(', ')}]`);
    const attrs = makeAttrs(node);
    const spatial = w.dims.length - 2;
    const kernel = attrs.ints('kernel_shape', w.dims.slice(2) as number[]);
    if (kernel.some((k, i) => k !== w.dims[2 + i])) fail(node, `kernel_shape [${kernel.join(', ')}] contradicts the weights [${w.dims.join(', ')}]`);
    const win = readWindow(node, attrs, kernel, spatial);
    const group = attrs.int('group', 1);
    const cOut = w.dims[0]!;
    if (group < 1 || cOut % group !== 0) fail(node, `group ${group} must be >= 1 and divide the output channels ${cOut}`);
    let bias: Float32Array | undefined;
    if (node.inputs[2]) {
      const b = inputs[2];
      if (!b) throw new UnsupportedOperatorError(`${nodeWhere(node)}: the bias (input 2) must be an initializer`);
      if (b.dtype !== 'float32' || b.size !== cOut) fail(node, `bias must be float32 [${cOut}], got ${b.dtype} [${b.dims.join(', ')}]`);
      bias = b.data as Float32Array;
    }
    const act = fused ? fusedActivation(node, attrs) : { activation: 'none' as const, alpha: 0, beta: 0 };
    const wdata = w.data as Float32Array;
    if (options.target === 'gpu') {
      // The GPU conv always adds a bias: zeros stand in for a model's absent one.
      const gpu = new GpuLayer(nodeWhere(node), wdata, options.precision === 'bf16', bias ?? new Float32Array(cOut));
      return { gpu, group, cOut, cIn: w.dims[1]! * group, win, ...(bias ? { bias } : {}), act, dispose: () => gpu.dispose() };
    }
    let handle: NativeConvHandle;
    try {
      handle = native().createConv(wdata, {
        cOut, cIn: w.dims[1]! * group, group, kernel: win.kernel, strides: win.strides, dilations: win.dilations,
        pads: win.pads, autoPad: AUTO_PADS.indexOf(win.autoPad), bias, bnEpsilon: 1e-5,
        activation: ACTIVATION_CODE[act.activation], alpha: act.alpha, beta: act.beta, precision: options.precision, variant: 'auto',
      });
    } catch (err) {
      throw fromNative(err);
    }
    const cIn = w.dims[1]! * group;
    const info = handle.info();
    const blockedIo = spatial === 2 ? info.blocked : undefined;
    if (blockedIo) {
      directConvs.set(handle, { cIn, cOut, win, needsBlockedY: blockedIo === 'xy', nchwX: blockedIo === 'y', bf16: info.blockedBf16 === true });
    }
    let sparse: SparseChoice | undefined;
    const pointwise = isPointwise(win, group);
    const kxk = !pointwise && isSparseKxK(win, group, spatial);
    if (options.precision === 'fp32' && (pointwise || kxk)) {
      // SpMM's B is [K = cIn*kh*kw, N = cOut]: the weights [cOut, cIn, kh, kw] transposed (K in im2col's order).
      const kk = cIn * kernel.reduce((a, b) => a * b, 1);
      const b = new Float32Array(kk * cOut);
      for (let o = 0; o < cOut; o++) for (let c = 0; c < kk; c++) b[c * cOut + o] = wdata[o * kk + c]!;
      try {
        // KxK runs only in the columns layout, which takes CSR.
        sparse = maybeSparse(b, kk, cOut, options.sparse, kxk ? 'csr' : 'auto');
      } catch (err) {
        handle.dispose();
        throw err;
      }
    }
    const epi = { ...(bias ? { bias } : {}), activation: act.activation as PlanActivation, alpha: act.alpha, beta: act.beta };
    const geometry = { cIn, cOut, kernel: win.kernel as [number, number], strides: win.strides as [number, number],
      dilations: win.dilations as [number, number], pads: win.autoPad === 'VALID' ? [0, 0, 0, 0] as [number, number, number, number] : win.pads };
    return {
      handle, group, cOut, cIn, win, ...(bias ? { bias } : {}), act, ...(sparse ? { sparse } : {}),
      calibrate: !sparse ? undefined
        : pointwise ? (threads: number) => timeConvLayer(sparse, handle, cIn, cOut, epi, threads)
          : (threads: number) => timeSparseConvLayer(sparse, handle, geometry, epi, threads),
      dispose: () => { handle.dispose(); sparse?.weights.dispose(); },
    };
  };
}

function convOp(fused: boolean): OpDef {
  return {
    prepare: prepareConv(fused),
    infer(ctx) {
      const x = ctx.inputs[0];
      const w = ctx.inputs[1];
      if (!x || !w) return ctx.fail('inputs X and W are required');
      if (x.dtype !== 'float32') ctx.fail(`X must be float32, got ${x.dtype}`);
      if (x.shape.length !== w.shape.length) ctx.fail(`X [${x.shape.join(', ')}] and W [${w.shape.join(', ')}] must have the same rank`, { input: true });
      const [n, c, h, wd] = spatialDims(ctx, x.shape);
      const p = ctx.prepared as ConvPrepared | undefined;
      const win = p?.win ?? readWindow(ctx.node, ctx.attrs, ctx.attrs.ints('kernel_shape', w.shape.slice(2)), w.shape.length - 2);
      const cIn = p?.cIn ?? w.shape[1]! * ctx.attrs.int('group', 1);
      if (c !== cIn) ctx.fail(`X has ${c} channels but the weights expect ${cIn}`, { input: true });
      const { out } = resolveWindow(ctx, { ...win, ceil: false }, h, wd);
      const shape = outShape(x.shape.length, n, w.shape[0]!, out[0], out[1]);
      const r = fused ? ctx.inputs[3] : undefined;
      if (r && (r.dtype !== 'float32' || r.shape.length !== shape.length || r.shape.some((d, i) => d !== shape[i]))) {
        ctx.fail(`the residual R must be float32 [${shape.join(', ')}], got ${r.dtype} [${r.shape.join(', ')}]`, { input: true });
      }
      return [{ dtype: 'float32', shape }];
    },
    lower(ctx, outs, e) {
      const p = ctx.prepared as ConvPrepared | undefined;
      if (!p) throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: the weights must be an initializer`);
      const [n, , h, w] = spatialDims(ctx, ctx.inputs[0]!.shape);
      if (sizeOf(outs[0]!.shape) === 0) return;
      const rbefore = fused && ctx.attrs.int('residual_before_activation', 0) !== 0;
      const pointwise = isPointwise(p.win, 1);
      const { out: [oh, ow], pads } = resolveWindow(ctx, { ...p.win, ceil: false }, h, w);
      if (p.gpu) {
        const dil = p.win.dilations;
        if (pads.some((pad, i) => pad >= (p.win.kernel[i % 2]! - 1) * dil[i % 2]! + 1)) {
          throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: pads [${pads.join(', ')}] as large as the kernel have no GPU path`);
        }
        const r = fused && ctx.inputs[3] ? e.ref(e.input(3)) : undefined;
        e.emit({ op: 'gpuConv', weights: p.gpu.weights(), bias: p.gpu.bias(), bf16: p.gpu.bf16, x: e.ref(e.input(0)), y: e.ref(e.output(0)),
          ...(r ? { residual: r } : {}), residualBeforeActivation: rbefore, n, cIn: p.cIn, h, w, cOut: p.cOut, group: p.group,
          kernel: p.win.kernel, strides: p.win.strides, dilations: p.win.dilations, pads,
          activation: p.act.activation as PlanActivation, alpha: p.act.alpha, beta: p.act.beta });
        return;
      }
      if (p.sparse && useSparse(p.sparse, n * (pointwise ? h * w : oh * ow))) {
        const residual = fused && ctx.inputs[3] ? e.input(3) : undefined;
        if (pointwise) emitPointwiseSpmm(e, p, p.sparse, n, h * w, residual, rbefore);
        else emitSparseConv(e, p, p.sparse, n, { h, w, oh, ow, pads }, residual, rbefore);
        return;
      }
      const r = fused && ctx.inputs[3] ? e.ref(e.input(3)) : undefined;
      e.emit({ op: 'conv', handle: p.handle!, x: e.ref(e.input(0)), y: e.ref(e.output(0)), ...(r ? { residual: r } : {}),
        residualBeforeActivation: fused && ctx.attrs.int('residual_before_activation', 0) !== 0, n, h, w });
    },
  };
}

/**
 * A 1x1 convolution on SpMM. NCHW holds each image as [cIn, HW] = A^T with HW contiguous, which is
 * what the SpMM's inner loop reads per non-zero; with CSR weights the step reads x and writes y (and
 * the residual) in place, column-major, one product per image. BSR's register tile wants rows of A,
 * so those weights go through [N*HW, c] temps and back. Either way 'auto' timed what runs here.
 */
function emitPointwiseSpmm(e: Emitter, p: ConvPrepared, s: SparseChoice, n: number, hw: number, residual: ValueId | undefined,
  residualBeforeActivation: boolean): void {
  const epilogue = {
    ...(p.bias ? { bias: e.ref(e.constant(new Tensor('float32', p.bias, [p.cOut]))) } : {}),
    residualBeforeActivation, activation: p.act.activation as PlanActivation, alpha: p.act.alpha, beta: p.act.beta,
  };
  if (s.format === 'csr') {
    e.emit({ op: 'spmm', weights: s.weights, a: e.ref(e.input(0)), c: e.ref(e.output(0)), m: hw, k: p.cIn, n: p.cOut,
      ...(residual !== undefined ? { residual: e.ref(residual) } : {}), ...epilogue,
      batch: n, aStrides: [p.cIn * hw, 1, hw], cStrides: [p.cOut * hw, 1, hw] });
    return;
  }
  const m = n * hw;
  const toRows = (src: ValueId, c: number): ValueId => {
    const t = e.temp('float32', [m, c]);
    e.emit({ op: 'copy', x: e.ref(src), y: e.ref(t), dims: [n, hw, c], xStrides: [c * hw, 1, hw], yStrides: [hw * c, c, 1], elemBytes: 4 });
    return t;
  };
  const a = toRows(e.input(0), p.cIn);
  const r = residual !== undefined ? toRows(residual, p.cOut) : undefined;
  const c = e.temp('float32', [m, p.cOut]);
  e.emit({ op: 'spmm', weights: s.weights, a: e.ref(a), c: e.ref(c), m, k: p.cIn, n: p.cOut,
    ...(r !== undefined ? { residual: e.ref(r) } : {}), ...epilogue });
  e.emit({ op: 'copy', x: e.ref(c), y: e.ref(e.output(0)), dims: [n, p.cOut, hw], xStrides: [hw * p.cOut, 1, p.cOut],
    yStrides: [p.cOut * hw, hw, 1], elemBytes: 4 });
}

/** A KxK convolution on SpMM, directly on the padded (or phased) image or through per-image im2col panels (see sparseConvSteps). */
function emitSparseConv(e: Emitter, p: ConvPrepared, s: SparseChoice, n: number,
  g: { h: number; w: number; oh: number; ow: number; pads: [number, number, number, number] }, residual: ValueId | undefined,
  residualBeforeActivation: boolean): void {
  const [kh, kw] = p.win.kernel as [number, number];
  const geometry = { cIn: p.cIn, cOut: p.cOut, ...g, kernel: [kh, kw] as [number, number], strides: p.win.strides as [number, number],
    dilations: p.win.dilations as [number, number] };
  const sizes = sparseConvScratch(geometry, n, residual !== undefined);
  const padded = e.temp('float32', [sizes.padded]);
  const scratch = sizes.scratch > 0 ? e.temp('float32', [sizes.scratch]) : undefined;
  const steps = sparseConvSteps(geometry, n, s, {
    x: (o) => e.ref(e.input(0), o), y: (o) => e.ref(e.output(0), o),
    ...(residual !== undefined ? { residual: (o: number) => e.ref(residual, o) } : {}),
    padded: (o) => e.ref(padded, o), ...(scratch !== undefined ? { scratch: e.ref(scratch) } : {}), ...(p.bias ? { bias: e.ref(e.constant(new Tensor('float32', p.bias, [p.cOut]))) } : {}),
  }, { residualBeforeActivation, activation: p.act.activation as PlanActivation, alpha: p.act.alpha, beta: p.act.beta }, '');
  // (emit names each step after the ONNX node, over the '' given here.)
  for (const step of steps) e.emit(step);
}

// ------------------------------------------------------------------------------------------------
// Gemm, sonde.FusedGemm, MatMul

export interface GemmPrepared extends Prepared, SparsePrepared {
  /** The CPU's packed weights; absent in a GPU session, whose weights are `gpu`. */
  weights?: NativePackedGemm | NativePackedGemmLowp;
  gpu?: GpuLayer;
  k: number;
  n: number;
}

/** Packs b [k, n] (row-major) for the session's precision. */
function packWeights(b: Float32Array, k: number, n: number, options: PrepareOptions, node: OnnxNode): GemmPrepared {
  if (options.target === 'gpu') {
    const gpu = new GpuLayer(nodeWhere(node), b, options.precision === 'bf16');
    return { gpu, k, n, dispose: () => gpu.dispose() };
  }
  let weights: NativePackedGemm | NativePackedGemmLowp;
  try {
    weights = options.precision === 'bf16'
      ? native().packGemmWeightsLowp(b, k, n, 'bf16', 'auto')
      : native().packGemmWeights(b, k, n, 'auto');
  } catch (err) {
    throw fromNative(err);
  }
  let sparse: SparseChoice | undefined;
  try {
    // bf16 sessions stay dense: the sparse kernels are fp32, and mixing would change the rounding per layer.
    if (options.precision === 'fp32') sparse = maybeSparse(b, k, n, options.sparse);
  } catch (err) {
    weights.dispose();
    throw err;
  }
  // Sparse weights too when SessionOptions.sparse and the weights' zeros call for them (fp32 only).
  return {
    weights, k, n, ...(sparse ? { sparse } : {}),
    calibrate: sparse ? (threads: number) => timeGemmLayer(sparse, weights as NativePackedGemm, k, n, threads) : undefined,
    dispose: () => { weights.dispose(); sparse?.weights.dispose(); },
  };
}

type GemmFields = Omit<Extract<PlanStep, { op: 'gemm' }>, 'op' | 'weights' | 'node'>;

/** The layer's gemm step, on the sparse weights when the session chose them for this M. */
function gemmStep(p: GemmPrepared, fields: GemmFields): DistributiveOmit<Extract<PlanStep, { op: 'gemm' | 'spmm' | 'gpuGemm' }>, 'node'> {
  if (p.gpu) return { op: 'gpuGemm', weights: p.gpu.weights(), bf16: p.gpu.bf16, ...fields };
  if (p.sparse && useSparse(p.sparse, fields.m)) {
    // Sparse weights exist in fp32 sessions only, so p.weights is the fp32 packed GEMM.
    const skip = fields.m === 1 ? { skipWeights: p.weights as NativePackedGemm } : {};
    return { op: 'spmm', weights: p.sparse.weights, ...fields, ...skip };
  }
  return { op: 'gemm', weights: p.weights!, ...fields };
}

/** [k, n] = scale * (trans ? b^T : b) for b of 2-D dims. */
function orientWeights(b: Tensor, trans: boolean, scale: number): { data: Float32Array; k: number; n: number } {
  const [r, c] = b.dims as unknown as [number, number];
  const src = b.data as Float32Array;
  if (!trans) {
    return { data: scale === 1 ? src : src.map((v) => v * scale), k: r, n: c };
  }
  const out = new Float32Array(r * c);
  for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) out[j * r + i] = src[i * c + j]! * scale;
  return { data: out, k: c, n: r };
}

function weightTensor(node: OnnxNode, inputs: (Tensor | undefined)[]): Tensor | undefined {
  const b = inputs[1];
  if (!b || b.dtype !== 'float32' || b.dims.length !== 2) return undefined;
  return b;
}

/** A bias of n values from a C that broadcasts to [m, n] with equal rows, scaled by beta; undefined when rows differ. */
function biasOf(c: Tensor, m: number, n: number, beta: number): Tensor | undefined {
  const d = c.dims;
  const rowsEqual = d.length === 0 || (d.length === 1 && (d[0] === n || d[0] === 1))
    || (d.length === 2 && d[0] === 1 && (d[1] === n || d[1] === 1)) || (m === 1 && sizeOf(d) === n);
  if (!rowsEqual) return undefined;
  const src = c.data as Float32Array;
  const out = new Float32Array(n);
  for (let j = 0; j < n; j++) out[j] = beta * src[c.size === 1 ? 0 : j]!;
  return new Tensor('float32', out, [n]);
}

/** C broadcast to a full [m, n] tensor times beta (a residual operand). */
function expandC(c: Tensor, m: number, n: number, beta: number): Tensor {
  const strides = broadcastStrides(c.dims, [m, n]);
  const src = c.data as Float32Array;
  const out = new Float32Array(m * n);
  for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) out[i * n + j] = beta * src[i * strides[0]! + j * strides[1]!]!;
  return new Tensor('float32', out, [m, n]);
}

function requireFloat(ctx: OpContext, i: number): number[] {
  const v = ctx.inputs[i];
  if (!v) return ctx.fail(`input ${i} is required`);
  if (v.dtype !== 'float32') ctx.fail(`input ${i} must be float32, got ${v.dtype}`);
  return v.shape;
}

/** Copies a [r, c] value transposed into a new temp [c, r]. */
function transposeTemp(e: Emitter, src: ValueId, r: number, c: number): ValueId {
  const t = e.temp('float32', [c, r]);
  e.emit({ op: 'copy', x: e.ref(src), y: e.ref(t), dims: [c, r], xStrides: [1, c], yStrides: [r, 1], elemBytes: 4 });
  return t;
}

const gemmOp: OpDef = {
  prepare(node, inputs, options) {
    const b = weightTensor(node, inputs);
    if (!b) return undefined;
    const attrs = makeAttrs(node);
    const o = orientWeights(b, attrs.int('transB', 0) !== 0, attrs.float('alpha', 1));
    return packWeights(o.data, o.k, o.n, options, node);
  },
  infer(ctx) {
    const a = requireFloat(ctx, 0);
    const b = requireFloat(ctx, 1);
    if (a.length !== 2 || b.length !== 2) ctx.fail(`A [${a.join(', ')}] and B [${b.join(', ')}] must be 2-D`, { input: true });
    const transA = ctx.attrs.int('transA', 0) !== 0;
    const transB = ctx.attrs.int('transB', 0) !== 0;
    const [m, k] = transA ? [a[1]!, a[0]!] : [a[0]!, a[1]!];
    const [kb, n] = transB ? [b[1]!, b[0]!] : [b[0]!, b[1]!];
    if (k !== kb) ctx.fail(`A's K (${k}) differs from B's K (${kb})`, { input: true });
    if (ctx.inputs[2]) {
      const c = requireFloat(ctx, 2);
      const bs = broadcastShapes(ctx, [c, [m, n]]);
      if (bs.length !== 2 || bs[0] !== m || bs[1] !== n) ctx.fail(`C [${c.join(', ')}] does not broadcast to [${m}, ${n}]`, { input: true });
    }
    return [{ dtype: 'float32', shape: [m, n] }];
  },
  lower(ctx, outs, e) {
    const [m, n] = outs[0]!.shape as [number, number];
    const a = ctx.inputs[0]!.shape;
    const transA = ctx.attrs.int('transA', 0) !== 0;
    const k = transA ? a[0]! : a[1]!;
    const alpha = ctx.attrs.float('alpha', 1);
    const beta = ctx.attrs.float('beta', 1);
    if (m * n === 0) return;
    let aId = e.input(0);
    if (transA) aId = transposeTemp(e, aId, k, m);
    const c = ctx.inputs[2];
    const p = ctx.prepared as GemmPrepared | undefined;
    if (p) {
      let bias: Tensor | undefined;
      let residual: ValueId | undefined;
      if (c && beta !== 0) {
        if (c.value) {
          bias = biasOf(c.value, m, n, beta);
          if (!bias) residual = e.constant(expandC(c.value, m, n, beta));
        } else if (beta === 1 && c.shape.length === 2 && c.shape[0] === m && c.shape[1] === n) {
          residual = e.input(2);
        }
      }
      const needsAdd = c && beta !== 0 && !bias && residual === undefined;
      const y = needsAdd ? e.temp('float32', [m, n]) : e.output(0);
      e.emit(gemmStep(p, { a: e.ref(aId), c: e.ref(y), m, k, n,
        ...(bias ? { bias: e.ref(e.constant(bias)) } : {}), ...(residual !== undefined ? { residual: e.ref(residual) } : {}),
        residualBeforeActivation: false, activation: 'none', alpha: 0, beta: 0 }));
      if (needsAdd) addScaled(ctx, e, y, [m, n], 2, beta, e.output(0));
      return;
    }
    // Both operands at run time: a plain matmul, then alpha and beta * C as elementwise steps.
    const transB = ctx.attrs.int('transB', 0) !== 0;
    const hasC = c !== undefined && beta !== 0;
    let cur = hasC || alpha !== 1 ? e.temp('float32', [m, n]) : e.output(0);
    e.emit({ op: 'matmul', a: e.ref(aId), b: e.ref(e.input(1)), c: e.ref(cur), batchDims: [1], aBatchStrides: [0], bBatchStrides: [0],
      m, k, n, transB });
    if (alpha !== 1) {
      const next = hasC ? e.temp('float32', [m, n]) : e.output(0);
      e.emit({ op: 'binary', kind: 'mul', dtype: 'float32', a: e.ref(cur), b: e.ref(e.constant(new Tensor('float32', Float32Array.of(alpha), [1]))),
        y: e.ref(next), dims: [m * n], aStrides: [1], bStrides: [0] });
      cur = next;
    }
    if (hasC) addScaled(ctx, e, cur, [m, n], 2, beta, e.output(0));
  },
};

/** y = x + beta * input(ci), broadcast to shape. */
function addScaled(ctx: OpContext, e: Emitter, x: ValueId, shape: number[], ci: number, beta: number, y: ValueId): void {
  const c = ctx.inputs[ci]!;
  let cId: ValueId;
  if (beta === 1) cId = e.input(ci);
  else if (c.value) cId = e.constant(new Tensor('float32', (c.value.data as Float32Array).map((v) => v * beta), c.value.dims));
  else {
    cId = e.temp('float32', c.shape);
    e.emit({ op: 'binary', kind: 'mul', dtype: 'float32', a: e.ref(e.input(ci)), b: e.ref(e.constant(new Tensor('float32', Float32Array.of(beta), [1]))),
      y: e.ref(cId), dims: [Math.max(1, sizeOf(c.shape))], aStrides: [1], bStrides: [0] });
  }
  const merged = mergeAxes(shape, [stridesOf(shape), broadcastStrides(c.shape, shape), stridesOf(shape)]);
  e.emit({ op: 'binary', kind: 'add', dtype: 'float32', a: e.ref(x), b: e.ref(cId), y: e.ref(y), dims: merged.dims,
    aStrides: merged.strides[0]!, bStrides: merged.strides[1]! });
}

const fusedGemmOp: OpDef = {
  prepare(node, inputs, options) {
    const b = weightTensor(node, inputs);
    if (!b) throw new UnsupportedOperatorError(`${nodeWhere(node)}: B (input 1) must be a 2-D float32 initializer`);
    const o = orientWeights(b, makeAttrs(node).int('trans_b', 0) !== 0, 1);
    return packWeights(o.data, o.k, o.n, options, node);
  },
  infer(ctx) {
    const a = requireFloat(ctx, 0);
    const b = requireFloat(ctx, 1);
    fusedActivation(ctx.node, ctx.attrs);
    const transB = ctx.attrs.int('trans_b', 0) !== 0;
    if (b.length !== 2) ctx.fail(`B must be 2-D, got [${b.join(', ')}]`);
    const [k, n] = transB ? [b[1]!, b[0]!] : [b[0]!, b[1]!];
    if (a.length < 1 || a[a.length - 1] !== k) ctx.fail(`A [${a.join(', ')}] must end in K = ${k}`, { input: true });
    const shape = [...a.slice(0, -1), n];
    if (ctx.inputs[2]) {
      const c = ctx.inputs[2];
      if (!c.value || sizeOf(c.shape) !== n && sizeOf(c.shape) !== 1) ctx.fail(`C must be an initializer of ${n} values, got [${c.shape.join(', ')}]`);
    }
    const r = ctx.inputs[3];
    if (r && (r.dtype !== 'float32' || sizeOf(r.shape) !== sizeOf(shape) || r.shape[r.shape.length - 1] !== n)) {
      ctx.fail(`the residual R must be float32 of the output's shape [${shape.join(', ')}], got [${r.shape.join(', ')}]`, { input: true });
    }
    return [{ dtype: 'float32', shape }];
  },
  lower(ctx, outs, e) {
    const p = ctx.prepared as GemmPrepared | undefined;
    if (!p) throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: B must be an initializer`);
    const shape = outs[0]!.shape;
    const m = sizeOf(shape.slice(0, -1));
    if (m * p.n === 0) return;
    const act = fusedActivation(ctx.node, ctx.attrs);
    const c = ctx.inputs[2]?.value;
    const bias = c ? biasOf(c, 1, p.n, 1) : undefined;
    e.emit(gemmStep(p, { a: e.ref(e.input(0)), c: e.ref(e.output(0)), m, k: p.k, n: p.n,
      ...(bias ? { bias: e.ref(e.constant(bias)) } : {}), ...(ctx.inputs[3] ? { residual: e.ref(e.input(3)) } : {}),
      residualBeforeActivation: ctx.attrs.int('residual_before_activation', 0) !== 0,
      activation: act.activation as PlanActivation, alpha: act.alpha, beta: act.beta }));
  },
};

/** numpy matmul shapes: 1-D operands are promoted and their promoted dim dropped from the result. */
function matmulShape(ctx: OpContext, a: number[], b: number[]): { m: number; k: number; n: number; batch: number[]; out: number[] } {
  if (a.length === 0 || b.length === 0) ctx.fail('MatMul operands must have rank >= 1', { input: true });
  const a2 = a.length === 1 ? [1, a[0]!] : a;
  const b2 = b.length === 1 ? [b[0]!, 1] : b;
  const m = a2[a2.length - 2]!;
  const k = a2[a2.length - 1]!;
  const kb = b2[b2.length - 2]!;
  const n = b2[b2.length - 1]!;
  if (k !== kb) ctx.fail(`A [${a.join(', ')}] and B [${b.join(', ')}] disagree on K (${k} vs ${kb})`, { input: true });
  const batch = broadcastShapes(ctx, [a2.slice(0, -2), b2.slice(0, -2)]);
  const out = [...batch, ...(a.length === 1 ? [] : [m]), ...(b.length === 1 ? [] : [n])];
  return { m, k, n, batch, out };
}

const matMulOp: OpDef = {
  prepare(node, inputs, options) {
    const b = weightTensor(node, inputs);
    if (!b) return undefined;
    return packWeights(b.data as Float32Array, b.dims[0]!, b.dims[1]!, options, node);
  },
  infer(ctx) {
    const a = requireFloat(ctx, 0);
    const b = requireFloat(ctx, 1);
    return [{ dtype: 'float32', shape: matmulShape(ctx, a, b).out }];
  },
  lower(ctx, outs, e) {
    const a = ctx.inputs[0]!.shape;
    const b = ctx.inputs[1]!.shape;
    const { m, k, n, batch } = matmulShape(ctx, a, b);
    if (sizeOf(outs[0]!.shape) === 0) return;
    const p = ctx.prepared as GemmPrepared | undefined;
    if (p) {
      // Weights shared by every batch entry: the leading dims of A are just more rows.
      e.emit(gemmStep(p, { a: e.ref(e.input(0)), c: e.ref(e.output(0)), m: sizeOf(a.slice(0, -1)), k, n,
        residualBeforeActivation: false, activation: 'none', alpha: 0, beta: 0 }));
      return;
    }
    const a2 = a.length === 1 ? [1, a[0]!] : a;
    const b2 = b.length === 1 ? [b[0]!, 1] : b;
    const batchStrides = (s: number[]) => {
      const own = s.slice(0, -2);
      const st = broadcastStrides(own, batch).map((x) => x * s[s.length - 2]! * s[s.length - 1]!);
      return st;
    };
    let batchDims = batch;
    let aBS = batchStrides(a2);
    let bBS = batchStrides(b2);
    const cBS = stridesOf(batch).map((x) => x * m * n);
    const merged = mergeAxes(batchDims, [aBS, bBS, cBS]);
    batchDims = merged.dims;
    aBS = merged.strides[0]!;
    bBS = merged.strides[1]!;
    e.emit({ op: 'matmul', a: e.ref(e.input(0)), b: e.ref(e.input(1)), c: e.ref(e.output(0)), batchDims, aBatchStrides: aBS,
      bBatchStrides: bBS, m, k, n, transB: false });
  },
};

// ------------------------------------------------------------------------------------------------
// Pooling

function poolOp(kind: 0 | 1): OpDef {
  const read = (ctx: OpContext) => {
    const x = requireFloat(ctx, 0);
    const [n, c, h, w] = spatialDims(ctx, x);
    const kernel = ctx.attrs.ints('kernel_shape');
    const win = readWindow(ctx.node, ctx.attrs, kernel, x.length - 2);
    if (kind === 0 && ctx.attrs.int('storage_order', 0) !== 0 && ctx.node.outputs[1]) {
      ctx.fail('storage_order 1 is not supported');
    }
    const countIncludePad = kind === 1 && ctx.attrs.int('count_include_pad', 0) !== 0;
    if (win.ceil && countIncludePad) {
      throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: ceil_mode with count_include_pad is not supported`);
    }
    const r = resolveWindow(ctx, win, h, w);
    return { x, n, c, h, w, win, countIncludePad, ...r };
  };
  return {
    infer(ctx) {
      const r = read(ctx);
      return [{ dtype: 'float32', shape: outShape(r.x.length, r.n, r.c, r.out[0], r.out[1]) }];
    },
    lower(ctx, outs, e) {
      const r = read(ctx);
      if (sizeOf(outs[0]!.shape) === 0) return;
      e.emit({ op: 'pool', kind, x: e.ref(e.input(0)), y: e.ref(e.output(0)), planes: r.n * r.c, h: r.h, w: r.w,
        kernel: r.win.kernel, strides: r.win.strides, dilations: r.win.dilations, pads: r.pads, countIncludePad: r.countIncludePad });
    },
  };
}

const globalAveragePoolOp: OpDef = {
  infer(ctx) {
    const x = requireFloat(ctx, 0);
    if (x.length < 3) ctx.fail(`X must have rank >= 3, got [${x.join(', ')}]`, { input: true });
    return [{ dtype: 'float32', shape: [x[0]!, x[1]!, ...x.slice(2).map(() => 1)] }];
  },
  lower(ctx, outs, e) {
    const x = ctx.inputs[0]!.shape;
    if (sizeOf(outs[0]!.shape) === 0) return;
    const hw = sizeOf(x.slice(2));
    if (hw === 0) ctx.fail('X has an empty spatial extent', { input: true });
    e.emit({ op: 'globalAveragePool', x: e.ref(e.input(0)), y: e.ref(e.output(0)), planes: x[0]! * x[1]!, hw });
  },
};

// ------------------------------------------------------------------------------------------------
// Softmax, LayerNormalization, BatchNormalization, Gelu

function softmaxOp(log: boolean): OpDef {
  return {
    infer(ctx) {
      const x = requireFloat(ctx, 0);
      return [{ dtype: 'float32', shape: [...x] }];
    },
    lower(ctx, outs, e) {
      const x = ctx.inputs[0]!.shape;
      const count = sizeOf(x);
      if (count === 0) return;
      const rank = Math.max(1, x.length);
      const shape = x.length === 0 ? [1] : x;
      let outer: number;
      let axisLen: number;
      let inner: number;
      if (ctx.opset < 13) {
        // Opsets 1-12 flatten to 2-D at `axis` and normalise each row.
        const axis = normAxis(ctx, ctx.attrs.int('axis', 1), rank);
        outer = sizeOf(shape.slice(0, axis));
        axisLen = sizeOf(shape.slice(axis));
        inner = 1;
      } else {
        const axis = normAxis(ctx, ctx.attrs.int('axis', -1), rank);
        outer = sizeOf(shape.slice(0, axis));
        axisLen = shape[axis]!;
        inner = sizeOf(shape.slice(axis + 1));
      }
      e.emit({ op: 'softmax', x: e.ref(e.input(0)), y: e.ref(e.output(0)), outer, axis: axisLen, inner, log });
    },
  };
}

const layerNormOp: OpDef = {
  infer(ctx) {
    const x = requireFloat(ctx, 0);
    const axis = normAxis(ctx, ctx.attrs.int('axis', -1), x.length);
    const cols = sizeOf(x.slice(axis));
    for (const i of [1, 2]) {
      const v = ctx.inputs[i];
      if (!v) { if (i === 1) ctx.fail('Scale (input 1) is required'); continue; }
      requireFloat(ctx, i);
      if (sizeOf(v.shape) !== cols && sizeOf(v.shape) !== 1) {
        ctx.fail(`input ${i} [${v.shape.join(', ')}] must hold the ${cols} values of the normalised axes`, { input: true });
      }
    }
    for (let i = 1; i < ctx.node.outputs.length; i++) {
      if (ctx.node.outputs[i]) throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: the Mean and InvStdDev outputs are not supported`);
    }
    return [{ dtype: 'float32', shape: [...x] }];
  },
  lower(ctx, outs, e) {
    const x = ctx.inputs[0]!.shape;
    const axis = normAxis(ctx, ctx.attrs.int('axis', -1), x.length);
    const rows = sizeOf(x.slice(0, axis));
    const cols = sizeOf(x.slice(axis));
    if (rows * cols === 0) return;
    const param = (i: number): ValueId | undefined => {
      const v = ctx.inputs[i];
      if (!v) return undefined;
      if (sizeOf(v.shape) === cols) return e.input(i);
      // A single value broadcast over the row: expanded once at compile time (or by a strided copy).
      if (v.value) return e.constant(new Tensor('float32', new Float32Array(cols).fill((v.value.data as Float32Array)[0]!), [cols]));
      const t = e.temp('float32', [cols]);
      e.emit({ op: 'copy', x: e.ref(e.input(i)), y: e.ref(t), dims: [cols], xStrides: [0], yStrides: [1], elemBytes: 4 });
      return t;
    };
    const scale = param(1);
    const bias = param(2);
    e.emit({ op: 'layerNorm', x: e.ref(e.input(0)), y: e.ref(e.output(0)), ...(scale !== undefined ? { scale: e.ref(scale) } : {}),
      ...(bias !== undefined ? { bias: e.ref(bias) } : {}), rows, cols, epsilon: ctx.attrs.float('epsilon', 1e-5) });
  },
};

const batchNormOp: OpDef = {
  infer(ctx) {
    const x = requireFloat(ctx, 0);
    if (x.length < 2) ctx.fail(`X must have rank >= 2, got [${x.join(', ')}]`, { input: true });
    if (ctx.attrs.int('training_mode', 0) !== 0) throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: training_mode 1 is not supported`);
    for (let i = 1; i < ctx.node.outputs.length; i++) {
      if (ctx.node.outputs[i]) throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: the training outputs (mean, var) are not supported`);
    }
    const c = x[1]!;
    for (const [i, name] of [[1, 'scale'], [2, 'B'], [3, 'mean'], [4, 'var']] as const) {
      const v = ctx.inputs[i];
      if (!v) ctx.fail(`${name} (input ${i}) is required`);
      if (!v!.value) throw new UnsupportedOperatorError(`${nodeWhere(ctx.node)}: ${name} (input ${i}) must be an initializer`);
      if (v!.dtype !== 'float32' || sizeOf(v!.shape) !== c) ctx.fail(`${name} must be float32 [${c}], got ${v!.dtype} [${v!.shape.join(', ')}]`, { input: true });
    }
    return [{ dtype: 'float32', shape: [...x] }];
  },
  lower(ctx, outs, e) {
    const x = ctx.inputs[0]!.shape;
    if (sizeOf(x) === 0) return;
    const c = x[1]!;
    const [s, b, mean, v] = [1, 2, 3, 4].map((i) => ctx.inputs[i]!.value!.data as Float32Array) as [Float32Array, Float32Array, Float32Array, Float32Array];
    const eps = ctx.attrs.float('epsilon', 1e-5);
    const scale = new Float32Array(c);
    const shift = new Float32Array(c);
    for (let i = 0; i < c; i++) {
      // In double, then rounded once: the same folding the optimiser applies to Conv weights.
      const k = s[i]! / Math.sqrt(v[i]! + eps);
      scale[i] = k;
      shift[i] = b[i]! - mean[i]! * k;
    }
    e.emit({ op: 'channelAffine', x: e.ref(e.input(0)), y: e.ref(e.output(0)),
      scale: e.ref(e.constant(new Tensor('float32', scale, [c]))), shift: e.ref(e.constant(new Tensor('float32', shift, [c]))),
      outer: x[0]!, channels: c, inner: sizeOf(x.slice(2)) });
  },
};

const geluOp: OpDef = {
  infer(ctx) {
    const x = requireFloat(ctx, 0);
    const approx = ctx.attrs.string('approximate', 'none');
    if (approx !== 'none' && approx !== 'tanh') ctx.fail(`approximate '${approx}' must be 'none' or 'tanh'`);
    return [{ dtype: 'float32', shape: [...x] }];
  },
  lower(ctx, outs, e) {
    const count = sizeOf(outs[0]!.shape);
    if (count === 0) return;
    const kind = ctx.attrs.string('approximate', 'none') === 'tanh' ? 'geluTanh' : 'gelu';
    e.emit({ op: 'unary', kind, dtype: 'float32', x: e.ref(e.input(0)), y: e.ref(e.output(0)), count, alpha: 0, beta: 0 });
  },
};

export const NN_OPS: Record<string, OpDef> = {
  Conv: convOp(false),
  BatchNormalization: batchNormOp,
  Gemm: gemmOp,
  MatMul: matMulOp,
  MaxPool: poolOp(0),
  AveragePool: poolOp(1),
  GlobalAveragePool: globalAveragePoolOp,
  Softmax: softmaxOp(false),
  LogSoftmax: softmaxOp(true),
  LayerNormalization: layerNormOp,
  Gelu: geluOp,
};

/** Domain 'sonde': the optimiser's fused forms (lib/session/fused.ts). */
export const NN_SONDE_OPS: Record<string, OpDef> = {
  FusedConv: convOp(true),
  FusedGemm: fusedGemmOp,
};

