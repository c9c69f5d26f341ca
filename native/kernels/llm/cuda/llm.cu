// The small ops a language model's forward pass needs on the GPU besides the products, norms and
// attention of the other families (ops/llm_gpu.cc composes them all):
//   llm_embed        [table, tokens int32, x f32]       {type, d, rows, vocab}
//                    x[r] = the dequantised row tokens[r] of the embedding table, read in the GGUF
//                    bytes (f32, f16, bf16, q8_0, q4_0 as kernels/quant/quant.h numbers them), as
//                    the CPU's DequantizeRow computes it; an id outside the vocabulary gives zeros.
//   llm_add          [y, a]                              {count}        y += a (the residual stream)
//   llm_bias         [y, bias]                           {rows, n}      y[r][j] += bias[j] (qwen2)
//   llm_gather_rows  [x, rows int32, out]                {rows, n, xRows}  out[r] = x[rows[r]]
//   llm_copy_blocks  [pool, pairs int32]                 {pairs, blockBytes, blocks}
//                    block pairs[2i + 1] = block pairs[2i] (copy-on-write before a step)
//   llm_copy         [src, dst]                          {bytes}        (a KV pool's growth)
//   llm_gated_add    [y, x, w, s]                        {rows, n, gated}
//                    y[r] += g_r * s[r], g_r = sigmoid(x[r] . w) (gated) or 1: qwen2moe's shared
//                    expert joining the routed experts' sum (deepseek2's is ungated)
//   llm_add_rms_norm [x, a, w, y, scratch?]              {rows, n, eps, quantize?}
//                    x += a, then y = RMSNorm(x) * w (y may be a): the residual add and the next
//                    norm of a layer in one pass over the row, one launch fewer per add
//   llm_silu_mul     [gate, up, y, scratch?]              {rows, n, ld?, quantize?}
//                    y = silu(gate) * up (SwiGLU); gate and up rows ld apart (default n: packed),
//                    so that one joined gate/up product's output [rows][2n] is read in place
//   llm_rope_store   [q, k, v, positions, rowSeq, pool, tables, qOut?]
//                    {rows, heads, kvHeads, headDim, base, freqScale, neox, dtype, blockSize,
//                     numBlocks, layers, layer, seqs, width, ldq?, ldk?, ldv?}
//                    RoPE of every row's query and key heads (attention/cuda/rope.cu's angles),
//                    the roped keys and the values written into the KV pool at the row's position
//                    through its sequence's block table (kv_store.cu's layout and rounding): the
//                    three launches of a dense layer's attention input in one. Rows of q, k, v
//                    are ldq, ldk, ldv apart (default packed: one joined QKV product's output is
//                    read in place); keys are roped in place, queries into qOut (packed rows of
//                    heads * headDim, as attention reads them; default q itself)
//   quantize: y also quantised into scratch as quant_matmul's activations (quant/cuda/quant.cu:
//   rows * n int8, then rows * n / 32 fp32 scales, by quantize_acts.h's rule), so that the
//   q8_0/q4_0 product reading y runs with reuse = 1: one quantiser launch fewer per product input
//   (n % 32 == 0)
//   llm_rms_norm_rows [x, w, y]                          {rows, n, ldx, ldy, eps}
//                    RMSNorm of the first n elements of rows ldx apart into rows ldy apart (in
//                    place allowed): MLA's latent, the head of each [latent | rope key] row
//   llm_head_matmul  [x, w f32, y]                       {rows, heads, k, n, ldx, hx, ldy, hy}
//                    per head h: y[r][h][0, n) = x[r][h][0, k) . W[h]^T, W[h] n rows of k (MLA's
//                    absorbed key and value up-projections), rows ldx / ldy and heads hx / hy apart
//   llm_copy_rows    [x, y]                              {rows, heads, count, ldx, hx, ox, ldy, hy, oy}
//                    y[r][h][oy + i] = x[r][h][ox + i], i < count (the roped query part of MLA)
//   llm_chain_next   [logits, tokens int32, pos int32, meta int32, lens int32, chosen int32,
//                    params f64?, rng u32?, rngOut u32?]   {seqs, vocab, step, sample?}
//                    decode steps chained on the device (ops/llm_gpu.cc: StepChain): per sequence
//                    s (one decode row each, its logits row s) the next token t, and
//                    chosen[step * seqs + s] = t, and the next step's inputs follow: tokens[s] = t,
//                    and pos[s], meta[3s] (start) and lens[s] one position on. Without sample, t
//                    is the argmax (lib/llm/sampling.ts's argmax: the first maximum, NaN never, 0
//                    when no logit exceeds -inf). With sample, params[4s..4s+4) = (temperature,
//                    top-k, top-p, log(min-p) or -inf) and rng[4s..4s+4) the xoshiro128** state:
//                    sampling.ts's Sampler chain for 0 < top-k <= 64 < vocab without penalties,
//                    in the same order and float64 arithmetic (temperature <= 0: the argmax), the
//                    state advanced by its draws and copied to rngOut[(step * seqs + s) * 4..]
// Every op but llm_chain_next's selection is memory-bound and reads and writes each element once;
// none needs shared memory beyond a block's reduction partials.
#include "kernels/llm/xoshiro.h"
#include "kernels/quant/cuda/quantize_acts.h"
#include "kernels/quant/quant.h"
#include "kernels/attention/cuda/paged.h"
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

constexpr unsigned kThreads = 256;

// Blocks for a grid-stride loop over `count` items: enough to fill the device, no more than needed.
dim3 StrideGrid(const GpuDeviceInfo& d, size_t count) {
  const size_t want = (count + kThreads - 1) / kThreads, cap = size_t(d.multiprocessors > 0 ? d.multiprocessors : 1) * 8;
  return dim3(static_cast<unsigned>(want < cap ? want : cap));
}

