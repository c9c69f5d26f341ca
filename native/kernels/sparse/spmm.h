// f32 sparse-weight x dense-activation microkernels (SpMM), with the GEMM's fused epilogue.
//
// Convention (the GEMM's): C[M x N] = A[M x K] * B[K x N], B the weights. Two stored forms of B:
//
// CSR over W = B^T (N x K): row n of W is output column n, its non-zeros are (k, w) pairs with k
//   ascending. This is PyTorch's nn.Linear weight layout [out, in], so a pruned layer's CSR maps
//   one to one. A kernel call covers a group of up to NG consecutive output columns. For M > 1 the
//   operator packs A transposed per run (At: K rows of ldat >= M floats, M contiguous), so each
//   non-zero w[n][k] is one broadcast times a vector of M values At[k][0..M) - no gathers in the
//   inner loop, and an output column's M sums stay in registers across the whole row of W. The
//   group's results (NG columns x MB rows) are transposed (in registers where the ISA has the shuffles) to store rows
//   of C with the row-wise GEMM epilogue (masked for the group's last columns).
//   For M = 1 (SpMV, decode) At is A itself and the kernel gathers x[k] per non-zero instead.
//
// BSR with 1 x BW blocks over B (BW consecutive output columns sharing one k), stored per column
//   panel of BW columns: the panel's non-zero blocks (k ascending) and their BW values each. The
//   kernel is the dense GEMM tile with the K loop running over the panel's blocks only: each block
//   is a vector load times a broadcast A[i][k] for MR rows; rows of C come out in registers, so the
//   GEMM epilogue applies unchanged. Suits block-pruned weights (see ops/spmm.cc for the choice).
//
// Pure functions: no allocation, no threads, no globals. Only C headers here (included by ISA files).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/gemm/gemm.h"
#include "kernels/prefetch.h"

