/**
 * Load-time shape inference with symbolic dims, just enough for the fusions to prove what they
 * need (a residual operand has exactly the conv's output shape, a MatMul's input rank, a
 * LayerNorm's last dim) and to fold Shape of a tensor whose shape is static. Plans get concrete
 * shapes per run; here a dim is a number, or a symbol: the model's dim_param (the same name is the
 * same value), or a fresh `?n` for anything not known, which equals nothing but itself. A value
 * whose rank is unknown has no entry. Only what the graph's inputs and constants prove counts: a
 * model's value_info is not trusted (a wrong one would be baked into folded shapes), so the outputs
 * of ops not listed stay unknown, which only ever prevents a fusion or a fold.
 */
import type { OnnxNode } from '../../onnx/model.js';
import type { WorkGraph } from './graph.js';

export type SymDim = number | string;
export type SymShape = SymDim[];

export function sameShape(a: SymShape | undefined, b: SymShape | undefined): boolean {
  return !!a && !!b && a.length === b.length && a.every((d, i) => d === b[i]);
}

const SAME_SHAPE = new Set([
  'Relu', 'LeakyRelu', 'Clip', 'Sigmoid', 'Tanh', 'HardSigmoid', 'HardSwish', 'Erf', 'Exp', 'Log', 'Sqrt',
  'Neg', 'Abs', 'Not', 'Identity', 'Dropout', 'BatchNormalization', 'Softmax', 'LogSoftmax',
  'LayerNormalization', 'Gelu', 'Cast', 'Reciprocal', 'Floor', 'Ceil', 'Elu', 'Selu', 'Softplus', 'Round', 'Sign',
]);
const BROADCAST = new Set(['Add', 'Sub', 'Mul', 'Div', 'Pow', 'Equal', 'Less', 'Greater', 'And', 'Or', 'Where', 'Max', 'Min', 'PRelu']);

export function inferShapes(g: WorkGraph): Map<string, SymShape> {
  const shapes = new Map<string, SymShape>();
  let unknown = 0;
  const fresh = (): string => `?${unknown++}`;
  for (const vi of g.source.inputs) {
    if (vi.shape) shapes.set(vi.name, vi.shape.map((d) => (d === null ? fresh() : d)));
  }
  for (const [name, t] of g.inits) if (!g.graphInputs.has(name) || g.constant(name)) shapes.set(name, [...t.dims]);
  for (const node of g.nodes) {
    if (!node) continue;
    let out: SymShape | undefined;
    try {
      out = node.domain === '' ? inferNode(node, (v) => (v ? shapes.get(v) : undefined), g, fresh) : undefined;
    } catch {
      // A malformed node: the compiler reports it with context; here it only stays unknown.
      out = undefined;
    }
    const first = node.outputs[0];
    if (first && out) shapes.set(first, out);
  }
  return shapes;
}

