#include "ops/spmm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

namespace sonde {

namespace {

// 'auto' format: BSR when at least this fraction of the stored block values is non-zero. A CSR
// non-zero costs an index, a value and a broadcast per M-vector; a BSR block one index per bw values
// but computes its zeros. Block width: on 90% block-pruned 1024x1024, M = 64, one thread (bench
// `sparse --quick`, AVX-512 machine): BSR 1x16 0.43 ms, 1x32 0.47 ms, 1x8 0.55 ms, CSR 0.61 ms, dense
// GEMM 1.39 ms, so the default width is one vector (16 with AVX-512). The 0.5 threshold is a
// estimate from the per-value costs, not yet measured across fills (open item).
constexpr double kBsrMinFill = 0.5;

constexpr size_t kMaxOffset = 0xFFFFFFFFu;         // offsets are uint32
constexpr size_t kMaxK = 0x7FFFFFFFu;              // gathers take signed 32-bit indices

float* AlignedFloats(size_t count) {
  const size_t bytes = (std::max<size_t>(1, count) * sizeof(float) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return p;
}

}  // namespace

bool ValidBsrBlockWidth(uint32_t bw) { return bw == 8 || bw == 16 || bw == 32; }

uint32_t DefaultBsrBlockWidth() { return Cpu().Supports(IsaLevel::kAvx512) ? 16 : 8; }

const char* SparseFormatName(SparseFormat f) {
  switch (f) {
    case SparseFormat::kCsr: return "csr";
    case SparseFormat::kBsr: return "bsr";
    default: return "auto";
  }
}

void SparseWeights::NarrowIndices() {
  if (k_ > 65536) return;
  col_idx16_.assign(col_idx_.begin(), col_idx_.end());
  const char* e = std::getenv("SONDE_SPMV_GATHER");
  spmv_gather_ = e ? e[0] == '1' : Cpu().fast_gather;
}

void SparseWeights::ComputeBytes() {
  bytes_ = (row_ptr_.size() + col_idx_.size() + block_ptr_.size() + block_k_.size()) * sizeof(uint32_t) +
           col_idx16_.size() * sizeof(uint16_t) + values_.size() * sizeof(float) +
           (block_values_ ? block_k_.size() * bw_ * sizeof(float) : 0);
}

std::unique_ptr<SparseWeights> SparseWeights::FromDense(const float* b, size_t k, size_t n, size_t ldb,
                                                        SparseFormat format, uint32_t block_width) {
  if (k > kMaxK) throw std::length_error("k exceeds 2^31 - 1");
  std::unique_ptr<SparseWeights> w(new SparseWeights());
  w->k_ = k;
  w->n_ = n;
  const uint32_t bw = ValidBsrBlockWidth(block_width) ? block_width : DefaultBsrBlockWidth();
  const size_t panels = (n + bw - 1) / bw;
  // One pass row by row (B is row-major): non-zeros per output column and non-zero blocks per panel.
  std::vector<size_t> col_count(n, 0), panel_blocks(panels, 0);
  size_t nnz = 0, blocks = 0;
  for (size_t kk = 0; kk < k; ++kk) {
    const float* row = b + kk * ldb;
    for (size_t p = 0; p < panels; ++p) {
      bool any = false;
      for (size_t j = p * bw; j < std::min(n, p * bw + bw); ++j) {
        if (row[j] != 0.0f) {
          ++col_count[j];
          any = true;
        }
      }
      panel_blocks[p] += any;
      blocks += any;
    }
  }
  for (size_t c : col_count) nnz += c;
  w->nnz_ = nnz;
  if (format == SparseFormat::kAuto) {
    const double fill = blocks ? static_cast<double>(nnz) / (static_cast<double>(blocks) * bw) : 0.0;
    format = fill >= kBsrMinFill ? SparseFormat::kBsr : SparseFormat::kCsr;
  }
  w->format_ = format;
  if (format == SparseFormat::kCsr) {
    if (nnz > kMaxOffset) throw std::length_error("more than 2^32 - 1 non-zeros");
    w->row_ptr_.resize(n + 1);
    w->row_ptr_[0] = 0;
    for (size_t j = 0; j < n; ++j) w->row_ptr_[j + 1] = w->row_ptr_[j] + static_cast<uint32_t>(col_count[j]);
    w->col_idx_.resize(nnz);
    w->values_.resize(nnz);
    std::vector<uint32_t> pos(w->row_ptr_.begin(), w->row_ptr_.end() - 1);
    // k ascending in the outer loop, so each row's column indices come out sorted.
    for (size_t kk = 0; kk < k; ++kk) {
      const float* row = b + kk * ldb;
      for (size_t j = 0; j < n; ++j) {
        if (row[j] != 0.0f) {
          w->col_idx_[pos[j]] = static_cast<uint32_t>(kk);
          w->values_[pos[j]++] = row[j];
        }
      }
    }
    w->NarrowIndices();
  } else {
    size_t stored;
    if (blocks > kMaxOffset || __builtin_mul_overflow(blocks, static_cast<size_t>(bw), &stored))
      throw std::length_error("more than 2^32 - 1 blocks");
    w->bw_ = bw;
    w->block_ptr_.resize(panels + 1);
    w->block_ptr_[0] = 0;
    for (size_t p = 0; p < panels; ++p) w->block_ptr_[p + 1] = w->block_ptr_[p] + static_cast<uint32_t>(panel_blocks[p]);
    w->block_k_.resize(blocks);
    w->block_values_.reset(AlignedFloats(stored));
    float* vals = w->block_values_.get();
    std::vector<uint32_t> pos(w->block_ptr_.begin(), w->block_ptr_.end() - 1);
    for (size_t kk = 0; kk < k; ++kk) {
      const float* row = b + kk * ldb;
      for (size_t p = 0; p < panels; ++p) {
        const size_t j0 = p * bw, cols = std::min<size_t>(bw, n - j0);
        bool any = false;
        for (size_t j = 0; j < cols && !any; ++j) any = row[j0 + j] != 0.0f;
        if (!any) continue;
        const size_t bi = pos[p]++;
        w->block_k_[bi] = static_cast<uint32_t>(kk);
        float* dst = vals + bi * bw;
        std::memcpy(dst, row + j0, cols * sizeof(float));
        std::memset(dst + cols, 0, (bw - cols) * sizeof(float));
      }
    }
  }
  w->ComputeBytes();
  return w;
}

std::unique_ptr<SparseWeights> SparseWeights::FromCsr(size_t rows, size_t cols, const uint32_t* row_ptr,
                                                      size_t row_ptr_len, const uint32_t* col_idx, size_t col_idx_len,
                                                      const float* values, size_t values_len, std::string* error) {
  if (cols > kMaxK) return *error = "cols must be at most 2147483647", nullptr;
  if (row_ptr_len != rows + 1) return *error = "rowPtr must hold rows + 1 entries", nullptr;
  if (col_idx_len != values_len) return *error = "colIdx and values must have the same length", nullptr;
  if (row_ptr[0] != 0) return *error = "rowPtr[0] must be 0", nullptr;
  for (size_t r = 0; r < rows; ++r)
    if (row_ptr[r + 1] < row_ptr[r]) return *error = "rowPtr must be non-decreasing", nullptr;
  if (row_ptr[rows] != col_idx_len) return *error = "rowPtr[rows] must equal the length of colIdx and values", nullptr;
  for (size_t r = 0; r < rows; ++r) {
    for (uint32_t p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
      if (col_idx[p] >= cols) return *error = "colIdx holds an index out of range [0, cols)", nullptr;
      if (p > row_ptr[r] && col_idx[p] <= col_idx[p - 1])
        return *error = "colIdx must be strictly increasing within each row", nullptr;
    }
  }
  std::unique_ptr<SparseWeights> w(new SparseWeights());
  w->format_ = SparseFormat::kCsr;
  w->k_ = cols;
  w->n_ = rows;
  w->nnz_ = col_idx_len;
  w->row_ptr_.assign(row_ptr, row_ptr + row_ptr_len);
  w->col_idx_.assign(col_idx, col_idx + col_idx_len);
  w->values_.assign(values, values + values_len);
  w->NarrowIndices();
  w->ComputeBytes();
  return w;
}

namespace {

kernels::F32SpmmCsrUkernelInfo CsrUkernel(GemmVariant v) {
#if defined(__x86_64__) || defined(_M_X64)
  if (v == GemmVariant::kAvx512) return kernels::F32SpmmCsrUkernelAvx512();
  if (v == GemmVariant::kAvx2) return kernels::F32SpmmCsrUkernelAvx2();
#endif
  return kernels::F32SpmmCsrUkernelScalar();
}

kernels::F32SpmmBsrUkernelInfo BsrUkernel(GemmVariant v, uint32_t bw) {
#if defined(__x86_64__) || defined(_M_X64)
  if (v == GemmVariant::kAvx512 && bw != 8) return kernels::F32SpmmBsrUkernelAvx512(bw);
  // An 8-wide block is one ymm: the AVX2 kernel is the right one on AVX-512 machines too.
  if (v == GemmVariant::kAvx512 || v == GemmVariant::kAvx2) return kernels::F32SpmmBsrUkernelAvx2(bw);
#endif
  return kernels::F32SpmmBsrUkernelScalar(bw);
}

bool Trivial(const kernels::GemmEpilogue& e) {
  return !e.scale && !e.bias && !e.residual && e.activation == kernels::kActNone;
}

// Splits units [0, count) (CSR groups or BSR panels) into at most `parts` contiguous ranges of about
// equal cost, cost(u) = work(u) + fixed: prefix sums of non-zeros, so that threads get equal work
// rather than equal column counts (pruned layers have very uneven rows). `fixed` is the per-unit
// cost that does not depend on non-zeros (epilogue, stores), so all-zero units still spread out.
std::vector<size_t> BalancedSplit(size_t count, size_t parts, const uint32_t* unit_ptr, size_t fixed) {
  auto prefix = [&](size_t u) { return static_cast<double>(unit_ptr[u]) + static_cast<double>(u * fixed); };
  std::vector<size_t> bounds{0};
  const double total = prefix(count);
  size_t u = 0;
  for (size_t t = 1; t < parts; ++t) {
    const double target = total * static_cast<double>(t) / static_cast<double>(parts);
    while (u < count && prefix(u) < target) ++u;
    if (u > bounds.back() && u < count) bounds.push_back(u);
  }
  bounds.push_back(count);
  return bounds;
}

}  // namespace

std::string SpmmUkernelName(const SparseWeights& w, GemmVariant v) {
  v = ResolveGemmVariant(v);
  if (v == GemmVariant::kReference) return "f32_spmm_reference";
  if (w.format() == SparseFormat::kBsr) return BsrUkernel(v, w.block_width()).name;
  return CsrUkernel(v).name;  // (1 < M <= 8 under 'auto' on AVX-512: the AVX2 kernel, see RunSpmm)
}

bool RunSpmm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
             const SparseWeights& w, GemmVariant variant) {
  const size_t m = args.m, n = w.n(), k = w.k();
  if (m == 0 || n == 0) return true;
  const unsigned threads = std::max(1u, std::min(max_threads, pool.size()));
  const kernels::GemmEpilogue& e = args.epilogue;
  const bool trivial = Trivial(e);
  const bool bsr = w.format() == SparseFormat::kBsr;
  // 'auto' with CSR and 1 < M <= 8 on AVX-512 machines: the AVX2 kernel, whose 8-row vectors are
  // not half padding (1024x1024 at 90%, M = 8, one thread: 0.076 vs 0.093 ms).
  if (variant == GemmVariant::kAuto && !bsr && m > 1 && m <= 8 && ResolveGemmVariant(variant) == GemmVariant::kAvx512)
    variant = GemmVariant::kAvx2;
  variant = ResolveGemmVariant(variant);

  if (variant == GemmVariant::kReference) {
    return pool.ParallelFor(m, threads, [&](size_t i) {
      const kernels::GemmEpilogue ep = OffsetEpilogue(e, i, 0);
      if (bsr) {
        kernels::F32SpmmBsrReference(1, n, w.block_width(), 0, w.block_ptr_.size() - 1, args.a + i * args.lda, args.lda,
                                     w.block_ptr_.data(), w.block_k_.data(), w.block_values_.get(),
                                     args.c + i * args.ldc, args.ldc, &ep);
      } else {
        kernels::F32SpmmCsrReference(1, 0, n, args.a + i * args.lda, args.lda, w.row_ptr_.data(), w.col_idx_.data(),
                                     w.values_.data(), args.c + i * args.ldc, args.ldc, &ep);
      }
    }, cancel);
  }

  if (bsr) {
    const auto uk = BsrUkernel(variant, w.block_width());
    const size_t bw = uk.bw, mr = uk.mr;
    const size_t panels = w.block_ptr_.size() - 1;
    const size_t m_tiles = (m + mr - 1) / mr;
    // A few tasks per thread over panels (balanced by block counts); split rows too when there are
    // few panels, so small-N layers still use every thread.
    const std::vector<size_t> pb = BalancedSplit(panels, 4 * threads, w.block_ptr_.data(), 8);
    const size_t p_chunks = pb.size() - 1;
    const size_t m_chunks = std::min(m_tiles, std::max<size_t>(1, (4 * threads + p_chunks - 1) / p_chunks));
    const size_t tiles_per = (m_tiles + m_chunks - 1) / m_chunks;
    return pool.ParallelFor(p_chunks * m_chunks, threads, [&](size_t t) {
      const size_t pc = t / m_chunks, mc = t % m_chunks;
      const size_t t0 = mc * tiles_per, t1 = std::min(m_tiles, t0 + tiles_per);
      for (size_t p = pb[pc]; p < pb[pc + 1]; ++p) {
        const size_t n0 = p * bw, nc = std::min(bw, n - n0);
        const uint32_t b0 = w.block_ptr_[p];
        const size_t blocks = w.block_ptr_[p + 1] - b0;
        for (size_t ti = t0; ti < t1; ++ti) {
          const size_t m0 = ti * mr, rows = std::min(mr, m - m0);
          const kernels::GemmEpilogue ep = OffsetEpilogue(e, m0, n0);
          uk.fn(rows, nc, args.a + m0 * args.lda, args.lda, blocks, w.block_k_.data() + b0,
                w.block_values_.get() + static_cast<size_t>(b0) * bw, args.c + m0 * args.ldc + n0, args.ldc,
                trivial ? nullptr : &ep);
        }
      }
    }, cancel);
  }

  const auto uk = CsrUkernel(variant);
  const size_t ng = uk.ng;
  const size_t groups = (n + ng - 1) / ng;
  // Cost of a group: its non-zeros, plus ng for the work that does not depend on them (transpose,
  // epilogue, stores).
  std::vector<uint32_t> group_ptr(groups + 1);
  for (size_t g = 0; g <= groups; ++g) group_ptr[g] = w.row_ptr_[std::min(g * ng, n)];
  const std::vector<size_t> bounds = BalancedSplit(groups, 4 * threads, group_ptr.data(), ng);
  const size_t chunks = bounds.size() - 1;

  if (m == 1) {
    // SpMV: x is A's row itself; no packing.
    const kernels::F32SpmvCsr16Ukernel spmv16 = w.spmv_gather_ && uk.spmv16_gather ? uk.spmv16_gather : uk.spmv16;
    return pool.ParallelFor(chunks, threads, [&](size_t t) {
      for (size_t g = bounds[t]; g < bounds[t + 1]; ++g) {
        const size_t n0 = g * ng, nc = std::min(ng, n - n0);
        const kernels::GemmEpilogue ep = OffsetEpilogue(e, 0, n0);
        if (w.col_idx16_.empty())
          uk.spmv(nc, args.a, w.row_ptr_.data() + n0, w.col_idx_.data(), w.values_.data(), args.c + n0,
                  trivial ? nullptr : &ep);
        else
          spmv16(nc, args.a, w.row_ptr_.data() + n0, w.col_idx16_.data(), w.values_.data(), args.c + n0,
                 trivial ? nullptr : &ep);
      }
    }, cancel);
  }

  // Pack At (K x ldat, M contiguous, zero-padded to the vector width): per run, because A changes
  // every run; it costs K*M copies against 2*nnz*M flops.
  const size_t ldat = (m + uk.mv - 1) / uk.mv * uk.mv;
  // Rows per kernel call: all of M up to the kernel's register budget (128 with AVX-512), in equal
  // blocks (M = 130 as 2 x 65, not 128 + 2): each block is one more pass over the weights. The whole
  // K x mb slice of At is read from L2 at random k; walking K in L1-sized slabs instead (sums kept
  // in a partial tile between slabs) measured slower at every M and K tried (1024x1024 and K = 4096
  // at 90%, M 32-256): at 90% a column has only 6-13 non-zeros per L1-sized slab, too few to pay for
  // loading and storing its sums once per slab.
  const size_t m_blocks = (ldat + uk.mb - 1) / uk.mb;
  // At's storage, kept per thread and reused: a fresh allocation of this size is an mmap, page
  // faults and a zero fill every run (measured here: ~0.4 ms for a 256 KiB At, more than the SpMM
  // itself). An unusually large batch must not pin its At for a thread's lifetime (as gemm_lowp
  // trims its prepared A): Release drops one over 64 MiB.
  struct AtScratch {
    std::unique_ptr<float, SparseWeights::FreeDeleter> buf;
    size_t capacity = 0;
    uint64_t packed_for = 0;  // the call whose At this thread's copy holds (0: none)
    size_t packed_m0 = 0, packed_rows = 0;  // which of its rows (a part of M, or all of them)
    float* Get(size_t floats) {
      if (capacity < floats) {
        buf.reset(AlignedFloats(floats));
        capacity = floats;
      }
      return buf.get();
    }
    void Release() {
      if (capacity * sizeof(float) > (static_cast<size_t>(64) << 20)) {
        buf.reset();
        capacity = 0;
        packed_for = 0;
      }
    }
  };
  thread_local AtScratch scratch;
  struct ReleaseAtEnd {
    ~ReleaseAtEnd() { scratch.Release(); }
  } release_at_end;
  // 16-bit column indices where K allows them (the SpMV's): a quarter fewer bytes of weights, which
  // a run after other work reads from L3 (pruned MLP at batch 32, one thread, interleaved with
  // onnxruntime-node and the dense session as the sparse suite runs them: 0.299-0.315 -> 0.288-0.303
  // ms; kernel calls back to back within noise).
  const kernels::F32SpmmCsr16bitUkernel spmm16 = w.col_idx16_.empty() ? nullptr : uk.spmm16;
  // Column groups [g0, g1) over rows [m0, m0 + rows) of C, from their At at at_block (ld apart).
  // whole_m > 0: the rows are a part of that many (the part kernels, which sum with its chains).
  auto columns = [&](size_t m0, size_t rows, const float* at_block, size_t ld, size_t g0, size_t g1, size_t whole_m = 0) {
    for (size_t g = g0; g < g1; ++g) {
      const size_t n0 = g * ng, nc = std::min(ng, n - n0);
      const kernels::GemmEpilogue ep = OffsetEpilogue(e, m0, n0);
      const uint32_t* row_ptr = w.row_ptr_.data() + n0;
      float* const c = args.c + m0 * args.ldc + n0;
      const kernels::GemmEpilogue* const epp = trivial ? nullptr : &ep;
      if (whole_m && spmm16)
        uk.spmm16_part(rows, whole_m, nc, at_block, ld, row_ptr, w.col_idx16_.data(), w.values_.data(), c, args.ldc, epp);
      else if (whole_m)
        uk.spmm_part(rows, whole_m, nc, at_block, ld, row_ptr, w.col_idx_.data(), w.values_.data(), c, args.ldc, epp);
      else if (spmm16)
        spmm16(rows, nc, at_block, ld, row_ptr, w.col_idx16_.data(), w.values_.data(), c, args.ldc, epp);
      else
        uk.spmm(rows, nc, at_block, ld, row_ptr, w.col_idx_.data(), w.values_.data(), c, args.ldc, epp);
    }
  };

  // The block size depends on M alone: a kernel's order of summation depends on its rows (its
  // accumulator count), and results must not depend on the thread count.
  const size_t mb = ((m + m_blocks - 1) / m_blocks + uk.mv - 1) / uk.mv * uk.mv;
  const size_t row_blocks = (m + mb - 1) / mb;
  if (threads == 1 || row_blocks % threads == 0 || row_blocks >= 4 * threads) {
    // A task per block of rows where the blocks spread evenly enough over the threads: it packs its
    // own slab of At (K x mb) and runs every column against it while the slab is in its core's L2.
    // Packing all of At first, then splitting the columns over the threads, had each thread read
    // the slabs the other had packed from the other core, and on one thread left a large At in L3
    // by the time its first block ran (1024x1024 at 90%, M = 512: t1 3.2-3.4 -> 1.8 ms, t2
    // 1.65-1.88 -> 1.02-1.08; M = 256: t1 1.00-1.09 -> 0.89-1.00, t2 0.60-0.66 -> 0.58-0.62).
    const size_t slab = k * mb;
    float* const at = scratch.Get(row_blocks * slab);
    return pool.ParallelFor(row_blocks, threads, [&](size_t t) {
      const size_t m0 = t * mb, rows = std::min(mb, m - m0);
      float* const at_block = at + t * slab;
      uk.pack(rows, k, args.a + m0 * args.lda, args.lda, at_block, mb);
      columns(m0, rows, at_block, mb, 0, groups);
    }, cancel);
  }

  static std::atomic<uint64_t> calls{0};
  const uint64_t call = calls.fetch_add(1, std::memory_order_relaxed) + 1;
  // Packs rows [m0, m0 + rows) of A into this thread's At (ld: rows rounded up to whole vectors)
  // unless it holds them for this call already.
  const auto packed = [&](size_t m0, size_t rows, size_t ld) {
    float* const at = scratch.Get(k * ld);
    if (scratch.packed_for != call || scratch.packed_m0 != m0 || scratch.packed_rows != rows) {
      uk.pack(rows, k, args.a + m0 * args.lda, args.lda, at, ld);
      scratch.packed_for = call;
      scratch.packed_m0 = m0;
      scratch.packed_rows = rows;
    }
    return at;
  };

  constexpr size_t kMinPartVectors = 2;
  const size_t vectors = ldat / uk.mv, part0 = (vectors + 1) / 2 * uk.mv;
  if (row_blocks == 1 && vectors >= 2 * kMinPartVectors && part0 <= uk.part_mb &&
      (spmm16 ? uk.spmm16_part != nullptr : uk.spmm_part != nullptr)) {
    // One block of rows on several threads: M in two parts of whole vectors, a part per thread (or
    // per half of them), each packing only its part of At and running the columns on it, where the
    // columns split below has each thread pack and read the whole At for half of the columns.
    // 1024x1024 at 90% on two threads (Xeon), back to back: M = 64 0.144 -> 0.127 ms, 80 0.210 ->
    // 0.157, 128 0.329 -> 0.272; interleaved with the dense GEMM as the sparse suite runs them (the
    // weights then come from L3, and each part reads all of them) M = 64 0.175 -> 0.162, 128 0.349
    // -> 0.316. A part of one vector pays the per-non-zero loads for 16 rows only: M = 32 0.075 ->
    // 0.079, 48 (parts of 2 and 1) even. The parts keep the whole M's accumulator chains
    // (F32SpmmCsrPartUkernel), so the results are those of one thread.
    const size_t per_part = std::max<size_t>(1, threads / 2);
    const std::vector<size_t> pb = BalancedSplit(groups, per_part, group_ptr.data(), ng);
    const size_t part_chunks = pb.size() - 1;
    return pool.ParallelFor(2 * part_chunks, threads, [&](size_t t) {
      const size_t part = t / part_chunks, chunk = t % part_chunks;
      const size_t m0 = part ? part0 : 0, rows = part ? m - part0 : part0;
      const size_t ld = (rows + uk.mv - 1) / uk.mv * uk.mv;
      columns(m0, rows, packed(m0, rows, ld), ld, pb[chunk], pb[chunk + 1], m);
      scratch.Release();
    }, cancel);
  }

  // Fewer blocks of rows than threads (or an uneven few): the columns split over the threads, and
  // each thread packs a whole At of its own before its first chunk, reading it from its own L2
  // after; packing one At split over K (a loop of its own) left each thread reading half of it from
  // the other core (1024x1024 at 90%, two threads, M = 16-300: 0.89-0.91x of the time; K = 256 the
  // same).
  return pool.ParallelFor(chunks, threads, [&](size_t t) {
    float* const at = packed(0, m, ldat);
    for (size_t m0 = 0; m0 < m; m0 += mb) columns(m0, std::min(mb, m - m0), at + m0, ldat, bounds[t], bounds[t + 1]);
    scratch.Release();
  }, cancel);
}

std::string SpmmColumnsUkernelName(GemmVariant v) {
  v = ResolveGemmVariant(v);
  if (v == GemmVariant::kReference) return "f32_spmm_columns_reference";
  return CsrUkernel(v).columns_name;
}

std::vector<uint32_t> SpmmConvTapOffsets(const SparseWeights& w, const std::vector<size_t>& tap_offset, size_t plane) {
  const size_t taps = tap_offset.size();
  std::vector<uint32_t> out(w.col_idx_.size());
  for (size_t p = 0; p < out.size(); ++p) {
    const size_t kk = w.col_idx_[p];
    out[p] = static_cast<uint32_t>(kk / taps * plane + tap_offset[kk % taps]);
  }
  return out;
}

bool RunSpmmColumns(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const SpmmColumnsArgs& args,
                    const SparseWeights& w, GemmVariant variant) {
  const size_t m = args.m, n = w.n(), batch = args.batch, rows = args.rows;
  if (m == 0 || n == 0 || batch == 0 || rows == 0 || w.format() != SparseFormat::kCsr) return true;
  const unsigned threads = std::max(1u, std::min(max_threads, pool.size()));
  const kernels::GemmEpilogue& e = args.epilogue;
  const bool trivial = Trivial(e);
  variant = ResolveGemmVariant(variant);
  // With offsets, a non-zero's row is a + offset: the kernels' col_idx * lda with lda = 1.
  const uint32_t* const col_idx = args.a_offsets ? args.a_offsets : w.col_idx_.data();
  const size_t lda = args.a_offsets ? 1 : args.lda;
  // Item b, row r, positions [m0, m0 + ...), output columns [n0, ...): the operands at that block.
  auto a_at = [&](size_t b, size_t r, size_t m0) { return args.a + b * args.a_batch_stride + r * args.a_row_stride + m0; };
  auto c_off = [&](size_t b, size_t r, size_t m0) { return b * args.c_batch_stride + r * args.c_row_stride + m0; };
  auto block_epilogue = [&](size_t b, size_t r, size_t m0, size_t n0) {
    kernels::GemmEpilogue ep = e;
    if (ep.scale) ep.scale += n0;
    if (ep.bias) ep.bias += n0;
    if (ep.residual) ep.residual += b * args.r_batch_stride + r * args.c_row_stride + n0 * ep.ldr + m0;
    return ep;
  };
  if (variant == GemmVariant::kReference) {
    return pool.ParallelFor(batch * rows * n, threads, [&](size_t t) {
      const size_t b = t / (rows * n), r = t / n % rows, j = t % n;
      const kernels::GemmEpilogue ep = block_epilogue(b, r, 0, 0);
      kernels::F32SpmmCsrColumnsReference(m, j, j + 1, a_at(b, r, 0), lda, w.row_ptr_.data(), col_idx, w.values_.data(),
                                          args.c + c_off(b, r, 0), args.ldc, &ep);
    }, cancel);
  }
  const auto uk = CsrUkernel(variant);
  // Positions per call: all of m up to the register budget, in equal blocks of whole vectors (as RunSpmm).
  // Summing K in slabs of 192 rows (64 positions per call, each slab's sums added to the stored ones)
  // keeps a slab's A^T in L1 and measured 1.2-1.5x faster on one layer repeated (K 512-4608, on
  // this Intel core's 48 KiB L1d), yet nothing in pruned ResNet-50 (n1 t1 0.99x, n1 t2 1.04x, n8 t2
  // 1.04x slower): inside the model a layer's weights and A^T arrive from beyond L2 whichever way.
  const size_t m_blocks = (m + uk.mb - 1) / uk.mb;
  const size_t mb = ((m + m_blocks - 1) / m_blocks + uk.mv - 1) / uk.mv * uk.mv;
  const size_t row_tasks = batch * rows * m_blocks;
  // Row task rt (item b, row r, positions from m0) against output columns [n0, n1). No block is
  // empty: with mb rounded up to whole vectors the last block still starts below m (checked for the
  // three kernels' vector widths and row limits at every m up to 200000).
  auto run_block = [&](size_t rt, size_t n0, size_t n1) {
    const size_t b = rt / (rows * m_blocks), r = rt / m_blocks % rows, m0 = (rt % m_blocks) * mb;
    const kernels::GemmEpilogue ep = block_epilogue(b, r, m0, n0);
    uk.columns(std::min(mb, m - m0), n1 - n0, a_at(b, r, m0), lda, w.row_ptr_.data() + n0, col_idx, w.values_.data(),
               args.c + c_off(b, r, m0) + n0 * args.ldc, args.ldc, trivial ? nullptr : &ep);
  };
  if (WholeImageTasks(threads, batch)) {
    // A whole item per task: each thread keeps to its own images' activations instead of both
    // streaming every image; the same kernel calls, so the same bits.
    const size_t per_item = rows * m_blocks;
    return pool.ParallelFor(batch, threads, [&](size_t b) {
      for (size_t rt = b * per_item; rt < (b + 1) * per_item; ++rt) run_block(rt, 0, n);
    }, cancel);
  }
  // Output columns in groups of ng balanced by non-zeros, enough chunks for ~4 tasks per thread
  // once the (item, row, position block) tasks are counted: a 7x7 plane at batch 1 is one block,
  // so its columns must spread; a 56x56 plane already has 25-49 blocks per image.
  const size_t ng = uk.ng, groups = (n + ng - 1) / ng;
  std::vector<uint32_t> group_ptr(groups + 1);
  for (size_t g = 0; g <= groups; ++g) group_ptr[g] = w.row_ptr_[std::min(g * ng, n)];
  const size_t parts = std::max<size_t>(1, (4 * threads + row_tasks - 1) / row_tasks);
  const std::vector<size_t> bounds = BalancedSplit(groups, parts, group_ptr.data(), ng);
  const size_t chunks = bounds.size() - 1;
  if (chunks == 1 && threads > 1) {
    // Every block runs all columns: each thread takes one contiguous run of blocks. Handed out one
    // by one, the two threads took alternate 128-position blocks, and each thread's accesses to
    // every row of its input, output and residual (short runs a plane apart) skipped a block at a
    // time, which the prefetchers did not follow: pruned ResNet-50 n1 t2, the 56x56 64 -> 256 1x1s
    // took longer on two threads than on one (downsample 0.193 -> 0.289 ms, with a residual
    // 0.381 -> 0.425); in halves 0.117 and 0.211 (the whole model's steps 16.0 -> 14.3 ms).
    // Runs of a quarter (two per thread) were slower again (0.148, 0.264). Same kernel calls, so
    // the same bits.
    const size_t per = (row_tasks + threads - 1) / threads;
    return pool.ParallelFor((row_tasks + per - 1) / per, threads, [&](size_t q) {
      for (size_t rt = q * per; rt < std::min(row_tasks, (q + 1) * per); ++rt) run_block(rt, 0, n);
    }, cancel);
  }
  return pool.ParallelFor(row_tasks * chunks, threads, [&](size_t t) {
    // Column chunk outermost within a block's tasks, so neighbouring tasks share At's rows (and a
    // direct conv's consecutive output rows share all but one input row per tap row).
    const size_t ch = t % chunks;
    run_block(t / chunks, bounds[ch] * ng, std::min(n, bounds[ch + 1] * ng));
  }, cancel);
}

}  // namespace sonde
