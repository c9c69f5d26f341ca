#include "runtime/plan.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <initializer_list>
#include <new>
#include <utility>

#include "ops/gemv_skip.h"

namespace sonde {

namespace {

// Enough for concurrent runs on a few cores without holding many arenas of a large model idle.
constexpr size_t kMaxIdleArenas = 4;
constexpr size_t kArenaAlign = 64;
// A matmul walk is its batch dims plus the two matrix dims.
constexpr size_t kMaxWalkRank = kMaxRank + 2;

using Wide = __int128;

struct Walk {
  size_t rank = 0;
  size_t dims[kMaxWalkRank] = {};
  ptrdiff_t strides[kMaxWalkRank] = {};
};

Walk ContiguousWalk(size_t count) {
  Walk w;
  w.rank = 1;
  w.dims[0] = count;
  w.strides[0] = 1;
  return w;
}

Walk StridedWalk(const size_t* dims, const ptrdiff_t* strides, size_t rank) {
  Walk w;
  w.rank = rank;
  for (size_t i = 0; i < rank; ++i) {
    w.dims[i] = dims[i];
    w.strides[i] = strides[i];
  }
  return w;
}

bool IsElemBytes(size_t b) { return b == 1 || b == 2 || b == 4 || b == 8; }

// Checks one step against the buffers; the first problem found is kept in error().
class StepValidator {
 public:
  // align[b] is raised to the largest element size any step reads or writes buffer b with.
  StepValidator(const std::vector<PlanBufferDesc>& buffers, std::vector<size_t>& align)
      : buffers_(buffers), align_(align) {}

  const std::string& error() const { return error_; }
  bool ok() const { return error_.empty(); }
  void Fail(const std::string& why) {
    if (error_.empty()) error_ = why;
  }

  // Product of sizes; an overflow fails the step (and returns 0 so later checks stay harmless).
  size_t Product(std::initializer_list<size_t> xs) {
    size_t p = 1;
    for (size_t x : xs) {
      if (__builtin_mul_overflow(p, x, &p)) {
        Fail("sizes overflow");
        return 0;
      }
    }
    return p;
  }

  void Read(PlanRef& r, size_t elem, const Walk& w, const char* what) { Check(r, elem, w, false, what); }
  void Write(PlanRef& r, size_t elem, const Walk& w, const char* what) { Check(r, elem, w, true, what); }
  void ReadOptional(PlanRef& r, size_t elem, const Walk& w, const char* what) {
    if (r.present()) Read(r, elem, w, what);
  }

 private:
  // The walk touches offset + sum_i j_i * stride_i for j_i < dims_i: its lowest and highest
  // elements come from taking, per dim, 0 or dims-1 by the sign of the stride.
  void Check(PlanRef& r, size_t elem, const Walk& w, bool write, const char* what) {
    if (!r.present()) return Fail(std::string(what) + " is missing");
    if (r.buffer >= buffers_.size())
      return Fail(std::string(what) + " refers to buffer " + std::to_string(r.buffer) + " of " +
                  std::to_string(buffers_.size()));
    const PlanBufferDesc& b = buffers_[r.buffer];
    if (elem > align_[r.buffer]) align_[r.buffer] = elem;
    if (write && (b.kind == PlanBufferKind::kInput || b.kind == PlanBufferKind::kConst || b.kind == PlanBufferKind::kDevice))
      return Fail(std::string(what) + " writes buffer " + std::to_string(r.buffer) + ", which is " +
                  (b.kind == PlanBufferKind::kInput ? "an input" : "a constant") + " (read-only)");
    Wide lo = static_cast<Wide>(r.offset), hi = lo;
    for (size_t i = 0; i < w.rank; ++i) {
      if (w.dims[i] == 0) {
        r.byte_offset = r.offset * elem;
        return;  // touches nothing
      }
      const Wide span = static_cast<Wide>(w.dims[i] - 1) * w.strides[i];
      (span < 0 ? lo : hi) += span;
    }
    if (lo < 0 || (hi + 1) * static_cast<Wide>(elem) > static_cast<Wide>(b.bytes))
      return Fail(std::string(what) + " reaches elements [" + std::to_string(static_cast<long long>(lo)) + ", " +
                  std::to_string(static_cast<long long>(hi)) + "] of buffer " + std::to_string(r.buffer) + ", which holds " +
                  std::to_string(b.bytes / elem) + " of " + std::to_string(elem) + " bytes");
    r.byte_offset = r.offset * elem;
  }

  const std::vector<PlanBufferDesc>& buffers_;
  std::vector<size_t>& align_;
  std::string error_;
};

bool IsIntegerArith(ElemType t) { return t == ElemType::kFloat32 || t == ElemType::kInt64 || t == ElemType::kInt32; }

void ValidateConv(StepValidator& v, PlanStep& s) {
  if (!s.conv) return v.Fail("no convolution");
  const ConvSpec& spec = s.conv->spec();
  WindowShape ws;
  const std::string e = ResolveWindow(spec.window, s.h, s.w, &ws);
  if (!e.empty()) return v.Fail(e);
  const size_t y = v.Product({s.n, spec.c_out, ws.oh, ws.ow});
  const BlockedLayout &xl = s.blocked[0], &rl = s.blocked[1], &yl = s.blocked[2];
  if (!xl.present() && !(yl.present() && s.conv->blocked_y_from_nchw())) {
    if (rl.present() || yl.present()) return v.Fail("a blocked residual or y needs a blocked x");
    v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.n, spec.c_in, s.h, s.w})), "x");
    v.ReadOptional(s.in[1], 4, ContiguousWalk(y), "residual");
    v.Write(s.out[0], 4, ContiguousWalk(y), "y");
    return;
  }
  if (s.in[1].present() && rl.present() != yl.present()) return v.Fail("the residual must be blocked exactly when y is");
  const std::string why = s.conv->CheckBlocked(s.h, s.w, xl, yl.present() ? &yl : nullptr, rl.present() ? &rl : nullptr);
  if (!why.empty()) return v.Fail(why);
  const size_t cin_blocks = kernels::NchwcBlocks(spec.c_in), cout_blocks = kernels::NchwcBlocks(spec.c_out);
  if (xl.present()) v.Read(s.in[0], xl.elem_bytes(), ContiguousWalk(v.Product({s.n, cin_blocks, xl.block_floats()})), "x");
  else v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.n, spec.c_in, s.h, s.w})), "x");
  const size_t yb = yl.present() ? v.Product({s.n, cout_blocks, yl.block_floats()}) : y;
  if (s.in[1].present()) v.Read(s.in[1], 4, ContiguousWalk(rl.present() ? v.Product({s.n, cout_blocks, rl.block_floats()}) : y), "residual");
  v.Write(s.out[0], yl.present() ? yl.elem_bytes() : 4, ContiguousWalk(yb), "y");
}