function inferNode(n: OnnxNode, shape: (v: string | undefined) => SymShape | undefined, g: WorkGraph, fresh: () => string): SymShape | undefined {
  const x = shape(n.inputs[0]);
  const attr = n.attributes;
  if (SAME_SHAPE.has(n.opType)) return x;
  if (BROADCAST.has(n.opType)) {
    let out: SymShape | undefined = x;
    for (const v of n.inputs.slice(1)) out = broadcast(out, shape(v), fresh);
    return out;
  }
  switch (n.opType) {
    case 'Conv': case 'MaxPool': case 'AveragePool': {
      if (!x || x.length < 3) return undefined;
      const spatial = x.length - 2;
      let channels: SymDim = x[1]!;
      let kernel = attr.kernel_shape as number[] | undefined;
      if (n.opType === 'Conv') {
        const w = shape(n.inputs[1]);
        if (!w || w.length !== x.length) return undefined;
        channels = w[0]!;
        kernel ??= w.slice(2).map((d) => (typeof d === 'number' ? d : NaN));
      }
      if (!kernel || kernel.length !== spatial || kernel.some((k) => !Number.isInteger(k))) return undefined;
      const strides = (attr.strides as number[] | undefined) ?? new Array<number>(spatial).fill(1);
      const dil = (attr.dilations as number[] | undefined) ?? new Array<number>(spatial).fill(1);
      const pads = (attr.pads as number[] | undefined) ?? new Array<number>(2 * spatial).fill(0);
      const autoPad = (attr.auto_pad as string | undefined) ?? 'NOTSET';
      const ceil = n.opType !== 'Conv' && attr.ceil_mode === 1;
      const dims = x.slice(2).map((d, i): SymDim => {
        const k = kernel![i]!, s = strides[i] ?? 1, dl = dil[i] ?? 1;
        const span = dl * (k - 1) + 1;
        if (autoPad === 'SAME_UPPER' || autoPad === 'SAME_LOWER') {
          if (typeof d === 'number') return Math.ceil(d / s);
          return s === 1 ? d : fresh();
        }
        const total = autoPad === 'VALID' ? 0 : (pads[i] ?? 0) + (pads[i + spatial] ?? 0);
        if (typeof d !== 'number') return s === 1 && total === span - 1 ? d : fresh();
        const room = d + total - span;
        if (room < 0) return fresh();
        let o = (ceil ? Math.ceil(room / s) : Math.floor(room / s)) + 1;
        // The last window must start inside the input or its left padding (ONNX/PyTorch ceil_mode).
        if (ceil && (o - 1) * s >= d + (pads[i] ?? 0)) o--;
        return o;
      });
      return [x[0]!, channels, ...dims];
    }
    case 'GlobalAveragePool': case 'GlobalMaxPool':
      return x && x.length >= 3 ? [x[0]!, x[1]!, ...x.slice(2).map(() => 1)] : undefined;
    case 'MatMul': {
      const b = shape(n.inputs[1]);
      if (!x || !b || x.length === 0 || b.length === 0) return undefined;
      const a2 = x.length === 1 ? [1, x[0]!] : x;
      const b2 = b.length === 1 ? [b[0]!, 1] : b;
      const batch = broadcast(a2.slice(0, -2), b2.slice(0, -2), fresh);
      if (!batch) return undefined;
      const out = [...batch, ...(x.length === 1 ? [] : [a2[a2.length - 2]!]), ...(b.length === 1 ? [] : [b2[b2.length - 1]!])];
      return out;
    }
    case 'Gemm': {
      const b = shape(n.inputs[1]);
      if (!x || !b || x.length !== 2 || b.length !== 2) return undefined;
      return [attr.transA === 1 ? x[1]! : x[0]!, attr.transB === 1 ? b[0]! : b[1]!];
    }
    case 'Flatten': {
      if (!x) return undefined;
      let axis = (attr.axis as number | undefined) ?? 1;
      if (axis < 0) axis += x.length;
      const prod = (ds: SymShape): SymDim => (ds.every((d) => typeof d === 'number') ? (ds as number[]).reduce((p, q) => p * q, 1) : fresh());
      return [prod(x.slice(0, axis)), prod(x.slice(axis))];
    }
    case 'Transpose': {
      if (!x) return undefined;
      const perm = (attr.perm as number[] | undefined) ?? x.map((_, i) => x.length - 1 - i);
      return perm.length === x.length ? perm.map((p) => x[p]!) : undefined;
    }
    case 'Reshape': {
      const target = g.constant(n.inputs[1] ?? '');
      if (!x || !target || target.dtype !== 'int64') return undefined;
      const want = Array.from(target.data as BigInt64Array, Number);
      const allowZero = attr.allowzero === 1;
      const out: SymDim[] = want.map((d, i) => (d === 0 && !allowZero ? x[i] ?? fresh() : d));
      const minus = out.indexOf(-1);
      if (minus >= 0) {
        const known = out.filter((d, i) => i !== minus);
        const total = x.every((d) => typeof d === 'number') ? (x as number[]).reduce((p, q) => p * q, 1) : undefined;
        const rest = known.every((d) => typeof d === 'number') ? (known as number[]).reduce((p, q) => p * q, 1) : undefined;
        out[minus] = total !== undefined && rest ? total / rest : fresh();
      }
      return out;
    }
    case 'Unsqueeze': case 'Squeeze': {
      if (!x) return undefined;
      const axesInput = g.opset >= 13 ? n.inputs[1] : undefined;
      const axesT = axesInput ? g.constant(axesInput) : undefined;
      if (axesInput && (!axesT || axesT.dtype !== 'int64')) return undefined;
      const axes = axesT ? Array.from(axesT.data as BigInt64Array, Number) : (attr.axes as number[] | undefined);
      if (n.opType === 'Unsqueeze') {
        if (!axes) return undefined;
        const rank = x.length + axes.length;
        const set = new Set(axes.map((a) => (a < 0 ? a + rank : a)));
        const out: SymDim[] = [];
        let j = 0;
        for (let i = 0; i < rank; i++) out.push(set.has(i) ? 1 : x[j++]!);
        return out;
      }
      if (!axes) return x.every((d) => typeof d === 'number') ? x.filter((d) => d !== 1) : undefined;
      const set = new Set(axes.map((a) => (a < 0 ? a + x.length : a)));
      return x.filter((_, i) => !set.has(i));
    }
    case 'Concat': {
      const all = n.inputs.map((v) => shape(v));
      if (!x || all.some((s) => !s || s.length !== x.length)) return undefined;
      if (typeof attr.axis !== 'number') return undefined;
      let axis = attr.axis;
      if (axis < 0) axis += x.length;
      const along = all.map((s) => s![axis]!);
      const out = [...x];
      out[axis] = along.every((d) => typeof d === 'number') ? (along as number[]).reduce((p, q) => p + q, 0) : fresh();
      return out;
    }
    default:
      return undefined;
  }
}

/** Numpy broadcasting over symbolic dims; undefined when the shapes cannot broadcast. */
function broadcast(a: SymShape | undefined, b: SymShape | undefined, fresh: () => string): SymShape | undefined {
  if (!a || !b) return undefined;
  const rank = Math.max(a.length, b.length);
  const out: SymDim[] = [];
  for (let i = 0; i < rank; i++) {
    const da = a[a.length - rank + i] ?? 1;
    const db = b[b.length - rank + i] ?? 1;
    if (da === db || db === 1) out.push(da);
    else if (da === 1) out.push(db);
    else if (typeof da === 'number' && typeof db === 'number') return undefined;
    // A symbol against a number n > 1 is n (the symbol is n or 1); two different symbols: unknown.
    else if (typeof da === 'number') out.push(da);
    else if (typeof db === 'number') out.push(db);
    else out.push(fresh());
  }
  return out;
}
