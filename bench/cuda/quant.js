// q8_0 / q4_0 matrix products: the decode GEMV is bound by reading the weights, so it reports GB/s
// of weight bytes (the GGUF bytes: 34 / 18 per block of 32) against the measured read ceiling, with
// the activation quantiser the op runs first and without it (x quantised once, as projections that
// share an input run); the prefill GEMM reports TFLOP/s against the int8 mma.sync rate (twice the
// bf16 rate the suite measures on sm_80 and sm_90). Repeated runs of one matrix below ~50 MB read it
// partly from L2, which flatters the 4096 x 4096 cases.
import { GpuBuffer } from '../../dist/cuda/runtime.js';
import { GpuQuantWeights, gpuQuantScratchBytes } from '../../dist/cuda/quant.js';
import { randomBuffer, timeOp } from './common.js';

const BLOCK_BYTES = { q8_0: 34, q4_0: 18 };

/** GGUF rows of random quants whose fp16 scales are all 2^-6 (any value streams at the same speed). */
function randomGguf(type, n, k) {
  const size = BLOCK_BYTES[type], blocks = n * k / 32, data = new Uint8Array(blocks * size);
  let s = 0x9e3779b9;
  for (let i = 0; i < data.length; i++) {
    s ^= s << 13; s ^= s >>> 17; s ^= s << 5;
    data[i] = s & 0xff;
  }
  for (let b = 0; b < blocks; b++) {
    data[b * size] = 0x00;
    data[b * size + 1] = 0x24;
  }
  return { type, n, k, data };
}

export async function* quantCases(env) {
  const { id, emulated, measured } = env;
  const reps = emulated ? 1 : 50;
  const cases = emulated
    ? [[1, 256, 64, 'gemv'], [64, 128, 128, 'gemm']]
    // k x n: attention output, FFN up (gate/up joined: 2 x 14336), FFN down.
    : [[1, 4096, 4096, 'gemv'], [1, 4096, 14336, 'gemv'], [1, 4096, 28672, 'gemv'], [1, 14336, 4096, 'gemv'],
      [512, 4096, 4096, 'gemm']];
  for (const type of ['q8_0', 'q4_0']) {
    for (const [m, k, n, algorithm] of cases) {
      const weights = await GpuQuantWeights.upload(id, randomGguf(type, n, k));
      const x = await randomBuffer(id, m * k), y = GpuBuffer.alloc(id, m * n * 4);
      const scratch = GpuBuffer.alloc(id, gpuQuantScratchBytes(m, k));
      const packed = weights.buffer('quant bench');
      const run = (simt, reuse = false) => timeOp(id, 'quant_matmul', [x, packed, y, scratch],
        { type: type === 'q8_0' ? 3 : 4, m, n, k, algorithm: algorithm === 'gemv' ? 1 : 2, simt, reuse }, reps);
      if (algorithm === 'gemv') {
        // With the quantiser (two launches), then the GEMV alone on x quantised once (as Q, K, V
        // or gate and up share theirs): the second is the kernel's own bandwidth.
        for (const reuse of [false, true]) {
          const ms = await run(false, reuse);
          const gbps = n * k / 32 * BLOCK_BYTES[type] / ms / 1e6;
          yield { case: `${type} gemv ${m}x${k}x${n}${reuse ? ' (x quantised once)' : ''}`, ms, gbps, pctOfRead: 100 * gbps / measured.gbps };
        }
      } else {
        for (const simt of [false, true]) {
          const ms = await run(simt);
          const tflops = 2 * m * n * k / ms / 1e9;
          const int8Mma = measured.mma ? 2 * measured.mma : undefined;
          yield { case: `${type} gemm ${m}x${k}x${n} ${simt ? 'simt dp4a' : 'mma s8'}`, ms, tflops,
            pctOfInt8Mma: int8Mma ? 100 * tflops / int8Mma : undefined };
        }
      }
      for (const b of [weights, x, y, scratch]) b.dispose();
    }
  }
}
