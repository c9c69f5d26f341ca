/**
 * Dense or sparse per layer (SessionOptions.sparse). A layer whose weights are sparse enough gets
 * sparse weights built at load beside its packed dense ones; which of the two a plan uses is decided
 * per plan, when the layer's row count M is known, from timings taken at load.
 *
 * Why timing and not a cost model: whether SpMM beats the packed GEMM depends on the sparsity
 * pattern (CSR vs BSR, non-zeros per row), on K and N (cache fit of the packed panels), on M (the
 * GEMM's register tiles need rows to reach peak; SpMM's gather does not) and on the machine's SIMD
 * level and memory bandwidth. A formula would need all of those calibrated anyway; timing both
 * kernels on the layer's own weights measures exactly the thing to decide. It costs one native call
 * per candidate layer at load (both paths at three row counts, best of 2, timed natively per step
 * so the JS round trip is not in the numbers; best of 3 more where the choice is close, see
 * timeCases): a few milliseconds for an MLP layer, tens for a large 1x1 convolution. A 1x1 Conv's
 * sparse path is timed as it would run (CSR in place on NCHW; BSR with its two layout copies).
 *
 * 'auto' picks sparse only when the measured time is below SAFETY x the dense one at the plan's M
 * (interpolated between the measured M, linear beyond the largest), so a layer is never chosen
 * sparse on noise: the rule that keeps 'auto' within 5% of 'off' per layer.
 */
import { native, type NativeConvHandle, type NativePackedGemm, type NativePackedGemmLowp, type NativeSparseWeights } from '../binding.js';
import { fromNative } from '../errors.js';
import type { PlanActivation, PlanBuffer, PlanRef, PlanStep, PlanSpec } from './plan.js';

export type SparseMode = 'auto' | 'off' | 'force';

/** Below this fraction of zeros 'auto' does not even build sparse weights (SpMM cannot win). */
export const MIN_AUTO_SPARSITY = 0.5;
/** Sparse must measure at most this fraction of dense to be chosen. */
export const SAFETY = 0.9;
/** The row counts timed at load. */
export const TIMED_M = [1, 8, 64] as const;
const REPS = 3;
/** A layer is timed again when sparse / (SAFETY x dense) is within this factor of 1 in some case. */
const CLOSE = 1.5;

export interface SparseTiming {
  m: number;
  /** Best of REPS, nanoseconds. */
  denseNs: number;
  sparseNs: number;
}

/** The sparse side of a Gemm/MatMul layer's prepared weights. */
export interface SparseChoice {
  weights: NativeSparseWeights;
  /** The weights as gemm's B: [k, n] (a 1x1 conv: [cIn, cOut]). */
  k: number;
  n: number;
  mode: SparseMode;
  format: 'csr' | 'bsr';
  /** Zeros / (k * n) of the layer's weights. */
  sparsity: number;
  /** Filled at load in 'auto' (best of REPS, ns). */
  timings?: SparseTiming[];
  /** The kernel each compiled plan used, by M. */
  chosen: Map<number, 'dense' | 'sparse'>;
}

/** What a prepared Conv/Gemm/MatMul with sparse weights adds: the session times it at load in 'auto'. */
export interface SparsePrepared {
  sparse?: SparseChoice;
  calibrate?(threads: number): Promise<void>;
}

export function zeroFraction(d: Float32Array): number {
  let z = 0;
  for (let i = 0; i < d.length; i++) if (d[i] === 0) z++;
  return d.length ? z / d.length : 0;
}

/** Sparse weights for b [k, n] when the mode and sparsity call for them. */
export function maybeSparse(b: Float32Array, k: number, n: number, mode: SparseMode, format: 'auto' | 'csr' = 'auto'): SparseChoice | undefined {
  if ((mode !== 'auto' && mode !== 'force') || k * n === 0) return undefined;
  const sparsity = zeroFraction(b);
  if (mode === 'auto' && sparsity < MIN_AUTO_SPARSITY) return undefined;
  let weights: NativeSparseWeights;
  try {
    weights = native().toSparse(b, k, n, format, 0);
  } catch (err) {
    throw fromNative(err);
  }
  return { weights, k, n, mode, format: weights.info().format!, sparsity, chosen: new Map() };
}