// One block per row: each thread takes elements j, j + 256, ... of it. The row's GGUF bytes are at
// best 2-byte aligned (34- and 18-byte blocks), so quantised rows are read byte by byte; an
// embedding lookup moves rows * d elements per step, nothing next to one weight matrix.
__global__ void __launch_bounds__(kThreads) EmbedKernel(const uint8_t* __restrict__ table, const int32_t* __restrict__ tokens,
                                                        float* __restrict__ x, int type, unsigned d, unsigned vocab,
                                                        size_t row_bytes) {
  GridDependencyStart();
  const unsigned r = blockIdx.x;
  const int32_t t = tokens[r];
  float* out = x + size_t(r) * d;
  const bool valid = t >= 0 && static_cast<unsigned>(t) < vocab;
  const uint8_t* row = table + size_t(valid ? t : 0) * row_bytes;
  for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
    float v = 0.0f;
    if (valid) {
      switch (type) {
        case kernels::kQuantF32: {
          uint32_t bits = uint32_t(row[4 * j]) | uint32_t(row[4 * j + 1]) << 8 | uint32_t(row[4 * j + 2]) << 16 |
                          uint32_t(row[4 * j + 3]) << 24;
          v = __uint_as_float(bits);
          break;
        }
        case kernels::kQuantF16: v = HalfToFloat(static_cast<uint16_t>(row[2 * j] | row[2 * j + 1] << 8)); break;
        case kernels::kQuantBf16: v = Bf16ToFloat(static_cast<uint16_t>(row[2 * j] | row[2 * j + 1] << 8)); break;
        case kernels::kQuantQ8_0: {
          const uint8_t* b = row + (j / 32) * 34;
          const float scale = HalfToFloat(static_cast<uint16_t>(b[0] | b[1] << 8));
          v = scale * static_cast<float>(static_cast<int8_t>(b[2 + j % 32]));
          break;
        }
        default: {  // q4_0: byte i of a block's 16 holds element i (low nibble) and i + 16 (high)
          const uint8_t* b = row + (j / 32) * 18;
          const float scale = HalfToFloat(static_cast<uint16_t>(b[0] | b[1] << 8));
          const unsigned e = j % 32;
          const int q = e < 16 ? (b[2 + e] & 0x0F) : (b[2 + e - 16] >> 4);
          v = scale * static_cast<float>(q - 8);
          break;
        }
      }
    }
    out[j] = v;
  }
}

__global__ void __launch_bounds__(kThreads) AddKernel(float* __restrict__ y, const float* __restrict__ a, size_t count) {
  GridDependencyStart();
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) y[i] += a[i];
}

__global__ void __launch_bounds__(kThreads) BiasKernel(float* __restrict__ y, const float* __restrict__ bias, size_t rows,
                                                       unsigned n) {
  const size_t count = rows * n;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    y[i] += bias[i % n];
}

__global__ void __launch_bounds__(kThreads) GatherRowsKernel(const float* __restrict__ x, const int32_t* __restrict__ rows,
                                                             float* __restrict__ out, unsigned n, unsigned x_rows) {
  GridDependencyStart();
  const unsigned r = blockIdx.x;
  const int32_t src = rows[r];
  float* o = out + size_t(r) * n;
  const bool valid = src >= 0 && static_cast<unsigned>(src) < x_rows;
  for (unsigned j = threadIdx.x; j < n; j += blockDim.x) o[j] = valid ? x[size_t(src) * n + j] : 0.0f;
}

// One block of kChainThreads per sequence (llm_chain_next).
constexpr unsigned kChainThreads = 1024, kChainWarps = kChainThreads / 32;
constexpr int kChainTopK = 64;

// The row's first maximum as the TS argmax picks it, on thread 0. A thread's candidates rise in
// index, so a strict > keeps its first maximum; the block then prefers the larger value, and the
// lower index on equal values. "None" is (-inf, vocab): a row with no logit above -inf (or only
// NaN) gives 0.
__device__ int32_t ChainArgmax(const float* __restrict__ row, unsigned vocab, float* best_v, unsigned* best_i) {
  float v = -INFINITY;
  unsigned idx = vocab;
  for (unsigned j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float x = row[j];
    if (x > v) v = x, idx = j;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const unsigned oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) v = ov, idx = oi;
  }
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = v, best_i[threadIdx.x / 32] = idx;
  __syncthreads();
  if (threadIdx.x == 0)
    for (unsigned w = 1; w < kChainWarps; ++w)
      if (best_v[w] > v || (best_v[w] == v && best_i[w] < idx)) v = best_v[w], idx = best_i[w];
  return idx < vocab ? static_cast<int32_t>(idx) : 0;
}

