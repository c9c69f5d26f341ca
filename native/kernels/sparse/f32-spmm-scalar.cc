#include "kernels/sparse/spmm.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kNg = 8;   // output columns per call
constexpr size_t kMb = 64;  // rows per call

// Each output sums its row's products in order, like the SIMD kernels (which use FMA, so the
// roundings differ; the tests bound both against the exact sum).
void F32SpmmCsr8x64Scalar(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                          const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                          const GemmEpilogue* ep) {
  for (size_t j = 0; j < nc; ++j) {
    float acc[kMb] = {};
    for (uint32_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) {
      const float w = values[p];
      const float* ak = at + static_cast<size_t>(col_idx[p]) * ldat;
      for (size_t i = 0; i < m; ++i) acc[i] += w * ak[i];
    }
    for (size_t i = 0; i < m; ++i) c[i * ldc + j] = ep ? GemmEpilogueScalar(acc[i], i, j, ep) : acc[i];
  }
}

// The scalar epilogue with the columns layout's operands: scale/bias by column j, residual at j * ldr + i.
inline float ColumnsEpilogueScalar(float v, size_t i, size_t j, const GemmEpilogue* ep) {
  GemmEpilogue t = *ep;
  if (t.scale) t.scale += j;
  if (t.bias) t.bias += j;
  if (t.residual) t.residual += j * ep->ldr + i;
  return GemmEpilogueScalar(v, 0, 0, &t);
}

void F32SpmmCsrColumns8x64Scalar(size_t m, size_t nc, const float* at, size_t ldat, const uint32_t* row_ptr,
                                 const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                                 const GemmEpilogue* ep) {
  for (size_t j = 0; j < nc; ++j) {
    float acc[kMb] = {};
    for (uint32_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) {
      const float w = values[p];
      const float* ak = at + static_cast<size_t>(col_idx[p]) * ldat;
      for (size_t i = 0; i < m; ++i) acc[i] += w * ak[i];
    }
    for (size_t i = 0; i < m; ++i) c[j * ldc + i] = ep ? ColumnsEpilogueScalar(acc[i], i, j, ep) : acc[i];
  }
}

void F32SpmvCsr8Scalar(size_t nc, const float* x, const uint32_t* row_ptr, const uint32_t* col_idx,
                       const float* values, float* c, const GemmEpilogue* ep) {
  for (size_t j = 0; j < nc; ++j) {
    float acc = 0.0f;
    for (uint32_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) acc += values[p] * x[col_idx[p]];
    c[j] = ep ? GemmEpilogueScalar(acc, 0, j, ep) : acc;
  }
}

void F32SpmvCsr8x16bitScalar(size_t nc, const float* x, const uint32_t* row_ptr, const uint16_t* col_idx,
                             const float* values, float* c, const GemmEpilogue* ep) {
  for (size_t j = 0; j < nc; ++j) {
    const float acc = F32SpmvRow16(x, row_ptr[j], row_ptr[j + 1], col_idx, values);
    c[j] = ep ? GemmEpilogueScalar(acc, 0, j, ep) : acc;
  }
}

constexpr size_t kBsrMr = 4;
constexpr size_t kBsrMaxBw = 32;

template <size_t BW>
void F32SpmmBsrScalar(size_t mr, size_t nc, const float* a, size_t lda, size_t blocks, const uint32_t* block_k,
                      const float* block_values, float* c, size_t ldc, const GemmEpilogue* ep) {
  float acc[kBsrMr][BW] = {};
  for (size_t b = 0; b < blocks; ++b) {
    const float* wb = block_values + b * BW;
    const size_t k = block_k[b];
    for (size_t i = 0; i < mr; ++i) {
      const float av = a[i * lda + k];
      for (size_t j = 0; j < BW; ++j) acc[i][j] += av * wb[j];
    }
  }
  for (size_t i = 0; i < mr; ++i)
    for (size_t j = 0; j < nc; ++j) c[i * ldc + j] = ep ? GemmEpilogueScalar(acc[i][j], i, j, ep) : acc[i][j];
}

}  // namespace

