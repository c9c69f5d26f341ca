#include "ops/gemm.h"
#include "runtime/enum_names.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace sonde {

const EnumName<GemmVariant> kGemmVariantNames[] = {
    {GemmVariant::kAuto, "auto"},
    {GemmVariant::kReference, "reference"},
    {GemmVariant::kScalar, "scalar"},
    {GemmVariant::kAvx2, "avx2"},
    {GemmVariant::kAvx512, "avx512"},
};

bool ParseGemmVariant(const std::string& name, GemmVariant* out) { return ParseEnumName(kGemmVariantNames, name, out); }

const char* GemmVariantName(GemmVariant v) { return EnumNameOf(kGemmVariantNames, v); }

std::string GemmVariantUnavailable(GemmVariant v) {
  const CpuFeatures& cpu = Cpu();
  IsaLevel need = IsaLevel::kScalar;
  if (v == GemmVariant::kAvx2) need = IsaLevel::kAvx2;
  if (v == GemmVariant::kAvx512) need = IsaLevel::kAvx512;
#if !(defined(__x86_64__) || defined(_M_X64))
  if (need != IsaLevel::kScalar) return std::string(GemmVariantName(v)) + " kernels exist only on x86-64";
#endif
  if (!cpu.Supports(need))
    return std::string("this CPU (or SONDE_ISA) allows at most '") + IsaName(cpu.level) +
           "', not '" + GemmVariantName(v) + "'";
  return "";
}

GemmVariant ResolveGemmVariant(GemmVariant v) {
  if (v != GemmVariant::kAuto) return v;
  switch (Cpu().level) {
    case IsaLevel::kAvx512: return GemmVariant::kAvx512;
    case IsaLevel::kAvx2: return GemmVariant::kAvx2;
    default: return GemmVariant::kScalar;
  }
}

kernels::F32GemmUkernelInfo GemmUkernel(GemmVariant v) {
#if defined(__x86_64__) || defined(_M_X64)
  if (v == GemmVariant::kAvx512) return kernels::F32GemmUkernelAvx512();
  if (v == GemmVariant::kAvx2) return kernels::F32GemmUkernelAvx2();
#endif
  return kernels::F32GemmUkernelScalar();
}

std::unique_ptr<PackedGemmWeights> PackedGemmWeights::Pack(const float* b, size_t k, size_t n,
                                                           size_t ldb, GemmVariant variant) {
  std::unique_ptr<PackedGemmWeights> w(new PackedGemmWeights());
  w->k_ = k;
  w->n_ = n;
  w->variant_ = ResolveGemmVariant(variant);
  w->ukernel_ = GemmUkernel(w->variant_);
  const size_t nr = w->ukernel_.nr;
  const size_t panels = (n + nr - 1) / nr;
  const size_t floats = std::max<size_t>(1, panels * k * nr);
  // 64-byte alignment: one cache line, and the aligned loads of the AVX-512 kernel.
  w->bytes_ = (floats * sizeof(float) + 63) / 64 * 64;
  w->data_ = static_cast<float*>(std::aligned_alloc(64, w->bytes_));
  if (!w->data_) throw std::bad_alloc();
  for (size_t p = 0; p < panels; ++p) {
    const size_t n0 = p * nr;
    const size_t cols = std::min(nr, n - n0);
    float* dst = w->data_ + p * k * nr;
    for (size_t kk = 0; kk < k; ++kk) {
      std::memcpy(dst + kk * nr, b + kk * ldb + n0, cols * sizeof(float));
      std::memset(dst + kk * nr + cols, 0, (nr - cols) * sizeof(float));
    }
  }
  return w;
}

PackedGemmWeights::~PackedGemmWeights() { std::free(data_); }