// Floats as unsigned keys in the same order; -0 as +0 (equal values, ranked by id as the TS
// top-k does), NaN below everything.
__device__ __forceinline__ uint32_t OrderKey(float v) {
  if (v != v) return 0;
  if (v == 0.0f) v = 0.0f;
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct ChainShared {
  unsigned hist[2048];
  unsigned warp_sums[kChainWarps];
  float best_v[kChainWarps];
  unsigned best_i[kChainWarps];
  unsigned prefix, need, taken;
  int kept, use_argmax;
  int32_t cand_i[kChainTopK];
  uint32_t cand_k[kChainTopK];
  int32_t sorted_i[kChainTopK];
  float sorted_v[kChainTopK];
  double e[kChainTopK];
  double z;
};

// The sum of v over the threads before this one (in thread order), on every thread: warp scans,
// then a scan of the warps' totals by warp 0. Block-uniform call; kChainThreads threads.
__device__ unsigned BlockExclusiveScan(unsigned v, unsigned* warp_sums) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned incl = v;
  for (unsigned o = 1; o < 32; o <<= 1) {
    const unsigned u = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    unsigned w = lane < kChainWarps ? warp_sums[lane] : 0;
    for (unsigned o = 1; o < 32; o <<= 1) {
      const unsigned u = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += u;
    }
    if (lane < kChainWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  const unsigned out = (warp ? warp_sums[warp - 1] : 0) + incl - v;
  __syncthreads();  // warp_sums free for the next call
  return out;
}

// One count per lane with `active` into hist[bin], the lanes of a warp with one bin in one atomic:
// logits crowd a few bins of their top bits, and a shared atomic per element into those serialised
// the first pass (55 us a step for a 32k vocabulary on an H200). Warp-uniform call.
__device__ __forceinline__ void WarpHistAdd(unsigned* hist, unsigned bin, bool active) {
  const unsigned lane = threadIdx.x % 32;
  unsigned pending = __ballot_sync(0xffffffffu, active);
  while (pending) {
    const int leader = __ffs(static_cast<int>(pending)) - 1;
    const unsigned lb = __shfl_sync(0xffffffffu, bin, leader);
    const unsigned same = __ballot_sync(0xffffffffu, ((pending >> lane) & 1u) && bin == lb);
    if (static_cast<int>(lane) == leader) atomicAdd(&hist[lb], static_cast<unsigned>(__popc(same)));
    pending &= ~same;
  }
}

// The k largest logits (ties: lower id first), in rank order, into sh.sorted_*: a radix select of
// the k-th largest key in three passes over the row (11 + 11 + 10 bits), then one pass collecting
// the larger keys and, in id order, the first of those equal to it.
__device__ void ChainTopK(const float* __restrict__ row, unsigned vocab, unsigned k, ChainShared& sh) {
  const unsigned tid = threadIdx.x;
  if (tid == 0) sh.prefix = 0, sh.need = k, sh.taken = 0;
  unsigned mask = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const unsigned bins = pass == 2 ? 1024u : 2048u;
    for (unsigned b = tid; b < bins; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    const unsigned prefix = sh.prefix;
    for (unsigned base = 0; base < vocab; base += blockDim.x) {  // warp-uniform trip count
      const unsigned j = base + tid;
      const uint32_t key = j < vocab ? OrderKey(row[j]) : 0;
      WarpHistAdd(sh.hist, (key >> shift) & (bins - 1), j < vocab && (key & mask) == prefix);
    }
    __syncthreads();
    // The bin holding the need-th largest key: counts from the top bin down, scanned over the
    // block (thread t takes the per bins t * per.. from the top); exactly one bin has the count
    // above it below need and reaches need with its own (the bins hold every key under the
    // prefix, at least need of them). A serial walk by one thread cost ~50 us a step.
    const unsigned need = sh.need, per = bins / kChainThreads;
    unsigned local = 0;
    for (unsigned q = 0; q < per; ++q) local += sh.hist[bins - 1 - (tid * per + q)];
    unsigned above = BlockExclusiveScan(local, sh.warp_sums);
    for (unsigned q = 0; q < per; ++q) {
      const unsigned bin = bins - 1 - (tid * per + q), h = sh.hist[bin];
      if (above < need && above + h >= need) sh.prefix = prefix | (bin << shift), sh.need = need - above;
      above += h;
    }
    mask |= (bins - 1) << shift;
    __syncthreads();
  }
  // Keys above the k-th go in wherever they fall; of the keys equal to it, the `need` lowest ids,
  // found in id order through each thread's contiguous span and the counts of the spans before.
  const uint32_t kth = sh.prefix;
  const unsigned span = (vocab + kChainThreads - 1) / kChainThreads, lo = min(vocab, tid * span), hi = min(vocab, lo + span);
  unsigned equal = 0;
  for (unsigned j = lo; j < hi; ++j) {
    const uint32_t key = OrderKey(row[j]);
    if (key > kth) {
      const unsigned at = atomicAdd(&sh.taken, 1u);
      sh.cand_i[at] = static_cast<int32_t>(j), sh.cand_k[at] = key;
    }
    equal += key == kth;
  }
  unsigned before = BlockExclusiveScan(equal, sh.warp_sums);
  const unsigned above = k - sh.need;  // keys above the k-th: all of them were counted
  for (unsigned j = lo; j < hi && before < sh.need; ++j) {
    if (OrderKey(row[j]) != kth) continue;
    sh.cand_i[above + before] = static_cast<int32_t>(j), sh.cand_k[above + before] = kth;
    ++before;
  }
  __syncthreads();
  // Rank order: larger key first, lower id on equal keys.
  if (tid < k) {
    const uint32_t key = sh.cand_k[tid];
    const int32_t id = sh.cand_i[tid];
    unsigned rank = 0;
    for (unsigned o = 0; o < k; ++o) rank += sh.cand_k[o] > key || (sh.cand_k[o] == key && sh.cand_i[o] < id);
    sh.sorted_i[rank] = id;
    sh.sorted_v[rank] = row[id];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kChainThreads) ChainNextKernel(const float* __restrict__ logits, int32_t* __restrict__ tokens,
                                                                 int32_t* __restrict__ pos, int32_t* __restrict__ meta,
                                                                 int32_t* __restrict__ lens, int32_t* __restrict__ chosen,
                                                                 const double* __restrict__ params, uint32_t* __restrict__ rng,
                                                                 uint32_t* __restrict__ rng_out, unsigned vocab, unsigned seqs,
                                                                 unsigned step) {
  __shared__ ChainShared sh;
  const unsigned s = blockIdx.x, tid = threadIdx.x;
  const float* row = logits + size_t(s) * vocab;
  int32_t t = 0;
  // Uniform over the block: one sequence's parameters.
  const double temperature = params ? params[4 * s] : 0.0;
  if (!(temperature > 0.0)) {
    t = ChainArgmax(row, vocab, sh.best_v, sh.best_i);
  } else {
    const unsigned k = static_cast<unsigned>(params[4 * s + 1]);
    const double top_p = params[4 * s + 2], min_logit = params[4 * s + 3];
    ChainTopK(row, vocab, k, sh);
    const double max = sh.sorted_v[0];
    if (tid == 0) sh.use_argmax = !(max - max == 0.0);  // not finite (isfinite is not in both dialects)
    __syncthreads();
    if (sh.use_argmax) {
      t = ChainArgmax(row, vocab, sh.best_v, sh.best_i);
    } else {
      // The chain of Sampler.#chain: z over the top-k, top-p's prefix, min-p's, then temperature.
      if (tid < k) sh.e[tid] = exp(double(sh.sorted_v[tid]) - max);
      __syncthreads();
      if (tid == 0) {
        double z = 0;
        for (unsigned i = 0; i < k; ++i) z += sh.e[i];
        unsigned kept = k;
        if (top_p < 1) {
          double cum = 0;
          for (unsigned i = 0; i < k; ++i) {
            cum += sh.e[i] / z;
            if (cum >= top_p) {
              kept = i + 1;
              break;
            }
          }
        }
        if (min_logit > -INFINITY) {
          unsigned i = 1;
          while (i < kept && double(sh.sorted_v[i]) - max >= min_logit) ++i;
          kept = i;
        }
        sh.kept = static_cast<int>(kept);
      }
      __syncthreads();
      const unsigned kept = static_cast<unsigned>(sh.kept);
      if (tid < kept) {
        const double e = exp((double(sh.sorted_v[tid]) - max) / temperature);
        sh.e[tid] = e > 0 ? e : 0;
      }
      __syncthreads();
      if (tid == 0) {
        t = sh.sorted_i[0];
        if (kept > 1) {
          double sum = 0;
          for (unsigned i = 0; i < kept; ++i) sum += sh.e[i];
          const double r = double(XoshiroNext(rng + 4 * s)) / 4294967296.0;
          double cum = 0;
          t = sh.sorted_i[kept - 1];
          for (unsigned i = 0; i < kept; ++i) {
            cum += sh.e[i] / sum;
            if (r < cum) {
              t = sh.sorted_i[i];
              break;
            }
          }
        }
      }
    }
  }
  if (tid != 0) return;
  chosen[size_t(step) * seqs + s] = t;
  tokens[s] = t;
  pos[s] += 1;
  meta[3 * s] += 1;
  lens[s] += 1;
  if (rng_out)
    for (int w = 0; w < 4; ++w) rng_out[(size_t(step) * seqs + s) * 4 + w] = rng[4 * s + w];
}

// One grid row per pair; 16-byte words when the block size allows (every real pool's does: a
// block is whole rows of an even head size), bytes otherwise.
__global__ void __launch_bounds__(kThreads) CopyBlocksKernel(uint8_t* __restrict__ pool, const int32_t* __restrict__ pairs,
                                                             size_t block_bytes, unsigned blocks) {
  const int32_t src = pairs[2 * blockIdx.y], dst = pairs[2 * blockIdx.y + 1];
  if (src < 0 || dst < 0 || static_cast<unsigned>(src) >= blocks || static_cast<unsigned>(dst) >= blocks || src == dst) return;
  const uint8_t* s = pool + size_t(src) * block_bytes;
  uint8_t* d = pool + size_t(dst) * block_bytes;
  const size_t stride = size_t(gridDim.x) * blockDim.x, first = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (block_bytes % 16 == 0) {
    for (size_t i = first; i < block_bytes / 16; i += stride) StoreVec<uint4>(d + 16 * i, LoadVec<uint4>(s + 16 * i));
  } else {
    for (size_t i = first; i < block_bytes; i += stride) d[i] = s[i];
  }
}

__global__ void __launch_bounds__(kThreads) CopyKernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, size_t bytes) {
  const size_t stride = size_t(gridDim.x) * blockDim.x, first = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t words = bytes / 16;
  for (size_t i = first; i < words; i += stride) StoreVec<uint4>(dst + 16 * i, LoadVec<uint4>(src + 16 * i));
  for (size_t i = words * 16 + first; i < bytes; i += stride) dst[i] = src[i];
}

// The sum of every thread's v over a block of kThreads (partial: kThreads / 32 floats of shared
// memory), on every thread: warp sums, then each thread adds the warps' in the same order.
__device__ __forceinline__ float BlockSum(float v, float* partial) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  for (unsigned i = 0; i < kThreads / 32; ++i) total += partial[i];
  return total;
}

// One block per row: the gate's dot product reduced over the block, then the scaled add. The dot
// is a plain fp32 sum (the CPU computes it as a 1-row f32 product: same terms, another order).
__global__ void __launch_bounds__(kThreads) GatedAddKernel(float* __restrict__ y, const float* __restrict__ x,
                                                           const float* __restrict__ w, const float* __restrict__ s,
                                                           unsigned n, int gated) {
  __shared__ float partial[kThreads / 32];
  const size_t r = blockIdx.x;
  float g = 1.0f;
  if (gated) {
    float dot = 0.0f;
    for (unsigned j = threadIdx.x; j < n; j += blockDim.x) dot += x[r * n + j] * w[j];
    g = 1.0f / (1.0f + expf(-BlockSum(dot, partial)));
  }
  for (unsigned j = threadIdx.x; j < n; j += blockDim.x) y[r * n + j] += g * s[r * n + j];
}

__global__ void __launch_bounds__(kThreads) RmsNormRowsKernel(const float* x, const float* __restrict__ w, float* y,
                                                              unsigned n, size_t ldx, size_t ldy, float eps) {
  __shared__ float partial[kThreads / 32];
  const float* xr = x + blockIdx.x * ldx;
  float* yr = y + blockIdx.x * ldy;
  float ss = 0.0f;
  for (unsigned j = threadIdx.x; j < n; j += blockDim.x) ss += xr[j] * xr[j];
  const float scale = 1.0f / sqrtf(BlockSum(ss, partial) / static_cast<float>(n) + eps);
  // In place: each thread rewrites only the elements it read, after the block's sum.
  for (unsigned j = threadIdx.x; j < n; j += blockDim.x) yr[j] = xr[j] * scale * w[j];
}

// One block per row; every thread rewrites only the elements it read (y may alias a). With xq, n
// is a multiple of 32, so the loops are warp-uniform and a warp's 32 elements are one quant block.
__global__ void __launch_bounds__(kThreads) AddRmsNormKernel(float* __restrict__ x, const float* a, const float* __restrict__ w,
                                                             float* y, unsigned n, float eps, int8_t* __restrict__ xq,
                                                             float* __restrict__ xd, bool early) {
  GridDependencyStart(early);
  __shared__ float partial[kThreads / 32];
  float* xr = x + size_t(blockIdx.x) * n;
  const float* ar = a + size_t(blockIdx.x) * n;
  float* yr = y + size_t(blockIdx.x) * n;
  float ss = 0.0f;
  for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = xr[j] + ar[j];
    xr[j] = v;
    ss += v * v;
  }
  const float scale = 1.0f / sqrtf(BlockSum(ss, partial) / static_cast<float>(n) + eps);
  for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = xr[j] * scale * w[j];
    yr[j] = v;
    if (xq) QuantizeActBlock<1>({v}, size_t(blockIdx.x) * n + j, true, xq, xd);
  }
}