void ValidateConvChain(StepValidator& v, PlanStep& s) {
  if (!s.chain) return v.Fail("no conv chain");
  const BlockedLayout &xl = s.blocked[0], &rl = s.blocked[1], &yl = s.blocked[2];
  if (!xl.present() || !yl.present()) return v.Fail("a conv chain's x and y are blocked");
  if (s.in[1].present() != rl.present()) return v.Fail("the residual must be blocked");
  const std::string why = s.chain->Check(s.h, s.w, xl, yl, rl.present() ? &rl : nullptr);
  if (!why.empty()) return v.Fail(why);
  const ConvChain& c = *s.chain;
  const size_t x_blocks = kernels::NchwcBlocks(c.expand ? c.expand->spec().c_in : c.depthwise->spec().c_in);
  const size_t y_blocks = kernels::NchwcBlocks(c.project->spec().c_out);
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.n, x_blocks, xl.block_floats()})), "x");
  if (s.in[1].present()) v.Read(s.in[1], 4, ContiguousWalk(v.Product({s.n, y_blocks, rl.block_floats()})), "residual");
  v.Write(s.out[0], 4, ContiguousWalk(v.Product({s.n, y_blocks, yl.block_floats()})), "y");
}

void ValidateReorder(StepValidator& v, PlanStep& s) {
  const BlockedLayout& l = s.blocked[0];
  if (!l.present() || l.w == 0) return v.Fail("needs a blocked layout with a non-empty interior");
  if (l.bf16) return v.Fail("reorders are float32 (a bf16 layout is for bf16 direct convs only)");
  const size_t nchw = v.Product({s.n, s.count, l.h, l.w});
  const size_t blocked = v.Product({s.n, kernels::NchwcBlocks(s.count), l.block_floats()});
  v.Read(s.in[0], 4, ContiguousWalk(s.flag ? nchw : blocked), "x");
  v.Write(s.out[0], 4, ContiguousWalk(s.flag ? blocked : nchw), "y");
}

void ValidateGemm(StepValidator& v, PlanStep& s) {
  if (!s.gemm == !s.gemm_lowp) return v.Fail("needs exactly one packed weights handle");
  const size_t wk = s.gemm ? s.gemm->k() : s.gemm_lowp->k(), wn = s.gemm ? s.gemm->n() : s.gemm_lowp->n();
  if (wk != s.k || wn != s.n)
    return v.Fail("weights are " + std::to_string(wk) + " x " + std::to_string(wn) + ", the step says k = " +
                  std::to_string(s.k) + ", n = " + std::to_string(s.n));
  if (s.kind < 0 || s.kind >= kernels::kActCount) return v.Fail("unknown activation");
  const size_t c = v.Product({s.m, s.n});
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.m, s.k})), "a");
  v.ReadOptional(s.in[1], 4, ContiguousWalk(s.n), "bias");
  v.ReadOptional(s.in[2], 4, ContiguousWalk(c), "residual");
  v.Write(s.out[0], 4, ContiguousWalk(c), "c");
}

void ValidateSpmm(StepValidator& v, PlanStep& s) {
  if (!s.sparse) return v.Fail("needs a sparse weights handle");
  if (s.sparse->k() != s.k || s.sparse->n() != s.n)
    return v.Fail("sparse weights are " + std::to_string(s.sparse->k()) + " x " + std::to_string(s.sparse->n()) +
                  ", the step says k = " + std::to_string(s.k) + ", n = " + std::to_string(s.n));
  if (s.gemm && (s.m != 1 || s.gemm->k() != s.k || s.gemm->n() != s.n))
    return v.Fail("skipWeights must be the layer's k x n weights, for m = 1 only");
  if (s.kind < 0 || s.kind >= kernels::kActCount) return v.Fail("unknown activation");
  const ptrdiff_t* as = s.strides[0];
  const ptrdiff_t* cs = s.strides[1];
  for (size_t i = 0; i < 3; ++i)
    if (as[i] < 0 || cs[i] < 0) return v.Fail("aStrides and cStrides must not be negative");
  const bool rows = as[2] == 1 && cs[2] == 1, columns = as[1] == 1 && cs[1] == 1;
  // Distinct outputs must not share an element (pool threads write them concurrently).
  if (rows && !(static_cast<size_t>(cs[1]) >= s.n || s.m <= 1))
    return v.Fail("row-major c needs cStrides[1] >= n");
  if (!rows && columns) {
    if (s.sparse->format() != SparseFormat::kCsr) return v.Fail("column-major a and c need CSR weights");
    if (s.gemm) return v.Fail("skipWeights is for row-major a and c only");
    if (!(static_cast<size_t>(cs[2]) >= s.m || s.n <= 1)) return v.Fail("column-major c needs cStrides[2] >= m");
  }
  if (!rows && !columns)
    return v.Fail("a and c must both be row-major (aStrides[2] = cStrides[2] = 1) or both column-major "
                  "(aStrides[1] = cStrides[1] = 1)");
  if (s.taps.present) {
    // (With m = 1 the strides also read as row-major; taps decide.)
    if (!columns) return v.Fail("a direct convolution (taps) writes column-major c");
    if (s.sparse->format() != SparseFormat::kCsr) return v.Fail("a direct convolution (taps) needs CSR weights");
    if (s.gemm) return v.Fail("skipWeights is for row-major a and c only");
    if (!(static_cast<size_t>(cs[2]) >= s.m || s.n <= 1)) return v.Fail("column-major c needs cStrides[2] >= m");
    PlanStep::SpmmTaps& g = s.taps;
    if (g.kh == 0 || g.kw == 0 || g.c_in == 0 || g.sh == 0 || g.sw == 0 || g.dh == 0 || g.dw == 0 || g.oh == 0 ||
        g.ow == 0 || g.hp == 0 || g.wp == 0)
      return v.Fail("taps need non-zero cIn, hp, wp, kh, kw, sh, sw, dh, dw, oh and ow");
    if (!g.phased && g.sw != 1) return v.Fail("taps: a stride along rows (sw > 1) needs the phased layout");
    if (v.Product({g.c_in, g.kh, g.kw}) != s.k) return v.Fail("taps: cIn * kh * kw must equal k");
    if (v.Product({g.oh, g.ow}) != s.m) return v.Fail("taps: oh * ow must equal m");
    // Each tap's offset in a channel's plane, and the step between output rows.
    const size_t hq = g.phased ? (g.hp + g.sh - 1) / g.sh : g.hp, wq = g.phased ? (g.wp + g.sw - 1) / g.sw : g.wp;
    // Every size below is bounded by the plane once these hold (k = c_in * kh * kw already is).
    const size_t plane = v.Product({g.phased ? v.Product({g.sh, g.sw}) : 1, hq, wq});
    const size_t image = v.Product({g.c_in, plane});
    if (!v.ok()) return;
    if (image > 0xFFFFFFFFu) return v.Fail("taps: the padded image exceeds 2^32 elements");
    const size_t last_y = v.Product({g.kh - 1, g.dh}), last_x = v.Product({g.kw - 1, g.dw});
    if (!v.ok() || last_y >= g.hp || last_x >= g.wp) return v.Fail("taps: the kernel reaches past the padded image");
    g.row_stride = g.phased ? wq : v.Product({g.sh, g.wp});
    std::vector<size_t> tap_offset(g.kh * g.kw);
    size_t last_tap = 0;
    for (size_t ky = 0; ky < g.kh; ++ky) {
      for (size_t kx = 0; kx < g.kw; ++kx) {
        const size_t y = ky * g.dh, x = kx * g.dw;  // < hp, < wp: no overflow
        const size_t off = g.phased ? ((y % g.sh) * g.sw + x % g.sw) * hq * wq + y / g.sh * wq + x / g.sw : y * g.wp + x;
        tap_offset[ky * g.kw + kx] = off;
        last_tap = std::max(last_tap, off);
      }
    }
    // Bounds on the last element read in a plane; a row wider than the image's reads on into the
    // next rows (one long row computes several narrow ones at once, the positions across row ends
    // discarded by the caller). Each term is checked against the plane so the sum cannot wrap.
    const size_t rows_span = v.Product({g.oh - 1, g.row_stride});
    if (!v.ok() || rows_span >= plane || g.ow > plane || last_tap + rows_span + g.ow - 1 >= plane)
      return v.Fail("taps: the output window reaches past the padded image");
    if (s.outer > 1 && static_cast<size_t>(cs[0]) < (s.n - 1) * cs[2] + s.m)
      return v.Fail("cStrides[0] overlaps the batch's outputs");
    const size_t a_dims[2] = {s.outer, image}, c_dims[3] = {s.outer, s.m, s.n};
    const ptrdiff_t a_strides[2] = {as[0], 1};
    v.Read(s.in[0], 4, StridedWalk(a_dims, a_strides, 2), "a");
    v.ReadOptional(s.in[1], 4, ContiguousWalk(s.n), "bias");
    v.ReadOptional(s.in[2], 4, StridedWalk(c_dims, cs, 3), "residual");
    v.Write(s.out[0], 4, StridedWalk(c_dims, cs, 3), "c");
    s.tap_offsets = std::make_shared<const std::vector<uint32_t>>(SpmmConvTapOffsets(*s.sparse, tap_offset, plane));
    return;
  }
  if (s.outer > 1) {
    const size_t c_item = rows ? (s.m - 1) * cs[1] + s.n : (s.n - 1) * cs[2] + s.m;
    if (s.m && s.n && static_cast<size_t>(cs[0]) < c_item) return v.Fail("cStrides[0] overlaps the batch's outputs");
  }
  const size_t a_dims[3] = {s.outer, s.m, s.k}, c_dims[3] = {s.outer, s.m, s.n};
  v.Read(s.in[0], 4, StridedWalk(a_dims, as, 3), "a");
  v.ReadOptional(s.in[1], 4, ContiguousWalk(s.n), "bias");
  v.ReadOptional(s.in[2], 4, StridedWalk(c_dims, cs, 3), "residual");
  v.Write(s.out[0], 4, StridedWalk(c_dims, cs, 3), "c");
}

