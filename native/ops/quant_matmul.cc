#include "ops/quant_matmul.h"
#include "runtime/enum_names.h"

#include <algorithm>
#include <vector>

#include "formats/gguf.h"
#include "runtime/cpu.h"

namespace sonde {

const EnumName<QuantVariant> kQuantVariantNames[] = {
    {QuantVariant::kAuto, "auto"},
    {QuantVariant::kReference, "reference"},
    {QuantVariant::kScalar, "scalar"},
    {QuantVariant::kAvx2, "avx2"},
    {QuantVariant::kAvx512, "avx512"},
    {QuantVariant::kAvx512Vnni, "avx512vnni"},
};

bool ParseQuantVariant(const std::string& name, QuantVariant* out) { return ParseEnumName(kQuantVariantNames, name, out); }

const char* QuantVariantName(QuantVariant v) { return EnumNameOf(kQuantVariantNames, v); }

bool QuantTypeFromGgml(uint32_t t, int32_t* out) {
  switch (t) {
    case kGgmlF32: *out = kernels::kQuantF32; return true;
    case kGgmlF16: *out = kernels::kQuantF16; return true;
    case kGgmlBF16: *out = kernels::kQuantBf16; return true;
    case kGgmlQ8_0: *out = kernels::kQuantQ8_0; return true;
    case kGgmlQ4_0: *out = kernels::kQuantQ4_0; return true;
    default: return false;
  }
}

static const char* const kTypeNames[] = {"f32", "f16", "bf16", "q8_0", "q4_0"};

bool ParseQuantType(const std::string& name, int32_t* out) {
  for (int32_t t = 0; t < kernels::kQuantTypeCount; ++t)
    if (name == kTypeNames[t]) { *out = t; return true; }
  return false;
}

const char* QuantTypeName(int32_t type) {
  return type >= 0 && type < kernels::kQuantTypeCount ? kTypeNames[type] : "?";
}

static bool IsBlockType(int32_t t) { return t == kernels::kQuantQ8_0 || t == kernels::kQuantQ4_0; }

std::string QuantVariantUnavailable(int32_t type, QuantVariant v, bool* not_for_type) {
  *not_for_type = false;
  if (v == QuantVariant::kAvx512Vnni && !IsBlockType(type)) {
    *not_for_type = true;
    return std::string("variant 'avx512vnni' has no kernel for type '") + QuantTypeName(type) + "' (only q8_0 and q4_0)";
  }
  if (v == QuantVariant::kAuto || v == QuantVariant::kReference || v == QuantVariant::kScalar) return "";
#if !(defined(__x86_64__) || defined(_M_X64))
  return std::string(QuantVariantName(v)) + " kernels exist only on x86-64";
#else
  const CpuFeatures& cpu = Cpu();
  const IsaLevel need = v == QuantVariant::kAvx2 ? IsaLevel::kAvx2 : IsaLevel::kAvx512;
  if (!cpu.Supports(need) || (v == QuantVariant::kAvx512Vnni && !cpu.HasVnni()))
    return std::string("this CPU (or SONDE_ISA) cannot run '") + QuantVariantName(v) + "' (SIMD level '" +
           IsaName(cpu.level) + "'" + (cpu.avx512vnni ? ", avx512_vnni" : "") + ")";
  return "";
#endif
}

QuantVariant ResolveQuantVariant(int32_t type, QuantVariant v) {
  if (v != QuantVariant::kAuto) return v;
#if defined(__x86_64__) || defined(_M_X64)
  const CpuFeatures& cpu = Cpu();
  if (IsBlockType(type) && cpu.HasVnni()) return QuantVariant::kAvx512Vnni;
  if (cpu.Supports(IsaLevel::kAvx512)) return QuantVariant::kAvx512;
  if (cpu.Supports(IsaLevel::kAvx2)) return QuantVariant::kAvx2;
#endif
  return QuantVariant::kScalar;
}

kernels::QuantDotUkernelInfo QuantUkernel(int32_t type, QuantVariant v) {
  switch (v) {
#if defined(__x86_64__) || defined(_M_X64)
    case QuantVariant::kAvx2: return kernels::QuantDotUkernelAvx2(type);
    case QuantVariant::kAvx512: return kernels::QuantDotUkernelAvx512(type);
    case QuantVariant::kAvx512Vnni: return kernels::QuantDotUkernelAvx512Vnni(type);
#endif
    default: return kernels::QuantDotUkernelScalar(type);
  }
}

bool RunQuantMatmul(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs& args,
                    QuantVariant v, QuantMatmulScratch* scratch) {
  const size_t m = args.m, n = args.n, k = args.k;
  if (m == 0 || n == 0) return true;
  const bool block = IsBlockType(args.type);
  const bool reference = v == QuantVariant::kReference;
  const kernels::QuantDotUkernelInfo uk = reference ? kernels::QuantDotUkernelInfo{} : QuantUkernel(args.type, v);
  const bool corr = !reference && uk.act_form == kernels::kQuantActQ8Corr;
  QuantMatmulScratch local;
  QuantMatmulScratch& qa = scratch ? *scratch : local;
  if (block) {
    qa.nb_pad = ((k / kernels::kQuantBlock) + 1) & ~static_cast<size_t>(1);
    qa.q_stride = qa.nb_pad * kernels::kQuantBlock;
    qa.q.resize(m * qa.q_stride);
    qa.d.resize(m * qa.nb_pad);
    qa.sums.resize(m * qa.nb_pad);
    if (corr) qa.corr.resize(m * qa.nb_pad);
    const bool ok = pool.ParallelFor(m, max_threads, [&](size_t i) {
      int32_t* sums = qa.sums.data() + i * qa.nb_pad;
      kernels::QuantizeActivationRow(args.x + i * args.ldx, k, qa.q.data() + i * qa.q_stride, qa.d.data() + i * qa.nb_pad, sums);
      if (corr) {
        // The vnni kernel adds corr_offset to every weight to make it unsigned; start each block's
        // int32 sum at -offset * sum(x) so the result is sum(w * x) again.
        int32_t* c = qa.corr.data() + i * qa.nb_pad;
        for (size_t b = 0; b < qa.nb_pad; ++b) c[b] = -uk.corr_offset * sums[b];
      }
    }, cancel);
    if (!ok) return false;
  }
  const size_t row_bytes = kernels::QuantRowBytes(args.type, k);
  // Tasks of whole weight rows: about 64 KiB of weights each (small enough to balance two threads
  // and to stay in L2 while a group of 4 activation rows after another re-reads them), and at
  // least 4 per thread.
  const unsigned threads = std::max(1u, std::min(max_threads ? max_threads : pool.size(), std::max(1u, pool.size())));
  size_t rows = std::max<size_t>(1, (64 << 10) / std::max<size_t>(1, row_bytes));
  rows = std::min(rows, std::max<size_t>(1, (n + 4 * threads - 1) / (4 * threads)));
  const size_t tasks = (n + rows - 1) / rows;
  return pool.ParallelFor(tasks, max_threads, [&](size_t t) {
    const size_t n0 = t * rows, n1 = std::min(n, n0 + rows);
    if (reference) {
      for (size_t i = 0; i < m; ++i)
        for (size_t j = n0; j < n1; ++j)
          args.y[i * args.ldy + j] = static_cast<float>(kernels::QuantDotReference(
              args.type, args.w + j * row_bytes, k, args.x + i * args.ldx,
              block ? qa.q.data() + i * qa.q_stride : nullptr, block ? qa.d.data() + i * qa.nb_pad : nullptr));
      return;
    }
    for (size_t i0 = 0; i0 < m; i0 += kernels::kQuantMaxMr) {
      const size_t mr = std::min(kernels::kQuantMaxMr, m - i0);
      kernels::QuantActs a{};
      a.x = args.x + i0 * args.ldx;
      a.ldx = args.ldx;
      if (block) {
        a.q = qa.q.data() + i0 * qa.q_stride;
        a.q_stride = qa.q_stride;
        a.d = qa.d.data() + i0 * qa.nb_pad;
        a.d_stride = qa.nb_pad;
        if (corr) {
          a.corr = qa.corr.data() + i0 * qa.nb_pad;
          a.corr_stride = qa.nb_pad;
        }
      }
      for (size_t j = n0; j < n1; ++j) uk.fn(mr, k, args.w + j * row_bytes, &a, args.y + i0 * args.ldy + j, args.ldy);
    }
  }, cancel);
}

bool RunDequantize(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const uint8_t* w, int32_t type,
                   size_t n, size_t k, float* out) {
  const size_t row_bytes = kernels::QuantRowBytes(type, k);
  return pool.ParallelFor(n, max_threads, [&](size_t j) { kernels::DequantizeRow(type, w + j * row_bytes, k, out + j * k); },
                          cancel);
}

}  // namespace sonde