// AddRmsNormKernel for rows of up to kThreads * 4 * P elements (n % 4 == 0, 16-byte aligned rows):
// each thread loads its P float4s of x and a at once and keeps the sums in registers for the
// norm, so a row costs two rounds of memory latency instead of one per 256 elements and pass (a
// decode step's single row is all latency). Same sums per thread, so the same result.
template <int P>
__global__ void __launch_bounds__(kThreads) AddRmsNormVecKernel(float* __restrict__ x, const float* a, const float* __restrict__ w,
                                                                float* y, unsigned n, float eps, int8_t* __restrict__ xq,
                                                                float* __restrict__ xd, bool early) {
  GridDependencyStart(early);
  __shared__ float partial[kThreads / 32];
  const size_t base = size_t(blockIdx.x) * n;
  float4* xr = reinterpret_cast<float4*>(x + base);
  const float4* ar = reinterpret_cast<const float4*>(a + base);
  const float4* wr = reinterpret_cast<const float4*>(w);
  float4* yr = reinterpret_cast<float4*>(y + base);
  const unsigned n4 = n / 4;
  float4 v[P];
  float ss = 0.0f;
  SONDE_UNROLL
  for (int p = 0; p < P; ++p) {
    const unsigned j = threadIdx.x + p * kThreads;
    v[p] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (j < n4) {
      const float4 xv = xr[j], av = ar[j];
      v[p] = make_float4(xv.x + av.x, xv.y + av.y, xv.z + av.z, xv.w + av.w);
    }
  }
  SONDE_UNROLL
  for (int p = 0; p < P; ++p) {
    const unsigned j = threadIdx.x + p * kThreads;
    if (j < n4) {
      xr[j] = v[p];
      ss += v[p].x * v[p].x + v[p].y * v[p].y + v[p].z * v[p].z + v[p].w * v[p].w;
    }
  }
  const float scale = 1.0f / sqrtf(BlockSum(ss, partial) / static_cast<float>(n) + eps);
  SONDE_UNROLL
  for (int p = 0; p < P; ++p) {
    const unsigned j = threadIdx.x + p * kThreads;
    const bool in = j < n4;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (in) {
      const float4 wv = wr[j];
      o = make_float4(v[p].x * scale * wv.x, v[p].y * scale * wv.y, v[p].z * scale * wv.z, v[p].w * scale * wv.w);
      yr[j] = o;
    }
    if (xq) QuantizeActBlock<4>({o.x, o.y, o.z, o.w}, base + size_t(j) * 4, in, xq, xd);
  }
}