void ValidateMatMul(StepValidator& v, PlanStep& s) {
  const size_t rank = s.shape.rank;
  Walk a = StridedWalk(s.shape.dims, s.strides[0], rank), b = StridedWalk(s.shape.dims, s.strides[1], rank);
  a.rank = b.rank = rank + 2;
  a.dims[rank] = s.m;
  a.dims[rank + 1] = s.k;
  a.strides[rank] = static_cast<ptrdiff_t>(s.k);
  a.strides[rank + 1] = 1;
  // b[i] is [k][n], or [n][k] when transB.
  b.dims[rank] = s.flag ? s.n : s.k;
  b.dims[rank + 1] = s.flag ? s.k : s.n;
  b.strides[rank] = static_cast<ptrdiff_t>(b.dims[rank + 1]);
  b.strides[rank + 1] = 1;
  size_t batch = 1;
  for (size_t i = 0; i < rank; ++i) batch = v.Product({batch, s.shape.dims[i]});
  v.Read(s.in[0], 4, a, "a");
  v.Read(s.in[1], 4, b, "b");
  v.Write(s.out[0], 4, ContiguousWalk(v.Product({batch, s.m, s.n})), "c");
}

void ValidateUnary(StepValidator& v, PlanStep& s) {
  const auto kind = static_cast<UnaryKind>(s.kind);
  const bool ok = kind == UnaryKind::kNot ? s.dtype == ElemType::kBool
                  : (kind == UnaryKind::kNeg || kind == UnaryKind::kAbs) ? IsIntegerArith(s.dtype)
                                                                         : s.dtype == ElemType::kFloat32;
  if (!ok) return v.Fail("this unary kind does not take this dtype");
  const size_t eb = ElemBytes(s.dtype);
  v.Read(s.in[0], eb, ContiguousWalk(s.count), "x");
  v.Write(s.out[0], eb, ContiguousWalk(s.count), "y");
}

void ValidateBinary(StepValidator& v, PlanStep& s) {
  const auto kind = static_cast<BinaryKind>(s.kind);
  const bool logical = kind == BinaryKind::kAnd || kind == BinaryKind::kOr;
  const bool compare = kind == BinaryKind::kEqual || kind == BinaryKind::kLess || kind == BinaryKind::kGreater;
  if (logical ? s.dtype != ElemType::kBool : !IsIntegerArith(s.dtype))
    return v.Fail("this binary kind does not take this dtype");
  const size_t eb = ElemBytes(s.dtype), rank = s.shape.rank;
  size_t count = 1;
  for (size_t i = 0; i < rank; ++i) count = v.Product({count, s.shape.dims[i]});
  v.Read(s.in[0], eb, StridedWalk(s.shape.dims, s.strides[0], rank), "a");
  v.Read(s.in[1], eb, StridedWalk(s.shape.dims, s.strides[1], rank), "b");
  v.Write(s.out[0], compare || logical ? 1 : eb, ContiguousWalk(count), "y");
}

void ValidateWhere(StepValidator& v, PlanStep& s) {
  if (!IsElemBytes(s.elem_bytes)) return v.Fail("elemBytes must be 1, 2, 4 or 8");
  const size_t rank = s.shape.rank;
  size_t count = 1;
  for (size_t i = 0; i < rank; ++i) count = v.Product({count, s.shape.dims[i]});
  v.Read(s.in[0], 1, StridedWalk(s.shape.dims, s.strides[0], rank), "cond");
  v.Read(s.in[1], s.elem_bytes, StridedWalk(s.shape.dims, s.strides[1], rank), "x");
  v.Read(s.in[2], s.elem_bytes, StridedWalk(s.shape.dims, s.strides[2], rank), "y");
  v.Write(s.out[0], s.elem_bytes, ContiguousWalk(count), "out");
}