namespace sonde {
namespace kernels {

// CSR, M > 1: output columns [0, nc) (nc <= NG) of the group, rows [0, m) (m <= MB).
// row_ptr holds nc + 1 offsets into col_idx / values (absolute, not rebased to the group).
// at: At at the first row of this M block; at[k * ldat + i] = A[i][k] (zero-padded past m to a
// multiple of the vector width). c, ep: offset to (row 0, column 0) of the block.
typedef void (*F32SpmmCsrUkernel)(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                                  const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                                  const GemmEpilogue* ep);
// The same with 16-bit column indices (K <= 65536): 6 bytes of weights per non-zero instead of 8.
typedef void (*F32SpmmCsr16bitUkernel)(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                                       const uint16_t* col_idx, const float* values, float* c, size_t ldc,
                                       const GemmEpilogue* ep);
// A part of a call's rows: as F32SpmmCsrUkernel over rows [0, m) of At, with the accumulator chains
// (and so the summation order) of a call over all `whole_m` rows (m <= whole_m), so that results do
// not depend on how the operator split M between threads.
typedef void (*F32SpmmCsrPartUkernel)(size_t m, size_t whole_m, size_t nc, const float* at, size_t ldat,
                                      const uint32_t* row_ptr, const uint32_t* col_idx, const float* values, float* c,
                                      size_t ldc, const GemmEpilogue* ep);
typedef void (*F32SpmmCsrPart16bitUkernel)(size_t m, size_t whole_m, size_t nc, const float* at, size_t ldat,
                                           const uint32_t* row_ptr, const uint16_t* col_idx, const float* values,
                                           float* c, size_t ldc, const GemmEpilogue* ep);
// At packing: at[k * ldat + i] = a[i * lda + k] for i < m, k < k; zero for m <= i < ldat.
typedef void (*F32TransposePackUkernel)(size_t m, size_t k, const float* a, size_t lda, float* at, size_t ldat);
// CSR, M = 1: c[0..nc) = epilogue(sum_p values[p] * x[col_idx[p]]) over each row's non-zeros.
typedef void (*F32SpmvCsrUkernel)(size_t nc, const float* x, const uint32_t* row_ptr, const uint32_t* col_idx,
                                  const float* values, float* c, const GemmEpilogue* ep);
// The same with 16-bit column indices (K <= 65536), the form the operator uses when it can: SpMV is
// bound by streaming the weights (from L2 at best), and 6 bytes per non-zero instead of 8 is what
// made it faster. Its x[k]: scalar loads on Zen 4/5, where they beat vgatherdps (1024x1024 at 90%,
// one thread, weights in L2: gather 42 us, scalar with 32-bit indices 54, with 16-bit 35); gathers
// of 16 on Intel (spmv16_gather: 20 us against 35 with scalar loads and 23 with 32-bit indices on
// the Xeon; the weights pick one when built, by CpuFeatures::fast_gather).
typedef void (*F32SpmvCsr16Ukernel)(size_t nc, const float* x, const uint32_t* row_ptr, const uint16_t* col_idx,
                                    const float* values, float* c, const GemmEpilogue* ep);

// How far ahead the SpMV kernels ask for their weight stream (non-zeros: 2 KiB of values, 1 KiB
// of 16-bit indices). A run that follows other work finds the weights beyond L2, and the hardware
// prefetcher ramps up anew at every 4 KiB page of each stream. Pruned MLP 784-1024-1024-10 at
// batch 1, two threads, interleaved with onnxruntime-node (bench/model-ab.js): 0.066 -> 0.062 ms
// at 512 (256: 0.063, 1024: 0.064) with the gathers; with F32SpmvRow16's scalar loads (Zen, and
// SONDE_SPMV_GATHER=0 here) 0.95-0.97x time, 0.979x on one thread; AVX2 (SONDE_ISA=avx2) 0.958x.
constexpr uint32_t kSpmvPrefetchAhead = 512;
// The stream's lines kSpmvPrefetchAhead non-zeros ahead of p (for a step of up to 32 non-zeros).
template <typename Index>
static inline void PrefetchSpmvStream(const float* values, const Index* col_idx, size_t p) {
  PrefetchL1(values + p + kSpmvPrefetchAhead);
  PrefetchL1(values + p + kSpmvPrefetchAhead + 16);
  PrefetchL1(col_idx + p + kSpmvPrefetchAhead);
  if (sizeof(Index) == 4) PrefetchL1(col_idx + p + kSpmvPrefetchAhead + 16);
}

// One row's sum for the 16-bit SpMV kernels: 8 independent chains, so the loop runs at the rate of
// its loads (index, value, x[k]) rather than at the FMA latency. static: each ISA file compiles its own.
static inline float F32SpmvRow16(const float* x, uint32_t p, uint32_t p1, const uint16_t* col_idx,
                                 const float* values) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (; p + 8 <= p1; p += 8) {
    PrefetchSpmvStream(values, col_idx, p);
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) acc[u] += values[p + u] * x[col_idx[p + u]];
  }
  for (; p < p1; ++p) acc[0] += values[p] * x[col_idx[p]];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
// acc[u][v] over u summed pairwise into acc[0][v]: (0+1), (2+3), ... then (0+2), (4+6), then (0+4).
// Each level has constant bounds: GCC 12 does not fully unroll the equivalent `step *= 2` loop, and
// then keeps the whole accumulator array in memory, storing every accumulator after each FMA of
// the inner loop (the U = 4 and 8 kernels ran at a third of their rate). Add: the ISA's vector add.
template <size_t U, size_t MV, typename V, typename Add>
static inline void PairwiseSumU(V (&acc)[U][MV], size_t v, Add add) {
  static_assert(U == 1 || U == 2 || U == 4 || U == 8, "U is a power of two up to 8");
  if constexpr (U >= 2) {
#pragma GCC unroll 4
    for (size_t u = 0; u + 1 < U; u += 2) acc[u][v] = add(acc[u][v], acc[u + 1][v]);
  }
  if constexpr (U >= 4) {
#pragma GCC unroll 2
    for (size_t u = 0; u + 2 < U; u += 4) acc[u][v] = add(acc[u][v], acc[u + 2][v]);
  }
  if constexpr (U >= 8) acc[0][v] = add(acc[0][v], acc[4][v]);
}
// The columns kernels (the layout below) store m floats of output column j + kColumnsPrefetchAhead
// (and read as many of its residual) a little after asking for them here, into L2: each column's
// row of C^T is its own short run (m <= 128 floats) a whole plane away from the last, which the
// hardware prefetchers do not follow, and at ResNet-50's 56x56 and 28x28 layers those lines come from beyond L2 (3.2 MB of
// output per image at 56x56). With a K of 64 a column's sums take only ~50 FMAs, so the stores
// and residual loads stalled the loop. Pruned ResNet-50 against the same build without it
// (bench/model-ab.js, 2 columns ahead): n1 t1 0.971x time, n8 t1 0.929x, n8 t2 0.943x, n1 t2
// 0.998x (4 ahead: 1.010-1.019x there, where the blocks are split between the threads).
constexpr size_t kColumnsPrefetchAhead = 2;
static inline void PrefetchColumnsAhead(size_t j, size_t nc, size_t m, const float* c, size_t ldc,
                                        const GemmEpilogue* ep) {
  if (j + kColumnsPrefetchAhead >= nc) return;
  const size_t col = j + kColumnsPrefetchAhead;
  const float* res = ep && ep->residual ? ep->residual + col * ep->ldr : nullptr;
  for (size_t i = 0; i < m; i += 16) {
    PrefetchL2(c + col * ldc + i);
    if (res) PrefetchL2(res + i);
  }
}
// CSR with A and C column-major (the "columns" layout: an NCHW image is A^T [C_in x H*W] for a 1x1
// conv, an im2col panel is A^T [C_in*KH*KW x OH*OW], and C^T [C_out x OH*OW] is the output image):
// c[j * ldc + i] = epilogue(sum_p values[p] * at[col_idx[p] * ldat + i]) for output columns j < nc,
// rows i < m (m <= mb). Each non-zero is a broadcast times contiguous rows of At as in the row
// layout, but At is the caller's tensor (no pack, no alignment, nothing read or written past m: a
// masked last vector) and an output column's sums are stored as they are (no transpose). ep:
// scale/bias at column 0 (one value per column j), residual at (column 0, row 0), ldr between columns.
typedef void (*F32SpmmCsrColumnsUkernel)(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                                         const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                                         const GemmEpilogue* ep);
// BSR: rows [0, mr) (mr <= MR) of A times one column panel (nc <= BW columns) of 1 x BW blocks
// block_k[0..blocks), block_values[b * BW .. b * BW + BW).
typedef void (*F32SpmmBsrUkernel)(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks,
                                  const uint32_t* block_k, const float* block_values, float* c, size_t ldc,
                                  const GemmEpilogue* ep);

struct F32SpmmCsrUkernelInfo {
  F32SpmmCsrUkernel spmm;
  F32SpmvCsrUkernel spmv;
  F32SpmvCsr16Ukernel spmv16;
  F32TransposePackUkernel pack;
  uint32_t ng;  // output columns per call (the SIMD width)
  uint32_t mb;  // max rows per spmm call
  uint32_t mv;  // At row padding (vector width in floats)
  const char* name;
  F32SpmmCsrColumnsUkernel columns;  // rows [0, mb) per call too
  const char* columns_name;
  // spmv16 gathering 16 x[k] per instruction (null where the ISA has no gather): faster than the
  // scalar loads where gathers are (CpuFeatures::fast_gather).
  F32SpmvCsr16Ukernel spmv16_gather;
  F32SpmmCsr16bitUkernel spmm16;  // spmm over 16-bit indices (null: the operator uses spmm)
  // Parts of M for a split over threads (null: the variant has none), parts of up to part_mb rows.
  F32SpmmCsrPartUkernel spmm_part;
  F32SpmmCsrPart16bitUkernel spmm16_part;
  uint32_t part_mb;
};

struct F32SpmmBsrUkernelInfo {
  F32SpmmBsrUkernel fn;
  uint32_t mr;  // rows per call (max)
  uint32_t bw;  // block width it was written for
  const char* name;
};

F32SpmmCsrUkernelInfo F32SpmmCsrUkernelScalar();
void F32TransposePackScalar(size_t m, size_t k, const float* a, size_t lda, float* at, size_t ldat);
// bw: 8, 16 or 32 (any multiple of 1 works for scalar).
F32SpmmBsrUkernelInfo F32SpmmBsrUkernelScalar(uint32_t bw);
#if defined(__x86_64__) || defined(_M_X64)
F32SpmmCsrUkernelInfo F32SpmmCsrUkernelAvx2();
F32SpmmCsrUkernelInfo F32SpmmCsrUkernelAvx512();
// bw 8, 16, 32 for AVX2; 16, 32 for AVX-512 (an 8-wide block is an AVX2 vector: the operator uses
// the AVX2 kernel for it). fn is null for an unsupported width.
F32SpmmBsrUkernelInfo F32SpmmBsrUkernelAvx2(uint32_t bw);
F32SpmmBsrUkernelInfo F32SpmmBsrUkernelAvx512(uint32_t bw);
#endif

// The reference: for each output, the CSR row's products summed in double, then the scalar
// epilogue. Rows [0, m) of A (lda), output columns [n0, n1) of W; c, ep at (row 0, column 0).
void F32SpmmCsrReference(size_t m, size_t n0, size_t n1, const float* a, size_t lda, const uint32_t* row_ptr,
                         const uint32_t* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep);
// The columns layout's reference (double sums, scalar epilogue as F32SpmmCsrColumnsUkernel's):
// rows [0, m), output columns [n0, n1); c, ep at (column 0, row 0).
void F32SpmmCsrColumnsReference(size_t m, size_t n0, size_t n1, const float* at, size_t ldat, const uint32_t* row_ptr,
                                const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                                const GemmEpilogue* ep);
// The same for BSR: rows [0, m), column panels [p0, p1) of width bw, n columns in all; c, ep at
// (row 0, column 0) of the whole output.
void F32SpmmBsrReference(size_t m, size_t n, size_t bw, size_t p0, size_t p1, const float* a, size_t lda,
                         const uint32_t* block_ptr, const uint32_t* block_k, const float* block_values, float* c,
                         size_t ldc, const GemmEpilogue* ep);

}  // namespace kernels
}  // namespace sonde
