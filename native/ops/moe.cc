#include "ops/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <vector>

#include "kernels/moe/moe.h"
#include "ops/step_profile.h"
#include "runtime/cpu.h"

namespace sonde {

namespace {

bool IsBlockType(int32_t t) {
  return t == kernels::kQuantQ8_0 || t == kernels::kQuantQ4_0 || t == kernels::kQuantQ8_0x32;
}

// One variant names the whole layer, whose tensors may be of different types: avx512vnni applies
// to the block types only, the float ones run the plain avx512 kernels.
QuantVariant VariantFor(QuantVariant v, int32_t type) {
  if (v == QuantVariant::kAvx512Vnni && !IsBlockType(type)) v = QuantVariant::kAvx512;
  return ResolveQuantVariant(type, v);
}

kernels::MoeUkernels Ukernels(QuantVariant v) {
#if defined(__x86_64__) || defined(_M_X64)
  if (v == QuantVariant::kAuto) {
    const CpuFeatures& cpu = Cpu();
    v = cpu.Supports(IsaLevel::kAvx512) ? QuantVariant::kAvx512
        : cpu.Supports(IsaLevel::kAvx2)  ? QuantVariant::kAvx2
                                         : QuantVariant::kScalar;
  }
  if (v == QuantVariant::kAvx2) return kernels::MoeUkernelsAvx2();
  if (v == QuantVariant::kAvx512 || v == QuantVariant::kAvx512Vnni) return kernels::MoeUkernelsAvx512();
#endif
  return kernels::MoeUkernelsScalar();
}

unsigned EffectiveThreads(ThreadPool& pool, unsigned threads) {
  const unsigned size = std::max(1u, pool.size());
  return threads == 0 ? size : std::min(threads, size);
}

// y[m x n] = x[m x k] . W^T, W = n rows of k of `type` at w; qs holds the activations' int8 form.
bool Matmul(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, QuantVariant v, const float* x, size_t m,
            size_t k, const uint8_t* w, int32_t type, size_t n, float* y, QuantMatmulScratch* qs) {
  QuantMatmulArgs a;
  a.x = x;
  a.m = m;
  a.k = k;
  a.ldx = k;
  a.w = w;
  a.n = n;
  a.type = type;
  a.y = y;
  a.ldy = n;
  return RunQuantMatmul(pool, threads, cancel, a, VariantFor(v, type), qs);
}

// x's rows (m of k, ldx apart) quantised for the dot kernels of `type` (a single token's products).
bool QuantizeForGemv(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, QuantVariant v, const float* x,
                     size_t m, size_t k, size_t ldx, int32_t type, QuantMatmulScratch* qs) {
  QuantMatmulArgs a;
  a.x = x;
  a.m = m;
  a.k = k;
  a.ldx = ldx;
  a.type = type;
  a.algorithm = QuantAlgorithm::kGemv;
  return QuantizeActivations(pool, threads, cancel, a, VariantFor(v, type), qs);
}

std::string CheckMatrix(const char* name, const uint8_t* data, int32_t type, size_t cols, QuantVariant v) {
  if (!data) return std::string(name) + ": no data";
  if (type < 0 || type >= kernels::kQuantTypeCount) return std::string(name) + ": unknown weight type";
  if (IsBlockType(type) && cols % kernels::kQuantBlock != 0)
    return std::string(name) + ": " + QuantTypeName(type) + " rows need a multiple of 32 elements, got " + std::to_string(cols);
  if (v != QuantVariant::kAuto) {
    bool not_for_type;
    const std::string why = QuantVariantUnavailable(type, v == QuantVariant::kAvx512Vnni && !IsBlockType(type) ? QuantVariant::kAvx512 : v, &not_for_type);
    if (!why.empty()) return std::string(name) + ": " + why;
  }
  return "";
}

std::string CheckExperts(const char* name, const MoeExpertWeights& w, size_t rows, size_t cols, QuantVariant v) {
  std::string why = CheckMatrix(name, w.data, w.type, cols, v);
  if (!why.empty()) return why;
  size_t bytes;
  if (__builtin_mul_overflow(kernels::QuantRowBytes(w.type, cols), rows, &bytes) || w.expert_stride < bytes)
    return std::string(name) + ": expert_stride " + std::to_string(w.expert_stride) + " is below one expert's " +
           std::to_string(rows) + " rows of " + std::to_string(cols) + " " + QuantTypeName(w.type);
  return "";
}

}  // namespace

std::string ValidateMoeLayer(const MoeLayer& l) {
  if (l.d_model == 0 || l.d_ff == 0) return "d_model and d_ff must be positive";
  if (l.n_experts == 0) return "n_experts must be positive";
  if (l.n_experts > static_cast<size_t>(std::numeric_limits<int32_t>::max())) return "n_experts is too large";
  if (l.k == 0 || l.k > l.n_experts)
    return "k must be in [1, n_experts = " + std::to_string(l.n_experts) + "], got " + std::to_string(l.k);
  if (l.scoring != MoeScoring::kSoftmax && l.scoring != MoeScoring::kSigmoid) return "unknown scoring";
  if (!std::isfinite(l.weight_scale)) return "weight_scale must be finite";
  if (l.groups > 1) {
    if (l.n_experts % l.groups != 0)
      return "expert group count " + std::to_string(l.groups) + " does not divide the expert count " + std::to_string(l.n_experts);
    if (l.groups_used == 0 || l.groups_used > l.groups)
      return "expert groups used must be in [1, " + std::to_string(l.groups) + "], got " + std::to_string(l.groups_used);
    if (l.k > l.groups_used * (l.n_experts / l.groups))
      return "k = " + std::to_string(l.k) + " experts do not fit in " + std::to_string(l.groups_used) + " groups of " +
             std::to_string(l.n_experts / l.groups);
  }
  if (!(l.capacity_factor >= 0) || !std::isfinite(l.capacity_factor)) return "capacity_factor must be finite and >= 0";
  std::string why;
  if (!(why = CheckMatrix("router", l.router.data, l.router.type, l.d_model, l.variant)).empty()) return why;
  if (!(why = CheckExperts("gate", l.gate, l.d_ff, l.d_model, l.variant)).empty()) return why;
  if (!(why = CheckExperts("up", l.up, l.d_ff, l.d_model, l.variant)).empty()) return why;
  if (!(why = CheckExperts("down", l.down, l.d_model, l.d_ff, l.variant)).empty()) return why;
  if (l.shared_d_ff > 0) {
    if (!(why = CheckMatrix("shared_gate", l.shared_gate.data, l.shared_gate.type, l.d_model, l.variant)).empty()) return why;
    if (!(why = CheckMatrix("shared_up", l.shared_up.data, l.shared_up.type, l.d_model, l.variant)).empty()) return why;
    if (!(why = CheckMatrix("shared_down", l.shared_down.data, l.shared_down.type, l.shared_d_ff, l.variant)).empty()) return why;
    if (l.shared_gate_inp.data &&
        !(why = CheckMatrix("shared_gate_inp", l.shared_gate_inp.data, l.shared_gate_inp.type, l.d_model, l.variant)).empty())
      return why;
  }
  return "";
}

namespace {

bool RouteTokens(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& l, const float* x,
                 size_t tokens, int32_t* expert_ids, float* expert_weights, float* scores, MoeScratch& s) {
  if (tokens == 0) return true;
  threads = EffectiveThreads(pool, threads);
  const size_t e = l.n_experts, k = l.k;
  s.logits.resize(tokens * e);
  // A decode step's router is a few KiB of weights (8 experts x 1 KiB rows): handing it to a
  // helper costs more than reading it.
  const size_t router_bytes = tokens * e * kernels::QuantRowBytes(l.router.type, l.d_model);
  if (router_bytes < (64u << 10)) threads = 1;
  if (!Matmul(pool, threads, cancel, l.variant, x, tokens, l.d_model, l.router.data, l.router.type, e, s.logits.data(), &s.acts))
    return false;
  if (!scores) {
    s.scores.resize(tokens * e);
    scores = s.scores.data();
  }
  const float* logits = s.logits.data();
  // Group-limited routing (DeepSeek) needs a key per expert to rank groups by.
  if (l.groups > 1) s.keys.resize(tokens * e);
  float* keys = s.keys.data();
  auto route = [&](size_t t) {
    if (l.groups > 1)
      kernels::MoeRouteTokenGrouped(e, k, l.groups, l.groups_used, logits + t * e, static_cast<int32_t>(l.scoring),
                                    l.selection_bias, l.renormalize, l.weight_scale, scores + t * e, keys + t * e,
                                    expert_ids + t * k, expert_weights + t * k);
    else
      kernels::MoeRouteToken(e, k, logits + t * e, static_cast<int32_t>(l.scoring), l.selection_bias, l.renormalize,
                             l.weight_scale, scores + t * e, expert_ids + t * k, expert_weights + t * k);
  };
  if (tokens == 1) {
    route(0);
    return true;
  }
  // Routing is O(E k) per token: chunks of tokens keep ParallelFor's per-index cost small.
  const size_t chunk = 64;
  return pool.ParallelFor((tokens + chunk - 1) / chunk, threads, [&](size_t c) {
    for (size_t t = c * chunk, end = std::min(tokens, t + chunk); t < end; ++t) route(t);
  }, cancel);
}

}  // namespace

bool RunMoeRoute(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& l, const float* x,
                 size_t tokens, int32_t* expert_ids, float* expert_weights, float* scores) {
  MoeScratch s;
  return RouteTokens(pool, threads, cancel, l, x, tokens, expert_ids, expert_weights, scores, s);
}

namespace {

// Splits the product y = x . W^T (W: n rows of k of type) into chunks of rows and appends them.
// The caller sizes chunks to about 8 per thread over the whole phase: enough to balance threads
// whose speed differs (a shared machine); x is quantised once for all of them.
void AddGemv(std::vector<MoeGemvPiece>* pieces, const float* x, size_t k, const uint8_t* w, int32_t type, size_t n,
             float* y, size_t chunk_rows, const QuantMatmulScratch* acts, size_t row0) {
  const size_t row_bytes = kernels::QuantRowBytes(type, k);
  // q8_0x32 is addressed by whole groups of 32 rows.
  if (type == kernels::kQuantQ8_0x32) chunk_rows = (chunk_rows + kernels::kQ8_0x32Rows - 1) / kernels::kQ8_0x32Rows * kernels::kQ8_0x32Rows;
  for (size_t r = 0; r < n; r += chunk_rows) {
    const size_t rows = std::min(chunk_rows, n - r);
    pieces->push_back(MoeGemvPiece{x, k, w + r * row_bytes, type, rows, y + r, acts, row0});
  }
}

bool RunGemvPieces(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, QuantVariant v, MoeScratch& s) {
  const std::vector<MoeGemvPiece>& pieces = s.pieces;
  s.ok.assign(pieces.size(), 1);
  const bool done = pool.ParallelFor(pieces.size(), threads, [&](size_t i) {
    const MoeGemvPiece& p = pieces[i];
    QuantMatmulArgs a;
    a.x = p.x;
    a.m = 1;
    a.k = p.k;
    a.ldx = p.k;
    a.w = p.w;
    a.n = p.n;
    a.type = p.type;
    a.y = p.y;
    a.ldy = p.n;
    a.algorithm = QuantAlgorithm::kGemv;
    s.ok[i] = RunQuantMatmulQuantized(pool, 1, cancel, a, VariantFor(v, p.type), *p.acts, p.row0);
  }, cancel);
  if (!done) return false;
  for (char c : s.ok)
    if (!c) return false;
  return true;
}

// A single token (decode): its k experts' GEMVs are bound by reading their weights, so all of
// them (and the shared expert's) run as one phase of row chunks over every thread, gate and up
// first, then down: two synchronisations instead of three per expert.
bool RunMoeSingleToken(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& l,
                       const kernels::MoeUkernels& uk, const float* x, const int32_t* ids, const float* weights,
                       float* y, MoeScratch& s) {
  const size_t k = l.k, d = l.d_model, f = l.d_ff, sf = l.shared_d_ff;
  s.h.resize(2 * (k * f + sf));
  s.out.resize((k + 1) * d);
  float* g = s.h.data();
  float* u = g + k * f + sf;
  float* out = s.out.data();
  float sgate = 1.0f;
  // Each phase in about 8 chunks per thread: sized from both phases' rows together, the down
  // phase (a third of the rows) got under 3 per thread, and a thread that drew the last one left
  // the other waiting for up to a chunk.
  auto chunk_for = [&](size_t rows) { return std::max<size_t>(16, (rows + 8 * threads - 1) / (8 * threads)); };
  size_t chunk = chunk_for(2 * (k * f + sf));
  // x once per weight type it meets (the tensors of a layer may differ in type).
  bool quantized[kernels::kQuantTypeCount] = {};
  auto x_acts = [&](int32_t type) -> const QuantMatmulScratch* {
    if (!quantized[type]) {
      if (!QuantizeForGemv(pool, threads, cancel, l.variant, x, 1, d, d, type, &s.x_acts[type])) return nullptr;
      quantized[type] = true;
    }
    return &s.x_acts[type];
  };
  const QuantMatmulScratch *xg = x_acts(l.gate.type), *xu = x_acts(l.up.type);
  if (!xg || !xu) return false;
  s.pieces.clear();
  for (size_t j = 0; j < k; ++j) {
    const size_t e = static_cast<size_t>(ids[j]);
    AddGemv(&s.pieces, x, d, l.gate.data + e * l.gate.expert_stride, l.gate.type, f, g + j * f, chunk, xg, 0);
    AddGemv(&s.pieces, x, d, l.up.data + e * l.up.expert_stride, l.up.type, f, u + j * f, chunk, xu, 0);
  }
  if (sf) {
    const QuantMatmulScratch *sxg = x_acts(l.shared_gate.type), *sxu = x_acts(l.shared_up.type);
    if (!sxg || !sxu) return false;
    AddGemv(&s.pieces, x, d, l.shared_gate.data, l.shared_gate.type, sf, g + k * f, chunk, sxg, 0);
    AddGemv(&s.pieces, x, d, l.shared_up.data, l.shared_up.type, sf, u + k * f, chunk, sxu, 0);
    if (l.shared_gate_inp.data) {
      const QuantMatmulScratch* sxi = x_acts(l.shared_gate_inp.type);
      if (!sxi) return false;
      AddGemv(&s.pieces, x, d, l.shared_gate_inp.data, l.shared_gate_inp.type, 1, &sgate, chunk, sxi, 0);
    }
  }
  StepProfile* prof = StepProfileCurrent();
  auto piece_bytes = [&] {
    double b = 0;
    for (const MoeGemvPiece& p : s.pieces) b += static_cast<double>(kernels::QuantRowBytes(p.type, p.k) * p.n);
    return b;
  };
  if (!RunGemvPieces(pool, threads, cancel, l.variant, s)) return false;
  StepProfileMark(prof, kPhaseExpertsUp, prof ? piece_bytes() : 0);
  uk.swiglu(k * f + sf, g, u, g);
  // The k experts' down inputs are the rows of g (f apart): quantised together, row j for expert j.
  if (!QuantizeForGemv(pool, threads, cancel, l.variant, g, k, f, f, l.down.type, &s.h_acts)) return false;
  if (sf && !QuantizeForGemv(pool, threads, cancel, l.variant, g + k * f, 1, sf, sf, l.shared_down.type, &s.shared_h_acts))
    return false;
  s.pieces.clear();
  chunk = chunk_for(k * d + (sf ? d : 0));
  for (size_t j = 0; j < k; ++j) {
    const size_t e = static_cast<size_t>(ids[j]);
    AddGemv(&s.pieces, g + j * f, f, l.down.data + e * l.down.expert_stride, l.down.type, d, out + j * d, chunk, &s.h_acts, j);
  }
  if (sf) AddGemv(&s.pieces, g + k * f, sf, l.shared_down.data, l.shared_down.type, d, out + k * d, chunk, &s.shared_h_acts, 0);
  StepProfileMark(prof, kPhaseExpertsAct);
  if (!RunGemvPieces(pool, threads, cancel, l.variant, s)) return false;
  StepProfileMark(prof, kPhaseExpertsDown, prof ? piece_bytes() : 0);
  std::memset(y, 0, d * sizeof(float));
  for (size_t j = 0; j < k; ++j) uk.scale_add(d, weights[j], out + j * d, y);
  if (sf) uk.scale_add(d, l.shared_gate_inp.data ? 1.0f / (1.0f + std::exp(-sgate)) : 1.0f, out + k * d, y);
  return true;
}

bool RunMoeChecked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& l, const float* x,
                   size_t tokens, float* y, uint64_t* expert_counts, uint64_t* dropped, MoeScratch& s) {
  const size_t n_exp = l.n_experts, k = l.k, d = l.d_model, f = l.d_ff;
  threads = EffectiveThreads(pool, threads);
  const unsigned nthreads = threads;
  const kernels::MoeUkernels uk = Ukernels(l.variant);

  s.ids.resize(tokens * k);
  s.weights.resize(tokens * k);
  const int32_t* ids = s.ids.data();
  const float* weights = s.weights.data();
  if (!RouteTokens(pool, threads, cancel, l, x, tokens, s.ids.data(), s.weights.data(), nullptr, s)) return false;
  StepProfileMark(StepProfileCurrent(), kPhaseRouter,
                  static_cast<double>(kernels::QuantRowBytes(l.router.type, d) * n_exp));

  // Group the (token, slot) pairs by expert, in token order so that a capacity limit keeps the
  // earliest tokens and the result does not depend on thread timing.
  s.routed.assign(n_exp, 0);
  for (size_t i = 0; i < tokens * k; ++i) ++s.routed[static_cast<size_t>(ids[i])];
  size_t capacity = std::numeric_limits<size_t>::max();
  if (l.capacity_factor > 0) {
    const double c = std::ceil(static_cast<double>(l.capacity_factor) * static_cast<double>(tokens * k) / static_cast<double>(n_exp));
    capacity = c >= static_cast<double>(tokens) ? tokens : static_cast<size_t>(c);
  }
  std::vector<size_t>& rows = s.rows;
  std::vector<size_t>& offset = s.offset;
  rows.assign(n_exp, 0);
  offset.assign(n_exp + 1, 0);
  uint64_t drops = 0;
  for (size_t e = 0; e < n_exp; ++e) {
    rows[e] = std::min(s.routed[e], capacity);
    drops += s.routed[e] - rows[e];
    offset[e + 1] = offset[e] + rows[e];
    if (expert_counts) expert_counts[e] += s.routed[e];
  }
  if (dropped) *dropped += drops;
  // One token never exceeds a capacity (ceil of a positive number, and its k experts differ).
  if (tokens == 1) return RunMoeSingleToken(pool, threads, cancel, l, uk, x, ids, weights, y, s);
  const size_t total = offset[n_exp];
  s.row_of.assign(tokens * k, -1);
  const int64_t* row_of = s.row_of.data();
  s.fill.assign(n_exp, 0);
  for (size_t i = 0; i < tokens * k; ++i) {
    const size_t e = static_cast<size_t>(ids[i]);
    if (s.fill[e] < rows[e]) s.row_of[i] = static_cast<int64_t>(offset[e] + s.fill[e]++);
  }

  // Each expert's rows gathered contiguously, so that its GEMM streams its weights once for the
  // whole group.
  s.xg.resize(total * d);
  float* xg = s.xg.data();
  {
    const bool ok = pool.ParallelFor(tokens, threads, [&](size_t t) {
      for (size_t j = 0; j < k; ++j) {
        const int64_t r = row_of[t * k + j];
        if (r >= 0) std::memcpy(xg + static_cast<size_t>(r) * d, x + t * d, d * sizeof(float));
      }
    }, cancel);
    if (!ok) return false;
  }
  s.hg.resize(total * f);
  s.hu.resize(total * f);
  s.yo.resize(total * d);
  if (s.expert_acts.size() < n_exp) s.expert_acts.resize(n_exp);

  // Each expert's gate, up and down products through RunQuantMatmul, which takes the blocked GEMM
  // for groups of kQuantGemmMinRows rows and more.
  auto run_expert = [&](size_t e, unsigned thr) -> bool {
    const size_t m = rows[e], off = offset[e];
    if (m == 0) return true;
    QuantMatmulScratch* qs = &s.expert_acts[e];
    const float* xe = xg + off * d;
    float* g = s.hg.data() + off * f;
    float* u = s.hu.data() + off * f;
    if (!Matmul(pool, thr, cancel, l.variant, xe, m, d, l.gate.data + e * l.gate.expert_stride, l.gate.type, f, g, qs)) return false;
    if (!Matmul(pool, thr, cancel, l.variant, xe, m, d, l.up.data + e * l.up.expert_stride, l.up.type, f, u, qs)) return false;
    uk.swiglu(m * f, g, u, g);
    return Matmul(pool, thr, cancel, l.variant, g, m, f, l.down.data + e * l.down.expert_stride, l.down.type, d,
                  s.yo.data() + off * d, qs);
  };

  // Threads by work. A group holding more than one thread's share of the rows runs alone over all
  // threads, its GEMMs split over N. The rest run side by side, one expert per thread: small GEMMs split over threads would
  // spend more on synchronisation than on arithmetic, and each expert's weights are read once.
  std::vector<size_t>& wide = s.wide;
  std::vector<size_t>& narrow = s.narrow;
  wide.clear();
  narrow.clear();
  for (size_t e = 0; e < n_exp; ++e) {
    if (rows[e] == 0) continue;
    const bool big = rows[e] * nthreads > total;
    (big ? wide : narrow).push_back(e);
  }
  if (narrow.size() < nthreads) {
    wide.insert(wide.end(), narrow.begin(), narrow.end());
    narrow.clear();
  }
  for (size_t e : wide)
    if (!run_expert(e, threads)) return false;
  if (!narrow.empty()) {
    // Largest groups first, so the last ones to start are short.
    std::stable_sort(narrow.begin(), narrow.end(), [&](size_t a, size_t b) { return rows[a] > rows[b]; });
    s.ok.assign(narrow.size(), 1);
    const bool done = pool.ParallelFor(narrow.size(), threads, [&](size_t i) { s.ok[i] = run_expert(narrow[i], 1); }, cancel);
    if (!done) return false;
    for (char c : s.ok)
      if (!c) return false;
  }

  // A prefill's experts, gate/up/down together, under one phase.
  if (StepProfile* prof = StepProfileCurrent()) {
    size_t used = 0;
    for (size_t e = 0; e < n_exp; ++e) used += rows[e] > 0;
    StepProfileMark(prof, kPhaseExpertsUp, static_cast<double>(used * (l.gate.expert_stride + l.up.expert_stride + l.down.expert_stride)));
  }
  // Shared expert on every token, its output gated per token.
  const bool shared = l.shared_d_ff > 0, shared_gate = shared && l.shared_gate_inp.data;
  if (shared) {
    const size_t sf = l.shared_d_ff;
    s.sg.resize(tokens * sf);
    s.su.resize(tokens * sf);
    s.so.resize(tokens * d);
    if (!Matmul(pool, threads, cancel, l.variant, x, tokens, d, l.shared_gate.data, l.shared_gate.type, sf, s.sg.data(), &s.acts) ||
        !Matmul(pool, threads, cancel, l.variant, x, tokens, d, l.shared_up.data, l.shared_up.type, sf, s.su.data(), &s.acts))
      return false;
    uk.swiglu(tokens * sf, s.sg.data(), s.su.data(), s.sg.data());
    if (!Matmul(pool, threads, cancel, l.variant, s.sg.data(), tokens, sf, l.shared_down.data, l.shared_down.type, d, s.so.data(), &s.acts))
      return false;
    if (shared_gate) {
      s.sgate.resize(tokens);
      if (!Matmul(pool, threads, cancel, l.variant, x, tokens, d, l.shared_gate_inp.data, l.shared_gate_inp.type, 1, s.sgate.data(), &s.acts))
        return false;
      for (size_t t = 0; t < tokens; ++t) s.sgate[t] = 1.0f / (1.0f + std::exp(-s.sgate[t]));
    }
  }

  // Weighted scatter-add in slot order (llama.cpp's order: the experts' sum, then the shared
  // expert); one token per task, so no two threads write the same row.
  return pool.ParallelFor(tokens, threads, [&](size_t t) {
    float* yt = y + t * d;
    std::memset(yt, 0, d * sizeof(float));
    for (size_t j = 0; j < k; ++j) {
      const int64_t r = row_of[t * k + j];
      if (r >= 0) uk.scale_add(d, weights[t * k + j], s.yo.data() + static_cast<size_t>(r) * d, yt);
    }
    if (shared) uk.scale_add(d, shared_gate ? s.sgate[t] : 1.0f, s.so.data() + t * d, yt);
  }, cancel);
}

}  // namespace

bool RunMoe(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& layer, const float* x,
            size_t tokens, float* y, uint64_t* expert_counts, std::string* error, uint64_t* dropped) {
  return RunMoe(pool, threads, cancel, layer, x, tokens, y, expert_counts, error, dropped, nullptr);
}

bool RunMoe(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const MoeLayer& layer, const float* x,
            size_t tokens, float* y, uint64_t* expert_counts, std::string* error, uint64_t* dropped,
            MoeScratch* scratch) {
  const std::string why = ValidateMoeLayer(layer);
  if (!why.empty()) {
    if (error) *error = "MoE layer: " + why;
    return false;
  }
  if (tokens == 0) return true;
  try {
    MoeScratch local;
    if (RunMoeChecked(pool, threads, cancel, layer, x, tokens, y, expert_counts, dropped, scratch ? *scratch : local))
      return true;
    if (error) *error = "cancelled";
  } catch (const std::bad_alloc&) {
    if (error) *error = "MoE layer: out of memory for the work buffers of " + std::to_string(tokens) + " tokens";
  } catch (const std::exception& e) {
    if (error) *error = std::string("MoE layer: ") + e.what();
  }
  return false;
}

}  // namespace sonde
