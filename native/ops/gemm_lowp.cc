#include "ops/gemm_lowp.h"
#include "runtime/enum_names.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "kernels/conv/conv.h"
#include "runtime/cpu.h"

namespace sonde {

const EnumName<GemmPrecision> kGemmPrecisionNames[] = {
    {GemmPrecision::kFp32, "fp32"},
    {GemmPrecision::kBf16, "bf16"},
    {GemmPrecision::kFp16, "fp16"},
    {GemmPrecision::kInt8, "int8"},
};

bool ParseGemmPrecision(const std::string& name, GemmPrecision* out) { return ParseEnumName(kGemmPrecisionNames, name, out); }

const char* GemmPrecisionName(GemmPrecision p) { return EnumNameOf(kGemmPrecisionNames, p); }

const EnumName<LowpGemmVariant> kLowpGemmVariantNames[] = {
    {LowpGemmVariant::kAuto, "auto"},
    {LowpGemmVariant::kReference, "reference"},
    {LowpGemmVariant::kScalar, "scalar"},
    {LowpGemmVariant::kAvx2, "avx2"},
    {LowpGemmVariant::kAvx512, "avx512"},
    {LowpGemmVariant::kAvx512Bf16, "avx512bf16"},
    {LowpGemmVariant::kAvx512Vnni, "avx512vnni"},
    {LowpGemmVariant::kAmx, "amx"},
};

bool ParseLowpGemmVariant(const std::string& name, LowpGemmVariant* out) { return ParseEnumName(kLowpGemmVariantNames, name, out); }

const char* LowpGemmVariantName(LowpGemmVariant v) { return EnumNameOf(kLowpGemmVariantNames, v); }

std::string LowpGemmVariantUnavailable(GemmPrecision p, LowpGemmVariant v, bool* not_for_precision) {
  *not_for_precision = false;
  if (p == GemmPrecision::kFp32 || (v == LowpGemmVariant::kAvx512Bf16 && p != GemmPrecision::kBf16) ||
      (v == LowpGemmVariant::kAvx512Vnni && p != GemmPrecision::kInt8) ||
      (v == LowpGemmVariant::kAmx && p == GemmPrecision::kFp16)) {
    *not_for_precision = true;
    return std::string("variant '") + LowpGemmVariantName(v) + "' has no kernel for precision '" +
           GemmPrecisionName(p) + "'";
  }
  if (v == LowpGemmVariant::kAuto || v == LowpGemmVariant::kReference || v == LowpGemmVariant::kScalar) return "";
#if !(defined(__x86_64__) || defined(_M_X64))
  return std::string(LowpGemmVariantName(v)) + " kernels exist only on x86-64";
#else
  const CpuFeatures& cpu = Cpu();
  const IsaLevel need = v == LowpGemmVariant::kAvx2 ? IsaLevel::kAvx2 : IsaLevel::kAvx512;
  const bool amx = p == GemmPrecision::kBf16 ? cpu.HasAmxBf16() : cpu.HasAmxInt8();
  if (!cpu.Supports(need) || (v == LowpGemmVariant::kAvx512Bf16 && !cpu.HasBf16()) ||
      (v == LowpGemmVariant::kAvx512Vnni && !cpu.HasVnni()) || (v == LowpGemmVariant::kAmx && !amx))
    return std::string("this CPU (or SONDE_ISA) cannot run '") + LowpGemmVariantName(v) + "' (SIMD level '" +
           IsaName(cpu.level) + "'" + (cpu.avx512bf16 ? ", avx512_bf16" : "") + (cpu.avx512vnni ? ", avx512_vnni" : "") +
           (cpu.os_amx && cpu.amx_bf16 ? ", amx_bf16" : "") + (cpu.os_amx && cpu.amx_int8 ? ", amx_int8" : "") + ")";
  return "";
#endif
}

LowpGemmVariant ResolveLowpGemmVariant(GemmPrecision p, LowpGemmVariant v) {
  if (v != LowpGemmVariant::kAuto) return v;
  const CpuFeatures& cpu = Cpu();
  if ((p == GemmPrecision::kBf16 && cpu.HasAmxBf16()) || (p == GemmPrecision::kInt8 && cpu.HasAmxInt8()))
    return LowpGemmVariant::kAmx;
  if (p == GemmPrecision::kBf16 && cpu.HasBf16()) return LowpGemmVariant::kAvx512Bf16;
  if (p == GemmPrecision::kInt8 && cpu.HasVnni()) return LowpGemmVariant::kAvx512Vnni;
  switch (cpu.level) {
    case IsaLevel::kAvx512: return LowpGemmVariant::kAvx512;
    case IsaLevel::kAvx2: return LowpGemmVariant::kAvx2;
    default: return LowpGemmVariant::kScalar;
  }
}

namespace {

kernels::LowpGemmUkernelInfo UkernelFor(GemmPrecision p, LowpGemmVariant v) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (p) {
    case GemmPrecision::kBf16:
      if (v == LowpGemmVariant::kAmx) return kernels::Bf16GemmUkernelAmx();
      if (v == LowpGemmVariant::kAvx512Bf16) return kernels::Bf16GemmUkernelAvx512Bf16();
      if (v == LowpGemmVariant::kAvx512) return kernels::Bf16GemmUkernelAvx512();
      if (v == LowpGemmVariant::kAvx2) return kernels::Bf16GemmUkernelAvx2();
      break;
    case GemmPrecision::kFp16:
      if (v == LowpGemmVariant::kAvx512) return kernels::F16GemmUkernelAvx512();
      if (v == LowpGemmVariant::kAvx2) return kernels::F16GemmUkernelAvx2();
      break;
    case GemmPrecision::kInt8:
      if (v == LowpGemmVariant::kAmx) return kernels::Qs8GemmUkernelAmx();
      if (v == LowpGemmVariant::kAvx512Vnni) return kernels::Qs8GemmUkernelAvx512Vnni();
      if (v == LowpGemmVariant::kAvx512) return kernels::Qs8GemmUkernelAvx512();
      if (v == LowpGemmVariant::kAvx2) return kernels::Qs8GemmUkernelAvx2();
      break;
    default: break;
  }
#endif
  if (p == GemmPrecision::kFp16) return kernels::F16GemmUkernelScalar();
  if (p == GemmPrecision::kInt8) return kernels::Qs8GemmUkernelScalar();
  return kernels::Bf16GemmUkernelScalar();
}

size_t RoundUp(size_t x, size_t m) { return (x + m - 1) / m * m; }

// K as the kernel reads it, zero-padded: to its pair (bf16) or quad (int8), or its k_align.
size_t PaddedK(const kernels::LowpGemmUkernelInfo& uk, size_t k) {
  const size_t unit = uk.a_form == kernels::kLowpAU8Quads ? 4 : 2;
  return RoundUp(k, std::max<size_t>(unit, uk.k_align));
}

void* AlignedAlloc(size_t bytes) {
  // 64 bytes: one cache line, and the aligned panel loads of the AVX-512 kernels.
  void* p = std::aligned_alloc(64, std::max<size_t>(64, RoundUp(bytes, 64)));
  if (!p) throw std::bad_alloc();
  return p;
}

// Per-row dynamic quantisation of A to u8 (definition in gemm_lowp.h). dst holds kq >= k bytes,
// zero-padded.
void QuantizeRow(const float* a, size_t k, size_t kq, uint8_t* dst, float* scale_out, int32_t* zero_out) {
  float lo = 0.0f, hi = 0.0f;
  bool finite = true;
  for (size_t p = 0; p < k; ++p) {
    const float v = a[p];
    finite &= std::isfinite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  std::memset(dst, 0, kq);
  if (!finite) {
    *scale_out = NAN;
    *zero_out = 0;
    return;
  }
  float s, inv, z;
  if (!kernels::LowpU8Params(lo, hi, &s, &inv, &z)) {
    *scale_out = s;
    *zero_out = 0;
    return;
  }
  for (size_t p = 0; p < k; ++p) {
    const float u = std::nearbyint(a[p] * inv) + z;
    dst[p] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, u)));
  }
  *scale_out = s;
  *zero_out = static_cast<int32_t>(z);
}

