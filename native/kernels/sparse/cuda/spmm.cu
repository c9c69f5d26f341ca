// SpMM on the GPU (the CPU family: kernels/sparse, ops/spmm.cc): C[M x N] = epilogue(A[M x K] * B)
// with the weights B stored sparse in the CPU's two forms (kernels/sparse/spmm.h):
// - CSR of W = B^T (N rows of K): row n is output column n. Rows are grouped into chunks of about
//   equal non-zero count on the host (lib/cuda/sparse.ts), one warp per chunk, so a skewed row
//   length distribution does not leave most warps idle behind a few long rows.
//   M > 1: A is first transposed (At, K rows of M) so that one non-zero w[n][k] times the M
//   activations At[k][0..M) is a coalesced 256-byte load per 64 rows of A; the non-zeros' indices
//   and values are read 32 at a time and broadcast by shuffles. Each lane keeps 2 rows' sums in
//   registers across the whole row of W. M = 1 (SpMV): the warp splits each row's non-zeros across lanes (x gathered)
//   and reduces with shuffles.
// - BSR of 1 x BW blocks over B (BW consecutive output columns sharing one k), per panel of BW
//   columns: lanes take a panel's BW columns (coalesced value loads), thread groups split the
//   panel's blocks, and 8 rows of A share each value load (1 for M = 1).
// The fused epilogue is the GEMM's (kernels/gemm/cuda/epilogue.h): scale, bias, activation, residual.
#include "kernels/gemm/cuda/epilogue.h"
#include "runtime/cuda/dialect.h"