// Grid-stride over the elements; with xq the count is a multiple of 32 and the stride of whole
// warps, so each warp's 32 elements are one quant block.
__global__ void __launch_bounds__(kThreads) SiluMulKernel(const float* __restrict__ gate, const float* __restrict__ up,
                                                          float* __restrict__ y, size_t count, size_t n, size_t ld,
                                                          int8_t* __restrict__ xq, float* __restrict__ xd, bool early) {
  GridDependencyStart(early);
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const size_t at = ld == n ? i : i / n * ld + i % n;
    const float g = gate[at], v = g / (1.0f + expf(-g)) * up[at];
    y[i] = v;
    if (xq) QuantizeActBlock<1>({v}, i, true, xq, xd);
  }
}

template <int kType>
struct RopeStoreArgs {
  const float* q;
  float *k, *q_out;
  const float* v;
  size_t ldq, ldk, ldv;
  const int32_t *pos, *row_seq, *tables;
  typename attention::KvElem<kType>::T* pool;
  attention::PoolLayout kv;
  unsigned rows, heads, kv_heads, half, width;
  float freq_scale, theta_scale;
  int neox;
};

// One thread per (row, head, pair) of the query heads then the key heads. The angle is computed as
// the rope op does (theta_0 = pos * freq_scale, then j multiplications by theta_scale in fp32).
template <int kType>
__global__ void __launch_bounds__(kThreads) RopeStoreKernel(RopeStoreArgs<kType> a) {
  GridDependencyStart();
  using E = attention::KvElem<kType>;
  const unsigned all = a.heads + a.kv_heads, dims = 2 * a.half;
  const size_t total = size_t(a.rows) * all * a.half;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const unsigned j = static_cast<unsigned>(i % a.half), h = static_cast<unsigned>(i / a.half % all);
    const unsigned row = static_cast<unsigned>(i / a.half / all);
    const int32_t p = a.pos[row];
    float theta = static_cast<float>(p) * a.freq_scale;
    for (unsigned t = 0; t < j; ++t) theta *= a.theta_scale;
    const float c = cosf(theta), sn = sinf(theta);
    const bool key = h >= a.heads;
    const unsigned hh = key ? h - a.heads : h;
    const unsigned e0 = a.neox ? j : 2 * j, e1 = a.neox ? j + a.half : 2 * j + 1;
    const float* r = key ? a.k + row * a.ldk + size_t(hh) * dims : a.q + row * a.ldq + size_t(hh) * dims;
    const float x0 = r[e0], x1 = r[e1], y0 = x0 * c - x1 * sn, y1 = x0 * sn + x1 * c;
    // A thread reads and writes only its own pair: in place (q_out == q) is safe.
    float* w = key ? a.k + row * a.ldk + size_t(hh) * dims : a.q_out + (size_t(row) * a.heads + hh) * dims;
    w[e0] = y0;
    w[e1] = y1;
    if (!key) continue;
    const int32_t s = a.row_seq[row];
    const int32_t id = p < 0 ? -1 : a.tables[size_t(s) * a.width + p / a.kv.block_size];
    if (id < 0 || id >= a.kv.blocks) continue;
    typename E::T* at = a.pool + size_t(id) * a.kv.block + a.kv.key + size_t(hh) * a.kv.stream +
                        size_t(p % a.kv.block_size) * a.kv.row;
    const float* vr = a.v + row * a.ldv + size_t(hh) * dims;
    at[e0] = E::Put(y0);
    at[e1] = E::Put(y1);
    at[a.kv.value + e0] = E::Put(vr[e0]);
    at[a.kv.value + e1] = E::Put(vr[e1]);
  }
}

// One thread per output element: a dot product over k of the head's input and one weight row.
// The per-head matrices are small (MLA: 512 x 128) and a decode step has few rows.
__global__ void __launch_bounds__(kThreads) HeadMatmulKernel(const float* __restrict__ x, const float* __restrict__ w,
                                                             float* __restrict__ y, unsigned rows, unsigned heads,
                                                             unsigned k, unsigned n, size_t ldx, size_t hx, size_t ldy,
                                                             size_t hy) {
  const size_t total = size_t(rows) * heads * n;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const unsigned j = static_cast<unsigned>(i % n), h = static_cast<unsigned>(i / n % heads), r = static_cast<unsigned>(i / n / heads);
    const float* xr = x + r * ldx + h * hx;
    const float* wr = w + (size_t(h) * n + j) * k;
    float acc = 0.0f;
    for (unsigned t = 0; t < k; ++t) acc = fmaf(xr[t], wr[t], acc);
    y[r * ldy + h * hy + j] = acc;
  }
}

__global__ void __launch_bounds__(kThreads) CopyRowsKernel(const float* __restrict__ x, float* __restrict__ y, unsigned rows,
                                                           unsigned heads, unsigned count, size_t ldx, size_t hx, size_t ox,
                                                           size_t ldy, size_t hy, size_t oy) {
  const size_t total = size_t(rows) * heads * count;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t j = i % count, h = i / count % heads, r = i / count / heads;
    y[r * ldy + h * hy + oy + j] = x[r * ldx + h * hx + ox + j];
  }
}

