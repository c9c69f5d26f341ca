/**
 * The plan-level layout pass: keeps the activations between convolutions on the direct path in the
 * channel-blocked NCHW16c layout (PlanBlocked) instead of NCHW, so a run of such convs pays one
 * reorder where it starts and one where it ends, not a blocked copy of the input and a gathered
 * NCHW store in every conv. Runs on the lowered steps of compilePlan, before liveness and memory
 * planning (a blocked value is a new, larger value with a border; the planner places it like any
 * other).
 *
 * Which values go blocked: the output y of a blockable conv (the direct path; a depthwise conv,
 * which reads blocked only when it writes blocked; channels in blocks of 16, the last one padded),
 * when it is not pinned to NCHW (a graph input/output, a const, aliased by a
 * Reshape/Flatten...) and at least one step reads it blocked: a blockable conv's x, the residual of
 * a conv whose y is blocked, a GlobalAveragePool (whole blocks only), a max or average pool whose y
 * is blocked (a pool's y is blocked too when its x is and something reads it blocked). Its border is the largest any reading conv's
 * padding needs, so each conv reads it in place. Then per step:
 * - a conv with a blocked y reads x and the residual blocked; an NCHW x or residual gets a
 *   blocked copy (one reorder, shared by every conv that reads it);
 * - a direct conv with an NCHW y reads a blocked x in place, and an NCHW copy of a blocked residual;
 * - every other read of a blocked value reads one NCHW copy of it (one reorder before its first use).
 * A blocked value that a bf16 direct conv (precision 'bf16') writes and only bf16 direct convs read
 * as x is held in bf16 (PlanBlocked.bf16): half the bytes, and no per-reader conversion
 * (SONDE_CONV_BLOCKED_BF16=0 turns only this off).
 * SONDE_CONV_BLOCKED=0 (read per plan build) turns the pass off, for A/B measurements.
 */
import type { NativeConvHandle } from '../binding.js';
import { blockedConvGeometry, type BlockedConvGeometry } from './ops/nn.js';
import type { ValueId } from './ops/types.js';
import type { PlanBlocked, PlanRef, PlanStep } from './plan.js';

const BLOCK = 16;

export interface LayoutIo {
  steps: PlanStep[];
  /** The value a step's ref was made for (possibly an alias), or undefined. */
  valueOf(ref: PlanRef): ValueId | undefined;
  rootOf(id: ValueId): ValueId;
  /** The value's bytes must stay NCHW: a graph input or output, a const, an alias or aliased. */
  pinned(root: ValueId): boolean;
  bytes(id: ValueId): number;
  name(id: ValueId): string;
  /** A new intermediate value of `bytes`. */
  newValue(bytes: number, name: string): ValueId;
  /** Gives an intermediate value a new byte size (a blocked value holds its border too). */
  resize(root: ValueId, bytes: number): void;
  ref(id: ValueId): PlanRef;
}

export function blockedPassEnabled(): boolean {
  return process.env.SONDE_CONV_BLOCKED !== '0';
}

/** SONDE_CONV_BLOCKED_BF16=0 (read per plan build) keeps bf16 convs' blocked values float32, for A/B. */
function bf16PassEnabled(): boolean {
  return process.env.SONDE_CONV_BLOCKED_BF16 !== '0';
}

type Pads = [number, number, number, number];

interface Use { step: number; field: string; ref: PlanRef; id: ValueId }

/** Every operand ref of a step, with its field name. */
export function refFields(step: PlanStep): [string, PlanRef][] {
  return Object.entries(step).filter((e): e is [string, PlanRef] => {
    const v = e[1] as unknown;
    return typeof v === 'object' && v !== null && 'buffer' in v && 'offset' in v;
  });
}

/** c channels in whole blocks of 16 (the last one partial: its lanes past c are padding). */
function blockedBytes(n: number, c: number, l: PlanBlocked): number {
  return n * Math.ceil(c / BLOCK) * BLOCK * (l.pads[0] + l.h + l.pads[2]) * (l.pads[1] + l.w + l.pads[3]) * (l.bf16 ? 2 : 4);
}