namespace sonde {
namespace SONDE_GPU_NS {

namespace {

// At[k][i] = A[i][k] for i < m, k < k (row length ldat); 32 x 32 tiles through shared memory (one padding column so
// that the transposed reads hit 32 different banks).
__global__ void __launch_bounds__(256) TransposeKernel(const float* __restrict__ a, size_t lda, float* __restrict__ at,
                                                       size_t ldat, int m, int k) {
  __shared__ float tile[32][33];
  const int k0 = blockIdx.x * 32, m0 = blockIdx.y * 32;
  for (int r = threadIdx.y; r < 32; r += 8) {
    const int i = m0 + r, kk = k0 + threadIdx.x;
    if (i < m && kk < k) tile[r][threadIdx.x] = a[size_t(i) * lda + kk];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += 8) {
    const int kk = k0 + r, i = m0 + threadIdx.x;
    if (i < m && kk < k) at[size_t(kk) * ldat + i] = tile[threadIdx.x][r];
  }
}

constexpr int kCsrWarps = 4, kCsrRowsPerLane = 2, kCsrRowsPerBlock = 32 * kCsrRowsPerLane;

struct SpmmOut {
  float* c;
  size_t ldc, ldr;
  int m, n;
};

// One warp per chunk of W rows, one block row per 64 rows of A: each lane takes 2 adjacent rows of A
// (one 8-byte load per non-zero, the warp's 64 rows in one 256-byte access; At rows are padded to an
// even length), and a row of W's indices and values is read 32 at a time, coalesced, then broadcast
// by shuffles. (One row per lane with a uniform index/value load per non-zero was 1.7x slower on an
// H200 at 4096 x 4096, 90% sparse, M = 64: 0.089 vs 0.053 ms.)
__global__ void __launch_bounds__(kCsrWarps * 32)
    SpmmCsrKernel(const float* __restrict__ at, size_t ldat, const uint32_t* __restrict__ row_ptr,
                       const uint32_t* __restrict__ col_idx, const float* __restrict__ values,
                       const uint32_t* __restrict__ chunk_rows, int chunks, SpmmOut out, GpuEpilogue ep) {
  const int chunk = blockIdx.x * kCsrWarps + threadIdx.x / 32;
  if (chunk >= chunks) return;  // whole warps leave together
  const int lane = threadIdx.x % 32, i0 = blockIdx.y * kCsrRowsPerBlock + 2 * lane;
  // A lane past M reads padding or row pairs of other lanes (valid memory) and stores nothing.
  const int r0 = min(i0, int(ldat) - 2);
  for (uint32_t row = chunk_rows[chunk]; row < chunk_rows[chunk + 1]; ++row) {
    float2 s = make_float2(0.0f, 0.0f), t = make_float2(0.0f, 0.0f);  // two chains
    const uint32_t p0 = row_ptr[row], p1 = row_ptr[row + 1];
    for (uint32_t base = p0; base < p1; base += 32) {
      const int count = min(32, int(p1 - base));  // warp-uniform
      const uint32_t my_k = lane < count ? col_idx[base + lane] : 0u;
      const float my_v = lane < count ? values[base + lane] : 0.0f;
      int j = 0;
      for (; j + 2 <= count; j += 2) {
        const uint32_t ka = __shfl_sync(0xffffffffu, my_k, j), kb = __shfl_sync(0xffffffffu, my_k, j + 1);
        const float va = __shfl_sync(0xffffffffu, my_v, j), vb = __shfl_sync(0xffffffffu, my_v, j + 1);
        const float2 a = *reinterpret_cast<const float2*>(at + size_t(ka) * ldat + r0);
        const float2 b = *reinterpret_cast<const float2*>(at + size_t(kb) * ldat + r0);
        s.x += va * a.x;
        s.y += va * a.y;
        t.x += vb * b.x;
        t.y += vb * b.y;
      }
      if (j < count) {
        const uint32_t ka = __shfl_sync(0xffffffffu, my_k, j);
        const float va = __shfl_sync(0xffffffffu, my_v, j);
        const float2 a = *reinterpret_cast<const float2*>(at + size_t(ka) * ldat + r0);
        s.x += va * a.x;
        s.y += va * a.y;
      }
    }
    if (i0 < out.m) out.c[size_t(i0) * out.ldc + row] = GpuApplyEpilogue(s.x + t.x, row, size_t(i0) * out.ldr + row, ep);
    if (i0 + 1 < out.m)
      out.c[size_t(i0 + 1) * out.ldc + row] = GpuApplyEpilogue(s.y + t.y, row, size_t(i0 + 1) * out.ldr + row, ep);
  }
}

// M = 1: one warp per chunk; each row's non-zeros spread over the lanes, then a shuffle reduction.
__global__ void __launch_bounds__(kCsrWarps * 32)
    SpmvCsrKernel(const float* __restrict__ x, const uint32_t* __restrict__ row_ptr, const uint32_t* __restrict__ col_idx,
                  const float* __restrict__ values, const uint32_t* __restrict__ chunk_rows, int chunks, SpmmOut out,
                  GpuEpilogue ep) {
  const int chunk = blockIdx.x * kCsrWarps + threadIdx.x / 32;
  if (chunk >= chunks) return;
  const unsigned lane = threadIdx.x % 32;
  for (uint32_t row = chunk_rows[chunk]; row < chunk_rows[chunk + 1]; ++row) {
    float s = 0.0f;
    for (uint32_t p = row_ptr[row] + lane; p < row_ptr[row + 1]; p += 32) s += values[p] * x[col_idx[p]];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out.c[row] = GpuApplyEpilogue(s, row, row, ep);
  }
}

// BSR: one block per (panel, MR rows of A). Lane j of a BW-wide thread group takes output column
// panel * BW + j (coalesced value loads); the block's 256 / BW groups split the panel's blocks
// between them (a panel holds ~K / 10 blocks at 90% sparsity: one group alone would be a long
// dependent walk, and a panel per group leaves a large GPU mostly idle at small M), each keeping MR
// rows' partial sums in registers, then sum the groups' partials through shared memory.
constexpr int kBsrThreads = 256;

template <int BW, int MR>
__global__ void __launch_bounds__(kBsrThreads)
    SpmmBsrKernel(const float* __restrict__ a, size_t lda, const uint32_t* __restrict__ panel_ptr,
                  const uint32_t* __restrict__ block_k, const float* __restrict__ block_values, SpmmOut out,
                  GpuEpilogue ep) {
  constexpr int kSlices = kBsrThreads / BW;
  __shared__ float partial[kSlices * MR * BW];
  const int j = threadIdx.x % BW, slice = threadIdx.x / BW, panel = blockIdx.x, i0 = blockIdx.y * MR;
  const float* rows[MR];
  SONDE_UNROLL
  for (int r = 0; r < MR; ++r) rows[r] = a + size_t(min(i0 + r, out.m - 1)) * lda;  // past M: read, never stored
  float acc[MR] = {};
  for (uint32_t b = panel_ptr[panel] + slice; b < panel_ptr[panel + 1]; b += kSlices) {
    const uint32_t k = block_k[b];
    const float v = block_values[size_t(b) * BW + j];
    SONDE_UNROLL
    for (int r = 0; r < MR; ++r) acc[r] += v * rows[r][k];
  }
  SONDE_UNROLL
  for (int r = 0; r < MR; ++r) partial[(slice * MR + r) * BW + j] = acc[r];
  __syncthreads();
  for (int o = threadIdx.x; o < MR * BW; o += kBsrThreads) {
    const int r = o / BW, jj = o % BW, i = i0 + r, col = panel * BW + jj;
    float sum = 0.0f;
    for (int sl = 0; sl < kSlices; ++sl) sum += partial[(sl * MR + r) * BW + jj];
    if (i < out.m && col < out.n) out.c[size_t(i) * out.ldc + col] = GpuApplyEpilogue(sum, col, size_t(i) * out.ldr + col, ep);
  }
}

template <int BW>
void LaunchBsr(GpuStream& st, const GpuOpCall& c, size_t panels, const float* a, size_t lda, const uint32_t* panel_ptr,
               const uint32_t* block_k, const float* values, const SpmmOut& o, const GpuEpilogue& ep) {
  // One row of A (decode, SpMV) needs no row tile; otherwise 8 rows share each value load.
  constexpr int kRows = 8;
  const unsigned row_tiles = o.m == 1 ? 1 : CeilDiv(size_t(o.m), kRows);
  if (row_tiles > 65535) c.Invalid("m is too large (over 65535 row tiles)");
  if (o.m == 1) Launch(SpmmBsrKernel<BW, 1>, dim3(unsigned(panels), 1), dim3(kBsrThreads), 0, st, a, lda, panel_ptr, block_k, values, o, ep);
  else Launch(SpmmBsrKernel<BW, kRows>, dim3(unsigned(panels), row_tiles), dim3(kBsrThreads), 0, st, a, lda, panel_ptr, block_k, values, o, ep);
}

// Shapes and the optional epilogue buffers (after the op's fixed ones, in the order bias, scale,
// residual, each present when its flag is 1).
struct SpmmShape {
  int64_t m, k, n, lda, ldc, ldr;
};

SpmmShape ReadShape(const GpuOpCall& c) {
  SpmmShape s;
  s.m = c.Int("m");
  s.k = c.Int("k", 1);
  s.n = c.Int("n", 1);
  s.lda = c.IntOr("lda", s.k, 1);
  s.ldc = c.IntOr("ldc", s.n, 1);
  s.ldr = c.IntOr("ldr", s.n, 1);
  if (s.lda < s.k) c.Invalid("lda must be >= k");
  if (s.ldc < s.n) c.Invalid("ldc must be >= n");
  if (s.ldr < s.n) c.Invalid("ldr must be >= n");
  return s;
}

// Elements a row-major [rows x cols] matrix with leading dimension ld spans.
size_t Span(const GpuOpCall& c, int64_t rows, int64_t cols, int64_t ld) {
  return rows == 0 ? 0 : c.Count({rows - 1, ld}) + size_t(cols);
}

GpuEpilogue ReadEpilogue(const GpuOpCall& c, size_t first, const SpmmShape& s) {
  GpuEpilogue ep = GpuEpilogueParams(c);
  size_t i = first;
  if (c.IntOr("hasBias", 0, 0, 1)) ep.bias = c.Buffer<float>(i++, s.n, "bias");
  if (c.IntOr("hasScale", 0, 0, 1)) ep.scale = c.Buffer<float>(i++, s.n, "scale");
  if (c.IntOr("hasResidual", 0, 0, 1)) ep.residual = c.Buffer<float>(i++, Span(c, s.m, s.n, s.ldr), "residual");
  if (i != c.buffers.size()) c.Invalid("expected " + std::to_string(i) + " buffers, got " + std::to_string(c.buffers.size()));
  return ep;
}

// Buffers: 0 a [m, lda], 1 rowPtr u32 [n + 1], 2 colIdx u32 [nnz], 3 values [nnz], 4 chunkRows u32
// [chunks + 1], 5 c [m, ldc], 6 scratch (k * m floats when m > 1), then the epilogue's. The index
// arrays come from lib/cuda/sparse.ts, which checked them when it built them.
void SpmmCsrOp(GpuStream& st, const GpuDeviceInfo&, const GpuOpCall& c) {
  const SpmmShape s = ReadShape(c);
  const int64_t nnz = c.Int("nnz"), chunks = c.Int("chunks", 0, s.n);
  const float* a = c.Buffer<float>(0, Span(c, s.m, s.k, s.lda), "a");
  const uint32_t* row_ptr = c.Buffer<uint32_t>(1, size_t(s.n) + 1, "rowPtr");
  const uint32_t* col_idx = c.Buffer<uint32_t>(2, size_t(nnz), "colIdx");
  const float* values = c.Buffer<float>(3, size_t(nnz), "values");
  const uint32_t* chunk_rows = c.Buffer<uint32_t>(4, size_t(chunks) + 1, "chunkRows");
  float* out = c.Buffer<float>(5, Span(c, s.m, s.n, s.ldc), "c");
  const int64_t ldat = s.m + (s.m & 1);  // even, for the kernel's 8-byte row-pair loads
  float* scratch = c.Buffer<float>(6, s.m > 1 ? c.Count({s.k, ldat}) : 0, "scratch");
  const GpuEpilogue ep = ReadEpilogue(c, 7, s);
  if (s.m == 0 || chunks == 0) return;
  const SpmmOut o{out, size_t(s.ldc), size_t(s.ldr), static_cast<int>(s.m), static_cast<int>(s.n)};
  const unsigned blocks = CeilDiv(size_t(chunks), kCsrWarps);
  if (s.m == 1) {
    Launch(SpmvCsrKernel, dim3(blocks), dim3(kCsrWarps * 32), 0, st, a, row_ptr, col_idx, values, chunk_rows,
           static_cast<int>(chunks), o, ep);
    return;
  }
  if (CeilDiv(size_t(s.k), 32) > 0x7fffffffu || CeilDiv(size_t(s.m), 32) > 65535 ||
      CeilDiv(size_t(s.m), kCsrRowsPerBlock) > 65535)
    c.Invalid("m is too large (over 2 million rows)");
  Launch(TransposeKernel, dim3(CeilDiv(size_t(s.k), 32), CeilDiv(size_t(s.m), 32)), dim3(32, 8), 0, st, a,
         size_t(s.lda), scratch, size_t(ldat), static_cast<int>(s.m), static_cast<int>(s.k));
  Launch(SpmmCsrKernel, dim3(blocks, CeilDiv(size_t(s.m), kCsrRowsPerBlock)), dim3(kCsrWarps * 32), 0, st, scratch,
         size_t(ldat), row_ptr, col_idx, values, chunk_rows, static_cast<int>(chunks), o, ep);
}

// Buffers: 0 a [m, lda], 1 panelPtr u32 [ceil(n / bw) + 1], 2 blockK u32 [blocks], 3 values
// [blocks * bw] (zero past column n), 4 c [m, ldc], then the epilogue's.
void SpmmBsrOp(GpuStream& st, const GpuDeviceInfo&, const GpuOpCall& c) {
  const SpmmShape s = ReadShape(c);
  const int64_t bw = c.Int("bw", 8, 32), blocks = c.Int("blocks");
  if (bw != 8 && bw != 16 && bw != 32) c.Invalid("bw must be 8, 16 or 32");
  const size_t panels = CeilDiv(size_t(s.n), size_t(bw));
  const float* a = c.Buffer<float>(0, Span(c, s.m, s.k, s.lda), "a");
  const uint32_t* panel_ptr = c.Buffer<uint32_t>(1, panels + 1, "panelPtr");
  const uint32_t* block_k = c.Buffer<uint32_t>(2, size_t(blocks), "blockK");
  const float* values = c.Buffer<float>(3, c.Count({blocks, bw}), "values");
  float* out = c.Buffer<float>(4, Span(c, s.m, s.n, s.ldc), "c");
  const GpuEpilogue ep = ReadEpilogue(c, 5, s);
  if (s.m == 0) return;
  const SpmmOut o{out, size_t(s.ldc), size_t(s.ldr), static_cast<int>(s.m), static_cast<int>(s.n)};
  if (bw == 8) LaunchBsr<8>(st, c, panels, a, size_t(s.lda), panel_ptr, block_k, values, o, ep);
  else if (bw == 16) LaunchBsr<16>(st, c, panels, a, size_t(s.lda), panel_ptr, block_k, values, o, ep);
  else LaunchBsr<32>(st, c, panels, a, size_t(s.lda), panel_ptr, block_k, values, o, ep);
}

}  // namespace

SONDE_GPU_OP("spmm_csr", SpmmCsrOp);
SONDE_GPU_OP("spmm_bsr", SpmmBsrOp);

}  // namespace SONDE_GPU_NS
}  // namespace sonde
