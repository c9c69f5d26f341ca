#include "ops/quant_matmul.h"
#include "runtime/enum_names.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <new>
#include <stdexcept>
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

const EnumName<QuantAlgorithm> kQuantAlgorithmNames[] = {
    {QuantAlgorithm::kAuto, "auto"},
    {QuantAlgorithm::kGemv, "gemv"},
    {QuantAlgorithm::kGemm, "gemm"},
    {QuantAlgorithm::kRepacked, "repacked"},
};

bool ParseQuantAlgorithm(const std::string& name, QuantAlgorithm* out) {
  return ParseEnumName(kQuantAlgorithmNames, name, out);
}

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

static const char* const kTypeNames[] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q8_0x32"};

bool ParseQuantType(const std::string& name, int32_t* out) {
  // Only the file types: q8_0x32 exists only as sonde repacks q8_0 weights itself.
  for (int32_t t = 0; t < kernels::kQuantFileTypeCount; ++t)
    if (name == kTypeNames[t]) { *out = t; return true; }
  return false;
}

const char* QuantTypeName(int32_t type) {
  return type >= 0 && type < kernels::kQuantTypeCount ? kTypeNames[type] : "?";
}

static bool IsBlockType(int32_t t) {
  return t == kernels::kQuantQ8_0 || t == kernels::kQuantQ4_0 || t == kernels::kQuantQ8_0x32;
}