// bf16 of one row of A (round to nearest even; cvt, when set, is the AVX512_BF16 conversion, which
// also flushes denormals: the kernels that read bf16 A flush them anyway), zero-padded to kp,
// written in chunks of `chunk` values `chunk_stride` apart (row-major: one chunk of kp).
void Bf16Row(kernels::F32ToBf16Ukernel cvt, const float* a, size_t k, size_t kp, size_t chunk, size_t chunk_stride,
             uint16_t* dst) {
  for (size_t c0 = 0; c0 < kp; c0 += chunk, dst += chunk_stride) {
    const size_t have = c0 < k ? std::min(chunk, k - c0) : 0;
    if (cvt) {
      if (have) cvt(a + c0, have, dst);
    } else {
      for (size_t p = 0; p < have; ++p) dst[p] = kernels::LowpF32ToBf16(a[c0 + p]);
    }
    for (size_t p = have; p < std::min(chunk, kp - c0); ++p) dst[p] = 0;
  }
}

}  // namespace

std::unique_ptr<PackedLowpGemmWeights> PackedLowpGemmWeights::Pack(const float* b, size_t k, size_t n, size_t ldb,
                                                                   GemmPrecision p, LowpGemmVariant v,
                                                                   std::string* error) {
  if (p == GemmPrecision::kInt8) {
    if (k > kernels::kQs8MaxK) {
      *error = "b has " + std::to_string(k) + " rows; int8 weights allow K <= " + std::to_string(kernels::kQs8MaxK) +
               " (the s32 sums of u8 x s8 products must not overflow)";
      return nullptr;
    }
    for (size_t kk = 0; kk < k; ++kk)
      for (size_t j = 0; j < n; ++j)
        if (!std::isfinite(b[kk * ldb + j])) {
          *error = "int8 quantisation needs finite weights, but b[" + std::to_string(kk) + ", " + std::to_string(j) +
                   "] is " + (std::isnan(b[kk * ldb + j]) ? "NaN" : "infinite");
          return nullptr;
        }
  }
  std::unique_ptr<PackedLowpGemmWeights> w(new PackedLowpGemmWeights());
  w->k_ = k;
  w->n_ = n;
  w->precision_ = p;
  w->variant_ = ResolveLowpGemmVariant(p, v);
  w->ukernel_ = UkernelFor(p, w->variant_);
  const size_t nr = w->ukernel_.nr;
  const size_t panels = (n + nr - 1) / nr;
  // Panel sizes are multiples of 64 bytes for NR >= 16 (the SIMD kernels), so every panel starts
  // aligned.
  const size_t kp = PaddedK(w->ukernel_, k);
  if (p == GemmPrecision::kBf16) w->panel_bytes_ = kp / 2 * nr * 4;
  else if (p == GemmPrecision::kFp16) w->panel_bytes_ = k * nr * 2;
  else w->panel_bytes_ = kp / 4 * nr * 4;
  const size_t data_bytes = panels * w->panel_bytes_;
  w->data_ = static_cast<unsigned char*>(AlignedAlloc(data_bytes));
  std::memset(w->data_, 0, RoundUp(std::max<size_t>(data_bytes, 1), 64));
  w->bytes_ = RoundUp(std::max<size_t>(data_bytes, 1), 64);
  if (p == GemmPrecision::kInt8) {
    const size_t cols = panels * nr;
    w->w_scale_ = static_cast<float*>(AlignedAlloc(cols * sizeof(float)));
    w->w_sum_ = static_cast<int32_t*>(AlignedAlloc(cols * sizeof(int32_t)));
    std::memset(w->w_scale_, 0, cols * sizeof(float));
    std::memset(w->w_sum_, 0, cols * sizeof(int32_t));
    w->bytes_ += 2 * RoundUp(std::max<size_t>(cols * 4, 1), 64);
  }
  for (size_t pi = 0; pi < panels; ++pi) {
    unsigned char* panel = w->data_ + pi * w->panel_bytes_;
    const size_t n0 = pi * nr, cols = std::min(nr, n - n0);
    for (size_t j = 0; j < cols; ++j) {
      const float* col = b + n0 + j;
      if (p == GemmPrecision::kBf16) {
        uint16_t* d = reinterpret_cast<uint16_t*>(panel);
        for (size_t kk = 0; kk < k; ++kk) d[((kk / 2) * nr + j) * 2 + (kk & 1)] = kernels::LowpF32ToBf16(col[kk * ldb]);
      } else if (p == GemmPrecision::kFp16) {
        uint16_t* d = reinterpret_cast<uint16_t*>(panel);
        for (size_t kk = 0; kk < k; ++kk) d[kk * nr + j] = kernels::LowpF32ToF16(col[kk * ldb]);
      } else {
        float amax = 0.0f;
        for (size_t kk = 0; kk < k; ++kk) amax = std::max(amax, std::fabs(col[kk * ldb]));
        const float s = amax / 127.0f;
        int8_t* d = reinterpret_cast<int8_t*>(panel);
        int32_t sum = 0;
        for (size_t kk = 0; kk < k; ++kk) {
          const float q = s > 0.0f ? std::min(127.0f, std::max(-127.0f, std::nearbyint(col[kk * ldb] / s))) : 0.0f;
          d[((kk / 4) * nr + j) * 4 + (kk & 3)] = static_cast<int8_t>(q);
          sum += static_cast<int32_t>(q);
        }
        w->w_scale_[n0 + j] = s;
        w->w_sum_[n0 + j] = sum;
      }
    }
  }
  return w;
}

