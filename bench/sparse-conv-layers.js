// Per-layer sparse convolutions (issue 6), one thread by default: a 1x1 conv on the old sparse lowering
// (NCHW -> rows copy, row SpMM, rows -> NCHW copy) against the in-place columns-layout SpMM step, and
// sparse 3x3 (pad, im2col, SpMM) against the dense conv operator, interleaved in one plan run. node bench/sparse-conv-layers.js [threads]
import { native } from '../dist/binding.js';
import { sparseConvSteps } from '../dist/session/sparse.js';
const threads = Number(process.argv[2] ?? 1);
let seed = 9;
const rnd = () => { seed = (seed * 1103515245 + 12345) >>> 0; return seed / 2 ** 32; };
const pruned = (len) => new Float32Array(len).map(() => (rnd() < 0.9 ? 0 : rnd() - 0.5));
const acts = (len) => new Float32Array(len).map(() => 0.25 + rnd());
const REPS = 9;
async function timeGroups(buffers, arenaBytes, groups) {
  const steps = [], spans = groups.map(() => []);
  for (const g of groups) steps.push(...g);  // warm-up
  for (let r = 0; r < REPS; r++) {
    const order = r % 2 ? [...groups.keys()].reverse() : [...groups.keys()];
    for (const gi of order) { const a = steps.length; steps.push(...groups[gi]); spans[gi].push([a, steps.length]); }
  }
  const plan = native().createPlan({ buffers, steps, arenaBytes, inputBytes: [], outputBytes: [] });
  const ns = new Float64Array(steps.length);
  await native().planRun(plan, [], [], threads, undefined, ns);
  plan.dispose();
  return spans.map((sp) => { const t = sp.map(([a, b]) => { let s = 0; for (let i = a; i < b; i++) s += ns[i]; return s / 1e6; }).sort((x, y) => x - y);
    return { min: t[0], med: t[t.length >> 1] }; });
}
const ref = (buffer) => ({ buffer, offset: 0 });
const epi = { residualBeforeActivation: false, activation: 'relu', alpha: 0, beta: 0 };
const fmt = (x) => `${x.min.toFixed(3)}/${x.med.toFixed(3)}`;
for (const [cIn, cOut, side] of [[64, 256, 56], [256, 64, 56], [128, 512, 28], [512, 128, 28], [256, 1024, 14], [1024, 256, 14], [512, 2048, 7], [2048, 512, 7]]) {
  const m = side * side;
  const b = pruned(cIn * cOut);
  const w = native().toSparse(b, cIn, cOut, 'csr', 0);
  const x = acts(cIn * m);
  const buffers = [{ kind: 'const', data: x, bytes: x.byteLength }, { kind: 'arena', offset: 0, bytes: cIn * m * 4 },
    { kind: 'arena', offset: Math.ceil(cIn * m * 4 / 64) * 64, bytes: cOut * m * 4 }];
  const yOff = buffers[2].offset + Math.ceil(cOut * m * 4 / 64) * 64;
  buffers.push({ kind: 'arena', offset: yOff, bytes: cOut * m * 4 });
  const old = [
    { op: 'copy', node: 'o', x: ref(0), y: ref(1), dims: [m, cIn], xStrides: [1, m], yStrides: [cIn, 1], elemBytes: 4 },
    { op: 'spmm', node: 'o', weights: w, a: ref(1), c: ref(2), m, k: cIn, n: cOut, ...epi },
    { op: 'copy', node: 'o', x: ref(2), y: ref(3), dims: [cOut, m], xStrides: [1, cOut], yStrides: [m, 1], elemBytes: 4 }];
  const neu = [{ op: 'spmm', node: 'n', weights: w, a: ref(0), c: ref(3), m, k: cIn, n: cOut, ...epi, batch: 1, aStrides: [cIn * m, 1, m], cStrides: [cOut * m, 1, m] }];
  const [o, n] = await timeGroups(buffers, yOff + cOut * m * 4, [old, neu]);
  console.log(`1x1 ${cIn}->${cOut} ${side}x${side} t${threads}: copies+rows ${fmt(o)} ms, columns ${fmt(n)} ms, x${(o.min / n.min).toFixed(2)}/${(o.med / n.med).toFixed(2)}`);
  w.dispose();
}
for (const [c, side, stride] of [[64, 56, 1], [128, 56, 2], [128, 28, 1], [256, 28, 2], [256, 14, 1], [512, 14, 2], [512, 7, 1]]) {
  const k9 = c * 9;
  const wt = pruned(c * k9);  // [cOut, cIn, 3, 3]
  const bT = new Float32Array(k9 * c);
  for (let o = 0; o < c; o++) for (let q = 0; q < k9; q++) bT[q * c + o] = wt[o * k9 + q];
  const w = native().toSparse(bT, k9, c, 'csr', 0);
  const conv = native().createConv(wt, { cOut: c, cIn: c, group: 1, kernel: [3, 3], strides: [stride, stride], dilations: [1, 1],
    pads: [1, 1, 1, 1], autoPad: 0, bnEpsilon: 1e-5, activation: 1, alpha: 0, beta: 0, precision: 'fp32', variant: 'auto' });
  const o = Math.floor((side + 2 - 3) / stride) + 1;
  const x = acts(c * side * side);
  const pb = c * (side + 2) ** 2 * 4, cb = k9 * o * o * 4, yb = c * o * o * 4;
  const off1 = Math.ceil(pb / 64) * 64, off2 = off1 + Math.ceil(cb / 64) * 64;
  const buffers = [{ kind: 'const', data: x, bytes: x.byteLength }, { kind: 'arena', offset: 0, bytes: pb },
    { kind: 'arena', offset: off1, bytes: cb }, { kind: 'arena', offset: off2, bytes: yb }];
  const g = { cIn: c, cOut: c, h: side, w: side, oh: o, ow: o, kernel: [3, 3], strides: [stride, stride], dilations: [1, 1], pads: [1, 1, 1, 1] };
  const sparse = sparseConvSteps(g, 1, { weights: w }, { x: () => ref(0), y: () => ref(3), padded: () => ref(1), scratch: ref(2) }, epi, 's');
  const dense = [{ op: 'conv', node: 'd', handle: conv, x: ref(0), y: ref(3), residualBeforeActivation: false, n: 1, h: side, w: side }];
  const [d, s] = await timeGroups(buffers, off2 + yb, [dense, sparse]);
  // pad (or a fill and a copy per phase of a strided conv's phased image), im2col copy (absent where the
  // conv runs directly on the image), spmm, and the long row's copy out.
  const parts = await timeGroups(buffers, off2 + yb, sparse.map((st) => [st]));
  const copyName = (i) => (i > 0 && sparse[i - 1].op === 'spmm' ? 'copy out' : sparse.some((st) => st.op === 'fill') ? 'phase copy' : 'im2col');
  const named = sparse.map((st, i) => `${st.op === 'copy' ? copyName(i) : st.op === 'spmm' && st.taps ? 'direct spmm' : st.op} ${parts[i].min.toFixed(3)}`);
  console.log(`3x3 ${c} ${side}x${side} s${stride} t${threads}: dense conv ${fmt(d)} ms, sparse ${fmt(s)} ms (${named.join(', ')}), x${(d.min / s.min).toFixed(2)}/${(d.med / s.med).toFixed(2)}`);
  w.dispose(); conv.dispose();
}