/** Estimated ns at M rows from the load-time timings. */
function estimate(t: SparseTiming[], m: number, key: 'denseNs' | 'sparseNs'): number {
  if (m <= t[0]!.m) return t[0]![key];
  for (let i = 1; i < t.length; i++) {
    const a = t[i - 1]!, b = t[i]!;
    if (m <= b.m) return a[key] + ((b[key] - a[key]) * (m - a.m)) / (b.m - a.m);
  }
  const last = t[t.length - 1]!;
  return (last[key] * m) / last.m;
}

/** Whether the plan for M rows runs this layer sparse; records the choice. */
export function useSparse(s: SparseChoice | undefined, m: number): boolean {
  if (!s) return false;
  let sparse: boolean;
  if (s.mode === 'force') sparse = true;
  else if (!s.timings?.length) sparse = false;
  else {
    // (At M = 1 a row that is mostly zeros runs the dense zero-skipping GEMV in either step, see
    // the spmm step's skipWeights: the choice is between the SpMV and the full dense GEMV.)
    sparse = estimate(s.timings, m, 'sparseNs') < SAFETY * estimate(s.timings, m, 'denseNs');
  }
  s.chosen.set(m, sparse ? 'sparse' : 'dense');
  return sparse;
}

/** One row count to time: the steps of the dense path and of the sparse path for it. */
export interface TimedCase { m: number; dense: PlanStep[]; sparse: PlanStep[] }

/** Best ns per case of each path over `reps` interleaved repetitions, after one untimed warm-up pass when `warm`. */
async function measure(cases: TimedCase[], reps: number, warm: boolean, buffers: PlanBuffer[], arenaBytes: number,
  threads: number): Promise<{ denseNs: number; sparseNs: number }[]> {
  const steps: PlanStep[] = [];
  if (warm) for (const c of cases) steps.push(...c.dense, ...c.sparse);
  const spans: { dense: [number, number]; sparse: [number, number] }[][] = cases.map(() => []);
  for (let r = 0; r < reps; r++) {
    cases.forEach((c, ci) => {
      // Alternating which path goes first, so a drift in the machine's load hits both alike.
      const first = r % 2 ? c.sparse : c.dense;
      const second = r % 2 ? c.dense : c.sparse;
      const a0 = steps.length;
      steps.push(...first);
      const b0 = steps.length;
      steps.push(...second);
      const x: [number, number] = [a0, b0], y: [number, number] = [b0, steps.length];
      spans[ci]!.push(r % 2 ? { sparse: x, dense: y } : { dense: x, sparse: y });
    });
  }
  const spec: PlanSpec = { buffers, steps, arenaBytes, inputBytes: [], outputBytes: [] };
  let plan;
  try {
    plan = native().createPlan(spec);
  } catch (err) {
    throw fromNative(err);
  }
  try {
    const ns = new Float64Array(steps.length);
    await native().planRun(plan, [], [], threads, undefined, ns);
    const sum = ([a, b]: [number, number]) => { let t = 0; for (let i = a; i < b; i++) t += ns[i]!; return t; };
    return spans.map((reps) => ({
      denseNs: Math.min(...reps.map((r) => sum(r.dense))),
      sparseNs: Math.min(...reps.map((r) => sum(r.sparse))),
    }));
  } catch (err) {
    throw fromNative(err);
  } finally {
    plan.dispose();
  }
}

/**
 * Fills s.timings: every case's dense and sparse steps in one plan run (an untimed warm-up pass for
 * caches, the pool and the arena's pages, then best of 2). Most layers are decided by that: sparse
 * clearly faster or clearly slower than SAFETY x dense. Only a layer with some case within a factor
 * CLOSE of that line is timed again, best of REPS more, so that noise cannot tip a close choice;
 * this halves the load-time cost of 'auto' against timing every layer REPS times twice.
 */
async function timeCases(s: SparseChoice, buffers: PlanBuffer[], arenaBytes: number, cases: TimedCase[], threads: number): Promise<void> {
  let best = await measure(cases, 2, true, buffers, arenaBytes, threads);
  const ratio = (ci: number) => best[ci]!.sparseNs / (SAFETY * best[ci]!.denseNs);
  if (cases.some((_, ci) => ratio(ci) > 1 / CLOSE && ratio(ci) < CLOSE)) {
    const again = await measure(cases, REPS, false, buffers, arenaBytes, threads);
    best = best.map((b, ci) => ({ denseNs: Math.min(b.denseNs, again[ci]!.denseNs), sparseNs: Math.min(b.sparseNs, again[ci]!.sparseNs) }));
  }
  s.timings = cases.map((c, ci) => ({ m: c.m, ...best[ci]! }));
}