PackedLowpGemmWeights::~PackedLowpGemmWeights() {
  std::free(data_);
  std::free(w_scale_);
  std::free(w_sum_);
}

float PackedLowpGemmWeights::ValueAt(size_t kk, size_t j) const {
  const size_t nr = ukernel_.nr;
  const unsigned char* panel = data_ + (j / nr) * panel_bytes_;
  j %= nr;
  if (precision_ == GemmPrecision::kBf16)
    return kernels::LowpBf16ToF32(reinterpret_cast<const uint16_t*>(panel)[((kk / 2) * nr + j) * 2 + (kk & 1)]);
  if (precision_ == GemmPrecision::kFp16) return kernels::LowpF16ToF32(reinterpret_cast<const uint16_t*>(panel)[kk * nr + j]);
  return static_cast<float>(QuantAt(kk, j));
}

int8_t PackedLowpGemmWeights::QuantAt(size_t kk, size_t j) const {
  const size_t nr = ukernel_.nr;
  const unsigned char* panel = data_ + (j / nr) * panel_bytes_;
  j %= nr;
  return reinterpret_cast<const int8_t*>(panel)[((kk / 4) * nr + j) * 4 + (kk & 3)];
}

const char* PackedLowpGemmWeights::ActivationForm() const {
  switch (ukernel_.a_form) {
    case kernels::kLowpABf16Pairs: return "bf16";
    case kernels::kLowpAU8Quads: return "u8";
    default: return "fp32";
  }
}