void ValidateCopy(StepValidator& v, PlanStep& s) {
  if (!IsElemBytes(s.elem_bytes)) return v.Fail("elemBytes must be 1, 2, 4 or 8");
  v.Read(s.in[0], s.elem_bytes, StridedWalk(s.shape.dims, s.strides[0], s.shape.rank), "x");
  v.Write(s.out[0], s.elem_bytes, StridedWalk(s.shape.dims, s.strides[1], s.shape.rank), "y");
}

void ValidateGather(StepValidator& v, PlanStep& s) {
  if (!IsElemBytes(s.elem_bytes)) return v.Fail("elemBytes must be 1, 2, 4 or 8");
  if (s.dtype_to != ElemType::kInt64 && s.dtype_to != ElemType::kInt32) return v.Fail("indices must be int64 or int32");
  v.Read(s.in[0], s.elem_bytes, ContiguousWalk(v.Product({s.outer, s.mid, s.inner})), "data");
  v.Read(s.in[1], ElemBytes(s.dtype_to), ContiguousWalk(s.count), "indices");
  v.Write(s.out[0], s.elem_bytes, ContiguousWalk(v.Product({s.outer, s.count, s.inner})), "y");
}

void ValidatePool(StepValidator& v, PlanStep& s) {
  if (s.kind != 0 && s.kind != 1) return v.Fail("pool kind must be 0 (max) or 1 (average)");
  WindowShape ws;
  const std::string e = ResolveWindow(s.window, s.h, s.w, &ws);
  if (!e.empty()) return v.Fail(e);
  const BlockedLayout &xl = s.blocked[0], &yl = s.blocked[2];
  if (xl.present() != yl.present()) return v.Fail("x and y must both be blocked or both NCHW");
  if (xl.present()) {
    if (s.outer % kernels::kNchwcBlock) return v.Fail("a blocked pool needs planes in whole blocks of 16");
    const std::string why = CheckPoolBlocked(s.h, s.w, s.window, xl, yl);
    if (!why.empty()) return v.Fail(why);
    const size_t blocks = s.outer / kernels::kNchwcBlock;
    v.Read(s.in[0], 4, ContiguousWalk(v.Product({blocks, xl.block_floats()})), "x");
    v.Write(s.out[0], 4, ContiguousWalk(v.Product({blocks, yl.block_floats()})), "y");
    return;
  }
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.outer, s.h, s.w})), "x");
  v.Write(s.out[0], 4, ContiguousWalk(v.Product({s.outer, ws.oh, ws.ow})), "y");
}

void ValidateGlobalAveragePool(StepValidator& v, PlanStep& s) {
  if (s.inner == 0) return v.Fail("hw must be >= 1");
  const BlockedLayout& l = s.blocked[0];
  if (l.bf16) return v.Fail("a blocked x must be float32");
  if (l.present() && (s.outer % kernels::kNchwcBlock || l.h * l.w != s.inner))
    return v.Fail("a blocked x needs planes in whole blocks of 16 and an interior of hw pixels");
  v.Read(s.in[0], 4, ContiguousWalk(l.present() ? v.Product({s.outer / kernels::kNchwcBlock, l.block_floats()})
                                                 : v.Product({s.outer, s.inner})), "x");
  v.Write(s.out[0], 4, ContiguousWalk(s.outer), "y");
}

void ValidateSoftmax(StepValidator& v, PlanStep& s) {
  const size_t count = v.Product({s.outer, s.mid, s.inner});
  v.Read(s.in[0], 4, ContiguousWalk(count), "x");
  v.Write(s.out[0], 4, ContiguousWalk(count), "y");
  s.dims3 = {s.outer, s.mid, s.inner};
}

void ValidateLayerNorm(StepValidator& v, PlanStep& s) {
  if (s.inner == 0 && s.outer != 0) return v.Fail("cols must be >= 1");
  const size_t count = v.Product({s.outer, s.inner});
  v.Read(s.in[0], 4, ContiguousWalk(count), "x");
  v.ReadOptional(s.in[1], 4, ContiguousWalk(s.inner), "scale");
  v.ReadOptional(s.in[2], 4, ContiguousWalk(s.inner), "bias");
  v.Write(s.out[0], 4, ContiguousWalk(count), "y");
}

void ValidateChannelAffine(StepValidator& v, PlanStep& s) {
  const size_t count = v.Product({s.outer, s.mid, s.inner});
  v.Read(s.in[0], 4, ContiguousWalk(count), "x");
  v.Read(s.in[1], 4, ContiguousWalk(s.mid), "scale");
  v.Read(s.in[2], 4, ContiguousWalk(s.mid), "shift");
  v.Write(s.out[0], 4, ContiguousWalk(count), "y");
}

void ValidateReduce(StepValidator& v, PlanStep& s) {
  const auto kind = static_cast<ReduceKind>(s.kind);
  if (!(s.dtype == ElemType::kFloat32 || (s.dtype == ElemType::kInt64 && kind != ReduceKind::kMean)))
    return v.Fail("reduce takes float32 (sum, mean, max, min) or int64 (sum, max, min)");
  if (s.mid == 0 && (kind == ReduceKind::kMax || kind == ReduceKind::kMin) && s.outer * s.inner != 0)
    return v.Fail("max/min over an empty axis");
  const size_t eb = ElemBytes(s.dtype);
  v.Read(s.in[0], eb, ContiguousWalk(v.Product({s.outer, s.mid, s.inner})), "x");
  v.Write(s.out[0], eb, ContiguousWalk(v.Product({s.outer, s.inner})), "y");
}

void ValidateArgMax(StepValidator& v, PlanStep& s) {
  const size_t count = v.Product({s.outer, s.inner});
  if (s.mid == 0 && count != 0) return v.Fail("argmax over an empty axis");
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.outer, s.mid, s.inner})), "x");
  v.Write(s.out[0], 8, ContiguousWalk(count), "y");
}

void ValidateTopK(StepValidator& v, PlanStep& s) {
  if (s.k > s.mid) return v.Fail("k = " + std::to_string(s.k) + " exceeds the axis length " + std::to_string(s.mid));
  const size_t count = v.Product({s.outer, s.k, s.inner});
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.outer, s.mid, s.inner})), "x");
  v.Write(s.out[0], 4, ContiguousWalk(count), "values");
  v.Write(s.out[1], 8, ContiguousWalk(count), "indices");
  s.dims3 = {s.outer, s.mid, s.inner};
}

void ValidateCast(StepValidator& v, PlanStep& s) {
  v.Read(s.in[0], ElemBytes(s.dtype), ContiguousWalk(s.count), "x");
  v.Write(s.out[0], ElemBytes(s.dtype_to), ContiguousWalk(s.count), "y");
}