// ---- ops ----

void EmbedOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int type = static_cast<int>(c.Int("type", kernels::kQuantF32, kernels::kQuantQ4_0));
  const int64_t d = c.Int("d", 1), rows = c.Int("rows", 0, 1 << 24), vocab = c.Int("vocab", 1);
  if ((type == kernels::kQuantQ8_0 || type == kernels::kQuantQ4_0) && d % 32)
    c.Invalid("d (" + std::to_string(d) + ") must be a multiple of 32 for a block-quantised table");
  const size_t row_bytes = kernels::QuantRowBytes(type, static_cast<size_t>(d));
  const uint8_t* table = c.Buffer<uint8_t>(0, c.Count({vocab, static_cast<int64_t>(row_bytes)}), "table");
  const int32_t* tokens = c.Buffer<int32_t>(1, static_cast<size_t>(rows), "tokens");
  float* x = c.Buffer<float>(2, c.Count({rows, d}), "x");
  if (rows == 0) return;
  LaunchDependent(EmbedKernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, s, table, tokens, x, type,
         static_cast<unsigned>(d), static_cast<unsigned>(vocab), row_bytes);
}

void AddOp(GpuStream& s, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const size_t count = c.Count({c.Int("count", 0, INT64_C(1) << 40)});
  float* y = c.Buffer<float>(0, count, "y");
  const float* a = c.Buffer<float>(1, count, "a");
  if (count) LaunchDependent(AddKernel, StrideGrid(dev, count), dim3(kThreads), 0, s, y, a, count);
}

void BiasOp(GpuStream& s, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows"), n = c.Int("n", 1);
  const size_t count = c.Count({rows, n});
  float* y = c.Buffer<float>(0, count, "y");
  const float* bias = c.Buffer<float>(1, static_cast<size_t>(n), "bias");
  if (count) Launch(BiasKernel, StrideGrid(dev, count), dim3(kThreads), 0, s, y, bias, static_cast<size_t>(rows),
                    static_cast<unsigned>(n));
}

void GatherRowsOp(GpuStream& s, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), n = c.Int("n", 1), x_rows = c.Int("xRows");
  const float* x = c.Buffer<float>(0, c.Count({x_rows, n}), "x");
  const int32_t* idx = c.Buffer<int32_t>(1, static_cast<size_t>(rows), "rows");
  float* out = c.Buffer<float>(2, c.Count({rows, n}), "out");
  if (rows == 0) return;
  LaunchDependent(GatherRowsKernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, s, x, idx, out, static_cast<unsigned>(n),
         static_cast<unsigned>(x_rows));
}

void CopyBlocksOp(GpuStream& s, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int64_t pairs = c.Int("pairs", 0, 65535), block_bytes = c.Int("blockBytes", 1, INT64_C(1) << 40);
  const int64_t blocks = c.Int("blocks", 1);
  uint8_t* pool = c.Buffer<uint8_t>(0, c.Count({blocks, block_bytes}), "pool");
  const int32_t* ids = c.Buffer<int32_t>(1, c.Count({pairs, 2}), "pairs");
  if (pairs == 0) return;
  const size_t units = block_bytes % 16 == 0 ? size_t(block_bytes) / 16 : size_t(block_bytes);
  const size_t cap = size_t(dev.multiprocessors > 0 ? dev.multiprocessors : 1) * 4;
  const size_t want = (units + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(want < cap ? want : cap), static_cast<unsigned>(pairs));
  Launch(CopyBlocksKernel, grid, dim3(kThreads), 0, s, pool, ids, static_cast<size_t>(block_bytes),
         static_cast<unsigned>(blocks));
}

void ChainNextOp(GpuStream& st, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t seqs = c.Int("seqs", 0, 1 << 24), vocab = c.Int("vocab", 1, INT64_C(1) << 30), step = c.Int("step", 0, 1 << 24);
  const bool sample = c.IntOr("sample", 0, 0, 1) != 0;
  const float* logits = c.Buffer<float>(0, c.Count({seqs, vocab}), "logits");
  int32_t* tokens = c.Buffer<int32_t>(1, static_cast<size_t>(seqs), "tokens");
  int32_t* pos = c.Buffer<int32_t>(2, static_cast<size_t>(seqs), "pos");
  int32_t* meta = c.Buffer<int32_t>(3, c.Count({seqs, 3}), "meta");
  int32_t* lens = c.Buffer<int32_t>(4, static_cast<size_t>(seqs), "lens");
  int32_t* chosen = c.Buffer<int32_t>(5, c.Count({step + 1, seqs}), "chosen");
  const double* params = sample ? c.Buffer<double>(6, c.Count({seqs, 4}), "params") : nullptr;
  uint32_t* rng = sample ? c.Buffer<uint32_t>(7, c.Count({seqs, 4}), "rng") : nullptr;
  uint32_t* rng_out = sample ? c.Buffer<uint32_t>(8, c.Count({step + 1, seqs, 4}), "rngOut") : nullptr;
  if (seqs == 0) return;
  Launch(ChainNextKernel, dim3(static_cast<unsigned>(seqs)), dim3(kChainThreads), 0, st, logits, tokens, pos, meta, lens, chosen,
         params, rng, rng_out, static_cast<unsigned>(vocab), static_cast<unsigned>(seqs), static_cast<unsigned>(step));
}

void CopyOp(GpuStream& s, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const size_t bytes = static_cast<size_t>(c.Int("bytes", 0, INT64_C(1) << 40));
  const uint8_t* src = c.Buffer<uint8_t>(0, bytes, "src");
  uint8_t* dst = c.Buffer<uint8_t>(1, bytes, "dst");
  if (!bytes) return;
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16) c.Invalid("src and dst must be 16-byte aligned");
  Launch(CopyKernel, StrideGrid(dev, (bytes + 15) / 16), dim3(kThreads), 0, s, src, dst, bytes);
}

void GatedAddOp(GpuStream& st, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), n = c.Int("n", 1);
  const int gated = static_cast<int>(c.IntOr("gated", 1, 0, 1));
  const size_t count = c.Count({rows, n});
  float* y = c.Buffer<float>(0, count, "y");
  const float* x = c.Buffer<float>(1, count, "x");
  const float* w = gated ? c.Buffer<float>(2, static_cast<size_t>(n), "w") : nullptr;
  const float* s = c.Buffer<float>(3, count, "s");
  if (rows == 0) return;
  Launch(GatedAddKernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, st, y, x, w, s, static_cast<unsigned>(n), gated);
}