namespace {

kernels::GemmEpilogue TileEpilogue(const kernels::GemmEpilogue& e, size_t m0, size_t n0) {
  kernels::GemmEpilogue t = e;
  if (t.scale) t.scale += n0;
  if (t.bias) t.bias += n0;
  if (t.residual) t.residual += m0 * t.ldr + n0;
  return t;
}

// A in the kernel's form, for the whole run (O(M K) work against the O(M N K) GEMM).
struct PreparedA {
  const void* rows = nullptr;
  size_t stride = 0;  // bytes
  std::vector<uint16_t> bf16;
  std::vector<uint8_t> u8;
  std::vector<float> scale;
  std::vector<int32_t> zero;
};

// Where row i of A (kp values) starts in uk's tile-major blocks (a_tiled): its block, then its
// place in the block's first k step; the row's next k_align values are mr * k_align further on.
size_t TiledRowOffset(size_t i, size_t kp, const kernels::LowpGemmUkernelInfo& uk) {
  return (i - i % uk.mr) * kp + (i % uk.mr) * uk.k_align;
}

// tiled: in uk's tile-major blocks (its a_tiled), else row-major (the reference reads rows).
bool PrepareA(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const LowpGemmArgs& args, size_t k,
              const kernels::LowpGemmUkernelInfo& uk, bool tiled, PreparedA* pa) {
  const size_t m = args.m;
  const int32_t form = uk.a_form;
  // Rows a tile kernel reads past m: any readable bytes do, their results are dropped.
  const size_t m_alloc = tiled ? RoundUp(m, uk.mr) : m;
  // Row blocks of ~64 KiB of input keep the per-task overhead small and both cores busy.
  const size_t rows_per_task = std::max<size_t>(1, (64 * 1024) / std::max<size_t>(1, k * 4));
  const size_t tasks = (m + rows_per_task - 1) / rows_per_task;
  if (form == kernels::kLowpAF32) {
    pa->rows = args.a;
    pa->stride = args.lda * sizeof(float);
    return true;
  }
  if (form == kernels::kLowpABf16Pairs) {
    const size_t kp = PaddedK(uk, k);
    pa->bf16.resize(m_alloc * kp);
    pa->rows = pa->bf16.data();
    pa->stride = kp * sizeof(uint16_t);
    kernels::F32ToBf16Ukernel cvt = nullptr;
#if defined(__x86_64__) || defined(_M_X64)
    if (Cpu().HasBf16()) cvt = kernels::F32ToBf16UkernelAvx512Bf16();
#endif
    return pool.ParallelFor(tasks, threads, [&](size_t t) {
      for (size_t i = t * rows_per_task; i < std::min(m, (t + 1) * rows_per_task); ++i) {
        if (tiled)
          Bf16Row(cvt, args.a + i * args.lda, k, kp, uk.k_align, uk.mr * uk.k_align, pa->bf16.data() + TiledRowOffset(i, kp, uk));
        else
          Bf16Row(cvt, args.a + i * args.lda, k, kp, kp, kp, pa->bf16.data() + i * kp);
      }
    }, cancel);
  }
  const size_t kq = PaddedK(uk, k);
  pa->u8.resize(m_alloc * kq);
  pa->scale.resize(m);
  pa->zero.resize(m);
  pa->rows = pa->u8.data();
  pa->stride = kq;
  // The SIMD quantiser gives the same bytes as QuantizeRow (same LowpU8Params, same rounding).
  kernels::LowpQuantizeRowU8 quantize = QuantizeRow;
#if defined(__x86_64__) || defined(_M_X64)
  if (Cpu().Supports(IsaLevel::kAvx512)) quantize = kernels::LowpQuantizeRowU8Avx512;
#endif
  // The quantiser needs the whole row (its range) before it writes: tiled, it writes a row here and
  // the row's k steps are copied to their places.
  return pool.ParallelFor(tasks, threads, [&](size_t t) {
    thread_local std::vector<uint8_t> row;
    if (tiled) row.resize(kq);
    for (size_t i = t * rows_per_task; i < std::min(m, (t + 1) * rows_per_task); ++i) {
      if (!tiled) {
        quantize(args.a + i * args.lda, k, kq, pa->u8.data() + i * kq, &pa->scale[i], &pa->zero[i]);
        continue;
      }
      quantize(args.a + i * args.lda, k, kq, row.data(), &pa->scale[i], &pa->zero[i]);
      uint8_t* dst = pa->u8.data() + TiledRowOffset(i, kq, uk);
      for (size_t s = 0; s < kq / uk.k_align; ++s)
        std::memcpy(dst + s * uk.mr * uk.k_align, row.data() + s * uk.k_align, uk.k_align);
    }
  }, cancel);
}

bool RunReference(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const LowpGemmArgs& args,
                  const PackedLowpGemmWeights& w, const PreparedA& pa) {
  const size_t m = args.m, n = w.n(), k = w.k();
  const int32_t form = w.ukernel().a_form;
  if (form == kernels::kLowpAU8Quads) {
    std::vector<int8_t> q(k * n);
    for (size_t kk = 0; kk < k; ++kk)
      for (size_t j = 0; j < n; ++j) q[kk * n + j] = w.QuantAt(kk, j);
    return pool.ParallelFor(m, threads, [&](size_t i) {
      const kernels::GemmEpilogue ep = TileEpilogue(args.epilogue, i, 0);
      kernels::Qs8GemmReference(1, n, k, pa.u8.data() + i * pa.stride, pa.stride, &pa.scale[i], &pa.zero[i], q.data(),
                                n, w.w_scale(), args.c + i * args.ldc, args.ldc, &ep);
    }, cancel);
  }
  std::vector<float> b(k * n);
  for (size_t kk = 0; kk < k; ++kk)
    for (size_t j = 0; j < n; ++j) b[kk * n + j] = w.ValueAt(kk, j);
  return pool.ParallelFor(m, threads, [&](size_t i) {
    const kernels::GemmEpilogue ep = TileEpilogue(args.epilogue, i, 0);
    std::vector<float> row(k);
    if (form == kernels::kLowpABf16Pairs) {
      const uint16_t* r = pa.bf16.data() + i * (pa.stride / 2);
      for (size_t p = 0; p < k; ++p) row[p] = kernels::LowpBf16ToF32(r[p]);
    } else {
      std::memcpy(row.data(), args.a + i * args.lda, k * sizeof(float));
    }
    kernels::F32GemmReference(1, n, k, row.data(), k, b.data(), n, args.c + i * args.ldc, args.ldc, &ep);
  }, cancel);
}

}  // namespace

