/**
 * Fuses inverted-residual blocks (MobileNetV2's: 1x1 expand, depthwise, 1x1 project, + residual)
 * into one convChain step (native ConvChain in native/ops/conv.h). Runs on the steps the layout pass
 * (lib/session/layout.ts) left, where such a block is a run of blocked conv steps: the expanded and
 * depthwise tensors it drops are then never stored whole (112x112x96 floats is 4.8 MB an image, more
 * than L2), which is what made MobileNetV2 cost more per image as the batch grew.
 *
 * A chain: a blocked depthwise conv D whose y only a pointwise conv P reads (as its blocked x, P's
 * y blocked, any residual blocked), plus, when D's x is the blocked y of a pointwise conv E that only
 * D reads (E without a residual), E. SONDE_CONV_CHAIN=0 (read per plan build) turns it off, for A/B
 * measurements and the tests that compare both.
 */
import type { NativeConvHandle } from '../binding.js';
import { refFields } from './layout.js';
import { chainRole } from './ops/nn.js';
import type { ValueId } from './ops/types.js';
import type { PlanRef, PlanStep } from './plan.js';

export function chainPassEnabled(): boolean {
  return process.env.SONDE_CONV_CHAIN !== '0';
}

export interface ChainIo {
  steps: PlanStep[];
  valueOf(ref: PlanRef): ValueId | undefined;
  rootOf(id: ValueId): ValueId;
}

type ConvStep = Extract<PlanStep, { op: 'conv' }>;

/** Returns the new step list. */
export function chainInvertedResiduals(io: ChainIo): PlanStep[] {
  const { steps } = io;
  const root = (ref: PlanRef) => {
    const id = io.valueOf(ref);
    return id === undefined ? undefined : io.rootOf(id);
  };
  // Every step that reads or writes each value.
  const touches = new Map<ValueId, number[]>();
  steps.forEach((s, i) => {
    for (const [, r] of refFields(s)) {
      const id = root(r);
      if (id === undefined) continue;
      const list = touches.get(id) ?? [];
      if (list[list.length - 1] !== i) list.push(i);
      touches.set(id, list);
    }
  });
  // A value made by step `from` and touched by no step but `to`, read whole as its blocked x.
  const private_ = (ref: PlanRef, from: number, to: number) => {
    const id = root(ref);
    const t = id === undefined ? undefined : touches.get(id);
    return ref.offset === 0 && t !== undefined && t.length === 2 && t[0] === from && t[1] === to;
  };
  const blockedConv = (s: PlanStep | undefined): s is ConvStep =>
    s?.op === 'conv' && s.xBlocked !== undefined && s.yBlocked !== undefined && !s.xBlocked.bf16 && !s.yBlocked.bf16;
  const role = (s: ConvStep) => chainRole(s.handle as NativeConvHandle, s.h, s.w);

  const replaced = new Map<number, PlanStep>();
  const dropped = new Set<number>();
  steps.forEach((d, i) => {
    if (!blockedConv(d) || d.residual || role(d) !== 'depthwise') return;
    // The projection: the one other step touching D's y.
    const dy = root(d.y);
    const after = dy === undefined ? undefined : touches.get(dy);
    if (!after || after.length !== 2 || after[0] !== i) return;
    const pi = after[1]!, p = steps[pi];
    if (!blockedConv(p) || root(p.x) !== dy || !private_(p.x, i, pi) || role(p) !== 'pointwise') return;
    if (p.residual && (!p.residualBlocked || p.residualBlocked.bf16 || root(p.residual) === dy)) return;
    // The expansion: the step that made D's x, when only D reads it.
    const dx = root(d.x);
    const before = dx === undefined ? undefined : touches.get(dx);
    let ei = -1;
    if (before && before.length === 2 && before[1] === i) {
      const e = steps[before[0]!];
      if (blockedConv(e) && !e.residual && root(e.y) === dx && private_(d.x, before[0]!, i) && role(e) === 'pointwise' && !dropped.has(before[0]!)) {
        ei = before[0]!;
      }
    }
    const e = ei >= 0 ? steps[ei] as ConvStep : undefined;
    const x = e ?? d;
    const chain: PlanStep = {
      op: 'convChain',
      node: [e?.node, d.node, p.node].filter((n) => n !== undefined).join('+'),
      ...(e ? { expand: e.handle } : {}),
      depthwise: d.handle,
      project: p.handle,
      x: x.x,
      y: p.y,
      ...(p.residual ? { residual: p.residual, residualBlocked: p.residualBlocked } : {}),
      residualBeforeActivation: p.residualBeforeActivation,
      n: x.n,
      h: x.h,
      w: x.w,
      xBlocked: x.xBlocked!,
      yBlocked: p.yBlocked!,
    };
    // In place of the projection, whose inputs (x, the residual) are all made by then.
    replaced.set(pi, chain);
    dropped.add(i);
    if (ei >= 0) dropped.add(ei);
  });
  if (replaced.size === 0) return steps;
  return steps.flatMap((s, i) => (dropped.has(i) ? [] : [replaced.get(i) ?? s]));
}