// Output dims of a pad; negative pads crop. Reflect needs each pad smaller than the (cropped) axis,
// edge needs a non-empty axis to repeat.
void ValidatePad(StepValidator& v, PlanStep& s) {
  const auto mode = static_cast<PadMode>(s.kind);
  size_t in = 1, out = 1;
  for (size_t i = 0; i < s.shape.rank; ++i) {
    const Wide d = s.shape.dims[i], b = s.pad_begin[i], e = s.pad_end[i];
    const Wide kept = d + (b < 0 ? b : 0) + (e < 0 ? e : 0);
    if (kept < 0 || d + b + e < 0) return v.Fail("pads crop more than axis " + std::to_string(i) + " holds");
    const Wide grow = (b > 0 ? b : 0) > (e > 0 ? e : 0) ? (b > 0 ? b : 0) : (e > 0 ? e : 0);
    if (mode == PadMode::kReflect && grow > 0 && grow >= kept)
      return v.Fail("reflect pads must be smaller than axis " + std::to_string(i));
    if (mode == PadMode::kEdge && grow > 0 && kept == 0)
      return v.Fail("edge padding of the empty axis " + std::to_string(i));
    in = v.Product({in, s.shape.dims[i]});
    out = v.Product({out, static_cast<size_t>(d + b + e)});
  }
  const size_t eb = ElemBytes(s.dtype);
  v.Read(s.in[0], eb, ContiguousWalk(in), "x");
  v.Write(s.out[0], eb, ContiguousWalk(out), "y");
}

void ValidateGpuConv(StepValidator& v, PlanStep& s) {
  if (!s.gpu_weights || !s.gpu_bias) return v.Fail("needs device weights and bias");
  if (s.groups == 0 || s.c_in % s.groups || s.c_out % s.groups) return v.Fail("groups must divide cIn and cOut");
  WindowShape ws;
  const std::string e = ResolveWindow(s.window, s.h, s.w, &ws);
  if (!e.empty()) return v.Fail(e);
  const size_t wbytes = v.Product({s.c_out, s.c_in / (s.groups ? s.groups : 1), s.window.kh, s.window.kw, s.bf16 ? 2u : 4u});
  if (s.gpu_weights->bytes() < wbytes || s.gpu_bias->bytes() < v.Product({s.c_out, 4}))
    return v.Fail("the device weights or bias are smaller than the conv's shape needs");
  const size_t y = v.Product({s.n, s.c_out, ws.oh, ws.ow});
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.n, s.c_in, s.h, s.w})), "x");
  v.ReadOptional(s.in[1], 4, ContiguousWalk(y), "residual");
  v.Write(s.out[0], 4, ContiguousWalk(y), "y");
}

void ValidateGpuGemm(StepValidator& v, PlanStep& s) {
  if (!s.gpu_weights) return v.Fail("needs device weights");
  if (s.gpu_weights->bytes() < v.Product({s.k, s.n, s.bf16 ? 2u : 4u}))
    return v.Fail("the device weights are smaller than k x n");
  if (s.kind < 0 || s.kind >= kernels::kActCount) return v.Fail("unknown activation");
  const size_t c = v.Product({s.m, s.n});
  v.Read(s.in[0], 4, ContiguousWalk(v.Product({s.m, s.k})), "a");
  v.ReadOptional(s.in[1], 4, ContiguousWalk(s.n), "bias");
  v.ReadOptional(s.in[2], 4, ContiguousWalk(c), "residual");
  v.Write(s.out[0], 4, ContiguousWalk(c), "c");
}

// Enum codes and ranks come from name tables in the binding; checked again because a bad one would
// index past a table or a dims array.
bool CodesInRange(const PlanStep& s) {
  if (s.shape.rank > kMaxRank) return false;
  switch (s.op) {
    case PlanOp::kUnary: return s.kind >= 0 && s.kind <= static_cast<int32_t>(UnaryKind::kIdentity);
    case PlanOp::kBinary: return s.kind >= 0 && s.kind <= static_cast<int32_t>(BinaryKind::kOr);
    case PlanOp::kReduce: return s.kind >= 0 && s.kind <= static_cast<int32_t>(ReduceKind::kMin);
    case PlanOp::kPad: return s.kind >= 0 && s.kind <= static_cast<int32_t>(PadMode::kEdge);
    default: return true;
  }
}

void ValidateStep(StepValidator& v, PlanStep& s) {
  if (!CodesInRange(s)) return v.Fail("kind or rank out of range");
  switch (s.op) {
    case PlanOp::kConv: return ValidateConv(v, s);
    case PlanOp::kConvChain: return ValidateConvChain(v, s);
    case PlanOp::kGemm: return ValidateGemm(v, s);
    case PlanOp::kMatMul: return ValidateMatMul(v, s);
    case PlanOp::kUnary: return ValidateUnary(v, s);
    case PlanOp::kBinary: return ValidateBinary(v, s);
    case PlanOp::kWhere: return ValidateWhere(v, s);
    case PlanOp::kCopy: return ValidateCopy(v, s);
    case PlanOp::kFill: return v.Write(s.out[0], ElemBytes(s.dtype), ContiguousWalk(s.count), "y");
    case PlanOp::kGather: return ValidateGather(v, s);
    case PlanOp::kPool: return ValidatePool(v, s);
    case PlanOp::kGlobalAveragePool: return ValidateGlobalAveragePool(v, s);
    case PlanOp::kSoftmax:
    case PlanOp::kLogSoftmax: return ValidateSoftmax(v, s);
    case PlanOp::kLayerNorm: return ValidateLayerNorm(v, s);
    case PlanOp::kChannelAffine: return ValidateChannelAffine(v, s);
    case PlanOp::kReduce: return ValidateReduce(v, s);
    case PlanOp::kArgMax: return ValidateArgMax(v, s);
    case PlanOp::kTopK: return ValidateTopK(v, s);
    case PlanOp::kCast: return ValidateCast(v, s);
    case PlanOp::kPad: return ValidatePad(v, s);
    case PlanOp::kSpmm: return ValidateSpmm(v, s);
    case PlanOp::kReorder: return ValidateReorder(v, s);
    case PlanOp::kGpuConv: return ValidateGpuConv(v, s);
    case PlanOp::kGpuGemm: return ValidateGpuGemm(v, s);
  }
  v.Fail("unknown op");
}

std::string ValidateBuffers(const std::vector<PlanBufferDesc>& buffers, size_t arena_bytes,
                            const std::vector<size_t>& input_bytes, const std::vector<size_t>& output_bytes) {
  for (size_t i = 0; i < buffers.size(); ++i) {
    const PlanBufferDesc& b = buffers[i];
    const std::string where = "buffer " + std::to_string(i) + ": ";
    switch (b.kind) {
      case PlanBufferKind::kInput:
      case PlanBufferKind::kOutput: {
        const bool input = b.kind == PlanBufferKind::kInput;
        const std::vector<size_t>& sizes = input ? input_bytes : output_bytes;
        if (b.index >= sizes.size())
          return where + (input ? "input " : "output ") + std::to_string(b.index) + " of " + std::to_string(sizes.size());
        if (b.bytes > sizes[b.index])
          return where + std::to_string(b.bytes) + " bytes, but " + (input ? "input " : "output ") +
                 std::to_string(b.index) + " has " + std::to_string(sizes[b.index]);
        break;
      }
      case PlanBufferKind::kArena:
        if (b.offset % kArenaAlign) return where + "arena offset " + std::to_string(b.offset) + " is not a multiple of 64";
        if (b.offset > arena_bytes || b.bytes > arena_bytes - b.offset)
          return where + "[" + std::to_string(b.offset) + ", +" + std::to_string(b.bytes) + ") is outside the arena of " +
                 std::to_string(arena_bytes) + " bytes";
        break;
      case PlanBufferKind::kConst:
        if (!b.data || b.data->size() < b.bytes) return where + "const data holds fewer than its " + std::to_string(b.bytes) + " bytes";
        break;
      case PlanBufferKind::kDevice:
        if (!b.device || b.device->bytes() < b.bytes) return where + "device data holds fewer than its " + std::to_string(b.bytes) + " bytes";
        break;
    }
  }
  return {};
}

}  // namespace

