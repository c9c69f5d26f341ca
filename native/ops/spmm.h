// SpMM operator: sparse weights built once at load (CSR or BSR, see kernels/sparse/spmm.h for the
// layouts), then C[M x N] = epilogue(A[M x K] * B[K x N]) on the pool, threads split over output
// columns with balanced non-zero counts.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "kernels/sparse/spmm.h"
#include "ops/gemm.h"

namespace sonde {

enum class SparseFormat { kAuto, kCsr, kBsr };

// BSR blocks are 1 x block_width over B (block_width consecutive output columns).
bool ValidBsrBlockWidth(uint32_t bw);
// The block width 'auto' uses: one vector of the widest SIMD level (16 with AVX-512, else 8).
uint32_t DefaultBsrBlockWidth();

class SparseWeights {
 public:
  // From dense B (k x n, row-major, leading dimension ldb). Explicit zeros (+0 and -0) are dropped;
  // NaN and Inf are kept. kAuto picks BSR when the blocks are mostly full (see spmm.cc).
  // Throws std::length_error when the non-zeros do not fit 32-bit offsets, std::bad_alloc.
  static std::unique_ptr<SparseWeights> FromDense(const float* b, size_t k, size_t n, size_t ldb, SparseFormat format,
                                                  uint32_t block_width);
  // From CSR of W = B^T (rows = n output columns, cols = k). Returns null with *error naming the
  // field when the arrays are inconsistent (the TS layer checks the same first).
  static std::unique_ptr<SparseWeights> FromCsr(size_t rows, size_t cols, const uint32_t* row_ptr, size_t row_ptr_len,
                                                const uint32_t* col_idx, size_t col_idx_len, const float* values,
                                                size_t values_len, std::string* error);

  SparseFormat format() const { return format_; }
  size_t k() const { return k_; }
  size_t n() const { return n_; }
  size_t nnz() const { return nnz_; }  // non-zero weights (BSR: not counting zeros inside blocks)
  size_t bytes() const { return bytes_; }
  uint32_t block_width() const { return bw_; }
  size_t blocks() const { return block_k_.size(); }

  // CSR of W.
  std::vector<uint32_t> row_ptr_, col_idx_;
  std::vector<float> values_;
  // col_idx_ narrowed to 16 bits when k <= 65536 (else empty): the SpMV (M = 1) path reads these,
  // gathering x 16 at a time where gathers are fast (CpuFeatures::fast_gather) or one scalar load
  // each; decided once here, where SONDE_SPMV_GATHER=0 or 1 forces either (so tests run both).
  std::vector<uint16_t> col_idx16_;
  bool spmv_gather_ = false;
  // BSR: per column panel p of bw columns, blocks [block_ptr_[p], block_ptr_[p + 1]).
  std::vector<uint32_t> block_ptr_, block_k_;
  struct FreeDeleter {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, FreeDeleter> block_values_;  // 64-byte aligned: the kernels' aligned loads

 private:
  SparseWeights() = default;
  void ComputeBytes();
  void NarrowIndices();
  SparseFormat format_ = SparseFormat::kCsr;
  size_t k_ = 0, n_ = 0, nnz_ = 0, bytes_ = 0;
  uint32_t bw_ = 0;
};

const char* SparseFormatName(SparseFormat f);
// Name of the microkernel a (resolved) variant runs for these weights.
std::string SpmmUkernelName(const SparseWeights& w, GemmVariant v);

// Runs on the calling pool thread plus up to max_threads-1 helpers. Returns false if cancelled.
// variant: resolved or kAuto; kReference is the double-accumulation reference.
bool RunSpmm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
             const SparseWeights& w, GemmVariant variant);

// The product in the columns layout (kernels/sparse/spmm.h), `batch` times: item b's A^T is k rows
// of lda >= m at a + b * a_batch_stride, its C^T (and residual) n rows of ldc (ldr) >= m at
// c + b * c_batch_stride (residual + b * r_batch_stride). One NCHW image per item for a 1x1 conv
// (A^T = the image, C^T = the output image), so the layout copies of the row form disappear.
// Scale/bias are per output column (channel). CSR weights only (callers check format()).
struct SpmmColumnsArgs {
  const float* a = nullptr;
  float* c = nullptr;
  size_t m = 0, lda = 0, ldc = 0;
  size_t batch = 1, a_batch_stride = 0, c_batch_stride = 0, r_batch_stride = 0;
  // Per item, `rows` products of m positions each: row r's A^T at a + r * a_row_stride, its C^T
  // (and residual) at c + r * c_row_stride. One (rows = 1) for a 1x1 conv or an im2col panel; a
  // direct KxK conv runs one per output row, m = its width.
  size_t rows = 1, a_row_stride = 0, c_row_stride = 0;
  // Non-null: each non-zero's A^T row at a + a_offsets[p] (one offset per non-zero of the weights),
  // instead of a + col_idx[p] * lda. A direct KxK conv's offsets point at (c, ky * dh, kx * dw) of the
  // padded image, so output row oy's panel row is that image read from row oy * sh: no im2col copy.
  const uint32_t* a_offsets = nullptr;
  kernels::GemmEpilogue epilogue{nullptr, nullptr, nullptr, 0, kernels::kActNone, 0, 0.0f, 0.0f};
};
// The a_offsets of a KxK conv whose weights' k index is (c, t) row-major, t = ky * kw + kx the tap
// (im2col order, k = c_in * taps): c * plane + tap_offset[t] for each non-zero. The caller checks
// that c_in * plane fits 32 bits.
std::vector<uint32_t> SpmmConvTapOffsets(const SparseWeights& w, const std::vector<size_t>& tap_offset, size_t plane);
bool RunSpmmColumns(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const SpmmColumnsArgs& args,
                    const SparseWeights& w, GemmVariant variant);
// Name of the columns-layout microkernel a (resolved) variant runs.
std::string SpmmColumnsUkernelName(GemmVariant v);

}  // namespace sonde
