// A Mixtral-like MoE layer (8 experts, top-2, dModel 4096, dFf 14336, bf16 experts, f32 router)
// through gpuMoe at 1, 16 and 512 tokens: the whole layer (router GEMM, routing, dispatch, grouped
// gate/up and down GEMMs, combine) per call. TFLOP/s counts the active FLOPs (tokens * k * 3
// GEMMs of 2 * dModel * dFf); GB/s counts the expert weights read (each expert that received a
// token read once), the bound of small batches, against the measured read ceiling.
import { GpuBuffer } from '../../dist/cuda/runtime.js';
import { gpuMoe, gpuMoeWorkspaceBytes } from '../../dist/cuda/moe.js';
import { randomBuffer } from './common.js';

// One expert matrix of random bf16 values in [-scale, scale), written to every expert's slot:
// generating 2.8 GB in JS would dominate the run, and equal values change no timing.
async function bf16Stack(id, experts, count, scale) {
  const one = new Uint16Array(count);
  const f = new Float32Array(1), u = new Uint32Array(f.buffer);
  for (let i = 0; i < count; i++) {
    f[0] = (Math.random() * 2 - 1) * scale;
    one[i] = u[0] >>> 16;
  }
  const b = GpuBuffer.alloc(id, experts * count * 2, 'the MoE expert weights');
  for (let e = 0; e < experts; e++) await b.write(one, e * count * 2);
  return b;
}

export async function* moeCases(env) {
  const { id, emulated, sheet, measured, quick } = env;
  const nExperts = emulated ? 4 : 8, k = 2, dModel = emulated ? 64 : 4096, dFf = emulated ? 96 : 14336;
  const tokenCounts = emulated ? [1, 16] : [1, 16, 512];
  const maxTokens = Math.max(...tokenCounts);
  const count = dModel * dFf;
  const layer = {
    nExperts, k, dModel, dFf, weightType: 'bf16', renormalize: true,
    router: await randomBuffer(id, nExperts * dModel),
    gate: await bf16Stack(id, nExperts, count, 0.02), up: await bf16Stack(id, nExperts, count, 0.02),
    down: await bf16Stack(id, nExperts, count, 0.02),
  };
  const x = await randomBuffer(id, maxTokens * dModel), y = GpuBuffer.alloc(id, maxTokens * dModel * 4);
  const workspace = GpuBuffer.alloc(id, gpuMoeWorkspaceBytes(maxTokens, layer), 'the MoE workspace');
  const peak = measured.mma ?? sheet?.bf16;
  try {
    for (const tokens of tokenCounts) {
      // 'auto' picks gemv below 8 rows per expert and tensor cores above; the forced kernel beside
      // it is the alternative that was not picked, measured in the same process.
      for (const kernel of ['auto', tokens >= 512 ? 'simt' : 'tensor']) {
        const reps = emulated ? 1 : quick ? 5 : tokens >= 512 ? 20 : 50;
        const { ms, expertCounts } = await gpuMoe(id, x, tokens, layer, y, { reps, workspace, kernel });
        const tflops = tokens * k * 3 * 2 * dModel * dFf / ms / 1e9;
        const used = expertCounts.filter((c) => c > 0).length;
        const gbps = used * 3 * count * 2 / ms / 1e6;
        yield {
          case: `moe bf16 E${nExperts} top${k} ${dModel}x${dFf} tokens ${tokens} ${kernel}`, ms, tflops,
          pctOfMma: peak ? 100 * tflops / peak : undefined, expertsUsed: used, gbps, pctOfRead: 100 * gbps / measured.gbps,
        };
      }
    }
  } finally {
    for (const b of [layer.router, layer.gate, layer.up, layer.down, x, y, workspace]) b.dispose();
  }
}