std::string QuantVariantUnavailable(int32_t type, QuantVariant v, bool* not_for_type) {
  *not_for_type = false;
  if (type == kernels::kQuantQ8_0x32 && v != QuantVariant::kAuto && v != QuantVariant::kAvx512Vnni) {
    *not_for_type = true;
    return std::string("variant '") + QuantVariantName(v) + "' has no kernel for repacked q8_0 weights (only avx512vnni)";
  }
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

kernels::QuantGemmUkernelInfo QuantGemmUkernel(int32_t type, QuantVariant v) {
  switch (v) {
#if defined(__x86_64__) || defined(_M_X64)
    case QuantVariant::kAvx512: return kernels::QuantGemmUkernelAvx512(type);
    case QuantVariant::kAvx512Vnni: return kernels::QuantGemmUkernelAvx512Vnni(type);
#endif
    default: return kernels::QuantGemmUkernelInfo{nullptr, nullptr, 0, 0, "?"};
  }
}

namespace {

// From this many activation rows the blocked GEMM beats the 16-row dot kernel (q8_0, one thread on
// the 2-core AVX-512 VNNI VM, weights not cached as in a decode step, since the packing prefetches
// its next panel: 2048 x 512 M=4 65 / 57 us (gemm / gemv), M=5 69 / 62, M=6 71 / 72, M=7 74 / 82,
// M=8 75 / 89; 512 x 2048 M=6 77 / 75, M=7 74 / 80, M=8 72 / 91). Packing costs about 2 weight
// reads, the dot kernel about 1 more per activation row. For q8_0 / q4_0 on VNNI the choice
// changes no result bit (Gemv16 is the GEMM's arithmetic), only the speed.
const size_t kQuantGemmMinRows = 6;

// The calling thread's panel buffer, grown to the largest panel it has packed and kept: a
// transformer's prefill allocates it once per pool thread. Null when the allocation fails.
uint8_t* PanelBuffer(size_t bytes) {
  thread_local std::unique_ptr<uint8_t[]> buffer;
  thread_local size_t capacity = 0;
  if (capacity < bytes) {
    buffer.reset(new (std::nothrow) uint8_t[bytes + 64]);
    capacity = buffer ? bytes : 0;
    if (!buffer) return nullptr;
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(buffer.get());
  return reinterpret_cast<uint8_t*>((p + 63) & ~static_cast<uintptr_t>(63));
}

// One product's GEMM work: tasks of consecutive panels of 32 weight rows, each panel packed by the
// task and run over a chunk of the activation rows. The activation rows are split only when there
// are too few panels to keep every thread busy (a narrow product: K/V projections of a few heads),
// because each chunk packs its panel again.
struct GemmJob {
  const QuantMatmulArgs* args;
  kernels::QuantGemmUkernelInfo gk;
  kernels::QuantQ8_0x32Ukernel x32;  // non-null: args.w is q8_0x32, read in place (no packing)
  bool block;
  size_t row0, panels, m_chunks, m_per, panels_per_task, tasks, row_bytes, panel_bytes;
};

GemmJob MakeGemmJob(unsigned threads, const QuantMatmulArgs& args, const kernels::QuantGemmUkernelInfo& gk, bool block,
                    size_t row0, kernels::QuantQ8_0x32Ukernel x32 = nullptr) {
  GemmJob j;
  j.args = &args;
  j.gk = gk;
  j.x32 = x32;
  j.block = block;
  j.row0 = row0;
  const size_t m = args.m, mr = gk.mr;
  j.panels = (args.n + kernels::kQuantGemmNr - 1) / kernels::kQuantGemmNr;
  size_t m_chunks = 1;
  if (j.panels < 4 * static_cast<size_t>(threads))
    m_chunks = std::min((m + mr - 1) / mr, (4 * static_cast<size_t>(threads) + j.panels - 1) / j.panels);
  j.m_per = ((m + m_chunks - 1) / m_chunks + mr - 1) / mr * mr;
  j.m_chunks = (m + j.m_per - 1) / j.m_per;
  // Consecutive panels per task, at least 4 tasks per thread: the packing prefetches the panel after
  // its own (kernels/quant/quant-gemm-avx512vnni.cc), which is then this thread's next one rather
  // than another core's (tasks are handed out one at a time).
  j.panels_per_task = j.m_chunks == 1 ? std::max<size_t>(1, j.panels / (4 * static_cast<size_t>(threads))) : 1;
  j.tasks = (j.panels + j.panels_per_task - 1) / j.panels_per_task * j.m_chunks;
  j.row_bytes = kernels::QuantRowBytes(args.type, args.k);
  j.panel_bytes = kernels::QuantGemmPanelBytes(args.type, args.k);
  return j;
}

// False when the panel buffer cannot be allocated.
bool RunGemmTask(const GemmJob& j, const QuantMatmulScratch& qa, size_t t) {
  uint8_t* panel = j.x32 ? nullptr : PanelBuffer(j.panel_bytes);
  if (!j.x32 && !panel) return false;
  const QuantMatmulArgs& args = *j.args;
  const size_t m = args.m, n = args.n, k = args.k, mr = j.gk.mr, m_chunks = j.m_chunks;
  const size_t p_end = std::min(j.panels, (t / m_chunks + 1) * j.panels_per_task);
  for (size_t p = t / m_chunks * j.panels_per_task; p < p_end; ++p) {
    const size_t n0 = p * kernels::kQuantGemmNr, nr = std::min(kernels::kQuantGemmNr, n - n0);
    if (j.x32)
      panel = const_cast<uint8_t*>(args.w + n0 * j.row_bytes);  // a whole group (q8_0x32 pads the last)
    else
      j.gk.pack(nr, k, args.w + n0 * j.row_bytes, j.row_bytes, panel);
    const size_t i_end = std::min(m, (t % m_chunks + 1) * j.m_per);
    for (size_t i0 = t % m_chunks * j.m_per; i0 < i_end; i0 += mr) {
      kernels::QuantActs a{};
      a.x = args.x + i0 * args.ldx;
      a.ldx = args.ldx;
      if (j.block) {
        a.q = qa.q.data() + (j.row0 + i0) * qa.q_stride;
        a.q_stride = qa.q_stride;
        a.d = qa.d.data() + (j.row0 + i0) * qa.nb_pad;
        a.d_stride = qa.nb_pad;
      }
      if (j.x32) {
        a.corr = qa.corr.data() + (j.row0 + i0) * qa.nb_pad;
        a.corr_stride = qa.nb_pad;
        j.x32(std::min(mr, i_end - i0), nr, k, panel, &a, args.y + i0 * args.ldy + n0, args.ldy);
        continue;
      }
      j.gk.fn(std::min(mr, i_end - i0), nr, k, panel, &a, args.y + i0 * args.ldy + n0, args.ldy);
    }
  }
  return true;
}

bool RunGemm(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs& args,
             const kernels::QuantGemmUkernelInfo& gk, const QuantMatmulScratch& qa, size_t row0, bool block,
             kernels::QuantQ8_0x32Ukernel x32) {
  const unsigned threads = std::max(1u, std::min(max_threads ? max_threads : pool.size(), std::max(1u, pool.size())));
  const GemmJob job = MakeGemmJob(threads, args, gk, block, row0, x32);
  if (job.tasks == 1 || max_threads == 1) {
    // A single-thread call (an MoE decode chunk that already runs on its own pool thread) needs
    // no ParallelFor round.
    for (size_t t = 0; t < job.tasks; ++t) {
      if (cancel && cancel->load()) return false;
      if (!RunGemmTask(job, qa, t)) throw std::bad_alloc();
    }
    return true;
  }
  std::atomic<bool> out_of_memory{false};
  const bool ok = pool.ParallelFor(job.tasks, max_threads, [&](size_t t) {
    if (!RunGemmTask(job, qa, t)) out_of_memory = true;
  }, cancel);
  if (out_of_memory) throw std::bad_alloc();
  return ok;
}

}  // namespace

namespace {

struct Plan {
  bool block, reference, gemm;
  kernels::QuantDotUkernelInfo uk;
  kernels::QuantGemmUkernelInfo gk;
  kernels::QuantQ8_0x32Ukernel x32 = nullptr;  // q8_0x32 weights: the one kernel of every M
};

Plan PlanFor(const QuantMatmulArgs& args, QuantVariant v) {
  Plan p;
  p.block = IsBlockType(args.type);
  p.reference = v == QuantVariant::kReference;
  p.uk = p.reference ? kernels::QuantDotUkernelInfo{} : QuantUkernel(args.type, v);
  p.gk = kernels::QuantGemmUkernelInfo{nullptr, nullptr, 0, 0, "?"};
#if defined(__x86_64__) || defined(_M_X64)
  if (args.type == kernels::kQuantQ8_0x32 && v == QuantVariant::kAvx512Vnni) {
    // The weights are panels already: the GEMM's task split, without packing, for every M.
    p.x32 = kernels::QuantQ8_0x32UkernelAvx512Vnni();
    p.uk.act_form = kernels::kQuantActQ8Corr;
    p.uk.corr_offset = 128;
    p.gk.mr = kernels::kQ8_0x32MaxMr;
    p.gemm = true;
    return p;
  }
#endif
  if (!p.reference) p.gk = QuantGemmUkernel(args.type, v);
  p.gemm = p.gk.pack && args.algorithm != QuantAlgorithm::kGemv &&
           (args.algorithm == QuantAlgorithm::kGemm || args.m >= kQuantGemmMinRows);
  return p;
}

// The activation quantiser: the AVX-512 one where the CPU runs it (the same bits as the scalar
// definition, for every variant), chosen once.
using ActivationQuantizer = void (*)(const float*, size_t, int8_t*, float*, int32_t*);
ActivationQuantizer ActivationQuantizerHere() {
  static const ActivationQuantizer fn = [] {
#if defined(__x86_64__) || defined(_M_X64)
    if (Cpu().Supports(IsaLevel::kAvx512)) return &kernels::QuantizeActivationRowAvx512;
#endif
    return &kernels::QuantizeActivationRow;
  }();
  return fn;
}

int32_t ActForm(const Plan& p) {
  if (!p.block) return kernels::kQuantActF32;
  if (p.x32) return kernels::kQuantActQ8Corr;
  if (p.gemm) return kernels::kQuantActU8;
  return p.reference ? kernels::kQuantActQ8 : p.uk.act_form;
}

}  // namespace

bool QuantizeActivations(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs& args,
                         QuantVariant v, QuantMatmulScratch* scratch) {
  const size_t m = args.m, k = args.k;
  const Plan plan = PlanFor(args, v);
  QuantMatmulScratch& qa = *scratch;
  qa.form = ActForm(plan);
  qa.corr_offset = plan.reference ? 0 : plan.uk.corr_offset;
  qa.rows = m;
  qa.k = k;
  if (!plan.block || m == 0) return true;
  const bool corr = qa.form == kernels::kQuantActQ8Corr;
  qa.nb_pad = ((k / kernels::kQuantBlock) + 1) & ~static_cast<size_t>(1);
  qa.q_stride = qa.nb_pad * kernels::kQuantBlock;
  // resize() keeps the capacity: a caller that reuses its scratch allocates only while M grows.
  qa.q.resize(m * qa.q_stride);
  qa.d.resize(m * qa.nb_pad);
  qa.sums.resize(m * qa.nb_pad);
  if (corr) qa.corr.resize(m * qa.nb_pad);
  const ActivationQuantizer quantize_row = ActivationQuantizerHere();
  auto row = [&](size_t i) {
    int32_t* sums = qa.sums.data() + i * qa.nb_pad;
    int8_t* q = qa.q.data() + i * qa.q_stride;
    quantize_row(args.x + i * args.ldx, k, q, qa.d.data() + i * qa.nb_pad, sums);
    if (qa.form == kernels::kQuantActU8) {
      // The GEMM's vpdpbusd takes the activations as its unsigned operand: q + 128.
      for (size_t j = 0; j < k; ++j) q[j] = static_cast<int8_t>(static_cast<uint8_t>(q[j]) ^ 0x80);
    }
    if (corr) {
      // The vnni kernel adds corr_offset to every weight to make it unsigned; start each block's
      // int32 sum at -offset * sum(x) so the result is sum(w * x) again.
      int32_t* c = qa.corr.data() + i * qa.nb_pad;
      for (size_t b = 0; b < qa.nb_pad; ++b) c[b] = -qa.corr_offset * sums[b];
    }
  };
  // A few rows (a decode step's one, an MoE token's k down inputs) are a few microseconds: a
  // helper's hand-off costs more, and on a loaded machine the caller may wait for a helper that
  // claimed a row and was descheduled.
  if (m * k <= (16u << 10)) {
    for (size_t i = 0; i < m; ++i) {
      if (cancel && cancel->load()) return false;
      row(i);
    }
    return true;
  }
  return pool.ParallelFor(m, max_threads, row, cancel);
}

namespace {

// One product's row-dot (GEMV) work, split into tasks of whole weight rows.
struct GemvJob {
  const QuantMatmulArgs* args;
  Plan plan;
  bool block, reference, corr, gemv16;
  size_t row_bytes, rows, tasks, row0;
};

GemvJob MakeGemvJob(unsigned threads, const QuantMatmulArgs& args, const Plan& plan, const QuantMatmulScratch& qa,
                    size_t row0) {
  GemvJob j;
  j.args = &args;
  j.plan = plan;
  j.block = plan.block;
  j.reference = plan.reference;
  j.corr = plan.block && qa.form == kernels::kQuantActQ8Corr;
  j.row0 = row0;
  const size_t n = args.n;
  j.row_bytes = kernels::QuantRowBytes(args.type, args.k);
  // The GEMM's row-dot companion (bit-identical to it) where there is one for these activations.
  j.gemv16 = j.corr && plan.gk.gemv && qa.corr_offset == plan.gk.gemv_corr_offset;
  // Tasks of whole weight rows: about 64 KiB of weights each (small enough to balance two threads
  // and to stay in L2 while a group of 4 activation rows after another re-reads them), and at
  // least 4 per thread; whole groups of 16 rows for the 16-row kernel. One activation row (decode)
  // reads each weight once, and a task start costs about half a microsecond (the claim, and the
  // prefetchers finding the new stream): about 256 KiB, at least one per thread (an f16 decode's
  // q/k/v and output products on two threads: 16 -> 18 GB/s).
  const bool decode = args.m == 1;
  const size_t per_thread = decode ? 1 : 4;
  size_t rows = std::max<size_t>(1, (size_t{decode ? 256u : 64u} << 10) / std::max<size_t>(1, j.row_bytes));
  rows = std::min(rows, std::max<size_t>(1, (n + per_thread * threads - 1) / (per_thread * threads)));
  if (j.gemv16) rows = (rows + kernels::kQuantGemvRows - 1) / kernels::kQuantGemvRows * kernels::kQuantGemvRows;
  j.rows = rows;
  j.tasks = (n + rows - 1) / rows;
  return j;
}

void RunGemvTask(const GemvJob& j, const QuantMatmulScratch& qa, size_t t) {
  const QuantMatmulArgs& args = *j.args;
  const size_t m = args.m, n = args.n, k = args.k, row0 = j.row0, row_bytes = j.row_bytes;
  const size_t n0 = t * j.rows, n1 = std::min(n, n0 + j.rows);
  // One activation row (a decode step) of a float type: the kernel that streams the task's rows.
  if (m == 1 && !j.reference && !j.block && j.plan.uk.rows) {
    kernels::QuantActs a{};
    a.x = args.x;
    a.ldx = args.ldx;
    j.plan.uk.rows(n1 - n0, k, args.w + n0 * row_bytes, row_bytes, &a, args.y + n0);
    return;
  }
  if (j.gemv16) {
    for (size_t i0 = 0; i0 < m; i0 += kernels::kQuantGemvMaxMr) {
      kernels::QuantActs a{};
      a.q = qa.q.data() + (row0 + i0) * qa.q_stride;
      a.q_stride = qa.q_stride;
      a.d = qa.d.data() + (row0 + i0) * qa.nb_pad;
      a.d_stride = qa.nb_pad;
      a.corr = qa.corr.data() + (row0 + i0) * qa.nb_pad;
      a.corr_stride = qa.nb_pad;
      const size_t mr = std::min(kernels::kQuantGemvMaxMr, m - i0);
      for (size_t r = n0; r < n1; r += kernels::kQuantGemvRows)
        j.plan.gk.gemv(mr, std::min(kernels::kQuantGemvRows, n1 - r), k, args.w + r * row_bytes, row_bytes, &a,
                       args.y + i0 * args.ldy + r, args.ldy);
    }
    return;
  }
  const bool block = j.block;
  if (j.reference) {
    for (size_t i = 0; i < m; ++i)
      for (size_t r = n0; r < n1; ++r)
        args.y[i * args.ldy + r] = static_cast<float>(kernels::QuantDotReference(
            args.type, args.w + r * row_bytes, k, args.x + i * args.ldx,
            block ? qa.q.data() + (row0 + i) * qa.q_stride : nullptr, block ? qa.d.data() + (row0 + i) * qa.nb_pad : nullptr));
    return;
  }
  for (size_t i0 = 0; i0 < m; i0 += kernels::kQuantMaxMr) {
    const size_t mr = std::min(kernels::kQuantMaxMr, m - i0);
    kernels::QuantActs a{};
    a.x = args.x + i0 * args.ldx;
    a.ldx = args.ldx;
    if (block) {
      a.q = qa.q.data() + (row0 + i0) * qa.q_stride;
      a.q_stride = qa.q_stride;
      a.d = qa.d.data() + (row0 + i0) * qa.nb_pad;
      a.d_stride = qa.nb_pad;
      if (j.corr) {
        a.corr = qa.corr.data() + (row0 + i0) * qa.nb_pad;
        a.corr_stride = qa.nb_pad;
      }
    }
    for (size_t r = n0; r < n1; ++r) j.plan.uk.fn(mr, k, args.w + r * row_bytes, &a, args.y + i0 * args.ldy + r, args.ldy);
  }
}

unsigned PoolThreads(ThreadPool& pool, unsigned max_threads) {
  return std::max(1u, std::min(max_threads ? max_threads : pool.size(), std::max(1u, pool.size())));
}

// The plan for args on activations qa: the activations decide, since a scratch quantised for more
// rows than this call may be in the GEMM form while these few rows alone would have taken the dot
// kernels.
Plan PlanForActs(const QuantMatmulArgs& args, QuantVariant v, const QuantMatmulScratch& qa) {
  Plan plan = PlanFor(args, v);
  if (plan.block && !plan.x32) plan.gemm = qa.form == kernels::kQuantActU8 && plan.gk.pack;
  return plan;
}

}  // namespace

bool RunQuantMatmulQuantized(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel,
                             const QuantMatmulArgs& args, QuantVariant v, const QuantMatmulScratch& qa, size_t row0) {
  if (args.m == 0 || args.n == 0) return true;
  const Plan plan = PlanForActs(args, v, qa);
  if (plan.x32 && (qa.form != kernels::kQuantActQ8Corr || qa.corr_offset != 128))
    throw std::invalid_argument("q8_0x32 weights need activations quantised for them");
  if (plan.gemm) return RunGemm(pool, max_threads, cancel, args, plan.gk, qa, row0, plan.block, plan.x32);
  const GemvJob job = MakeGemvJob(PoolThreads(pool, max_threads), args, plan, qa, row0);
  if (job.tasks == 1 || max_threads == 1) {
    // A single-thread call (an MoE chunk that already runs on its own pool thread) needs no
    // ParallelFor round.
    for (size_t t = 0; t < job.tasks; ++t) {
      if (cancel && cancel->load()) return false;
      RunGemvTask(job, qa, t);
    }
    return true;
  }
  return pool.ParallelFor(job.tasks, max_threads, [&](size_t t) { RunGemvTask(job, qa, t); }, cancel);
}

bool RunQuantMatmuls(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs* args,
                     size_t count, QuantVariant v, QuantMatmulScratch* scratch) {
  if (count == 0) return true;
  QuantMatmulScratch local;
  QuantMatmulScratch& qa = scratch ? *scratch : local;
  const QuantMatmulArgs& a0 = args[0];
  bool together = a0.m > 0;
  for (size_t i = 1; i < count && together; ++i)
    together = args[i].x == a0.x && args[i].m == a0.m && args[i].k == a0.k && args[i].ldx == a0.ldx &&
               args[i].type == a0.type && args[i].algorithm == a0.algorithm;
  if (!together) {
    for (size_t i = 0; i < count; ++i)
      if (!RunQuantMatmul(pool, max_threads, cancel, args[i], v, &qa)) return false;
    return true;
  }
  if (!QuantizeActivations(pool, max_threads, cancel, a0, v, &qa)) return false;
  const unsigned threads = PoolThreads(pool, max_threads);
  // At most a layer's q, k and v (and a fused gate/up pair): a fixed array, nothing allocated.
  const size_t kMaxJobs = 8;
  if (count > kMaxJobs) throw std::invalid_argument("RunQuantMatmuls takes at most 8 products");
  // The same activations, type and algorithm: every product takes the same plan. A batch of decode
  // rows (the GEMM from kQuantGemmMinRows) is as short as the dot kernels' few rows, so it too runs
  // all its products in one hand-off.
  const bool gemm = PlanFor(a0, v).gemm;
  GemvJob jobs[kMaxJobs];
  GemmJob gemm_jobs[kMaxJobs];
  size_t first[kMaxJobs + 1] = {0};
  for (size_t i = 0; i < count; ++i) {
    first[i + 1] = first[i];
    if (args[i].n == 0) continue;
    const Plan plan = PlanForActs(args[i], v, qa);
    if (gemm)
      gemm_jobs[i] = MakeGemmJob(threads, args[i], plan.gk, plan.block, 0, plan.x32);
    else
      jobs[i] = MakeGemvJob(threads, args[i], plan, qa, 0);
    first[i + 1] += gemm ? gemm_jobs[i].tasks : jobs[i].tasks;
  }
  std::atomic<bool> out_of_memory{false};
  auto task = [&](size_t t) {
    size_t i = 0;
    while (t >= first[i + 1]) ++i;
    if (!gemm)
      RunGemvTask(jobs[i], qa, t - first[i]);
    else if (!RunGemmTask(gemm_jobs[i], qa, t - first[i]))
      out_of_memory = true;
  };
  bool ok = true;
  if (threads == 1) {
    for (size_t t = 0; t < first[count] && ok; ++t) {
      if (cancel && cancel->load()) ok = false;
      else task(t);
    }
  } else {
    ok = pool.ParallelFor(first[count], max_threads, task, cancel);
  }
  if (out_of_memory) throw std::bad_alloc();
  return ok;
}

bool RepackQ8_0x32(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const uint8_t* w, size_t n, size_t k,
                   uint8_t* out) {
  const size_t row_bytes = kernels::QuantRowBytes(kernels::kQuantQ8_0, k);
  const size_t groups = (n + kernels::kQ8_0x32Rows - 1) / kernels::kQ8_0x32Rows;
  // About 1 MiB of weights per task: few hand-offs, and a task's source is one sequential run.
  const size_t per_task = std::max<size_t>(1, (1u << 20) / std::max<size_t>(1, kernels::kQ8_0x32Rows * row_bytes));
  return pool.ParallelFor((groups + per_task - 1) / per_task, max_threads, [&](size_t t) {
    for (size_t g = t * per_task; g < std::min(groups, (t + 1) * per_task); ++g) {
      const size_t r0 = g * kernels::kQ8_0x32Rows;
      kernels::RepackQ8_0x32Group(std::min(kernels::kQ8_0x32Rows, n - r0), k, w + r0 * row_bytes, row_bytes,
                                  out + r0 * row_bytes);
    }
  }, cancel);
}

bool RunQuantMatmul(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const QuantMatmulArgs& args,
                    QuantVariant v, QuantMatmulScratch* scratch) {
  if (args.m == 0 || args.n == 0) return true;
  if (args.algorithm == QuantAlgorithm::kRepacked && args.type == kernels::kQuantQ8_0) {
    if (v != QuantVariant::kAvx512Vnni) throw std::invalid_argument("the repacked q8_0 kernel runs at avx512vnni only");
    const size_t bytes = kernels::QuantQ8_0x32Bytes(args.n, args.k);
    std::unique_ptr<uint8_t[]> raw(new uint8_t[bytes + 64]);
    uint8_t* packed = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~static_cast<uintptr_t>(63));
    if (!RepackQ8_0x32(pool, max_threads, cancel, args.w, args.n, args.k, packed)) return false;
    QuantMatmulArgs r = args;
    r.w = packed;
    r.type = kernels::kQuantQ8_0x32;
    r.algorithm = QuantAlgorithm::kAuto;
    return RunQuantMatmul(pool, max_threads, cancel, r, v, scratch);
  }
  QuantMatmulScratch local;
  QuantMatmulScratch& qa = scratch ? *scratch : local;
  if (!QuantizeActivations(pool, max_threads, cancel, args, v, &qa)) return false;
  return RunQuantMatmulQuantized(pool, max_threads, cancel, args, v, qa, 0);
}

bool RunDequantize(ThreadPool& pool, unsigned max_threads, const CancelFlag* cancel, const uint8_t* w, int32_t type,
                   size_t n, size_t k, float* out) {
  const size_t row_bytes = kernels::QuantRowBytes(type, k);
  return pool.ParallelFor(n, max_threads, [&](size_t j) { kernels::DequantizeRow(type, w + j * row_bytes, k, out + j * k); },
                          cancel);
}

}  // namespace sonde