/**
 * Activations for timing: non-negative and non-zero like a ReLU layer's that is not sparse
 * (zeros would flatter a kernel that skips them), free of denormals so neither kernel hits a slow path.
 */
function timingActivations(count: number): Float32Array {
  const a = new Float32Array(count);
  let seed = 12345;
  for (let i = 0; i < count; i++) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    a[i] = 0.25 + (seed >>> 8) / 2 ** 24;
  }
  return a;
}

const align64 = (b: number) => Math.ceil(b / 64) * 64;

/** Times a Gemm/MatMul layer: packed dense GEMM against SpMM at TIMED_M rows. */
export async function timeGemmLayer(s: SparseChoice, dense: NativePackedGemm | NativePackedGemmLowp, k: number, n: number,
  threads: number): Promise<void> {
  const maxM = TIMED_M[TIMED_M.length - 1]!;
  const a = timingActivations(maxM * k);
  const cBytes = maxM * n * 4;
  const buffers: PlanBuffer[] = [{ kind: 'const', data: a, bytes: a.byteLength }, { kind: 'arena', offset: 0, bytes: cBytes }];
  const step = (m: number) => ({ node: 'sparse-timing', a: { buffer: 0, offset: 0 }, c: { buffer: 1, offset: 0 }, m, k, n,
    residualBeforeActivation: false, activation: 'none' as const, alpha: 0, beta: 0 });
  // (Rows without zeros: a mostly-zero row runs the dense zero-skipping GEMV in both steps at M = 1.)
  const cases = TIMED_M.map((m): TimedCase => ({
    m, dense: [{ op: 'gemm', weights: dense, ...step(m) }], sparse: [{ op: 'spmm', weights: s.weights, ...step(m) }],
  }));
  await timeCases(s, buffers, cBytes, cases, threads);
}

/** A ref to a value at an element offset (the compiler's refs are placeholders its planner rewrites, so offsets go through it). */
export type OffsetRef = (offset: number) => PlanRef;

/** A convolution's geometry for the sparse KxK path (one group, 2-D, pads resolved). */
export interface SparseConvGeometry {
  cIn: number; cOut: number; h: number; w: number; oh: number; ow: number;
  kernel: [number, number]; strides: [number, number]; dilations: [number, number]; pads: [number, number, number, number];
}

/**
 * Output rows at least this wide run the direct form row by row (no im2col panel): each call of the
 * kernel is one output row, so a narrow row wastes most of its last vector and pays the per-column
 * work for few positions. One thread, 90% unstructured 3x3 layers against SpMM on the im2col panel
 * (the panel's copy not counted): 56x56 (64 channels) 1.7x faster, 28x28 (128) 1.3-1.4x, 14x14 (256)
 * 0.5x, 7x7 0.4x. Narrower convs without a residual run all their rows as one long row instead
 * (sparseConvPlan's 'wide').
 */
export const DIRECT_MIN_OW = 24;

/** How sparseConvSteps runs a KxK convolution (see sparseConvPlan). */
export interface SparseConvPlan {
  mode: 'rows' | 'wide' | 'im2col';
  /**
   * The direct forms' image is stored in strides[0] x strides[1] phases (phase (ry, rx) holding the
   * padded image's rows ry, ry + sh, ... and columns rx, rx + sw, ...), so that a strided conv reads
   * contiguous rows; filled by a zero fill and one strided copy per phase a tap reads. Otherwise the
   * padded image itself (a pad step).
   */
  phased: boolean;
  /** Floats of the (padded or phased) image of one input image. */
  image: number;
  /** Floats of the scratch beside it: the long row's output, or the im2col panel; 0 for 'rows'. */
  scratch: number;
}