// The extent (elements) of rows x heads spans of `count` at offset o, rows ld and heads h apart.
size_t Extent(const GpuOpCall& c, int64_t rows, int64_t heads, int64_t count, int64_t ld, int64_t h, int64_t o) {
  if (rows == 0 || heads == 0 || count == 0) return 0;
  return c.Count({rows - 1, ld}) + c.Count({heads - 1, h}) + static_cast<size_t>(o + count);
}

// The optional quantised copy of an op's output: buffer i as quant_matmul's scratch for rows x n.
void AddRmsNormOp(GpuStream& st, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), n = c.Int("n", 1);
  const size_t count = c.Count({rows, n});
  float* x = c.Buffer<float>(0, count, "x");
  const float* a = c.Buffer<float>(1, count, "a");
  const float* w = c.Buffer<float>(2, static_cast<size_t>(n), "weight");
  float* y = c.Buffer<float>(3, count, "y");
  int8_t* xq;
  float* xd;
  QuantOutput(c, 4, rows, n, &xq, &xd);
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
  const unsigned un = static_cast<unsigned>(n);
  const float eps = static_cast<float>(c.NumOr("eps", 1e-6));
  const bool vec = n % 4 == 0 && !((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(a) |
                                    reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(y)) % 16);
  const int64_t per = (n + 4 * kThreads - 1) / (4 * kThreads);  // float4s per thread
  // The next op is the product that reads y (the FFN's, the next layer's Q/K/V): its first weight
  // lines start toward L2 while this short kernel and the one before it finish (with SwiGLU's and
  // the attention combine's early launch: 1.463 against 1.467 ms per step of the 16-layer q8_0
  // decode on an H200, bench/gpu-llm-ab.js).
  const bool early = GpuEarlyDependents();
  if (vec && per <= 1) LaunchDependent(AddRmsNormVecKernel<1>, grid, block, 0, st, x, a, w, y, un, eps, xq, xd, early);
  else if (vec && per <= 2) LaunchDependent(AddRmsNormVecKernel<2>, grid, block, 0, st, x, a, w, y, un, eps, xq, xd, early);
  else if (vec && per <= 4) LaunchDependent(AddRmsNormVecKernel<4>, grid, block, 0, st, x, a, w, y, un, eps, xq, xd, early);
  else if (vec && per <= 8) LaunchDependent(AddRmsNormVecKernel<8>, grid, block, 0, st, x, a, w, y, un, eps, xq, xd, early);
  else LaunchDependent(AddRmsNormKernel, grid, block, 0, st, x, a, w, y, un, eps, xq, xd, early);
}

void SiluMulOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), n = c.Int("n", 1), ld = c.IntOr("ld", n, n);
  const size_t count = c.Count({rows, n}), in = rows ? c.Count({rows - 1, ld}) + static_cast<size_t>(n) : 0;
  const float* gate = c.Buffer<float>(0, in, "gate");
  const float* up = c.Buffer<float>(1, in, "up");
  float* y = c.Buffer<float>(2, count, "y");
  int8_t* xq;
  float* xd;
  QuantOutput(c, 3, rows, n, &xq, &xd);
  if (count)
    LaunchDependent(SiluMulKernel, StrideGrid(dev, count), dim3(kThreads), 0, st, gate, up, y, count, static_cast<size_t>(n),
           static_cast<size_t>(ld), xq, xd, GpuEarlyDependents());  // the down product reads y next
}

template <int kType>
void LaunchRopeStore(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c, RopeStoreArgs<kType> a, void* pool,
                     const attention::PoolLayout& kv, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dims,
                     int64_t width) {
  a.pool = static_cast<typename attention::KvElem<kType>::T*>(pool);
  a.kv = kv;
  a.rows = static_cast<unsigned>(rows), a.heads = static_cast<unsigned>(heads), a.kv_heads = static_cast<unsigned>(kv_heads);
  a.half = static_cast<unsigned>(dims / 2), a.width = static_cast<unsigned>(width);
  const float base = static_cast<float>(c.NumOr("base", 10000.0));
  if (!(base > 0.0f)) c.Invalid("base must be positive");
  a.freq_scale = static_cast<float>(c.NumOr("freqScale", 1.0));
  a.theta_scale = powf(base, -2.0f / static_cast<float>(dims));
  a.neox = c.NumOr("neox", 0) != 0;
  const size_t total = c.Count({rows, heads + kv_heads, dims / 2});
  if (total) LaunchDependent(RopeStoreKernel<kType>, StrideGrid(dev, total), dim3(kThreads), 0, st, a);
}

void RopeStoreOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int type = attention::KvTypeOf(c);
  const int64_t rows = c.Int("rows", 0, 1 << 24), heads = c.Int("heads", 1, 65535), kv_heads = c.Int("kvHeads", 1, 65535);
  const int64_t dims = c.Int("headDim", 2, 1 << 16), seqs = c.Int("seqs", 0, 65535), width = c.Int("width", 1);
  if (dims % 2) c.Invalid("headDim must be even, got " + std::to_string(dims));
  const int64_t qd = heads * dims, kvd = kv_heads * dims;
  const int64_t ldq = c.IntOr("ldq", qd, qd, INT64_C(1) << 32), ldk = c.IntOr("ldk", kvd, kvd, INT64_C(1) << 32);
  const int64_t ldv = c.IntOr("ldv", kvd, kvd, INT64_C(1) << 32);
  const attention::PoolLayout kv = attention::PoolLayoutOf(c, 2 * kv_heads, dims, kv_heads);
  const auto extent = [&](int64_t ld, int64_t n) { return rows == 0 ? 0 : c.Count({rows - 1, ld}) + static_cast<size_t>(n); };
  RopeStoreArgs<attention::kKvF32> a{};  // the pointers and sizes; the pool's element type is the template's
  a.q = c.Buffer<float>(0, extent(ldq, qd), "q");
  a.k = c.Buffer<float>(1, extent(ldk, kvd), "k");
  a.v = c.Buffer<float>(2, extent(ldv, kvd), "v");
  a.pos = c.Buffer<int32_t>(3, static_cast<size_t>(rows), "positions");
  a.row_seq = c.Buffer<int32_t>(4, static_cast<size_t>(rows), "rowSeq");
  void* pool = c.Buffer<unsigned char>(5, c.Count({kv.blocks, static_cast<int64_t>(kv.block),
                                                   static_cast<int64_t>(attention::KvElemBytes(type))}), "pool");
  a.tables = c.Buffer<int32_t>(6, c.Count({seqs, width}), "blockTables");
  // In place unless a packed output is given (a joined QKV product's rows are wider than q's).
  a.q_out = c.buffers.size() > 7 && c.buffers[7].data ? c.Buffer<float>(7, c.Count({rows, heads, dims}), "qOut")
                                                       : const_cast<float*>(a.q);
  if (a.q_out == a.q && ldq != qd) c.Invalid("ldq must be heads * headDim without qOut");
  a.ldq = static_cast<size_t>(ldq), a.ldk = static_cast<size_t>(ldk), a.ldv = static_cast<size_t>(ldv);
  // The kernel trusts row_seq < seqs and positions within the table (ops/llm_gpu.cc builds them
  // from a validated step); ids are checked against the pool.
  const auto as = [&](auto tag) {
    using A = RopeStoreArgs<decltype(tag)::value>;
    A b{};
    b.q = a.q, b.k = a.k, b.q_out = a.q_out, b.v = a.v, b.ldq = a.ldq, b.ldk = a.ldk, b.ldv = a.ldv;
    b.pos = a.pos, b.row_seq = a.row_seq, b.tables = a.tables;
    return b;
  };
  switch (type) {
    case attention::kKvF32:
      LaunchRopeStore<attention::kKvF32>(st, dev, c, as(std::integral_constant<int, attention::kKvF32>{}), pool, kv, rows, heads, kv_heads, dims, width);
      break;
    case attention::kKvF16:
      LaunchRopeStore<attention::kKvF16>(st, dev, c, as(std::integral_constant<int, attention::kKvF16>{}), pool, kv, rows, heads, kv_heads, dims, width);
      break;
    default:
      LaunchRopeStore<attention::kKvBf16>(st, dev, c, as(std::integral_constant<int, attention::kKvBf16>{}), pool, kv, rows, heads, kv_heads, dims, width);
      break;
  }
}