bool RunLowpGemm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const LowpGemmArgs& args,
                 const PackedLowpGemmWeights& w, bool reference) {
  const auto& uk = w.ukernel();
  const size_t m = args.m, n = w.n(), k = w.k();
  if (m == 0 || n == 0) return true;
  const unsigned threads = std::max(1u, std::min(max_threads, pool.size()));
  if (k == 0) {  // empty sum: C = epilogue(0)
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < n; ++j) args.c[i * args.ldc + j] = kernels::GemmEpilogueScalar(0.0f, i, j, &args.epilogue);
    return true;
  }
  // The prepared copy of A is per-run scratch: reused from run to run by the thread that runs the
  // job (a fresh multi-megabyte vector costs page faults on every run), and released after a run
  // whose copy was unusually large so an occasional big batch does not pin that memory.
  thread_local PreparedA pa_scratch;
  PreparedA& pa = pa_scratch;
  struct Trim {
    PreparedA& pa;
    ~Trim() {
      if (pa.bf16.capacity() * 2 + pa.u8.capacity() > (static_cast<size_t>(64) << 20)) pa = PreparedA();
    }
  } trim{pa};
  if (!PrepareA(pool, threads, cancel, args, k, uk, uk.a_tiled && !reference, &pa)) return false;
  if (reference) return RunReference(pool, threads, cancel, args, w, pa);

  const size_t mr = uk.mr, nr = uk.nr;
  const size_t m_tiles = (m + mr - 1) / mr;
  const size_t n_panels = (n + nr - 1) / nr;
  // Task grid as in RunGemm: blocks of ~96 rows x ~256 columns, split until every thread has a few
  // tasks (M = 1 decode splits across N only). Tile origins do not depend on the grid, so results
  // are identical for any thread count.
  size_t mb = std::min(std::max<size_t>(1, 96 / mr), m_tiles);
  size_t nb = std::min(std::max<size_t>(1, 256 / nr), n_panels);
  auto tasks = [&] { return ((m_tiles + mb - 1) / mb) * ((n_panels + nb - 1) / nb); };
  while (tasks() < 4 * static_cast<size_t>(threads) && (nb > 1 || mb > 1)) {
    if (nb > 1 && (nb >= mb || mb == 1)) nb = (nb + 1) / 2;
    else mb = (mb + 1) / 2;
  }
  const size_t m_blocks = (m_tiles + mb - 1) / mb;
  const size_t n_blocks = (n_panels + nb - 1) / nb;
  const kernels::GemmEpilogue& e = args.epilogue;
  const bool trivial = !e.scale && !e.bias && !e.residual && e.activation == kernels::kActNone;
  const bool quant = uk.a_form == kernels::kLowpAU8Quads;
  const char* a_rows = static_cast<const char*>(pa.rows);
  auto task = [&](size_t t) {
    const size_t mbi = t % m_blocks, nbi = t / m_blocks;
    const size_t t0 = mbi * mb, t1 = std::min(m_tiles, t0 + mb);
    const size_t p0 = nbi * nb, p1 = std::min(n_panels, p0 + nb);
    for (size_t p = p0; p < p1; ++p) {
      const size_t n0 = p * nr;
      const size_t ncols = std::min(nr, n - n0);
      const void* wp = w.panel(p);
      for (size_t ti = t0; ti < t1; ++ti) {
        const size_t m0 = ti * mr;
        const size_t rows = std::min(mr, m - m0);
        const kernels::GemmEpilogue ep = TileEpilogue(e, m0, n0);
        kernels::LowpGemmQuant q{};
        if (quant) q = {pa.scale.data() + m0, pa.zero.data() + m0, w.w_scale() + n0, w.w_sum() + n0};
        uk.fn(rows, ncols, k, a_rows + m0 * pa.stride, pa.stride, wp, args.c + m0 * args.ldc + n0, args.ldc,
              quant ? &q : nullptr, trivial ? nullptr : &ep);
      }
    }
  };
  return pool.ParallelFor(m_blocks * n_blocks, threads, task, cancel);
}

}  // namespace sonde