/**
 * - 'rows': directly on the image, one output row per kernel call (rows of at least DIRECT_MIN_OW);
 * - 'wide': directly, all output rows as one row of (oh - 1) * rowPitch + ow positions: the positions
 *   that straddle row ends are computed and dropped by a copy of the rest into y. Against the im2col
 *   panel at 14x14 (256 channels) and 7x7 (512), one thread, 90%: 1.03x / 1.15x for the SpMM alone,
 *   without the panel's copy (0.11 / 0.15 ms); the copy out costs ~0.02 ms. The dropped positions
 *   take the epilogue's bias and activation, so a residual rules it out;
 * - 'im2col': through the panel [cIn*kh*kw, oh*ow] (narrow or strided-along-rows convs with a residual).
 * 'wide' runs strided convs on the phased image, rows strided along them however wide: a stride-2
 * 3x3 with 28-wide rows (128 channels, 56x56 in) took 0.75 ms there row by row (each output row
 * reading six short phase rows per channel), 0.62 as one long row, against 0.41 on its im2col panel
 * plus 0.48 for the pad and the panel's copy (in ResNet-50, 1.28 -> 1.16 ms for the layer).
 * 'rows' reads the padded image, every sh-th row.
 */
export function sparseConvPlan(g: SparseConvGeometry, residual: boolean): SparseConvPlan {
  const [sh, sw] = g.strides;
  const hp = g.h + g.pads[0] + g.pads[2], wp = g.w + g.pads[1] + g.pads[3];
  const wide = g.ow < DIRECT_MIN_OW || sw > 1;
  const phased = wide && (sh > 1 || sw > 1);
  const image = phased ? g.cIn * sh * sw * Math.ceil(hp / sh) * Math.ceil(wp / sw) : g.cIn * hp * wp;
  const rowPitch = phased ? Math.ceil(wp / sw) : wp;
  if (image <= 0xffffffff && (wide ? !residual : sw === 1)) {
    return { mode: wide ? 'wide' : 'rows', phased, image, scratch: wide ? g.cOut * ((g.oh - 1) * rowPitch + g.ow) : 0 };
  }
  return { mode: 'im2col', phased: false, image: g.cIn * hp * wp, scratch: g.cIn * g.kernel[0] * g.kernel[1] * g.oh * g.ow };
}

/**
 * Floats of the two scratch values sparseConvSteps needs for a batch of n: the padded (or phased)
 * images, all n of them for the direct forms and one for im2col (which pads image by image), and the
 * scratch beside them: all n long rows' outputs, or one image's im2col panel.
 */
export function sparseConvScratch(g: SparseConvGeometry, n: number, residual: boolean): { padded: number; scratch: number } {
  const plan = sparseConvPlan(g, residual);
  const whole = plan.mode !== 'im2col' || g.kernel[0] * g.kernel[1] === 1;
  return { padded: (whole ? n : 1) * plan.image, scratch: (plan.mode === 'wide' || whole ? n : 1) * plan.scratch };
}

/**
 * A KxK (or strided 1x1) convolution on the columns-layout SpMM: the images zero-padded (a pad step,
 * skipped without pads) or phased (sparseConvPlan), then C^T [cOut, oh*ow] = W . panel written into
 * each image's NCHW output, where the panel [cIn*kh*kw, oh*ow] (row (c, ky, kx) is the padded plane
 * read at stride (sh, sw) from (ky*dh, kx*dw): the K order of the weights [cOut, cIn, kh, kw]) is
 * read in place from that image (the spmm step's taps; one step for the batch, so threads can take
 * whole images) or gathered by one strided copy per image (at batch 8 a whole-batch panel of
 * ResNet-50's first 3x3 layer would be 58 MB). `x`, `y`, `residual` at image 0 (NCHW), `padded`
 * and `scratch` sized by sparseConvScratch.
 */