void F32TransposePackScalar(size_t m, size_t k, const float* a, size_t lda, float* at, size_t ldat) {
  // 8 x 8 blocks: one block's 8 source rows and 8 destination rows stay in L1 whatever the strides.
  constexpr size_t kB = 8;
  for (size_t i0 = 0; i0 < m; i0 += kB) {
    const size_t i1 = i0 + kB < m ? i0 + kB : m;
    for (size_t k0 = 0; k0 < k; k0 += kB) {
      const size_t k1 = k0 + kB < k ? k0 + kB : k;
      for (size_t kk = k0; kk < k1; ++kk)
        for (size_t i = i0; i < i1; ++i) at[kk * ldat + i] = a[i * lda + kk];
    }
  }
  for (size_t kk = 0; kk < k; ++kk)
    for (size_t i = m; i < ldat; ++i) at[kk * ldat + i] = 0.0f;
}

F32SpmmCsrUkernelInfo F32SpmmCsrUkernelScalar() {
  return {F32SpmmCsr8x64Scalar, F32SpmvCsr8Scalar, F32SpmvCsr8x16bitScalar, F32TransposePackScalar,
          kNg, kMb, 1, "f32_spmm_csr_8x64__scalar", F32SpmmCsrColumns8x64Scalar, "f32_spmm_csr_columns_64__scalar", nullptr,
          nullptr, nullptr, nullptr, 0};
}

F32SpmmBsrUkernelInfo F32SpmmBsrUkernelScalar(uint32_t bw) {
  switch (bw) {
    case 8: return {F32SpmmBsrScalar<8>, kBsrMr, 8, "f32_spmm_bsr1x8_4x8__scalar"};
    case 16: return {F32SpmmBsrScalar<16>, kBsrMr, 16, "f32_spmm_bsr1x16_4x16__scalar"};
    case kBsrMaxBw: return {F32SpmmBsrScalar<32>, kBsrMr, 32, "f32_spmm_bsr1x32_4x32__scalar"};
    default: return {nullptr, 0, bw, ""};
  }
}

void F32SpmmCsrReference(size_t m, size_t n0, size_t n1, const float* a, size_t lda, const uint32_t* row_ptr,
                         const uint32_t* col_idx, const float* values, float* c, size_t ldc, const GemmEpilogue* ep) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t n = n0; n < n1; ++n) {
      double s = 0.0;
      for (uint32_t p = row_ptr[n]; p < row_ptr[n + 1]; ++p)
        s += static_cast<double>(values[p]) * a[i * lda + col_idx[p]];
      c[i * ldc + n] = ep ? GemmEpilogueScalar(static_cast<float>(s), i, n, ep) : static_cast<float>(s);
    }
  }
}

void F32SpmmCsrColumnsReference(size_t m, size_t n0, size_t n1, const float* at, size_t ldat, const uint32_t* row_ptr,
                                const uint32_t* col_idx, const float* values, float* c, size_t ldc,
                                const GemmEpilogue* ep) {
  for (size_t n = n0; n < n1; ++n) {
    for (size_t i = 0; i < m; ++i) {
      double s = 0.0;
      for (uint32_t p = row_ptr[n]; p < row_ptr[n + 1]; ++p)
        s += static_cast<double>(values[p]) * at[static_cast<size_t>(col_idx[p]) * ldat + i];
      c[n * ldc + i] = ep ? ColumnsEpilogueScalar(static_cast<float>(s), i, n, ep) : static_cast<float>(s);
    }
  }
}

void F32SpmmBsrReference(size_t m, size_t n, size_t bw, size_t p0, size_t p1, const float* a, size_t lda,
                         const uint32_t* block_ptr, const uint32_t* block_k, const float* block_values, float* c,
                         size_t ldc, const GemmEpilogue* ep) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t p = p0; p < p1; ++p) {
      for (size_t j = 0; j < bw && p * bw + j < n; ++j) {
        double s = 0.0;
        for (uint32_t b = block_ptr[p]; b < block_ptr[p + 1]; ++b)
          s += static_cast<double>(block_values[static_cast<size_t>(b) * bw + j]) * a[i * lda + block_k[b]];
        const size_t col = p * bw + j;
        c[i * ldc + col] = ep ? GemmEpilogueScalar(static_cast<float>(s), i, col, ep) : static_cast<float>(s);
      }
    }
  }
}

}  // namespace kernels
}  // namespace sonde