const char* PlanOpName(PlanOp op) {
  switch (op) {
    case PlanOp::kConv: return "conv";
    case PlanOp::kConvChain: return "convChain";
    case PlanOp::kGemm: return "gemm";
    case PlanOp::kMatMul: return "matmul";
    case PlanOp::kUnary: return "unary";
    case PlanOp::kBinary: return "binary";
    case PlanOp::kWhere: return "where";
    case PlanOp::kCopy: return "copy";
    case PlanOp::kFill: return "fill";
    case PlanOp::kGather: return "gather";
    case PlanOp::kPool: return "pool";
    case PlanOp::kGlobalAveragePool: return "globalAveragePool";
    case PlanOp::kSoftmax: return "softmax";
    case PlanOp::kLogSoftmax: return "softmax";
    case PlanOp::kLayerNorm: return "layerNorm";
    case PlanOp::kChannelAffine: return "channelAffine";
    case PlanOp::kReduce: return "reduce";
    case PlanOp::kArgMax: return "argmax";
    case PlanOp::kTopK: return "topk";
    case PlanOp::kCast: return "cast";
    case PlanOp::kPad: return "pad";
    case PlanOp::kSpmm: return "spmm";
    case PlanOp::kReorder: return "reorder";
    case PlanOp::kGpuConv: return "gpuConv";
    case PlanOp::kGpuGemm: return "gpuGemm";
  }
  return "?";
}

struct Plan::Arena {
  unsigned char* data = nullptr;      // arena_bytes rounded up to 64, 64-byte aligned
  std::vector<unsigned char*> bases;  // per buffer, filled at the start of each run
  ~Arena() { std::free(data); }
};

std::string ValidatePlanSpec(std::vector<PlanBufferDesc>& buffers, std::vector<PlanStep>& steps, size_t arena_bytes,
                             const std::vector<size_t>& input_bytes, const std::vector<size_t>& output_bytes,
                             std::vector<size_t>* input_align, std::vector<size_t>* output_align) {
  std::string error = ValidateBuffers(buffers, arena_bytes, input_bytes, output_bytes);
  if (!error.empty()) return error;
  std::vector<size_t> align(buffers.size(), 1);
  for (size_t i = 0; i < steps.size(); ++i) {
    StepValidator v(buffers, align);
    ValidateStep(v, steps[i]);
    if (!v.ok()) return "step " + std::to_string(i) + " (" + PlanOpName(steps[i].op) + ", node '" + steps[i].node + "'): " + v.error();
  }
  input_align->assign(input_bytes.size(), 1);
  output_align->assign(output_bytes.size(), 1);
  for (size_t i = 0; i < buffers.size(); ++i) {
    const PlanBufferDesc& b = buffers[i];
    if (b.kind == PlanBufferKind::kInput) (*input_align)[b.index] = std::max((*input_align)[b.index], align[i]);
    if (b.kind == PlanBufferKind::kOutput) (*output_align)[b.index] = std::max((*output_align)[b.index], align[i]);
  }
  return {};
}

std::unique_ptr<Plan> Plan::Create(std::vector<PlanBufferDesc> buffers, std::vector<PlanStep> steps,
                                   size_t arena_bytes, std::vector<size_t> input_bytes,
                                   std::vector<size_t> output_bytes, std::string* error) {
  std::unique_ptr<Plan> plan(new Plan());
  *error = ValidatePlanSpec(buffers, steps, arena_bytes, input_bytes, output_bytes, &plan->input_align_, &plan->output_align_);
  if (!error->empty()) return nullptr;
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (buffers[i].kind == PlanBufferKind::kDevice) {
      *error = "buffer " + std::to_string(i) + ": device data is for GPU plans only";
      return nullptr;
    }
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    if (steps[i].op == PlanOp::kGpuConv || steps[i].op == PlanOp::kGpuGemm) {
      *error = "step " + std::to_string(i) + " (" + PlanOpName(steps[i].op) + ", node '" + steps[i].node + "'): runs on a GPU plan only";
      return nullptr;
    }
  }
  for (const PlanBufferDesc& b : buffers)
    if (b.kind == PlanBufferKind::kConst) plan->const_bytes_ += b.data->size();
  // A direct sparse conv's tap offsets are the plan's own constants (4 bytes per non-zero).
  for (const PlanStep& s : steps)
    if (s.tap_offsets) plan->const_bytes_ += s.tap_offsets->size() * sizeof(uint32_t);
  plan->buffers_ = std::move(buffers);
  plan->steps_ = std::move(steps);
  for (PlanStep& s : plan->steps_)
    if ((s.op == PlanOp::kGemm || s.op == PlanOp::kSpmm) && s.gemm && s.m == 1)
      s.skip_runs = std::make_shared<std::atomic<uint64_t>>(0);
  // Each conv's successor among the conv steps (steps between them, a pool or a reorder, are short).
  const ConvOp* next_conv = nullptr;
  for (size_t i = plan->steps_.size(); i-- > 0;) {
    PlanStep& s = plan->steps_[i];
    if (s.op == PlanOp::kConvChain) {
      next_conv = s.chain->expand ? s.chain->expand.get() : s.chain->depthwise.get();
      continue;
    }
    if (s.op != PlanOp::kConv || !s.conv) continue;
    if (next_conv) s.next_weights = next_conv->FirstWeights();
    next_conv = s.conv.get();
  }
  plan->arena_bytes_ = arena_bytes;
  plan->input_bytes_ = std::move(input_bytes);
  plan->output_bytes_ = std::move(output_bytes);
  plan->elementwise_uk_ = ElementwiseTable(ElementwiseVariant::kAuto);
  plan->idle_arenas_.reserve(kMaxIdleArenas);  // so that returning an arena never allocates
  return plan;
}

Plan::~Plan() = default;