export function sparseConvSteps(g: SparseConvGeometry, n: number, s: SparseChoice, refs: {
  x: OffsetRef; y: OffsetRef; residual?: OffsetRef; padded: OffsetRef; scratch?: PlanRef; bias?: PlanRef },
epilogue: { residualBeforeActivation: boolean; activation: PlanActivation; alpha: number; beta: number }, node: string): PlanStep[] {
  const [kh, kw] = g.kernel, [sh, sw] = g.strides, [dh, dw] = g.dilations, [pt, pl, pb, pr] = g.pads;
  const hp = g.h + pt + pb, wp = g.w + pl + pr, m = g.oh * g.ow, k = g.cIn * kh * kw, hw = g.h * g.w;
  const padding = pt + pl + pb + pr > 0;
  const plan = sparseConvPlan(g, refs.residual !== undefined);
  const { mode, phased } = plan;
  if (plan.scratch > 0 && !refs.scratch) throw new Error(`sparseConvSteps: the ${mode} form needs a scratch of ${plan.scratch} floats`);
  const hq = phased ? Math.ceil(hp / sh) : hp, wq = phased ? Math.ceil(wp / sw) : wp;
  const long = (g.oh - 1) * wq + g.ow;
  const common = { node, weights: s.weights, k, n: g.cOut, ...(refs.bias ? { bias: refs.bias } : {}), ...epilogue };
  const steps: PlanStep[] = [];
  // The (padded or phased) images from image b on: `images` of them (the batch for the direct
  // forms, one for im2col), or x itself when there is nothing to pad (plan.image = cIn * h * w then).
  const pad = (b: number, images: number) => {
    if (phased) {
      // The phases a tap reads, each from every image's channels at once (images and channels
      // merge: both are whole planes apart in x and in the phased copy).
      const phases = new Set<number>();
      for (let ky = 0; ky < kh; ky++) for (let kx = 0; kx < kw; kx++) phases.add(((ky * dh) % sh) * sw + ((kx * dw) % sw));
      steps.push({ op: 'fill', node, y: refs.padded(0), dtype: 'float32', count: images * plan.image, value: 0 });
      for (const ph of [...phases].sort((u, v) => u - v)) {
        const ry = Math.floor(ph / sw), rx = ph % sw;
        // The input's first row and column that land in this phase, and how many.
        const y0 = (((ry - pt) % sh) + sh) % sh, x0 = (((rx - pl) % sw) + sw) % sw;
        if (y0 >= g.h || x0 >= g.w) continue;
        const rows = Math.ceil((g.h - y0) / sh), cols = Math.ceil((g.w - x0) / sw);
        steps.push({ op: 'copy', node, x: refs.x(b * g.cIn * hw + y0 * g.w + x0),
          y: refs.padded(ph * hq * wq + ((y0 + pt - ry) / sh) * wq + (x0 + pl - rx) / sw),
          dims: [images * g.cIn, rows, cols], xStrides: [hw, sh * g.w, sw], yStrides: [sh * sw * hq * wq, wq, 1], elemBytes: 4 });
      }
    } else if (padding) {
      steps.push({ op: 'pad', node, x: refs.x(b * g.cIn * hw), y: refs.padded(0), dtype: 'float32', inDims: [images * g.cIn, g.h, g.w],
        begin: [0, pt, pl], end: [0, pb, pr], mode: 'constant', value: 0 });
    }
    return phased || padding ? refs.padded(0) : refs.x(b * g.cIn * hw);
  };
  const taps = { cIn: g.cIn, hp, wp, kh, kw, sh, dh, dw, ...(phased ? { sw, phased: true } : {}) };
  if (mode === 'wide') {
    const image = pad(0, n);
    steps.push({ op: 'spmm', ...common, a: image, c: refs.scratch!, m: long, batch: n, aStrides: [plan.image, 1, m],
      cStrides: [g.cOut * long, 1, long], taps: { ...taps, oh: 1, ow: long } });
    steps.push({ op: 'copy', node, x: refs.scratch!, y: refs.y(0), dims: [n * g.cOut, g.oh, g.ow], xStrides: [long, wq, 1],
      yStrides: [m, g.ow, 1], elemBytes: 4 });
  } else if (mode === 'rows') {
    const image = pad(0, n);
    steps.push({ op: 'spmm', ...common, a: image, c: refs.y(0), m, batch: n, ...(refs.residual ? { residual: refs.residual(0) } : {}),
      aStrides: [plan.image, 1, m], cStrides: [g.cOut * m, 1, m], taps: { ...taps, oh: g.oh, ow: g.ow } });
  } else if (kh * kw === 1) {
    // A strided 1x1's panel is the image subsampled, no larger than it: the whole batch at once.
    const image = pad(0, n);
    steps.push({ op: 'copy', node, x: image, y: refs.scratch!, dims: [n * g.cIn, g.oh, g.ow], xStrides: [hp * wp, sh * wp, sw],
      yStrides: [m, g.ow, 1], elemBytes: 4 });
    steps.push({ op: 'spmm', ...common, a: refs.scratch!, c: refs.y(0), m, batch: n, ...(refs.residual ? { residual: refs.residual(0) } : {}),
      aStrides: [k * m, 1, m], cStrides: [g.cOut * m, 1, m] });
  } else {
    for (let b = 0; b < n; b++) {
      const image = pad(b, 1);
      steps.push({ op: 'copy', node, x: image, y: refs.scratch!, dims: [g.cIn, kh, kw, g.oh, g.ow],
        xStrides: [hp * wp, dh * wp, dw, sh * wp, sw], yStrides: [kh * kw * m, kw * m, m, g.ow, 1], elemBytes: 4 });
      steps.push({ op: 'spmm', ...common, a: refs.scratch!, c: refs.y(b * g.cOut * m), m, batch: 1,
        ...(refs.residual ? { residual: refs.residual(b * g.cOut * m) } : {}), aStrides: [k * m, 1, m], cStrides: [g.cOut * m, 1, m] });
    }
  }
  return steps;
}