namespace {
// K block and rows per task. The 12x32 AVX-512 tile needs only 128 B of W and 48 B of A per 24 FMAs
// (12 cycles), ~15 B/cycle, which L2 delivers with room to spare; so the W slice (kc x NR: 128 KiB
// at kc = 1024) and the task's A block (192 rows x kc: 768 KiB) are sized for the 1 MiB L2, not
// for L1. What a smaller K block costs instead is a reload and store of every C tile per block and
// a fresh W slice (whose first tile waits on L3/DRAM) per panel per block. Measured in a
// standalone driver of this loop (thread CPU time, interleaved, best of 5-12, Zen 5 EPYC, 1
// thread; in place of the old kc = 256 / 96 rows): 2048^3 151 -> 177 GFLOP/s, 1024^3 182 -> 193,
// 64x1024x4096 with W from DRAM 138 -> 152 (kc 1024 vs 256). Copying A into a padded block (no 4K
// aliasing between its 12 rows) gained 0-8% at kc = 256 and nothing at kc = 512.
//
// Where the microkernel has a packed-A form and A's rows crowd one L1 set (RowsShareL1Set), a task
// packs its row tiles once per K block and runs every panel on the packed copy. In the standalone
// driver (thread CPU time, 40-300 rounds, old and new interleaved, median of the per-round ratios;
// Zen 5 EPYC at a load average of 6-12, shared with other builds): 1024^3 1.02x in a quiet spell and
// 1.18-1.24x in busy ones on 1 thread, 1.03-1.05x (1.16x) on 2; 2048^3 1.04-1.07x on 1 thread,
// 1.03-1.04x on 2; 64x1024x4096 on 2 threads 0.97-1.09x. The best rounds moved little (1024^3, 1
// thread: 188-198 GFLOP/s in place, 190-201 packed): what packing buys is mostly that the tile no
// longer loses its A lines whenever something else passes through that set. Tasks are 1024 columns
// wide when packing, since 256-column tasks (4 packs per row block) gave back half the gain.
constexpr size_t kKc = 1024;
constexpr size_t kRowsPerTask = 192;
constexpr size_t kColsPerTask = 256;
constexpr size_t kColsPerPackedTask = 1024;
// Fewer panels per task than this and a pack is not paid back: it costs about as much as running
// one panel over the same rows (64x4096x1024 on 2 threads, tasks of 4 panels: 0.97x packed).
constexpr size_t kMinPanelsToPackA = 8;
constexpr double kMinFlopsPerThread = 256.0 * 1024;
// Developer tuning knobs (SONDE_GEMM_KC / _MB / _NB / _NB_PACKED: K block, rows and columns per
// task; SONDE_GEMM_PACK_A=0 reads A in place), read once.
size_t Knob(const char* name, size_t dflt) {
  const char* v = std::getenv(name);
  size_t x = v ? std::strtoull(v, nullptr, 10) : 0;
  return x > 0 ? x : dflt;
}
// Whether the rows of a row tile, lda apart, all map to one L1 set: set index = address bits 6-11
// (64 sets of 64-byte lines: 32-48 KiB L1D at 8-12 ways), so rows a multiple of 4 KiB apart (lda of
// 1024, 2048, ... floats) put the tile's 12 A lines in one set, whose ways they fill, and every W or C
// line landing there evicts one. That is where packing pays: the 12x32 tile alone over an
// L1/L2-resident A, interleaved in one process, ran at 141 GFLOP/s in place with lda = 1024 against
// 188 packed (kc 1024), while at lda = 256 (4 sets) in place and packed were equal (192-193); with
// lda 256 and 512 (256^3, 512^3) packing only added its cost (0.91-0.95x in the driver above).
bool RowsShareL1Set(size_t lda) { return (lda * sizeof(float)) % 4096 == 0; }

bool PackAEnabled() {
  const char* v = std::getenv("SONDE_GEMM_PACK_A");
  return !(v && std::strcmp(v, "0") == 0);
}

// A pool thread's buffer for packed A: grows to the largest task block it has packed (192 rows x
// K block 1024: 768 KiB) and lives as long as the thread, so a run allocates nothing once warm.
class PackScratch {
 public:
  ~PackScratch() { std::free(data_); }
  float* Get(size_t floats) {
    if (floats > capacity_) {
      std::free(data_);
      data_ = nullptr;
      capacity_ = 0;
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data_) throw std::bad_alloc();
      capacity_ = bytes / sizeof(float);
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
};
thread_local PackScratch pack_scratch;
}  // namespace

bool RunGemm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const GemmArgs& args,
             const PackedGemmWeights& w) {
  const auto& uk = w.ukernel();
  const size_t m = args.m, n = w.n(), k = w.k();
  if (m == 0 || n == 0) return true;
  if (k == 0) {
    // Empty sum: C = epilogue(0).
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < n; ++j) args.c[i * args.ldc + j] = kernels::GemmEpilogueScalar(0.0f, i, j, &args.epilogue);
    return true;
  }
  const size_t mr = uk.mr, nr = uk.nr;
  const size_t m_tiles = (m + mr - 1) / mr;
  const size_t n_panels = (n + nr - 1) / nr;
  // 256K FLOPs (a few microseconds) per thread at least; a matrix-vector product is bound by
  // streaming W, so it splits from there on (1 x 784 x 1024 takes two threads, 1 x 1024 x 10 one).
  const unsigned threads = ThreadsForWork(std::max(1u, std::min(max_threads, pool.size())),
                                          2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k),
                                          kMinFlopsPerThread);
  // Task grid: start from blocks of ~192 rows x ~256 columns (1024 where A may be packed), then split
  // further until every thread has a few tasks (M=1 decode splits across N only).
  static const size_t kc_run = Knob("SONDE_GEMM_KC", kKc), mb_rows = Knob("SONDE_GEMM_MB", kRowsPerTask),
                      nb_cols = Knob("SONDE_GEMM_NB", kColsPerTask),
                      nb_cols_packed = Knob("SONDE_GEMM_NB_PACKED", kColsPerPackedTask);
  static const bool pack_a_enabled = PackAEnabled();
  const kernels::F32GemmPackedA& pa = uk.packed_a;
  // One row tile (M <= MR: decode, small batches) stays in place: nothing to share a pack with.
  // Packing needs wider tasks to pay; the grid for A read in place keeps its narrower ones.
  const bool may_pack_a = pack_a_enabled && pa.pack && m_tiles > 1 && RowsShareL1Set(args.lda);
  size_t mb = std::max<size_t>(1, mb_rows / mr), nb = std::max<size_t>(1, (may_pack_a ? nb_cols_packed : nb_cols) / nr);
  mb = std::min(mb, m_tiles);
  nb = std::min(nb, n_panels);
  auto tasks = [&] { return ((m_tiles + mb - 1) / mb) * ((n_panels + nb - 1) / nb); };
  while (tasks() < 4 * static_cast<size_t>(threads) && (nb > 1 || mb > 1)) {
    if (nb > 1 && (nb >= mb || mb == 1)) nb = (nb + 1) / 2;
    else mb = (mb + 1) / 2;
  }
  const size_t m_blocks = (m_tiles + mb - 1) / mb;
  const size_t n_blocks = (n_panels + nb - 1) / nb;
  const kernels::GemmEpilogue& e = args.epilogue;
  const bool trivial = !e.scale && !e.bias && !e.residual && e.activation == kernels::kActNone;
  // Blocking K keeps a W slice in cache for the next row tile; with one row tile per task there is
  // no next tile, and streaming each panel whole lets the prefetcher run (M=1 decode: 14.7 -> 21
  // GB/s on one thread, 1x1024x4096).
  const size_t k_block = mb > 1 ? kc_run : k;
  // The first row tile over each W slice reads it from L3 or DRAM (the later ones find it in L2).
  const kernels::F32GemmUkernel fn_cold_w = uk.fn_cold_w ? uk.fn_cold_w : uk.fn;
  // Packed A is bounded by the K block (mb > 1), so a thread's buffer never holds a whole long row.
  const bool pack_a = may_pack_a && mb > 1 && nb >= kMinPanelsToPackA;
  const size_t packed_tile_floats = pack_a ? mr * ((k_block + pa.k_group - 1) / pa.k_group * pa.k_group) : 0;
  auto task = [&](size_t t) {
    const size_t mbi = t % m_blocks, nbi = t / m_blocks;
    const size_t t0 = mbi * mb, t1 = std::min(m_tiles, t0 + mb);
    const size_t p0 = nbi * nb, p1 = std::min(n_panels, p0 + nb);
    float* ap = pack_a && p1 - p0 >= kMinPanelsToPackA ? pack_scratch.Get((t1 - t0) * packed_tile_floats) : nullptr;
    for (size_t k0 = 0; k0 < k; k0 += k_block) {
      const size_t kc = std::min(k_block, k - k0);
      const bool last = k0 + kc == k;
      if (ap) {
        for (size_t ti = t0; ti < t1; ++ti) {
          const size_t m0 = ti * mr;
          pa.pack(args.a + m0 * args.lda + k0, args.lda, std::min(mr, m - m0), kc, ap + (ti - t0) * packed_tile_floats);
        }
        for (size_t p = p0; p < p1; ++p) {
          const size_t n0 = p * nr;
          const size_t ncols = std::min(nr, n - n0);
          const float* wp = w.panel(p) + k0 * nr;
          for (size_t ti = t0; ti < t1; ++ti) {
            const size_t m0 = ti * mr;
            const kernels::GemmEpilogue ep = OffsetEpilogue(args.epilogue, m0, n0);
            (ti == t0 ? pa.fn_cold_w : pa.fn)(std::min(mr, m - m0), ncols, kc, ap + (ti - t0) * packed_tile_floats, wp,
                                              args.c + m0 * args.ldc + n0, args.ldc, k0 > 0, last && !trivial ? &ep : nullptr);
          }
        }
        continue;
      }
      for (size_t p = p0; p < p1; ++p) {
        const size_t n0 = p * nr;
        const size_t ncols = std::min(nr, n - n0);
        const float* wp = w.panel(p) + k0 * nr;
        for (size_t ti = t0; ti < t1; ++ti) {
          const size_t m0 = ti * mr;
          const size_t rows = std::min(mr, m - m0);
          const kernels::GemmEpilogue ep = OffsetEpilogue(args.epilogue, m0, n0);
          (ti == t0 ? fn_cold_w : uk.fn)(rows, ncols, kc, args.a + m0 * args.lda + k0, args.lda, wp,
                                         args.c + m0 * args.ldc + n0, args.ldc, k0 > 0, last && !trivial ? &ep : nullptr);
        }
      }
    }
  };
  return pool.ParallelFor(m_blocks * n_blocks, threads, task, cancel);
}

}  // namespace sonde
