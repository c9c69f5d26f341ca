// The `cuda` suite: per GPU kernel, achieved TFLOP/s or GB/s against the device's datasheet peak
// and against ceilings measured here (probe kernels), timed with device events over repeated runs
// of device-resident data. Without a GPU it reports why; `--emulated` runs tiny shapes on the
// emulator instead, which checks the suite itself and says nothing about speed.
// Kernel families add a case generator to FAMILIES (one import, one entry).
import { devices } from '../../dist/index.js';
import { GpuBuffer, gpuDevice } from '../../dist/cuda/runtime.js';
import { timeOp } from './common.js';
import { attentionCases } from './attention.js';
import { convCases } from './conv.js';
import { gemmCases } from './gemm.js';
import { llmCases } from './llm.js';
import { moeCases } from './moe.js';
import { normCases } from './norm.js';
import { quantCases } from './quant.js';
import { sessionCases } from './session.js';

const FAMILIES = [normCases, gemmCases, quantCases, attentionCases, moeCases, convCases, sessionCases, llmCases];

// Dense datasheet peaks: bf16 tensor-core and fp32 TFLOP/s, HBM GB/s. First match wins.
const DATASHEET = [
  [/H200/, { bf16: 989, fp32: 67, gbps: 4800 }],
  [/H100.*(SXM|HBM3)|H100 80GB HBM3/, { bf16: 989, fp32: 67, gbps: 3350 }],
  [/H100/, { bf16: 756, fp32: 51, gbps: 2000 }],
  [/A100.*80GB/, { bf16: 312, fp32: 19.5, gbps: 2039 }],
  [/A100/, { bf16: 312, fp32: 19.5, gbps: 1555 }],
  [/L40S/, { bf16: 362, fp32: 91.6, gbps: 864 }],
  [/L4\b/, { bf16: 121, fp32: 30.3, gbps: 300 }],
  [/A10\b/, { bf16: 125, fp32: 31.2, gbps: 600 }],
  [/RTX 4090/, { bf16: 165, fp32: 82.6, gbps: 1008 }],
  [/T4\b/, { bf16: 65, fp32: 8.1, gbps: 320 }],
];

export async function* cudaSuite(ctx) {
  const cuda = devices().cuda;
  const id = cuda.devices.length ? 'cuda:0' : ctx.emulated ? 'emulated' : undefined;
  if (!id) {
    yield { case: 'no CUDA device', note: `${cuda.reason ?? 'unknown'} (--emulated runs the suite on the emulator)` };
    return;
  }
  const info = gpuDevice(id);
  const emulated = info.emulated;
  const sheet = DATASHEET.find(([re]) => re.test(info.name))?.[1];
  // Measured ceilings: streaming read, SIMT FMA, mma.sync bf16.
  const n4 = emulated ? 1 << 12 : 1 << 28;  // 4 GiB on a GPU: far beyond any L2
  const x = GpuBuffer.alloc(id, n4 * 16, 'the bandwidth probe');
  const out = GpuBuffer.alloc(id, Math.max(1, info.multiprocessors * 4) * 4);
  const readMs = await timeOp(id, 'probe_read', [x, out], { count4: n4 }, emulated ? 1 : 10);
  x.dispose();
  const gbps = n4 * 16 / readMs / 1e6;
  yield { case: `${info.name}: read bandwidth`, gbps, peakGbps: sheet?.gbps, pct: sheet ? 100 * gbps / sheet.gbps : undefined };
  const blocks = emulated ? 1 : info.multiprocessors * 8, iters = emulated ? 2 : 1 << 14;
  const fmaOut = GpuBuffer.alloc(id, blocks * 4);
  const fmaMs = await timeOp(id, 'probe_fma', [fmaOut], { blocks, iters }, emulated ? 1 : 5);
  const fp32 = blocks * 256 * iters * 8 * 2 / fmaMs / 1e9;
  yield { case: 'fp32 FMA (SIMT)', tflops: fp32, peakTflops: sheet?.fp32, pct: sheet ? 100 * fp32 / sheet.fp32 : undefined };
  let mma;
  if (Number(info.computeCapability) >= 8) {
    const mmaMs = await timeOp(id, 'probe_mma', [fmaOut], { blocks, iters }, emulated ? 1 : 5);
    mma = blocks * 4 * iters * 4 * 2 * 16 * 8 * 16 / mmaMs / 1e9;
    yield { case: 'bf16 mma.sync (registers)', tflops: mma, peakTflops: sheet?.bf16, pct: sheet ? 100 * mma / sheet.bf16 : undefined };
  }
  fmaOut.dispose();
  out.dispose();
  const env = { id, info, emulated, sheet, measured: { gbps, fp32, mma }, quick: ctx.quick || emulated };
  // ctx.families (e.g. ['gemm', 'session'], or SONDE_CUDA_FAMILIES=gemm,session): only those.
  const only = ctx.families ?? process.env.SONDE_CUDA_FAMILIES?.split(',').filter(Boolean);
  for (const family of FAMILIES) {
    if (only && !only.includes(family.name.replace(/Cases$/, ''))) continue;
    yield* family(env);
  }
}