/**
 * Times a KxK convolution like timeConvLayer: the conv operator against sparseConvSteps at output
 * planes of TIMED_CONV_M positions (7x7, 14x14, 28x28), the input sized to give them with the
 * layer's own kernel, strides, dilations and pads.
 */
export async function timeSparseConvLayer(s: SparseChoice, conv: NativeConvHandle, g0: Omit<SparseConvGeometry, 'h' | 'w' | 'oh' | 'ow'>,
  epilogue: { bias?: Float32Array; activation: PlanActivation; alpha: number; beta: number }, threads: number): Promise<void> {
  const k = g0.cIn * g0.kernel[0] * g0.kernel[1];
  const timedM = k * g0.cOut >= LARGE_CONV_WEIGHTS ? TIMED_CONV_M.slice(0, -1) : TIMED_CONV_M;
  const geoms = timedM.map((m): SparseConvGeometry => {
    const o = Math.sqrt(m);
    // The input size whose output is o x o: (o - 1) * stride + dilated extent - pads.
    const size = (axis: 0 | 1) => Math.max(1, (o - 1) * g0.strides[axis] + (g0.kernel[axis] - 1) * g0.dilations[axis] + 1
      - g0.pads[axis] - g0.pads[axis + 2]!);
    return { ...g0, h: size(0), w: size(1), oh: o, ow: o };
  });
  const big = geoms[geoms.length - 1]!;
  // With several threads, also `threads` images of the largest plane: a batch the threads divide
  // runs a whole image per thread on the sparse path (RunSpmmColumns), which one image cannot show
  // (pruned ResNet-50's 3x3/2 256 at 2 threads: 0.75 against 0.78 ms dense for one 14x14 image, so
  // dense was chosen, and then took 6.8 ms at batch 8 where the sparse steps took about 4).
  const timed = [...geoms.map((g) => [g, 1] as const), ...(threads > 1 ? [[big, threads] as const] : [])];
  const most = timed[timed.length - 1]![1];
  const x = timingActivations(most * g0.cIn * big.h * big.w);
  const sizes = timed.map(([g, n]) => sparseConvScratch(g, n, false));
  const padded = { off: 0, bytes: Math.max(...sizes.map((z) => z.padded * 4)) };
  const cols = { off: align64(padded.bytes), bytes: Math.max(4, ...sizes.map((z) => z.scratch * 4)) };
  const y = { off: align64(cols.off + cols.bytes), bytes: most * g0.cOut * big.oh * big.ow * 4 };
  const buffers: PlanBuffer[] = [
    { kind: 'const', data: x, bytes: x.byteLength },
    { kind: 'arena', offset: padded.off, bytes: padded.bytes },
    { kind: 'arena', offset: cols.off, bytes: cols.bytes },
    { kind: 'arena', offset: y.off, bytes: y.bytes },
  ];
  if (epilogue.bias) buffers.push({ kind: 'const', data: epilogue.bias, bytes: epilogue.bias.byteLength });
  const ref = (buffer: number) => ({ buffer, offset: 0 });
  const epi = { residualBeforeActivation: false, activation: epilogue.activation, alpha: epilogue.alpha, beta: epilogue.beta };
  const cases = timed.map(([g, n]): TimedCase => ({
    m: n * g.oh * g.ow,
    dense: [{ op: 'conv', node: 'sparse-timing', handle: conv, x: ref(0), y: ref(3), residualBeforeActivation: false, n, h: g.h, w: g.w }],
    sparse: sparseConvSteps(g, n, s, { x: (o) => ({ buffer: 0, offset: o }), y: (o) => ({ buffer: 3, offset: o }), padded: (o) => ({ buffer: 1, offset: o }),
      scratch: ref(2), ...(epilogue.bias ? { bias: ref(4) } : {}) }, epi, 'sparse-timing'),
  }));
  await timeCases(s, buffers, y.off + y.bytes, cases, threads);
}