const maxPads = (a: Pads, b: Pads): Pads => [Math.max(a[0], b[0]), Math.max(a[1], b[1]), Math.max(a[2], b[2]), Math.max(a[3], b[3])];

/** Returns the new step list (the steps' refs are edited in place). */
export function blockConvRuns(io: LayoutIo): PlanStep[] {
  const { steps } = io;
  const geom = new Map<number, BlockedConvGeometry>();
  steps.forEach((s, i) => {
    // Operands at element 0 only: a blocked copy or view of a slice is not what this pass makes.
    if (s.op !== 'conv' || s.x.offset !== 0 || s.y.offset !== 0 || (s.residual && s.residual.offset !== 0)) return;
    const g = blockedConvGeometry(s.handle as NativeConvHandle, s.h, s.w);
    if (g) geom.set(i, g);
  });
  if (geom.size === 0) return steps;

  const uses = new Map<ValueId, Use[]>();
  steps.forEach((s, i) => {
    for (const [field, ref] of refFields(s)) {
      const id = io.valueOf(ref);
      if (id === undefined) continue;
      const root = io.rootOf(id);
      let list = uses.get(root);
      if (!list) uses.set(root, (list = []));
      list.push({ step: i, field, ref, id });
    }
  });
  // A use reads the value's bytes as they are (same value, from element 0).
  const plain = (u: Use, root: ValueId) => u.id === root && u.ref.offset === 0;

  // Candidates: outputs of convs that can write blocked (whole 16-channel blocks, not pinned).
  const producers = new Map<ValueId, number>();
  const convAt = (j: number) => steps[j] as Extract<PlanStep, { op: 'conv' }>;
  for (const [i, g] of geom) {
    const s = convAt(i);
    const root = io.rootOf(io.valueOf(s.y)!);
    if (io.pinned(root) || !plain({ step: i, field: 'y', ref: s.y, id: io.valueOf(s.y)! }, root)) continue;
    if (io.bytes(root) !== s.n * g.cOut * g.oh * g.ow * 4) continue;
    producers.set(root, i);
  }
  // What each candidate holds; pools (max or average, no dilation) whose x is a candidate of whole
  // 16-channel blocks add their y, blocked only while their x is (a pool does not convert).
  const made = new Map<ValueId, { n: number; c: number; oh: number; ow: number; bf16: boolean }>();
  for (const [root, i] of producers) {
    const g = geom.get(i)!;
    made.set(root, { n: convAt(i).n, c: g.cOut, oh: g.oh, ow: g.ow, bf16: g.bf16 });
  }
  const pools = new Map<number, ValueId>();
  steps.forEach((s, i) => {
    if (s.op !== 'pool' || s.x.offset !== 0 || s.y.offset !== 0 || s.dilations[0] !== 1 || s.dilations[1] !== 1) return;
    const x = io.rootOf(io.valueOf(s.x)!), y = io.rootOf(io.valueOf(s.y)!);
    const m = made.get(x);
    if (!m || m.c % BLOCK || io.valueOf(s.x) !== x || m.oh !== s.h || m.ow !== s.w || s.planes !== m.n * m.c) return;
    if (io.pinned(y) || io.valueOf(s.y) !== y) return;
    const oh = Math.floor((s.h + s.pads[0] + s.pads[2] - s.kernel[0]) / s.strides[0]) + 1;
    const ow = Math.floor((s.w + s.pads[1] + s.pads[3] - s.kernel[1]) / s.strides[1]) + 1;
    if (io.bytes(y) !== m.n * m.c * oh * ow * 4) return;
    producers.set(y, i);
    made.set(y, { n: m.n, c: m.c, oh, ow, bf16: false });
    pools.set(i, x);
  });
  const poolY = (j: number) => io.rootOf(io.valueOf((steps[j] as Extract<PlanStep, { op: 'pool' }>).y)!);
  // All of them blocked, then drop the values no step would read blocked, until none changes: a
  // depthwise conv reads blocked only when its y is blocked, and a residual is read blocked only
  // where the reader's y is (an NCHW y reads an NCHW residual: blocking it would cost a reorder back).
  const isBlocked = new Set(producers.keys());
  const yOf = (j: number) => io.rootOf(io.valueOf(convAt(j).y)!);
  const readsBlocked = (u: Use, root: ValueId): boolean => {
    if (!plain(u, root)) return false;
    const cg = geom.get(u.step);
    if (cg && u.field === 'x') return !cg.nchwX && (!cg.needsBlockedY || isBlocked.has(yOf(u.step)));
    if (cg && u.field === 'residual') return isBlocked.has(yOf(u.step));
    if (pools.has(u.step) && u.field === 'x') return isBlocked.has(poolY(u.step));
    // The blocked global pool reads whole 16-channel blocks.
    return steps[u.step]!.op === 'globalAveragePool' && u.field === 'x' && made.get(root)!.c % BLOCK === 0;
  };
  for (let changed = true; changed;) {
    changed = false;
    for (const root of [...isBlocked]) {
      const i = producers.get(root)!;
      const poolX = pools.get(i);
      if ((poolX !== undefined && !isBlocked.has(poolX)) || !(uses.get(root) ?? []).some((u) => u.step !== i && readsBlocked(u, root))) {
        isBlocked.delete(root);
        changed = true;
      }
    }
  }
  // Values produced blocked: batch, channels and layout (border: the widest any reading conv needs).
  const blocked = new Map<ValueId, { n: number; c: number; layout: PlanBlocked }>();
  for (const root of isBlocked) {
    const i = producers.get(root)!;
    const g = made.get(root)!;
    let border: Pads = [0, 0, 0, 0];
    for (const u of uses.get(root)!) {
      if (u.step !== i && u.field === 'x' && geom.has(u.step) && readsBlocked(u, root)) border = maxPads(border, geom.get(u.step)!.border);
    }
    // bf16 when a bf16 direct conv writes it and only bf16 direct convs read it, as their x: it is
    // rounded once where it is made instead of converted by every reader (a residual, a pool or an
    // NCHW copy reads float32).
    const bf16 = g.bf16 && bf16PassEnabled() && uses.get(root)!.every((u) => u.step === i ||
      (u.field === 'x' && geom.get(u.step)?.bf16 === true && readsBlocked(u, root)));
    blocked.set(root, { n: g.n, c: g.c, layout: { h: g.oh, w: g.ow, pads: border, ...(bf16 ? { bf16 } : {}) } });
  }
  if (blocked.size === 0) return steps;

  // Copies, made on first request: blocked copies of NCHW values (their border grown by every
  // reader before the reorder is built) and NCHW copies of blocked values.
  interface Copy { id?: ValueId; first: number; n: number; c: number; h: number; w: number; border: Pads; readers: (() => void)[] }
  const toBlocked = new Map<ValueId, Copy>();
  const toNchw = new Map<ValueId, Copy>();
  const request = (map: Map<ValueId, Copy>, root: ValueId, at: number, shape: { n: number; c: number; h: number; w: number }, border: Pads) => {
    let c = map.get(root);
    if (!c) map.set(root, (c = { first: at, ...shape, border: [0, 0, 0, 0], readers: [] }));
    c.first = Math.min(c.first, at);
    c.border = maxPads(c.border, border);
    return c;
  };
  const layoutOf = (c: Copy): PlanBlocked => ({ h: c.h, w: c.w, pads: c.border });

  const nchwUse = (u: Use, root: ValueId) => {
    const b = blocked.get(root)!;
    const c = request(toNchw, root, u.step, { n: b.n, c: b.c, h: b.layout.h, w: b.layout.w }, [0, 0, 0, 0]);
    c.readers.push(() => { (steps[u.step] as unknown as Record<string, PlanRef>)[u.field] = io.ref(c.id!); });
  };

  const handled = new Set<Use>();
  for (const [i, g] of geom) {
    const s = convAt(i);
    const y = io.rootOf(io.valueOf(s.y)!);
    const yb = blocked.get(y);
    // Runs as before (NCHW x and y); a blocked x is then an NCHW use (below).
    if (g.needsBlockedY && !yb) continue;
    const x = io.rootOf(io.valueOf(s.x)!);
    const xUse = uses.get(x)!.find((u) => u.ref === s.x)!;
    // A stem reads its NCHW x as it is (a blocked x is an NCHW use, below).
    if (!g.nchwX && blocked.has(x) && plain(xUse, x)) {
      s.xBlocked = blocked.get(x)!.layout;
      handled.add(xUse);
    } else if (!g.nchwX && yb) {
      const c = request(toBlocked, x, i, { n: s.n, c: g.cIn, h: s.h, w: s.w }, g.border);
      c.readers.push(() => { s.x = io.ref(c.id!); s.xBlocked = layoutOf(c); });
      handled.add(xUse);
    }
    if (yb) s.yBlocked = yb.layout;
    if (!s.residual) continue;
    const r = io.rootOf(io.valueOf(s.residual)!);
    const rUse = uses.get(r)!.find((u) => u.ref === s.residual)!;
    if (yb) {
      handled.add(rUse);
      if (blocked.has(r) && plain(rUse, r)) {
        s.residualBlocked = blocked.get(r)!.layout;
      } else {
        const c = request(toBlocked, r, i, { n: s.n, c: g.cOut, h: g.oh, w: g.ow }, [0, 0, 0, 0]);
        c.readers.push(() => { s.residual = io.ref(c.id!); s.residualBlocked = layoutOf(c); });
      }
    }
    // With an NCHW y, a blocked residual is an NCHW use (below).
  }
  for (const [i, x] of pools) {
    const s = steps[i] as Extract<PlanStep, { op: 'pool' }>;
    const yb = blocked.get(poolY(i));
    if (!yb) continue;
    s.xBlocked = blocked.get(x)!.layout;
    s.yBlocked = yb.layout;
    handled.add(uses.get(x)!.find((u) => u.ref === s.x)!);
  }
  for (const s of steps) {
    if (s.op !== 'globalAveragePool') continue;
    const x = io.rootOf(io.valueOf(s.x)!);
    const u = uses.get(x)!.find((v) => v.ref === s.x)!;
    if (blocked.has(x) && plain(u, x) && blocked.get(x)!.c % BLOCK === 0) {
      s.xBlocked = blocked.get(x)!.layout;
      handled.add(u);
    }
  }
  for (const root of blocked.keys()) {
    for (const u of uses.get(root)!) {
      if (handled.has(u) || (u.field === 'y' && producers.get(root) === u.step)) continue;
      nchwUse(u, root);
    }
  }

  // Materialise: new values, reorder steps before their first reader (named after that reader's
  // node, so profiles attribute the reorder to the layer that needs it), then the readers' refs.
  const before = new Map<number, PlanStep[]>();
  const insert = (at: number, step: PlanStep) => {
    let list = before.get(at);
    if (!list) before.set(at, (list = []));
    list.push(step);
  };
  for (const [root, c] of toBlocked) {
    const layout = layoutOf(c);
    c.id = io.newValue(blockedBytes(c.n, c.c, layout), `${io.name(root)} (NCHW16c)`);
    insert(c.first, { op: 'reorder', node: steps[c.first]!.node, x: io.ref(root), y: io.ref(c.id), n: c.n, c: c.c, layout, toBlocked: true });
    for (const r of c.readers) r();
  }
  for (const [root, c] of toNchw) {
    const b = blocked.get(root)!;
    c.id = io.newValue(io.bytes(root), `${io.name(root)} (NCHW)`);
    insert(c.first, { op: 'reorder', node: steps[c.first]!.node, x: io.ref(root), y: io.ref(c.id), n: b.n, c: b.c, layout: b.layout, toBlocked: false });
    for (const r of c.readers) r();
  }
  for (const [root, b] of blocked) io.resize(root, blockedBytes(b.n, b.c, b.layout));
  const out: PlanStep[] = [];
  steps.forEach((s, i) => {
    for (const extra of before.get(i) ?? []) out.push(extra);
    out.push(s);
  });
  return out;
}