void RmsNormRowsOp(GpuStream& st, const GpuDeviceInfo&, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), n = c.Int("n", 1);
  const int64_t ldx = c.IntOr("ldx", n, n, INT64_C(1) << 32), ldy = c.IntOr("ldy", n, n, INT64_C(1) << 32);
  const float* x = c.Buffer<float>(0, Extent(c, rows, 1, n, ldx, 0, 0), "x");
  const float* w = c.Buffer<float>(1, static_cast<size_t>(n), "weight");
  float* y = c.Buffer<float>(2, Extent(c, rows, 1, n, ldy, 0, 0), "y");
  if (rows == 0) return;
  Launch(RmsNormRowsKernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, st, x, w, y, static_cast<unsigned>(n),
         static_cast<size_t>(ldx), static_cast<size_t>(ldy), static_cast<float>(c.NumOr("eps", 1e-6)));
}

void HeadMatmulOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), heads = c.Int("heads", 1, 1 << 16), k = c.Int("k", 1), n = c.Int("n", 1);
  const int64_t ldx = c.Int("ldx", 0, INT64_C(1) << 32), hx = c.Int("hx", 0, INT64_C(1) << 32);
  const int64_t ldy = c.Int("ldy", 0, INT64_C(1) << 32), hy = c.Int("hy", 0, INT64_C(1) << 32);
  const float* x = c.Buffer<float>(0, Extent(c, rows, heads, k, ldx, hx, 0), "x");
  const float* w = c.Buffer<float>(1, c.Count({heads, n, k}), "w");
  float* y = c.Buffer<float>(2, Extent(c, rows, heads, n, ldy, hy, 0), "y");
  const size_t total = c.Count({rows, heads, n});
  if (!total) return;
  Launch(HeadMatmulKernel, StrideGrid(dev, total), dim3(kThreads), 0, st, x, w, y, static_cast<unsigned>(rows),
         static_cast<unsigned>(heads), static_cast<unsigned>(k), static_cast<unsigned>(n), static_cast<size_t>(ldx),
         static_cast<size_t>(hx), static_cast<size_t>(ldy), static_cast<size_t>(hy));
}

void CopyRowsOp(GpuStream& st, const GpuDeviceInfo& dev, const GpuOpCall& c) {
  const int64_t rows = c.Int("rows", 0, 1 << 24), heads = c.Int("heads", 1, 1 << 16), count = c.Int("count", 1);
  const int64_t ldx = c.Int("ldx", 0, INT64_C(1) << 32), hx = c.Int("hx", 0, INT64_C(1) << 32), ox = c.Int("ox", 0, INT64_C(1) << 32);
  const int64_t ldy = c.Int("ldy", 0, INT64_C(1) << 32), hy = c.Int("hy", 0, INT64_C(1) << 32), oy = c.Int("oy", 0, INT64_C(1) << 32);
  const float* x = c.Buffer<float>(0, Extent(c, rows, heads, count, ldx, hx, ox), "x");
  float* y = c.Buffer<float>(1, Extent(c, rows, heads, count, ldy, hy, oy), "y");
  const size_t total = c.Count({rows, heads, count});
  if (!total) return;
  Launch(CopyRowsKernel, StrideGrid(dev, total), dim3(kThreads), 0, st, x, y, static_cast<unsigned>(rows),
         static_cast<unsigned>(heads), static_cast<unsigned>(count), static_cast<size_t>(ldx), static_cast<size_t>(hx),
         static_cast<size_t>(ox), static_cast<size_t>(ldy), static_cast<size_t>(hy), static_cast<size_t>(oy));
}

}  // namespace

SONDE_GPU_OP("llm_add_rms_norm", AddRmsNormOp);
SONDE_GPU_OP("llm_rope_store", RopeStoreOp);
SONDE_GPU_OP("llm_silu_mul", SiluMulOp);
SONDE_GPU_OP("llm_rms_norm_rows", RmsNormRowsOp);
SONDE_GPU_OP("llm_head_matmul", HeadMatmulOp);
SONDE_GPU_OP("llm_copy_rows", CopyRowsOp);
SONDE_GPU_OP("llm_embed", EmbedOp);
SONDE_GPU_OP("llm_gated_add", GatedAddOp);
SONDE_GPU_OP("llm_add", AddOp);
SONDE_GPU_OP("llm_bias", BiasOp);
SONDE_GPU_OP("llm_gather_rows", GatherRowsOp);
SONDE_GPU_OP("llm_copy_blocks", CopyBlocksOp);
SONDE_GPU_OP("llm_copy", CopyOp);
SONDE_GPU_OP("llm_chain_next", ChainNextOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