/** Row counts (N * H * W) timed for 1x1 convolutions: ResNet-50's 7x7 .. 28x28 planes at batch 1. */
export const TIMED_CONV_M = [49, 196, 784] as const;
/**
 * Layers with at least this many weights (cIn * cOut) skip the largest TIMED_CONV_M and extrapolate
 * from 196. Channels grow as planes shrink in CNNs: ResNet-50's 512x2048 layers run on 7x7 planes
 * and reach 784 rows only at batch 16, yet their 784-row timings were most of the load-time cost
 * of 'auto' (about 20 ms per dense run of each of six such layers here).
 */
export const LARGE_CONV_WEIGHTS = 512 * 1024;

/**
 * Times a 1x1 convolution: the conv operator on NCHW against the sparse path the compiler emits
 * (CSR: the SpMM reading and writing NCHW in place; BSR: NCHW -> [M, cIn] copy, SpMM with the same
 * epilogue, [M, cOut] -> NCHW copy), at TIMED_CONV_M
 * positions laid out as one square image (7x7, 14x14, 28x28: an [1, cIn, 1, M] strip measured the
 * dense conv up to 2.6x slower than on the square plane of the same size, a bias towards sparse).
 */
export async function timeConvLayer(s: SparseChoice, conv: NativeConvHandle, cIn: number, cOut: number,
  epilogue: { bias?: Float32Array; activation: PlanActivation; alpha: number; beta: number }, threads: number): Promise<void> {
  const timedM = cIn * cOut >= LARGE_CONV_WEIGHTS ? TIMED_CONV_M.slice(0, -1) : TIMED_CONV_M;
  const maxM = timedM[timedM.length - 1]!;
  const x = timingActivations(maxM * cIn);
  const at = { off: 0, bytes: maxM * cIn * 4 };
  const c = { off: align64(at.bytes), bytes: maxM * cOut * 4 };
  const y = { off: align64(c.off + c.bytes), bytes: maxM * cOut * 4 };
  const arenaBytes = y.off + y.bytes;
  const buffers: PlanBuffer[] = [
    { kind: 'const', data: x, bytes: x.byteLength },
    { kind: 'arena', offset: at.off, bytes: at.bytes },
    { kind: 'arena', offset: c.off, bytes: c.bytes },
    { kind: 'arena', offset: y.off, bytes: y.bytes },
  ];
  if (epilogue.bias) buffers.push({ kind: 'const', data: epilogue.bias, bytes: epilogue.bias.byteLength });
  const ref = (buffer: number) => ({ buffer, offset: 0 });
  const epi = { ...(epilogue.bias ? { bias: ref(4) } : {}), residualBeforeActivation: false,
    activation: epilogue.activation, alpha: epilogue.alpha, beta: epilogue.beta };
  const cases = timedM.map((m): TimedCase => ({
    m,
    dense: [{ op: 'conv', node: 'sparse-timing', handle: conv, x: ref(0), y: ref(3), residualBeforeActivation: false, n: 1,
      h: Math.sqrt(m), w: Math.sqrt(m) }],
    sparse: s.format === 'csr'
      ? [{ op: 'spmm', node: 'sparse-timing', weights: s.weights, a: ref(0), c: ref(3), m, k: cIn, n: cOut, ...epi,
        batch: 1, aStrides: [cIn * m, 1, m], cStrides: [cOut * m, 1, m] }]
      : [
        { op: 'copy', node: 'sparse-timing', x: ref(0), y: ref(1), dims: [m, cIn], xStrides: [1, m], yStrides: [cIn, 1], elemBytes: 4 },
        { op: 'spmm', node: 'sparse-timing', weights: s.weights, a: ref(1), c: ref(2), m, k: cIn, n: cOut, ...epi },
        { op: 'copy', node: 'sparse-timing', x: ref(2), y: ref(3), dims: [cOut, m], xStrides: [1, cOut], yStrides: [m, 1], elemBytes: 4 },
      ],
  }));
  await timeCases(s, buffers, arenaBytes, cases, threads);
}