std::unique_ptr<Plan::Arena> Plan::AcquireArena() const {
  {
    std::lock_guard<std::mutex> lock(arenas_mu_);
    if (!idle_arenas_.empty()) {
      std::unique_ptr<Arena> a = std::move(idle_arenas_.back());
      idle_arenas_.pop_back();
      return a;
    }
  }
  auto a = std::make_unique<Arena>();
  a->bases.resize(buffers_.size());
  if (arena_bytes_) {
    const size_t rounded = (arena_bytes_ + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
    a->data = static_cast<unsigned char*>(std::aligned_alloc(kArenaAlign, rounded));
    if (!a->data) throw std::bad_alloc();
  }
  return a;
}

void Plan::ReleaseArena(std::unique_ptr<Arena> arena) const {
  std::lock_guard<std::mutex> lock(arenas_mu_);
  if (idle_arenas_.size() < kMaxIdleArenas) idle_arenas_.push_back(std::move(arena));
}

bool Plan::Run(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const void* const* inputs,
               void* const* outputs, double* timings, std::string* error) const {
  const auto started = std::chrono::steady_clock::now();
  std::unique_ptr<Arena> arena = AcquireArena();
  for (size_t i = 0; i < buffers_.size(); ++i) {
    const PlanBufferDesc& b = buffers_[i];
    unsigned char* base = nullptr;
    switch (b.kind) {
      // Inputs and consts are never written (checked at creation); the cast only unifies the table.
      case PlanBufferKind::kInput: base = static_cast<unsigned char*>(const_cast<void*>(inputs[b.index])); break;
      case PlanBufferKind::kOutput: base = static_cast<unsigned char*>(outputs[b.index]); break;
      case PlanBufferKind::kArena: base = arena->data + b.offset; break;
      case PlanBufferKind::kConst: base = const_cast<unsigned char*>(b.data->data()); break;
      case PlanBufferKind::kDevice: break;  // rejected by Create
    }
    arena->bases[i] = base;
  }
  const TensorOpContext ctx{&pool, threads, cancel};
  const ElementwiseContext ew{&pool, threads, cancel, elementwise_uk_};
  bool ok = true;
  for (size_t i = 0; i < steps_.size(); ++i) {
    if (cancel && cancel->load()) {
      ok = false;
      break;
    }
    const auto t0 = timings ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
    std::string why;
    if (!RunStep(steps_[i], ctx, ew, arena->bases.data(), &why)) {
      ok = false;
      if (!(cancel && cancel->load())) {
        if (why.empty()) why = "stopped before finishing (the thread pool is shutting down)";
        *error = "node '" + steps_[i].node + "': " + why;
      }
      break;
    }
    if (timings)
      timings[i] = static_cast<double>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  }
  ReleaseArena(std::move(arena));
  last_run_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count(),
                     std::memory_order_relaxed);
  return ok;
}

bool Plan::RunStep(const PlanStep& s, const TensorOpContext& ctx, const ElementwiseContext& ew,
                   unsigned char* const* bases, std::string* error) const {
  auto at = [bases](const PlanRef& r) -> unsigned char* { return r.present() ? bases[r.buffer] + r.byte_offset : nullptr; };
  auto f32 = [&](const PlanRef& r) { return reinterpret_cast<float*>(at(r)); };
  const void* x = at(s.in[0]);
  void* y = at(s.out[0]);
  switch (s.op) {
    case PlanOp::kConv:
      if (s.blocked[0].present() || s.blocked[2].present())
        return s.conv->RunBlocked(*ctx.pool, ctx.max_threads, ctx.cancel, f32(s.in[0]), s.blocked[0], s.n, s.h, s.w,
                                  f32(s.out[0]), s.blocked[2].present() ? &s.blocked[2] : nullptr, f32(s.in[1]),
                                  s.blocked[1].present() ? &s.blocked[1] : nullptr, s.flag, error, s.next_weights);
      return s.conv->Run(*ctx.pool, ctx.max_threads, ctx.cancel, f32(s.in[0]), s.n, s.h, s.w, f32(s.out[0]),
                         f32(s.in[1]), s.flag, error);
    case PlanOp::kConvChain:
      return s.chain->Run(*ctx.pool, ctx.max_threads, ctx.cancel, f32(s.in[0]), s.blocked[0], s.n, s.h, s.w,
                          f32(s.out[0]), s.blocked[2], f32(s.in[1]), s.blocked[1].present() ? &s.blocked[1] : nullptr,
                          s.flag, error);
    case PlanOp::kReorder:
      return ReorderNchwc(*ctx.pool, ctx.max_threads, ctx.cancel, s.flag, f32(s.in[0]), f32(s.out[0]), s.n, s.count,
                          s.blocked[0], error);
    case PlanOp::kGemm: {
      const kernels::GemmEpilogue ep{nullptr, f32(s.in[1]), f32(s.in[2]), s.n, s.kind, s.flag ? 1 : 0, s.alpha, s.beta};
      if (s.gemm) {
        GemmArgs args;
        args.a = f32(s.in[0]);
        args.m = s.m;
        args.lda = s.k;
        args.c = f32(s.out[0]);
        args.ldc = s.n;
        args.epilogue = ep;
        if (s.m == 1) {
          // Batch 1 after a ReLU: many activations are zero, and their weight rows need not be read.
          switch (RunGemvSkipZeros(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.gemm)) {
            case GemvSkipResult::kRan:
              if (s.skip_runs) s.skip_runs->fetch_add(1, std::memory_order_relaxed);
              return true;
            case GemvSkipResult::kCancelled: return false;
            case GemvSkipResult::kDense: break;
          }
        }
        return RunGemm(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.gemm);
      }
      LowpGemmArgs args;
      args.a = f32(s.in[0]);
      args.m = s.m;
      args.lda = s.k;
      args.c = f32(s.out[0]);
      args.ldc = s.n;
      args.epilogue = ep;
      return RunLowpGemm(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.gemm_lowp, false);
    }
    case PlanOp::kSpmm: {
      const ptrdiff_t* as = s.strides[0];
      const ptrdiff_t* cs = s.strides[1];
      const kernels::GemmEpilogue ep{nullptr, f32(s.in[1]), f32(s.in[2]), 0, s.kind, s.flag ? 1 : 0, s.alpha, s.beta};
      if (s.tap_offsets) {
        // A direct KxK conv: per output row, the padded image shifted per tap (no im2col panel).
        const PlanStep::SpmmTaps& g = s.taps;
        SpmmColumnsArgs args;
        args.a = f32(s.in[0]);
        args.c = f32(s.out[0]);
        args.m = g.ow;
        args.ldc = static_cast<size_t>(cs[2]);
        args.batch = s.outer;
        args.a_batch_stride = static_cast<size_t>(as[0]);
        args.c_batch_stride = args.r_batch_stride = static_cast<size_t>(cs[0]);
        args.rows = g.oh;
        args.a_row_stride = g.row_stride;
        args.c_row_stride = g.ow;
        args.a_offsets = s.tap_offsets->data();
        args.epilogue = ep;
        args.epilogue.ldr = args.ldc;
        return RunSpmmColumns(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.sparse, GemmVariant::kAuto);
      }
      if (!(as[2] == 1 && cs[2] == 1)) {
        // Column-major (NCHW): the transpose-free kernels read and write the images in place.
        SpmmColumnsArgs args;
        args.a = f32(s.in[0]);
        args.c = f32(s.out[0]);
        args.m = s.m;
        args.lda = static_cast<size_t>(as[2]);
        args.ldc = static_cast<size_t>(cs[2]);
        args.batch = s.outer;
        args.a_batch_stride = static_cast<size_t>(as[0]);
        args.c_batch_stride = args.r_batch_stride = static_cast<size_t>(cs[0]);
        args.epilogue = ep;
        args.epilogue.ldr = args.ldc;
        return RunSpmmColumns(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.sparse, GemmVariant::kAuto);
      }
      if (s.outer > 1) {
        for (size_t b = 0; b < s.outer; ++b) {
          GemmArgs args;
          args.a = f32(s.in[0]) + b * static_cast<size_t>(as[0]);
          args.m = s.m;
          args.lda = static_cast<size_t>(as[1]);
          args.c = f32(s.out[0]) + b * static_cast<size_t>(cs[0]);
          args.ldc = static_cast<size_t>(cs[1]);
          args.epilogue = ep;
          args.epilogue.ldr = args.ldc;
          if (args.epilogue.residual) args.epilogue.residual += b * static_cast<size_t>(cs[0]);
          if (!RunSpmm(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.sparse, GemmVariant::kAuto)) return false;
        }
        return true;
      }
      GemmArgs args;
      args.a = f32(s.in[0]);
      args.m = s.m;
      args.lda = static_cast<size_t>(as[1]);
      args.c = f32(s.out[0]);
      args.ldc = static_cast<size_t>(cs[1]);
      args.epilogue = ep;
      args.epilogue.ldr = args.ldc;
      if (s.m == 1 && s.gemm) {
        // A mostly-zero row reads fewer weights through the dense GEMV that skips them than through the SpMV.
        switch (RunGemvSkipZeros(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.gemm)) {
          case GemvSkipResult::kRan:
            if (s.skip_runs) s.skip_runs->fetch_add(1, std::memory_order_relaxed);
            return true;
          case GemvSkipResult::kCancelled: return false;
          case GemvSkipResult::kDense: break;
        }
      }
      return RunSpmm(*ctx.pool, ctx.max_threads, ctx.cancel, args, *s.sparse, GemmVariant::kAuto);
    }
    case PlanOp::kMatMul:
      return RunBatchedMatMul(ctx, f32(s.in[0]), s.strides[0], f32(s.in[1]), s.strides[1], f32(s.out[0]),
                              s.shape.dims, s.shape.rank, s.m, s.k, s.n, s.flag);
    case PlanOp::kUnary:
      return RunUnaryOp(ctx, static_cast<UnaryKind>(s.kind), s.dtype, x, y, s.count, s.alpha, s.beta, error);
    case PlanOp::kBinary:
      return RunBinaryOp(ctx, static_cast<BinaryKind>(s.kind), s.dtype, x, s.strides[0], at(s.in[1]), s.strides[1], y,
                         s.shape.dims, s.shape.rank, error);
    case PlanOp::kWhere:
      return RunWhere(ctx, at(s.in[0]), s.strides[0], at(s.in[1]), s.strides[1], at(s.in[2]), s.strides[2], y,
                      s.shape.dims, s.shape.rank, s.elem_bytes);
    case PlanOp::kCopy:
      return RunStridedCopy(ctx, x, s.strides[0], y, s.strides[1], s.shape.dims, s.shape.rank, s.elem_bytes);
    case PlanOp::kFill:
      RunFill(s.dtype, y, s.count, s.value);
      return true;
    case PlanOp::kGather:
      return RunGather(ctx, x, at(s.in[1]), s.dtype_to == ElemType::kInt64, y, s.outer, s.mid, s.inner, s.count,
                       s.elem_bytes, error);
    case PlanOp::kPool:
      if (s.blocked[0].present())
        return RunPoolBlocked(*ctx.pool, ctx.max_threads, ctx.cancel, static_cast<PoolKind>(s.kind), f32(s.in[0]),
                              s.blocked[0], s.outer / kernels::kNchwcBlock, s.h, s.w, s.window, s.flag,
                              f32(s.out[0]), s.blocked[2], error);
      return RunPool(*ctx.pool, ctx.max_threads, ctx.cancel, static_cast<PoolKind>(s.kind), f32(s.in[0]), s.outer, s.h,
                     s.w, s.window, s.flag, ConvVariant::kAuto, f32(s.out[0]), error);
    case PlanOp::kGlobalAveragePool:
      if (s.blocked[0].present())
        return RunGlobalAveragePoolBlocked(*ctx.pool, ctx.max_threads, ctx.cancel, f32(s.in[0]),
                                           s.outer / kernels::kNchwcBlock, s.blocked[0], f32(s.out[0]), error);
      return RunGlobalAveragePool(*ctx.pool, ctx.max_threads, ctx.cancel, f32(s.in[0]), s.outer, s.inner,
                                  ConvVariant::kAuto, f32(s.out[0]), error);
    case PlanOp::kSoftmax:
      return RunSoftmax(ew, f32(s.in[0]), s.dims3, 1, f32(s.out[0]));
    case PlanOp::kLogSoftmax:
      return RunLogSoftmax(ctx, f32(s.in[0]), f32(s.out[0]), s.outer, s.mid, s.inner);
    case PlanOp::kLayerNorm:
      return RunLayerNorm(ew, f32(s.in[0]), s.outer, s.inner, f32(s.in[1]), f32(s.in[2]), s.epsilon, f32(s.out[0]));
    case PlanOp::kChannelAffine:
      return RunChannelAffine(ctx, f32(s.in[0]), f32(s.in[1]), f32(s.in[2]), f32(s.out[0]), s.outer, s.mid, s.inner);
    case PlanOp::kReduce:
      return RunReduce(ctx, static_cast<ReduceKind>(s.kind), s.dtype, x, y, s.outer, s.mid, s.inner);
    case PlanOp::kArgMax:
      return RunArgMaxOp(ctx, f32(s.in[0]), reinterpret_cast<int64_t*>(y), s.outer, s.mid, s.inner, s.flag);
    case PlanOp::kTopK:
      return RunTopK(ew, f32(s.in[0]), s.dims3, 1, s.k, s.flag, f32(s.out[0]), reinterpret_cast<int64_t*>(at(s.out[1])));
    case PlanOp::kCast:
      return RunCastOp(ctx, s.dtype, x, s.dtype_to, y, s.count);
    case PlanOp::kPad:
      return RunPad(ctx, s.dtype, x, s.shape.dims, s.shape.rank, s.pad_begin, s.pad_end, static_cast<PadMode>(s.kind),
                    s.value, y);
    case PlanOp::kGpuConv:
    case PlanOp::kGpuGemm:
      break;  // rejected by Create
  }
  *error = "unknown op";
  return false;
}

}  // namespace sonde
