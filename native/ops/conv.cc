#include "ops/conv.h"
#include "runtime/enum_names.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "ops/gemm.h"
#include "runtime/cpu.h"

namespace sonde {

const EnumName<ConvVariant> kConvVariantNames[] = {
    {ConvVariant::kAuto, "auto"},
    {ConvVariant::kReference, "reference"},
    {ConvVariant::kScalar, "scalar"},
    {ConvVariant::kAvx2, "avx2"},
    {ConvVariant::kAvx512, "avx512"},
    {ConvVariant::kAvx512Bf16, "avx512bf16"},
    {ConvVariant::kAmx, "amx"},
};

bool ParseConvVariant(const std::string& name, ConvVariant* out) { return ParseEnumName(kConvVariantNames, name, out); }

const char* ConvVariantName(ConvVariant v) { return EnumNameOf(kConvVariantNames, v); }

std::string ConvVariantUnavailable(ConvVariant v, ConvPrecision p) {
  if (v == ConvVariant::kAvx512Bf16) {
    if (p != ConvPrecision::kBf16) return "variant 'avx512bf16' needs precision 'bf16'";
    if (!Cpu().HasBf16()) return "this CPU (or SONDE_ISA) has no AVX512_BF16";
    return "";
  }
  if (v == ConvVariant::kAmx) {
    if (p != ConvPrecision::kBf16) return "variant 'amx' needs precision 'bf16'";
    if (!Cpu().HasAmxBf16()) return "this CPU (or SONDE_ISA, or the OS) has no AMX-BF16 tiles";
    return "";
  }
  if (v == ConvVariant::kAvx2) return GemmVariantUnavailable(GemmVariant::kAvx2);
  if (v == ConvVariant::kAvx512) return GemmVariantUnavailable(GemmVariant::kAvx512);
  return "";
}

std::string ResolveWindow(const WindowGeometry& g, size_t h, size_t w, WindowShape* out) {
  if (g.kh == 0 || g.kw == 0) return "kernel size must be >= 1";
  if (g.sh == 0 || g.sw == 0) return "strides must be >= 1";
  if (g.dh == 0 || g.dw == 0) return "dilations must be >= 1";
  const size_t ekh = (g.kh - 1) * g.dh + 1, ekw = (g.kw - 1) * g.dw + 1;
  WindowShape s;
  auto axis = [&](size_t in, size_t ek, size_t stride, size_t pb, size_t pe, size_t* o, size_t* p0, size_t* p1) -> std::string {
    switch (g.auto_pad) {
      case ConvAutoPad::kSameUpper:
      case ConvAutoPad::kSameLower: {
        *o = (in + stride - 1) / stride;
        if (*o == 0) return "output size would be 0 (empty input)";
        const size_t need = (*o - 1) * stride + ek;
        const size_t total = need > in ? need - in : 0;
        *p0 = g.auto_pad == ConvAutoPad::kSameUpper ? total / 2 : total - total / 2;
        *p1 = total - *p0;
        return "";
      }
      case ConvAutoPad::kValid: pb = pe = 0; break;
      case ConvAutoPad::kNotSet: break;
    }
    if (pb >= ek || pe >= ek) return "pads must be smaller than the dilated kernel extent";
    if (in + pb + pe < ek) return "output size would be <= 0 (input plus pads smaller than the dilated kernel)";
    *o = (in + pb + pe - ek) / stride + 1;
    *p0 = pb;
    *p1 = pe;
    return "";
  };
  std::string e = axis(h, ekh, g.sh, g.pad_t, g.pad_b, &s.oh, &s.pad_t, &s.pad_b);
  if (e.empty()) e = axis(w, ekw, g.sw, g.pad_l, g.pad_r, &s.ow, &s.pad_l, &s.pad_r);
  if (!e.empty()) return e;
  *out = s;
  return "";
}

namespace {

// The pair tiles (two 32-channel blocks per tile) run 1x1 convs of at most this many input-channel
// blocks: isolated, 64 -> 256 on 56x56 165 -> 193 GFLOP/s, 128 -> 512 on 28x28 183 -> 200, but
// 256 -> 64 190 -> 184 (with more input channels the 14 x 32 tile's FMAs hide its loads).
constexpr size_t kPairMaxCBlocks = 8;

size_t RoundUp(size_t x, size_t m) { return (x + m - 1) / m * m; }

void* AlignedAlloc(size_t bytes) {
  // 64 bytes: the aligned panel loads of the AVX-512 kernels, and one cache line.
  void* p = std::aligned_alloc(64, RoundUp(std::max<size_t>(bytes, 64), 64));
  if (!p) throw std::bad_alloc();
  return p;
}

// A 64-byte aligned float buffer grown on demand and kept for its thread's lifetime (each user
// holds its own thread_local one), so a run allocates nothing after the first. Null when the
// allocation fails: the task then reports failure instead of throwing on a pool thread.
struct GrowingBuffer {
  float* p = nullptr;
  size_t n = 0;
  ~GrowingBuffer() { std::free(p); }
  float* Get(size_t floats) {
    if (n < floats) {
      std::free(p);
      n = 0;
      p = static_cast<float*>(std::aligned_alloc(64, RoundUp(floats * sizeof(float), 64)));
      if (!p) return nullptr;
      n = floats;
    }
    return p;
  }
};

// Per-thread scratch of the tasks (packed panels, padded planes).
float* ThreadScratch(size_t floats) {
  thread_local GrowingBuffer buf;
  return buf.Get(floats);
}

kernels::F32GemmUkernelInfo F32Ukernel(ConvVariant v) {
  switch (v) {
    case ConvVariant::kAvx512: return GemmUkernel(GemmVariant::kAvx512);
    case ConvVariant::kAvx2: return GemmUkernel(GemmVariant::kAvx2);
    default: return GemmUkernel(GemmVariant::kScalar);
  }
}

// The variants of bf16 weights only (the others widen bf16 weights to fp32).
bool Bf16Variant(ConvVariant v) { return v == ConvVariant::kAvx512Bf16 || v == ConvVariant::kAmx; }

ConvVariant ResolveFp32(ConvVariant v) {
  if (v != ConvVariant::kAuto) return v;
  switch (Cpu().level) {
    case IsaLevel::kAvx512: return ConvVariant::kAvx512;
    case IsaLevel::kAvx2: return ConvVariant::kAvx2;
    default: return ConvVariant::kScalar;
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// fp32 -> bf16 split of the bias into three terms whose fp32 sum is b to within ~2^-24 relative
// (each term holds the next 8 significant bits), so a bias row of ones keeps it fp32-exact. Only
// the x86 bf16 kernel uses it.
void SplitBf16(float b, uint16_t out[3]) {
  float r = b;
  for (int i = 0; i < 3; ++i) {
    out[i] = kernels::LowpF32ToBf16(r);
    r -= kernels::LowpBf16ToF32(out[i]);
  }
}
#endif

// Shapes the direct NCHWc kernel handles: 16-channel input blocks, the last one partial (zero
// weights on its missing channels) where at least half of the lanes hold channels (24 channels in
// 2 blocks: 25% of the FMAs spent on zeros, less than running that conv and its neighbours off the
// blocked path), strides its tile table has, no dilation, one group.
// Convs of at most kDirectNchwMaxChannels input channels (image stems) run the same tiles on a
// padded NCHW copy instead (one input channel per "block"); SONDE_CONV_DIRECT_NCHW=0 at creation
// leaves them on im2col + GEMM (A/B: bench/conv-direct.js, bench/models-direct.js).
constexpr size_t kDirectNchwMaxChannels = 4;
bool DirectNchwWanted() {
  const char* e = std::getenv("SONDE_CONV_DIRECT_NCHW");
  return !(e && *e == '0');
}
bool DirectFits(const ConvSpec& spec) {
  const WindowGeometry& g = spec.window;
  const bool channels = 2 * spec.c_in >= kernels::NchwcBlocks(spec.c_in) * kernels::kNchwcBlock ||
                        (spec.c_in <= kDirectNchwMaxChannels && DirectNchwWanted());
  return spec.group == 1 && channels && g.dh == 1 && g.dw == 1 && g.sh == g.sw && (g.sw == 1 || g.sw == 2);
}

// SONDE_CONV_DIRECT=1 / 0 turns the direct path on / off where it fits (read at each creation, so a
// benchmark can create both kinds in one process). On by default: measured faster than im2col + GEMM
// on every ResNet-50 conv it fits (3x3: 1.2-1.75x, strided 1x1: 1.2-1.4x, 1 thread, interleaved);
// 1x1 stride-1 convs choose per run by plane size (kDirectMaxPixelsPointwise).
bool DirectWanted(const ConvSpec& spec) {
  if (const char* e = std::getenv("SONDE_CONV_DIRECT"); e && *e) return *e == '1';
  (void)spec;
  return true;
}

}  // namespace

std::unique_ptr<ConvOp> ConvOp::Create(const float* weights, const float* bias, const BatchNormParams* bn,
                                       const ConvSpec& spec, ConvPrecision precision, ConvVariant variant,
                                       std::string* error) {
  const WindowGeometry& g = spec.window;
  if (spec.group == 0 || spec.c_in == 0 || spec.c_out == 0 || spec.c_in % spec.group || spec.c_out % spec.group) {
    *error = "channels must be positive multiples of group";
    return nullptr;
  }
  if (g.kh == 0 || g.kw == 0 || g.sh == 0 || g.sw == 0 || g.dh == 0 || g.dw == 0) {
    *error = "kernel size, strides and dilations must be >= 1";
    return nullptr;
  }
  std::unique_ptr<ConvOp> op(new ConvOp());
  op->spec_ = spec;
  op->precision_ = precision;
  const size_t cg = spec.c_in / spec.group, cog = spec.c_out / spec.group;
  const size_t kg = cg * g.kh * g.kw;
  op->kg_ = kg;
  op->has_bias_ = bias || bn;
  // Fold BatchNormalization in double: s = gamma / sqrt(var + eps); w' = w s; b' = (b - mean) s + beta.
  std::vector<double> s(spec.c_out, 1.0);
  op->bias_.assign(spec.c_out, 0.0f);
  for (size_t co = 0; co < spec.c_out; ++co) {
    double b = bias ? bias[co] : 0.0;
    if (bn) {
      s[co] = static_cast<double>(bn->scale[co]) / std::sqrt(static_cast<double>(bn->variance[co]) + bn->epsilon);
      b = (b - bn->mean[co]) * s[co] + bn->bias[co];
    }
    op->bias_[co] = static_cast<float>(b);
  }
  auto folded = [&](size_t co, size_t k) {
    const float v = static_cast<float>(weights[co * kg + k] * s[co]);
    return precision == ConvPrecision::kBf16 ? kernels::LowpBf16ToF32(kernels::LowpF32ToBf16(v)) : v;
  };

  const bool depthwise = cg == 1 && cog == 1;
  // Depthwise convs have no bf16 kernel: they take the fp32 one on the bf16-rounded weights.
  if (Bf16Variant(variant) && depthwise) variant = ConvVariant::kAvx512;
  if (precision == ConvPrecision::kBf16 && variant == ConvVariant::kAuto && Cpu().HasBf16() && !depthwise)
    variant = Cpu().HasAmxBf16() ? ConvVariant::kAmx : ConvVariant::kAvx512Bf16;
  if (variant != ConvVariant::kReference && !Bf16Variant(variant)) variant = ResolveFp32(variant);
  op->variant_ = variant;

  if (variant == ConvVariant::kReference || depthwise) {
    op->path_ = variant == ConvVariant::kReference ? Path::kReference : Path::kDepthwise;
    op->ldw_ = kg;
    op->w_ = static_cast<float*>(AlignedAlloc(spec.c_out * kg * sizeof(float)));
    for (size_t co = 0; co < spec.c_out; ++co)
      for (size_t k = 0; k < kg; ++k) op->w_[co * kg + k] = folded(co, k);
    op->bytes_ = RoundUp(spec.c_out * kg * sizeof(float), 64) + spec.c_out * sizeof(float);
#if defined(__x86_64__) || defined(_M_X64)
    if (variant == ConvVariant::kAvx512) {
      op->window_uk_ = kernels::F32WindowUkernelAvx512();
      op->window_name_ = "f32_window__avx512";
      // Blocked runs (plan layout pass) may carry a depthwise conv: its weights once more, per block.
      constexpr size_t kB = kernels::kNchwcBlock;
      // A partial last block gets zero weights and bias on its missing channels.
      if (depthwise && g.dh == 1 && g.dw == 1 && DirectWanted(spec)) {
        const size_t taps = g.kh * g.kw, blocks = kernels::NchwcBlocks(spec.c_out);
        op->dw_blocked_uk_ = kernels::F32NchwcDepthwiseUkernelAvx512();
        op->dw_blocked_w_ = static_cast<float*>(AlignedAlloc(blocks * kB * (taps + 1) * sizeof(float)));
        for (size_t cb = 0; cb < blocks; ++cb)
          for (size_t t = 0; t < taps; ++t)
            for (size_t l = 0; l < kB; ++l) {
              const size_t c = cb * kB + l;
              op->dw_blocked_w_[(cb * taps + t) * kB + l] = c < spec.c_out ? op->w_[c * kg + t] : 0.0f;
            }
        op->dw_blocked_bias_ = op->dw_blocked_w_ + blocks * kB * taps;
        for (size_t c = 0; c < blocks * kB; ++c) op->dw_blocked_bias_[c] = c < spec.c_out ? op->bias_[c] : 0.0f;
        op->bytes_ += RoundUp(blocks * kB * (taps + 1) * sizeof(float), 64);
      }
    }
#endif
    if (!op->window_uk_) {
      // AVX2 machines run the portable window kernel (no AVX2 variant of it yet).
      op->window_uk_ = kernels::F32WindowUkernelScalar();
      op->window_name_ = "f32_window__scalar";
    }
    return op;
  }

#if defined(__x86_64__) || defined(_M_X64)
  const bool direct_fits = DirectFits(spec) && DirectWanted(spec);
  // Under 'amx' a stem (a few input channels, no 16-channel block to make tiles of) takes the fp32
  // stem tiles on its bf16-rounded weights: the CPUs with AMX run vdpbf16ps at half their FMA rate
  // (ResNet-50's 7x7/2 stem: 2.0 ms on the bf16 stem tiles, 1.4 on the fp32 ones, 2 threads).
  const bool amx_stem = variant == ConvVariant::kAmx && spec.c_in <= kDirectNchwMaxChannels && direct_fits;
  const bool bf16_direct = Bf16Variant(variant) && direct_fits && !amx_stem;
  // Off the direct path (groups, dilation) only 'avx512bf16' takes the bf16 GEMM: under 'amx' those
  // convs fall through to the fp32 GEMM below on their bf16-rounded weights, for the same reason
  // (the avx512bf16 GEMM kernel ran at 0.67x the fp32 one on such a CPU).
  if (variant == ConvVariant::kAvx512Bf16 && !bf16_direct) {
    op->path_ = Path::kGemmBf16;
    op->bf16_uk_ = kernels::Bf16GemmUkernelAvx512Bf16();
    op->im2col_uk_ = kernels::F32Im2colUkernelAvx512();
    op->k_run_ = kg + (op->has_bias_ ? 3 : 0);
    op->ldw_ = (op->k_run_ + 1) / 2;
    op->w_pairs_ = static_cast<uint32_t*>(AlignedAlloc(spec.c_out * op->ldw_ * sizeof(uint32_t)));
    std::vector<uint16_t> row(op->ldw_ * 2);
    for (size_t co = 0; co < spec.c_out; ++co) {
      std::fill(row.begin(), row.end(), 0);
      for (size_t k = 0; k < kg; ++k) row[k] = kernels::LowpF32ToBf16(folded(co, k));
      if (op->has_bias_) SplitBf16(op->bias_[co], &row[kg]);
      for (size_t p = 0; p < op->ldw_; ++p)
        op->w_pairs_[co * op->ldw_ + p] = static_cast<uint32_t>(row[2 * p]) | (static_cast<uint32_t>(row[2 * p + 1]) << 16);
    }
    op->bytes_ = RoundUp(spec.c_out * op->ldw_ * sizeof(uint32_t), 64) + spec.c_out * sizeof(float);
    return op;
  }
#endif

#if defined(__x86_64__) || defined(_M_X64)
  if (bf16_direct || amx_stem || (variant == ConvVariant::kAvx512 && direct_fits)) {
    op->path_ = Path::kDirect;
    op->bf16_direct_ = bf16_direct;
    const bool nchw = spec.c_in <= kDirectNchwMaxChannels;
    op->in_block_ = nchw ? 1 : kernels::kNchwcBlock;
    op->amx_ = bf16_direct && !nchw && variant == ConvVariant::kAmx;
    op->direct_uk_ = op->amx_ ? kernels::Bf16NchwcConvUkernelAmx()
                     : bf16_direct ? (nchw ? kernels::Bf16NchwConvUkernelAvx512Bf16() : kernels::Bf16NchwcConvUkernelAvx512Bf16())
                     : nchw      ? kernels::F32NchwConvUkernelAvx512()
                                 : kernels::F32NchwcConvUkernelAvx512();
    op->pack_uk_ = kernels::F32PackNchwcRowUkernelAvx512();
    if (bf16_direct) op->to_bf16_uk_ = kernels::F32ToBf16UkernelAvx512Bf16();
    // fp32 1x1 stride 1 on blocked input with few input channels: two 32-channel blocks per tile,
    // where at least one item has all four 16-channel output blocks (more than 48 channels).
    const WindowGeometry& wg = spec.window;
    if (!bf16_direct && !nchw && wg.kh == 1 && wg.kw == 1 && wg.sh == 1 && wg.sw == 1 &&
        kernels::NchwcBlocks(spec.c_in) <= kPairMaxCBlocks && spec.c_out > 3 * kernels::kNchwcBlock)
      op->pair_uk_ = kernels::F32NchwcPointwisePairUkernelAvx512();
    constexpr size_t kO = kernels::kNchwcOutBlock;
    const size_t kB = op->in_block_;
    const size_t c_blocks = (spec.c_in + kB - 1) / kB, o_blocks = (spec.c_out + kO - 1) / kO;
    const size_t taps = g.kh * g.kw, block_floats = c_blocks * taps * kB * kO;
    op->bias_blocks_ = static_cast<float*>(AlignedAlloc(o_blocks * kO * sizeof(float)));
    // Zero past C_out and past C_in (a partial last input block).
    auto weight = [&](size_t ob, size_t cb, size_t t, size_t l, size_t o) {
      const size_t co = ob * kO + o, ci = cb * kB + l;
      return co < spec.c_out && ci < spec.c_in ? folded(co, ci * taps + t) : 0.0f;
    };
    if (bf16_direct && nchw) {
      // A stem: [o_block][c][ky][ceil(kw / 2) pairs][32 outputs] uint32 (tap kx = 2j low, 2j + 1
      // high, zero past kw).
      const size_t kw_pairs = (g.kw + 1) / 2;
      op->ldw_ = spec.c_in * g.kh * kw_pairs * kO;
      op->w_pairs_ = static_cast<uint32_t*>(AlignedAlloc(o_blocks * op->ldw_ * sizeof(uint32_t)));
      uint32_t* dst = op->w_pairs_;
      for (size_t ob = 0; ob < o_blocks; ++ob)
        for (size_t c = 0; c < spec.c_in; ++c)
          for (size_t ky = 0; ky < g.kh; ++ky)
            for (size_t j = 0; j < kw_pairs; ++j)
              for (size_t o = 0; o < kO; ++o) {
                const size_t kx = 2 * j;
                const float lo = weight(ob, c, ky * g.kw + kx, 0, o);
                const float hi = kx + 1 < g.kw ? weight(ob, c, ky * g.kw + kx + 1, 0, o) : 0.0f;
                *dst++ = static_cast<uint32_t>(kernels::LowpF32ToBf16(lo)) |
                         (static_cast<uint32_t>(kernels::LowpF32ToBf16(hi)) << 16);
              }
    } else if (bf16_direct) {
      // [o_block][c_block][ky][kx][8 input pairs][32 outputs] uint32 (channel 2j low, 2j+1 high).
      op->ldw_ = block_floats / 2;
      op->w_pairs_ = static_cast<uint32_t*>(AlignedAlloc(o_blocks * op->ldw_ * sizeof(uint32_t)));
      uint32_t* dst = op->w_pairs_;
      for (size_t ob = 0; ob < o_blocks; ++ob)
        for (size_t cb = 0; cb < c_blocks; ++cb)
          for (size_t t = 0; t < taps; ++t)
            for (size_t l = 0; l < kB; l += 2)
              for (size_t o = 0; o < kO; ++o)
                *dst++ = static_cast<uint32_t>(kernels::LowpF32ToBf16(weight(ob, cb, t, l, o))) |
                         (static_cast<uint32_t>(kernels::LowpF32ToBf16(weight(ob, cb, t, l + 1, o))) << 16);
    } else {
      // [o_block][c_block][ky][kx][16 (or 1) inputs][32 outputs]: the kernel walks it front to back.
      op->ldw_ = block_floats;
      op->w_ = static_cast<float*>(AlignedAlloc(o_blocks * block_floats * sizeof(float)));
      float* dst = op->w_;
      for (size_t ob = 0; ob < o_blocks; ++ob)
        for (size_t cb = 0; cb < c_blocks; ++cb)
          for (size_t t = 0; t < taps; ++t)
            for (size_t l = 0; l < kB; ++l)
              for (size_t o = 0; o < kO; ++o) *dst++ = weight(ob, cb, t, l, o);
    }
    for (size_t co = 0; co < o_blocks * kO; ++co) op->bias_blocks_[co] = co < spec.c_out ? op->bias_[co] : 0.0f;
    // 1x1 stride 1 unpadded: large planes run the pointwise GEMM kernel, reading these same blocked
    // weights (see Run), so the op holds one copy of them. Not for bf16 (no bf16 pointwise kernel
    // on the blocked weights): those always take the direct tiles.
    const bool zero_pads = g.auto_pad != ConvAutoPad::kNotSet || (g.pad_t == 0 && g.pad_l == 0 && g.pad_b == 0 && g.pad_r == 0);
    if (!bf16_direct && g.kh == 1 && g.kw == 1 && g.sh == 1 && zero_pads) {
      op->pointwise_uk_ = kernels::F32ConvGemmUkernelAvx512();
      op->pointwise_ = true;
      op->k_run_ = kg;
    }
    op->bytes_ = RoundUp(o_blocks * op->ldw_ * 4, 64) + RoundUp(o_blocks * kO * sizeof(float), 64) +
                 spec.c_out * sizeof(float);
    return op;
  }
#endif

  op->path_ = Path::kGemm;
  const ConvVariant f32_variant = variant == ConvVariant::kAmx ? ConvVariant::kAvx512 : variant;
  op->f32_uk_ = F32Ukernel(f32_variant);
#if defined(__x86_64__) || defined(_M_X64)
  if (f32_variant == ConvVariant::kAvx512) {
    op->im2col_uk_ = kernels::F32Im2colUkernelAvx512();
    // 1x1, stride 1, no padding (explicit zeros, or any auto_pad: SAME pads a 1x1 stride-1 window
    // by 0): B is the input itself, read in place by the pointwise kernel; the bias seeds the
    // accumulators instead of riding in a K row.
    const bool zero_pads = g.auto_pad != ConvAutoPad::kNotSet || (g.pad_t == 0 && g.pad_l == 0 && g.pad_b == 0 && g.pad_r == 0);
    if (g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && zero_pads) {
      op->pointwise_uk_ = kernels::F32ConvGemmUkernelAvx512();
      op->pointwise_ = true;
    }
  }
#endif
  op->k_run_ = kg + (op->has_bias_ && !op->pointwise_ ? 1 : 0);
  op->ldw_ = op->k_run_;
  op->w_ = static_cast<float*>(AlignedAlloc(spec.c_out * op->ldw_ * sizeof(float)));
  for (size_t co = 0; co < spec.c_out; ++co) {
    for (size_t k = 0; k < kg; ++k) op->w_[co * op->ldw_ + k] = folded(co, k);
    if (op->k_run_ > kg) op->w_[co * op->ldw_ + kg] = op->bias_[co];
  }
  op->bytes_ = RoundUp(spec.c_out * op->ldw_ * sizeof(float), 64) + spec.c_out * sizeof(float);
  return op;
}

ConvOp::~ConvOp() {
  std::free(w_);
  std::free(dw_blocked_w_);
  std::free(bias_blocks_);
  std::free(w_pairs_);
}

const char* ConvOp::path() const {
  switch (path_) {
    case Path::kGemm:
    case Path::kGemmBf16: return "gemm";
    case Path::kDepthwise: return "depthwise";
    case Path::kDirect: return "direct";
    case Path::kReference: return "reference";
  }
  return "?";
}

const char* ConvOp::ukernel() const {
  switch (path_) {
    case Path::kGemm: return pointwise_ ? pointwise_uk_.name : f32_uk_.name;
    case Path::kGemmBf16: return bf16_uk_.name;
    case Path::kDepthwise: return window_name_;
    case Path::kDirect:
      if (amx_) return "bf16_conv_nchw16c_14x32__amx";
      if (bf16_direct_) return in_block_ == 1 ? "bf16_conv_nchw_14x32__avx512bf16" : "bf16_conv_nchw16c_14x32__avx512bf16";
      return in_block_ == 1 ? "f32_conv_nchw_14x32__avx512" : "f32_conv_nchw16c_14x32__avx512";
    case Path::kReference: return "f32_conv__reference";
  }
  return "?";
}

namespace {
// 1x1 stride-1 convs on planes of at least this many pixels run the pointwise GEMM kernel (B read in
// place, no blocked copy) instead of the direct kernel. Measured on ResNet-50's 1x1 layers (GEMM ms /
// direct ms, 1 thread, interleaved, a loaded machine): 56x56 0.44-1.24 (three of four slower direct),
// 28x28 0.84-1.07, 14x14 1.05-1.34, 7x7 0.96-1.21: on small planes the GEMM's 32-pixel panels waste
// lanes (7x7: 49 of 64) and the blocked copy is cheap; on large ones the copy is not.
constexpr size_t kDirectMaxPixelsPointwise = 28 * 28;
}  // namespace

bool ConvOp::Run(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n, size_t h,
                 size_t w, float* y, const float* residual, bool residual_before_activation,
                 std::string* error) const {
  WindowShape s;
  std::string e = ResolveWindow(spec_.window, h, w, &s);
  if (!e.empty()) {
    *error = e;
    return false;
  }
  kernels::GemmEpilogue ep{nullptr, nullptr, residual, s.oh * s.ow, spec_.activation,
                           residual_before_activation ? 1 : 0, spec_.alpha, spec_.beta};
  bool ok = true;
  switch (path_) {
    case Path::kReference: {
      kernels::ConvRefArgs a{x, n, spec_.c_in, h, w, w_, ldw_, has_bias_ ? bias_.data() : nullptr, spec_.c_out,
                             spec_.group, spec_.window.kh, spec_.window.kw, spec_.window.sh, spec_.window.sw,
                             spec_.window.dh, spec_.window.dw, s.pad_t, s.pad_l, s.oh, s.ow, y, residual, &ep};
      ok = pool.ParallelFor(n * spec_.c_out, threads, [&](size_t t) {
        kernels::F32ConvReference(&a, t / spec_.c_out, t % spec_.c_out);
      }, cancel);
      if (!ok) *error = "aborted";
      return ok;
    }
    case Path::kDepthwise: ok = RunDepthwise(pool, threads, cancel, x, n, h, w, s, y, ep); break;
    case Path::kDirect:
      ok = pointwise_ && s.oh * s.ow >= kDirectMaxPixelsPointwise
               ? RunPointwise(pool, threads, cancel, x, n, h * w, y, ep)
               : RunDirect(pool, threads, cancel, x, n, h, w, s, y, ep);
      break;
    case Path::kGemm:
    case Path::kGemmBf16:
      ok = pointwise_ ? RunPointwise(pool, threads, cancel, x, n, h * w, y, ep)
                      : RunGemm(pool, threads, cancel, x, n, h, w, s, y, ep);
      break;
  }
  if (!ok && error->empty()) *error = "aborted";
  return ok;
}

namespace {
// K block of the fp32 path: a 256 x 32 panel slice is 32 KiB (L1/L2) and the 12 x 256 weight
// slice of a row tile 12 KiB; up to 8 panels (256 output pixels) per task share each weight slice.
// Measured (1 thread, best of 60, ResNet 3x3 and 1x1 layers): kc 128 and 256 within noise, 64 and
// 512 5-20% slower. Weights pre-packed in 12-row k-major tiles (one broadcast stream instead of 12
// rows) were tried and were no faster (2x slower on 7x7x512 3x3), so A is read in place.
constexpr size_t kKc = 256;
constexpr size_t kPanelsPerTask = 8;
// Below this many FLOPs per thread a convolution runs on fewer threads (see ThreadsForWork): the
// digits CNN's 8x8 layers (about 1 MFLOP) are faster on one.
constexpr double kMinFlopsPerThread = 1024.0 * 1024;
// The blocked pools of a plan (taps, or elements summed) split at far less work per thread: their
// input comes from convs whose threads each kept their share of the batch in their own L2
// (HomedChunks), and one thread taking it all reads the other's half across cores. The digits CNN
// at batch 64 on 2 threads, per run: its max pool (65K taps) 15 -> 8.5 us split, its global average
// pool (16K elements) 6.9 -> 4.6 us, where the threshold above kept both on one thread.
constexpr double kMinHomedWorkPerThread = 4096;
// What a direct tile costs beyond its FMAs (zeroing, storing and the epilogue of its accumulators,
// its loop set-up), in FLOPs of the FMAs' time: ~300 cycles. A conv of few input channels is mostly
// that: the digits stem (1 -> 16 channels on 8x8, 4 tiles of 144 FMAs per image) ran at ~35
// GFLOP/s, and counted by FLOPs alone it stayed on one thread at batch 64.
constexpr double kTileOverheadFlops = 8192;
// Threads for a conv of `work` FLOPs on at most `threads` of the pool (kMinFlopsPerThread each).
unsigned ConvThreads(const ThreadPool& pool, unsigned threads, double work) {
  return ThreadsForWork(std::max(1u, std::min(threads, pool.size())), work, kMinFlopsPerThread);
}
// Pointwise inputs larger than this are assumed to come from beyond L2 (see RunPointwise).
size_t PackPointwiseBytes() {
  static const size_t v = [] {
    const char* e = std::getenv("SONDE_CONV_PACK_BYTES");
    return e ? static_cast<size_t>(std::strtoull(e, nullptr, 10)) : size_t{1} << 21;
  }();
  return v;
}
bool PackPointwise(size_t input_bytes) { return input_bytes > PackPointwiseBytes(); }
}  // namespace

bool ConvOp::RunGemm(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n,
                     size_t h, size_t w, const WindowShape& s, float* y, const kernels::GemmEpilogue& ep0) const {
  const WindowGeometry& g = spec_.window;
  const bool bf16 = path_ == Path::kGemmBf16;
  const size_t mr = bf16 ? bf16_uk_.mr : f32_uk_.mr, nr = bf16 ? bf16_uk_.nr : f32_uk_.nr;
  const size_t groups = spec_.group, cg = spec_.c_in / groups, cog = spec_.c_out / groups;
  const size_t hwo = s.oh * s.ow;
  const size_t panels = (hwo + nr - 1) / nr, m_tiles = (cog + mr - 1) / mr;
  const unsigned nthreads = ConvThreads(pool, threads, Flops(n, hwo));
  // Task grid: (image, group, panel block, row block). Start with all rows and 8 panels per task,
  // then split until every thread has a few tasks. Splitting panels re-reads the weights once more
  // per extra block; splitting rows would repeat the im2col (see `shared` below). So split rows
  // first when the group's weights (cog x K) outweigh its im2col (K x OH*OW), as on 7x7x512 3x3
  // (9.4 MB of weights, 2 panels). One thread takes a single task per image and group.
  size_t nb = std::min(kPanelsPerTask, panels), mb = m_tiles;
  auto tasks = [&] { return n * groups * ((panels + nb - 1) / nb) * ((m_tiles + mb - 1) / mb); };
  const bool rows_first = cog > hwo;
  const size_t target = nthreads == 1 ? 1 : 4 * static_cast<size_t>(nthreads);
  while (tasks() < target && (nb > 1 || mb > 1)) {
    if (rows_first ? mb == 1 : nb > 1) nb = (nb + 1) / 2;
    else mb = (mb + 1) / 2;
  }
  auto m_blocks_of = [&](size_t rows_per_block) { return (m_tiles + rows_per_block - 1) / rows_per_block; };
  const size_t p_blocks = (panels + nb - 1) / nb, m_blocks = m_blocks_of(mb);
  const bool trivial = !ep0.residual && ep0.activation == kernels::kActNone;
  const size_t bias_rows = has_bias_ ? (bf16 ? 3 : 1) : 0;
  const size_t kc_max = bf16 ? k_run_ : std::min(kKc, k_run_);
  // Rows split across tasks would each repeat the im2col of the same panels; then pack every panel
  // once, in parallel, into one shared buffer (small: these layers have few output pixels, e.g.
  // 7 panels x K = 2305 x 32 floats = 2 MiB at 14x14x256 3x3) and let the row blocks read it.
  // Measured at 2 threads on 14x14x256 3x3: 1.97 ms (each of 8 row blocks packing) -> 1.0 ms.
  const bool shared = !bf16 && m_blocks_of(mb) > 1;
  std::unique_ptr<float, decltype(&std::free)> packed(nullptr, &std::free);
  if (shared) {
    const size_t panel_floats = k_run_ * nr, count = n * groups * panels;
    packed.reset(static_cast<float*>(AlignedAlloc(count * panel_floats * sizeof(float))));
    float* base = packed.get();
    if (!pool.ParallelFor(count, nthreads, [&](size_t t) {
          const size_t p = t % panels, gi = (t / panels) % groups, b = t / panels / groups;
          const kernels::Im2colArgs c{x + (b * spec_.c_in + gi * cg) * h * w, h, w, s.oh, s.ow, g.kh, g.kw, g.sh,
                                      g.sw, g.dh, g.dw, s.pad_t, s.pad_l, kg_, bias_rows};
          im2col_uk_(&c, 0, k_run_, p * nr, std::min(nr, hwo - p * nr), nr, base + t * panel_floats);
        }, cancel))
      return false;
  }
  // Per-thread scratch. fp32: nb panels of kc x nr floats. bf16: one panel of all K pairs (uint32)
  // plus its 2 * pairs fp32 rows.
  const size_t scratch = bf16 ? 3 * ldw_ * nr : shared ? 0 : nb * kc_max * nr;
  std::atomic<bool> oom{false};
  auto task = [&](size_t t) {
    const size_t mbi = t % m_blocks, pbi = (t / m_blocks) % p_blocks, gi = (t / m_blocks / p_blocks) % groups,
                 b = t / m_blocks / p_blocks / groups;
    float* buf = scratch ? ThreadScratch(scratch) : nullptr;
    if (scratch && !buf) {
      oom.store(true);
      return;
    }
    const kernels::Im2colArgs c{x + (b * spec_.c_in + gi * cg) * h * w, h, w, s.oh, s.ow, g.kh, g.kw, g.sh, g.sw,
                                g.dh, g.dw, s.pad_t, s.pad_l, kg_, bias_rows};
    const size_t t0 = mbi * mb, t1 = std::min(m_tiles, t0 + mb);
    const size_t p0 = pbi * nb, p1 = std::min(panels, p0 + nb);
    const size_t row0 = gi * cog;  // first output channel of the group
    float* yb = y + (b * spec_.c_out + row0) * hwo;
    kernels::GemmEpilogue ep = ep0;
    if (ep.residual) ep.residual += (b * spec_.c_out + row0) * hwo;
    if (bf16) {
      const size_t pairs = ldw_;
      uint32_t* panel = reinterpret_cast<uint32_t*>(buf);
      float* rows_f32 = buf + pairs * nr;  // 2 * pairs rows of nr floats: one im2col call per panel
      for (size_t p = p0; p < p1; ++p) {
        const size_t j0 = p * nr, ncols = std::min(nr, hwo - j0);
        im2col_uk_(&c, 0, 2 * pairs, j0, ncols, nr, rows_f32);
        for (size_t q = 0; q < pairs; ++q) {
          const float* r0 = rows_f32 + 2 * q * nr;
          const float* r1 = r0 + nr;
          uint32_t* dst = panel + q * nr;
          for (size_t l = 0; l < nr; ++l)
            dst[l] = static_cast<uint32_t>(kernels::LowpF32ToBf16(r0[l])) |
                     (static_cast<uint32_t>(kernels::LowpF32ToBf16(r1[l])) << 16);
        }
        for (size_t ti = t0; ti < t1; ++ti) {
          const size_t m0 = ti * mr, rows = std::min(mr, cog - m0);
          const kernels::GemmEpilogue tep = OffsetEpilogue(ep, m0, j0);
          bf16_uk_.fn(rows, ncols, k_run_, w_pairs_ + (row0 + m0) * ldw_, ldw_ * sizeof(uint32_t), panel,
                      yb + m0 * hwo + j0, hwo, nullptr, trivial ? nullptr : &tep);
        }
      }
      return;
    }
    for (size_t k0 = 0; k0 < k_run_; k0 += kc_max) {
      const size_t kc = std::min(kc_max, k_run_ - k0);
      const bool last = k0 + kc == k_run_;
      if (!shared) {
        for (size_t p = p0; p < p1; ++p) {
          const size_t j0 = p * nr, ncols = std::min(nr, hwo - j0);
          im2col_uk_(&c, k0, kc, j0, ncols, nr, buf + (p - p0) * kc * nr);
        }
      }
      for (size_t p = p0; p < p1; ++p) {
        const size_t j0 = p * nr, ncols = std::min(nr, hwo - j0);
        const float* panel = shared ? packed.get() + (((b * groups + gi) * panels + p) * k_run_ + k0) * nr
                                    : buf + (p - p0) * kc * nr;
        for (size_t ti = t0; ti < t1; ++ti) {
          const size_t m0 = ti * mr, rows = std::min(mr, cog - m0);
          const kernels::GemmEpilogue tep = OffsetEpilogue(ep, m0, j0);
          f32_uk_.fn(rows, ncols, kc, w_ + (row0 + m0) * ldw_ + k0, ldw_, panel, yb + m0 * hwo + j0, hwo, k0 > 0,
                     last && !trivial ? &tep : nullptr);
        }
      }
    }
  };
  const bool ok = pool.ParallelFor(n * groups * p_blocks * m_blocks, nthreads, task, cancel);
  if (oom.load()) throw std::bad_alloc();
  return ok;
}

bool ConvOp::RunPointwise(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n,
                          size_t hw, float* y, const kernels::GemmEpilogue& ep0) const {
  const size_t mr = pointwise_uk_.mr, nr = pointwise_uk_.nr;
  const size_t groups = spec_.group, cg = spec_.c_in / groups, cog = spec_.c_out / groups;
  // Weights in the direct path's 32-channel blocks: row tiles of 12, 12 and 8 rows per block, so none
  // straddles two blocks; element (co, k) of block ob at ob * ldw_ + k * 32 + co % 32.
  const bool blocked = path_ == Path::kDirect;
  constexpr size_t kO = kernels::kNchwcOutBlock;
  static_assert(kO == 32, "blocked row tiles are 12 + 12 + 8");
  const size_t panels = (hw + nr - 1) / nr,
               m_tiles = blocked ? (cog + kO - 1) / kO * 3 : (cog + mr - 1) / mr;
  const unsigned nthreads = ConvThreads(pool, threads, Flops(n, hw));
  // Same grid as RunGemm; with nothing to pack, splitting rows only costs re-reading input panels.
  size_t nb = std::min(kPanelsPerTask, panels), mb = m_tiles;
  auto tasks = [&] { return n * groups * ((panels + nb - 1) / nb) * ((m_tiles + mb - 1) / mb); };
  const bool rows_first = cog > hw;
  const size_t target = nthreads == 1 ? 1 : 4 * static_cast<size_t>(nthreads);
  while (tasks() < target && (nb > 1 || mb > 1)) {
    if (rows_first ? mb == 1 : nb > 1) nb = (nb + 1) / 2;
    else mb = (mb + 1) / 2;
  }
  const size_t p_blocks = (panels + nb - 1) / nb, m_blocks = (m_tiles + mb - 1) / mb;
  const bool trivial = !ep0.residual && ep0.activation == kernels::kActNone;
  const size_t kc_max = std::min(kKc, k_run_);
  // Reading B in place walks kc rows hw floats apart, nr floats of each per panel: kc concurrent
  // streams, more than the hardware prefetchers follow. That is free while the batch's input sits in
  // cache (batch 1, small planes) but starves the kernel once it comes from DRAM (a batch of large
  // planes), which made the per-image cost grow with the batch. Then each task first copies its
  // kc x (nb panels) block row by row into a contiguous scratch (sequential, prefetched reads) and
  // the kernel reads that from L1/L2.
  const size_t block_cols = nb * nr;
  const bool pack = PackPointwise(n * spec_.c_in * hw * sizeof(float));
  std::atomic<bool> oom{false};
  auto task = [&](size_t t) {
    const size_t mbi = t % m_blocks, pbi = (t / m_blocks) % p_blocks, gi = (t / m_blocks / p_blocks) % groups,
                 b = t / m_blocks / p_blocks / groups;
    const size_t t0 = mbi * mb, t1 = std::min(m_tiles, t0 + mb);
    const size_t p0 = pbi * nb, p1 = std::min(panels, p0 + nb);
    const size_t row0 = gi * cog;
    const float* xg = x + (b * spec_.c_in + gi * cg) * hw;
    float* yb = y + (b * spec_.c_out + row0) * hw;
    kernels::GemmEpilogue ep = ep0;
    if (ep.residual) ep.residual += (b * spec_.c_out + row0) * hw;
    float* buf = nullptr;
    if (pack && !(buf = ThreadScratch(kc_max * block_cols))) {
      oom.store(true);
      return;
    }
    const size_t c0 = p0 * nr, width = std::min(p1 * nr, hw) - c0;
    for (size_t k0 = 0; k0 < k_run_; k0 += kc_max) {
      const size_t kc = std::min(kc_max, k_run_ - k0);
      const bool last = k0 + kc == k_run_;
      if (pack)
        for (size_t kk = 0; kk < kc; ++kk) std::memcpy(buf + kk * block_cols, xg + (k0 + kk) * hw + c0, width * sizeof(float));
      for (size_t p = p0; p < p1; ++p) {
        const size_t j0 = p * nr, ncols = std::min(nr, hw - j0);
        const float* panel = pack ? buf + (j0 - c0) : xg + k0 * hw + j0;
        const size_t ldb = pack ? block_cols : hw;
        for (size_t ti = t0; ti < t1; ++ti) {
          size_t m0 = ti * mr, rows, lda = ldw_, ldk = 1;
          const float* a;
          if (blocked) {
            const size_t ob = ti / 3, off = ti % 3 * 12;
            m0 = ob * kO + off;
            if (m0 >= cog) continue;
            rows = std::min<size_t>(off == 24 ? 8 : 12, cog - m0);
            a = w_ + ob * ldw_ + k0 * kO + off;
            lda = 1;
            ldk = kO;
          } else {
            rows = std::min(mr, cog - m0);
            a = w_ + (row0 + m0) * ldw_ + k0;
          }
          const kernels::GemmEpilogue tep = OffsetEpilogue(ep, m0, j0);
          pointwise_uk_.fn(rows, ncols, kc, a, lda, ldk, panel, ldb,
                           k0 == 0 && has_bias_ ? bias_.data() + row0 + m0 : nullptr, yb + m0 * hw + j0, hw, k0 > 0,
                           last && !trivial ? &tep : nullptr);
        }
      }
    }
  };
  const bool ok = pool.ParallelFor(n * groups * p_blocks * m_blocks, nthreads, task, cancel);
  if (oom.load()) throw std::bad_alloc();
  return ok;
}

namespace {
// fn(begin, end) over `count` items of a batch in `threads` contiguous chunks, one per thread, each
// thread taking the same chunk in every step (ThreadPool::ParallelForHomed): a batch whose images
// the threads divide keeps each image on one core from one layer to the next. Items are
// image-major (a batch's 16-channel block planes, or its images), so with n images and threads
// dividing n the chunks are whole images.
template <typename Fn>
bool HomedChunks(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, size_t count, Fn&& fn) {
  const size_t chunks = std::max<size_t>(1, std::min<size_t>(threads, count));
  return pool.ParallelForHomed(chunks, static_cast<unsigned>(chunks),
                               [&](size_t c) { fn(c * count / chunks, (c + 1) * count / chunks); }, cancel);
}

// Depthwise/pooling planes per ParallelFor index: a 7x7 plane is ~200 FLOPs, too little to hand out alone.
size_t PlanesPerTask(size_t plane_floats) { return std::max<size_t>(1, 4096 / std::max<size_t>(1, plane_floats)); }

// Zeroes the border of one 16-channel block plane of a blocked tensor around interior rows
// [r0, r1): those rows' side columns, and the rows above (below) the interior with the first (last)
// interior row. The border is what a later conv reads as its padding.
void ZeroBlockBorder(void* block, const BlockedLayout& l, size_t r0, size_t r1) {
  constexpr size_t kB = kernels::kNchwcBlock;
  const size_t eb = l.elem_bytes(), row = l.wp() * kB * eb;
  char* blk = static_cast<char*>(block);
  for (size_t r = r0; r < r1; ++r) {
    char* line = blk + (l.pad_t + r) * row;
    if (l.pad_l) std::memset(line, 0, l.pad_l * kB * eb);
    if (l.pad_r) std::memset(line + (l.pad_l + l.w) * kB * eb, 0, l.pad_r * kB * eb);
  }
  if (r0 == 0 && l.pad_t) std::memset(blk, 0, l.pad_t * row);
  if (r1 == l.h && l.pad_b) std::memset(blk + (l.pad_t + l.h) * row, 0, l.pad_b * row);
}

// The channel-blocked input copy of the direct path, on the thread that runs the op (kept like
// ThreadScratch, but a separate buffer: the tasks of the same run may use ThreadScratch).
float* BlockedInputScratch(size_t floats) {
  thread_local GrowingBuffer buf;
  return buf.Get(floats);
}
// Its bf16 copy (bf16 direct path), likewise.
uint16_t* Bf16InputScratch(size_t elements) {
  thread_local GrowingBuffer buf;
  return reinterpret_cast<uint16_t*>(buf.Get((elements + 1) / 2));
}
}  // namespace

bool ConvOp::RunDirect(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n,
                       size_t h, size_t w, const WindowShape& s, float* y, const kernels::GemmEpilogue& ep0,
                       const BlockedLayout* yl, const BlockedLayout* rl, const WeightSpan& next) const {
  const size_t kB = in_block_;
  const WindowGeometry& g = spec_.window;
  const size_t c_blocks = (spec_.c_in + kB - 1) / kB;
  const size_t hp = std::max(s.pad_t + h, (s.oh - 1) * g.sh + g.kh);
  // The bf16 stem reads taps in pairs: an odd kw's last pair reads one zero column more.
  const size_t kw_read = bf16_direct_ && kB == 1 ? (g.kw + 1) / 2 * 2 : g.kw;
  const size_t wp = std::max(s.pad_l + w, (s.ow - 1) * g.sw + kw_read);
  const size_t plane = hp * wp * kB, image = c_blocks * plane;
  const unsigned nthreads = ConvThreads(pool, threads, DirectWork(n, s));
  float* xb = BlockedInputScratch(n * image);
  uint16_t* xh = bf16_direct_ ? Bf16InputScratch(n * image) : nullptr;
  if (!xb || (bf16_direct_ && !xh)) throw std::bad_alloc();
  // Blocked copy: zero the border rows/columns, transpose 16 channel planes into pixel-major rows
  // (16x16 register transposes; a scalar copy took ~0.3 ms of a 56x56x256 input).
  const auto pack_block = [&](size_t t) {
        const size_t b = t / c_blocks, cb = t % c_blocks;
        float* dst = xb + b * image + cb * plane;
        const float* src = x + (b * spec_.c_in + cb * kB) * h * w;
        for (size_t r = 0; r < hp; ++r) {
          float* row = dst + r * wp * kB;
          if (r < s.pad_t || r >= s.pad_t + h) {
            std::memset(row, 0, wp * kB * sizeof(float));
            continue;
          }
          std::memset(row, 0, s.pad_l * kB * sizeof(float));
          std::memset(row + (s.pad_l + w) * kB, 0, (wp - s.pad_l - w) * kB * sizeof(float));
          if (kB == 1) std::memcpy(row + s.pad_l, src + (r - s.pad_t) * w, w * sizeof(float));
          else pack_uk_(src + (r - s.pad_t) * w, h * w, w, row + s.pad_l * kB, std::min(kB, spec_.c_in - cb * kB));
        }
        // The bf16 copy while the block is in cache.
        if (xh) to_bf16_uk_(dst, plane, xh + b * image + cb * plane);
      };
  // Where the tiles take whole images per thread, each thread copies its own images.
  const bool packed = WholeImageTasks(nthreads, n)
                          ? HomedChunks(pool, nthreads, cancel, n * c_blocks,
                                        [&](size_t t0, size_t t1) { for (size_t t = t0; t < t1; ++t) pack_block(t); })
                          : pool.ParallelFor(n * c_blocks, nthreads, pack_block, cancel);
  if (!packed) return false;
  return RunDirectTiles(pool, nthreads, cancel, xh ? static_cast<const void*>(xh) : xb, hp, wp, n, s, y, yl, ep0, rl, next);
}

WeightSpan ConvOp::FirstWeights() const {
  if (path_ != Path::kDirect) return {};
  // RunDirectTiles' first item: one 32-channel block, or two with the pair tiles.
  const size_t o_blocks = (spec_.c_out + kernels::kNchwcOutBlock - 1) / kernels::kNchwcOutBlock;
  const size_t blocks = std::min<size_t>(pair_uk_ ? 2 : 1, o_blocks);
  const size_t w_block = ldw_ * (bf16_direct_ ? sizeof(uint32_t) : sizeof(float));
  return {bf16_direct_ ? reinterpret_cast<const char*>(w_pairs_) : reinterpret_cast<const char*>(w_), blocks * w_block};
}

// Where the direct tiles prefetch the next block's weights (RunDirectTiles): blocks of at least this
// many bytes of weights (a 3x3 conv of 64 fp32 input channels: 72 KiB), and tasks of up to this many
// runs on 2+ threads.
constexpr size_t kPrefetchWeightBytes = 64 * 1024;
constexpr size_t kPrefetchRunsPerTask = 4;

bool ConvOp::RunDirectTiles(ThreadPool& pool, unsigned nthreads, const CancelFlag* cancel, const void* xo,
                            size_t hp, size_t wp, size_t n, const WindowShape& s, float* y, const BlockedLayout* yl,
                            const kernels::GemmEpilogue& ep0, const BlockedLayout* rl, const WeightSpan& next_layer) const {
  constexpr size_t kB = kernels::kNchwcBlock, kO = kernels::kNchwcOutBlock;
  const WindowGeometry& g = spec_.window;
  const size_t c_blocks = (spec_.c_in + in_block_ - 1) / in_block_, o_blocks = (spec_.c_out + kO - 1) / kO, hwo = s.oh * s.ow;
  // With the pair tiles an item covers two 32-channel blocks (the last alone when they are odd):
  // the orders below count items' blocks (o_items) and weights (w_item) instead.
  const DirectTiling tiling = Tiling(s.ow);
  const bool pairs = tiling.pairs;
  const size_t o_items = tiling.o_items, per_item = tiling.per_item;
  const size_t c_last = spec_.c_in - (c_blocks - 1) * in_block_;
  // Bytes per image of the (fp32 or bf16) blocked input.
  const size_t image = c_blocks * hp * wp * in_block_ * (bf16_direct_ ? sizeof(uint16_t) : sizeof(float));
  // Blocked output: 16-channel blocks per image.
  const size_t yc_blocks = kernels::NchwcBlocks(spec_.c_out);
  // Items: one tile row group of one image and 32-channel block. Three orders, the one that streams
  // the fewest bytes from beyond L2 chosen per run:
  //  - images outermost, then blocks, rows innermost, so consecutive tiles reuse the block's weights
  //    from L2: all weights are read once per image when they do not stay in L2 between images, and
  //    an image's input once per block when it does not stay in L2 between blocks;
  //  - the same in bands of rows: a band's input (a quarter of L2) is read once and every block's
  //    tiles run over it (an early layer's image is larger than L2: a 56x56x256 1x1/2 input is 3 MiB,
  //    and 16 blocks each re-read it from L3 took the conv 1.5x as long);
  //  - blocks outermost, every image's tiles of a block following each other: the batch's input once
  //    per block when it does not stay in L2 (late layers of a batch: 7x7x512 3x3 weights are 9 MiB,
  //    an image's input 100 KiB).
  // A run is the consecutive items of one block. Output rows of at most 7 pixels go two at a time
  // (one 14-pixel tile).
  const size_t row_step = tiling.row_step, row_groups = (s.oh + row_step - 1) / row_step;
  const size_t items = n * o_items * row_groups;
  const size_t w_block = ldw_ * (bf16_direct_ ? sizeof(uint32_t) : sizeof(float));  // bf16: ldw_ pairs
  const size_t w_item = per_item * w_block;
  const size_t l2_half = Cpu().l2_bytes / 2, weights = o_blocks * w_block;
  const double wd = static_cast<double>(weights), id = static_cast<double>(n * image);
  // An image stays in L2 from one block's tiles to the next when it fits beside a block's weights
  // (a 28x28x512 input, 1.6 MiB, does in 2 MiB: banding that 1x1/2 conv, re-reading its 2 MiB of
  // weights per band, took 1.23x as long).
  const bool image_stays = image + w_item <= Cpu().l2_bytes / 8 * 7;
  const double whole_bytes = (weights <= l2_half ? wd : n * wd) + (image_stays ? id : o_items * id);
  // Input rows one row group reads (its taps' rows overlap the next group's by kh - sh).
  const size_t band_budget = Cpu().l2_bytes / 4;
  const size_t group_bytes = image / hp * std::min(hp, row_step * g.sh + (g.kh > g.sh ? g.kh - g.sh : 0));
  const size_t band = std::max<size_t>(1, band_budget / group_bytes), bands = (row_groups + band - 1) / band;
  const double banded_bytes = (weights <= l2_half ? wd : n * bands * wd) + id;
  const double block_major_bytes = wd + (n * image <= l2_half ? id : o_items * id);
  // Also where the weights leave L2 between images, though each task then streams all of them:
  // ResNet-50's 14x14 1x1 1024->512 (2 MiB) at batch 8 on 2 threads took 4.6 -> 6.1 ms so, but
  // keeping such layers as before made the whole model 1-2% slower at batch 2, 4 and 8.
  const bool image_tasks = WholeImageTasks(nthreads, n);
  // Threads that cannot take whole images (batch 1, or 3 on 2 threads) split each image into one
  // band of rows per thread, every block's tiles over its band, where the input outweighs the
  // weights: each thread then reads its share of the input into its own L2 once (and leaves its rows
  // of the output there for the next conv), where splitting the blocks made both threads read all
  // of it. ResNet-50 in one process against the block split: n1 t2 0.981-0.985x time, n3 t2 0.941x;
  // MobileNetV2 n1 t2 0.986x. Splitting every conv so (the weight-heavy late ones too): 1.095x.
  const bool band_split = !image_tasks && nthreads > 1 && o_items > 1 && wd < id && row_groups >= 2 * nthreads;
  const bool block_major = !band_split && !image_tasks && n > 1 && block_major_bytes < std::min(whole_bytes, banded_bytes);
  const bool banded = band_split || (!block_major && o_items > 1 && bands > 1 && banded_bytes < whole_bytes);
  const size_t band_groups = band_split ? (row_groups + nthreads - 1) / nthreads : banded ? band : row_groups;
  // Item it as (image, block, row group) and the end of its run.
  struct Item {
    size_t b, ob, rg, run_end;
  };
  const auto decode = [&](size_t it) -> Item {
    if (block_major) {
      const size_t per_block = n * row_groups;
      return {(it / row_groups) % n, it / per_block, it % row_groups, it - it % per_block + per_block};
    }
    const size_t per_image = o_items * row_groups, b = it / per_image, in_image = it % per_image;
    const size_t bd = in_image / (o_items * band_groups), in_band = in_image - bd * o_items * band_groups;
    const size_t groups = std::min(band_groups, row_groups - bd * band_groups);  // the last band may be short
    const size_t r = in_band % groups;
    return {b, in_band / groups, bd * band_groups + r, it - r + groups};
  };
  // The tiles prefetch the next run's block into L2, a slice per tile, where a block's weights are
  // large enough to come from memory: a thread's runs then follow each other without a tile that
  // waits on its weights alone (only a task's first run does). So a task holds several runs. Banded,
  // every block's weights stay in L2.
  const bool prefetch = !banded && w_block >= kPrefetchWeightBytes && o_items > 1;
  const size_t run = block_major ? n * row_groups : row_groups;
  const size_t target = nthreads == 1 ? 1 : 8 * static_cast<size_t>(nthreads);
  size_t per = (items + target - 1) / target;
  if (prefetch && nthreads > 1) per = std::max(per, std::min((items + nthreads - 1) / nthreads, kPrefetchRunsPerTask * run));
  // Whole images: one contiguous share of the batch per thread, the same share in every layer.
  if (image_tasks) per = items / nthreads;
  if (band_split) per = o_items * band_groups;
  const size_t tasks = (items + per - 1) / per;
  const size_t taps = c_blocks * g.kh * g.kw;
  const size_t seg_w = tiling.seg_w, pair_w = tiling.pair_w;
  const bool trivial = !ep0.residual && ep0.activation == kernels::kActNone;
  // One task per thread (images or bands of rows): each thread keeps its part from layer to layer.
  const bool homed = image_tasks || band_split;
  // What every item of a task passes its tiles alike.
  const bool blocked_res = yl && rl && ep0.residual;
  const kernels::NchwcConvArgs task_args{nullptr, c_blocks, hp, wp, c_last, nullptr, g.kh, g.kw, g.sh, g.sw, nullptr, 0,
                                         nullptr, s.oh, s.ow, nullptr, yl ? yl->wp() * kB : 0, yl ? yl->block_floats() : 0,
                                         blocked_res ? rl->wp() * kB : 0, blocked_res ? rl->block_floats() : 0,
                                         yl && yl->bf16 ? 1 : 0, nullptr, 0, 0, ldw_};
  const auto task = [&](size_t t) {
    const size_t begin = t * per, end = std::min(items, (t + 1) * per);
    if (begin >= end) return;
    // The task's items follow each other in decode's order: the first is decoded, the rest advance
    // a cursor. An item is one tile on small images (the digits CNN's 8x8 rows in pairs), and
    // decoding each (a handful of 64-bit divisions) was a tenth of those convs' time.
    Item item = decode(begin);
    size_t bd = item.rg / band_groups, r = item.rg - bd * band_groups;
    size_t groups = std::min(band_groups, row_groups - bd * band_groups);
    size_t next_run = items, next_run_ob = 0;  // decode(next_run).ob, for the prefetch below
    for (size_t it = begin; it < end; ++it) {
      if (it > begin) {
        if (block_major) {
          if (++item.rg == row_groups) {
            item.rg = 0;
            if (++item.b == n) {
              item.b = 0;
              ++item.ob;
              item.run_end += n * row_groups;
            }
          }
        } else {
          if (++r == groups) {
            r = 0;
            if (++item.ob == o_items) {
              item.ob = 0;
              if (++bd * band_groups >= row_groups) {
                bd = 0;
                ++item.b;
              }
              groups = std::min(band_groups, row_groups - bd * band_groups);
            }
            item.run_end = it + groups;
          }
          item.rg = bd * band_groups + r;
        }
      }
      const size_t oy = item.rg * row_step, ob = item.ob, b = item.b;
      const size_t rows = std::min(row_step, s.oh - oy);
      const size_t oc0 = ob * per_item * kO;
      // The pair tile stores four 16-channel output blocks: an item whose fourth does not exist (the
      // last of an odd block count, or 33..48 channels) runs its blocks on the 32-channel tiles.
      const bool pair = pairs && spec_.c_out > oc0 + 3 * kB;
      const size_t item_oc = per_item * kO;
      kernels::GemmEpilogue ep = ep0;
      float* yt;
      const size_t y_block = task_args.y_block, res_block = task_args.res_block;
      if (yl) {
        // In elements of y (float, or bf16 with yl->bf16).
        const size_t eb = yl->elem_bytes();
        char* yc = reinterpret_cast<char*>(y);
        yt = reinterpret_cast<float*>(yc + ((b * yc_blocks + oc0 / kB) * y_block + yl->origin()) * eb);
        if (ep.residual) {
          ep.residual += (b * yc_blocks + oc0 / kB) * res_block + rl->origin();
        }
        // The border a later conv reads as padding: the rows' side columns, and the top/bottom rows
        // with the first/last row group.
        const size_t nblk = std::min<size_t>(item_oc / kB, yc_blocks - oc0 / kB);
        for (size_t v = 0; v < nblk; ++v)
          ZeroBlockBorder(yc + (b * yc_blocks + oc0 / kB + v) * y_block * eb, *yl, oy, oy + rows);
      } else {
        yt = y + (b * spec_.c_out + oc0) * hwo;
        if (ep.residual) ep.residual += (b * spec_.c_out + oc0) * hwo;
      }
      const size_t wo = oc0 / kO * ldw_;
      kernels::NchwcConvArgs a = task_args;
      a.x = static_cast<const char*>(xo) + b * image;
      a.w = bf16_direct_ ? static_cast<const void*>(w_pairs_ + wo) : w_ + wo;
      a.bias = bias_blocks_ + oc0;
      a.oc_valid = std::min(item_oc, spec_.c_out - oc0);
      a.y = yt;
      a.ep = trivial ? nullptr : &ep;
      if (prefetch || next_layer.data) {
        const size_t next = item.run_end, j = it - (next - run);
        if (next != next_run) {
          next_run = next;
          next_run_ob = next < end ? decode(next).ob : ob;
        }
        const size_t next_ob = next_run_ob;
        // The next item's weights, or in the task's last run the next layer's first block.
        const char* src = nullptr;
        size_t next_w = 0;
        if (prefetch && next_ob != ob) {
          // The next item's weights: both of a pair's blocks, or the last odd block alone.
          next_w = std::min(w_item, (o_blocks - next_ob * per_item) * w_block);
          src = bf16_direct_ ? reinterpret_cast<const char*>(w_pairs_ + next_ob * per_item * ldw_)
                             : reinterpret_cast<const char*>(w_ + next_ob * per_item * ldw_);
        } else if (next >= end && next_layer.data) {
          next_w = next_layer.bytes;
          src = next_layer.data;
        }
        if (src) {
          // Spread evenly over the run: on the Xeon VM, prefetching it all in the first half or
          // quarter of the run's tiles was slower (a cold 7x7x512 3x3: 2.48 / 2.73 ms against 2.18).
          const size_t slice = (next_w + run - 1) / run;
          const size_t from = std::min(next_w, j * slice), bytes = std::min(next_w - from, slice);
          a.pf = src + from;
          a.pf_bytes = bytes;
          a.pf_step = std::max<size_t>(64, (bytes / taps + 63) / 64 * 64);
        }
      }
      if (pair) {
        for (size_t ox0 = 0; ox0 < s.ow; ox0 += pair_w) {
          pair_uk_(&a, oy, ox0, std::min(pair_w, s.ow - ox0), 1);
          a.pf = nullptr;
        }
        continue;
      }
      for (size_t k = 0; k < per_item && oc0 + k * kO < spec_.c_out; ++k) {
        if (k > 0) {  // a pair item's second block (fp32 only): weights, bias, output, residual 32 channels on
          a.w = static_cast<const float*>(a.w) + ldw_;
          a.bias += kO;
          a.y += yl ? (kO / kB) * y_block : kO * hwo;
          if (ep.residual) ep.residual += rl ? (kO / kB) * res_block : kO * hwo;
        }
        a.oc_valid = std::min(kO, spec_.c_out - oc0 - k * kO);
        for (size_t ox0 = 0; ox0 < s.ow; ox0 += seg_w) {
          direct_uk_(&a, oy, ox0, std::min(seg_w, s.ow - ox0), rows);
          a.pf = nullptr;  // the item's slice is asked for once, by its first segment
        }
      }
    }
  };
  return homed ? pool.ParallelForHomed(tasks, nthreads, task, cancel) : pool.ParallelFor(tasks, nthreads, task, cancel);
}

std::string ConvOp::CheckBlocked(size_t h, size_t w, const BlockedLayout& xl, const BlockedLayout* yl,
                                 const BlockedLayout* rl) const {
  if (!xl.present() && blocked_y_from_nchw()) {
    if (!yl) return "an NCHW x needs a blocked y here";
    if (rl && !yl) return "a blocked residual needs a blocked y";
    if (yl->bf16 && !bf16_direct_) return "bf16 blocked operands need the bf16 direct path";
    if (rl && rl->bf16) return "a blocked residual must be float32";
    WindowShape s;
    std::string e = ResolveWindow(spec_.window, h, w, &s);
    if (!e.empty()) return e;
    if (yl->h != s.oh || yl->w != s.ow) return "y's blocked layout is not the output size";
    if (rl && (rl->h != s.oh || rl->w != s.ow)) return "the residual's blocked layout is not the output size";
    return "";
  }
  if (!xl.present()) return "a blocked y or residual needs a blocked x";
  if (!blocked()) return "this convolution does not run on blocked activations";
  if (blocked_needs_blocked_y() && !yl) return "a blocked depthwise convolution needs a blocked y";
  WindowShape s;
  std::string e = ResolveWindow(spec_.window, h, w, &s);
  if (!e.empty()) return e;
  const WindowGeometry& g = spec_.window;
  if (xl.h != h || xl.w != w) return "x's blocked layout is not the input size";
  // Rows/columns the kernel reads past the interior: the far padding, and the taps of the last
  // output row/column beyond it.
  const size_t need_b = std::max(s.pad_t + h, (s.oh - 1) * g.sh + g.kh) - s.pad_t - h;
  const size_t need_r = std::max(s.pad_l + w, (s.ow - 1) * g.sw + g.kw) - s.pad_l - w;
  if (xl.pad_t < s.pad_t || xl.pad_l < s.pad_l || xl.pad_b < need_b || xl.pad_r < need_r)
    return "x's blocked border is smaller than the convolution's padding";
  if (!yl != !rl && rl) return "a blocked residual needs a blocked y";
  if ((xl.bf16 || (yl && yl->bf16)) && !bf16_direct_) return "bf16 blocked operands need the bf16 direct path";
  if (rl && rl->bf16) return "a blocked residual must be float32";
  if (yl) {
    if (yl->h != s.oh || yl->w != s.ow) return "y's blocked layout is not the output size";
    if (rl && (rl->h != s.oh || rl->w != s.ow)) return "the residual's blocked layout is not the output size";
  }
  return "";
}

bool ConvOp::RunBlocked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                        const BlockedLayout& xl, size_t n, size_t h, size_t w, float* y, const BlockedLayout* yl,
                        const float* residual, const BlockedLayout* rl, bool residual_before_activation,
                        std::string* error, const WeightSpan& next) const {
  std::string e = CheckBlocked(h, w, xl, yl, residual ? rl : nullptr);
  if (e.empty() && residual && !yl != !rl) e = "the residual must be blocked exactly when y is";
  if (!e.empty()) {
    *error = e;
    return false;
  }
  WindowShape s;
  ResolveWindow(spec_.window, h, w, &s);
  kernels::GemmEpilogue ep{nullptr, nullptr, residual, s.oh * s.ow, spec_.activation,
                           residual_before_activation ? 1 : 0, spec_.alpha, spec_.beta};
  if (!xl.present()) {
    const bool ok = RunDirect(pool, threads, cancel, x, n, h, w, s, y, ep, yl, rl, next);
    if (!ok && error->empty()) *error = "aborted";
    return ok;
  }
  const unsigned nthreads = ConvThreads(pool, threads, path_ == Path::kDirect ? DirectWork(n, s) : Flops(n, s.oh * s.ow));
  // This conv's padded (0, 0) inside x's (possibly wider) border.
  const size_t origin = ((xl.pad_t - s.pad_t) * xl.wp() + (xl.pad_l - s.pad_l)) * kernels::kNchwcBlock;
  bool ok;
  if (path_ == Path::kDepthwise) {
    ok = RunDepthwiseBlocked(pool, nthreads, cancel, x + origin, xl, n, s, y, *yl, residual, rl, ep);
  } else if (xl.bf16) {
    ok = RunDirectTiles(pool, nthreads, cancel, reinterpret_cast<const uint16_t*>(x) + origin, xl.hp(), xl.wp(), n, s,
                        y, yl, ep, rl, next);
  } else if (bf16_direct_) {
    // The bf16 copy of all of x, border included (zero stays zero), a block per task.
    const size_t blocks = n * kernels::NchwcBlocks(spec_.c_in), block = xl.block_floats();
    uint16_t* xh = Bf16InputScratch(blocks * block);
    if (!xh) throw std::bad_alloc();
    ok = pool.ParallelFor(blocks, nthreads, [&](size_t t) { to_bf16_uk_(x + t * block, block, xh + t * block); },
                          cancel) &&
         RunDirectTiles(pool, nthreads, cancel, xh + origin, xl.hp(), xl.wp(), n, s, y, yl, ep, rl, next);
  } else {
    ok = RunDirectTiles(pool, nthreads, cancel, x + origin, xl.hp(), xl.wp(), n, s, y, yl, ep, rl, next);
  }
  if (!ok && error->empty()) *error = "aborted";
  return ok;
}

bool ConvOp::RunDepthwiseBlocked(ThreadPool& pool, unsigned nthreads, const CancelFlag* cancel, const float* xo,
                                 const BlockedLayout& xl, size_t n, const WindowShape& s, float* y,
                                 const BlockedLayout& yl, const float* residual, const BlockedLayout* rl,
                                 const kernels::GemmEpilogue& ep0) const {
  constexpr size_t kB = kernels::kNchwcBlock;
  const WindowGeometry& g = spec_.window;
  const size_t cblocks = kernels::NchwcBlocks(spec_.c_out), blocks = n * cblocks, taps = g.kh * g.kw, y_row = yl.wp() * kB;
  const bool trivial = !residual && ep0.activation == kernels::kActNone;
  // A task is one block's plane (a 56x56 one is ~450 KFLOP); planes are what the threads split.
  const auto plane = [&](size_t t) {
    const size_t cb = t % cblocks;
    float* yb = y + t * yl.block_floats();
    ZeroBlockBorder(yb, yl, 0, s.oh);
    const kernels::NchwcDepthwiseArgs a{xo + t * xl.block_floats(), xl.wp() * kB, dw_blocked_w_ + cb * taps * kB,
                                        dw_blocked_bias_ + cb * kB, g.kh, g.kw, g.sh, g.sw, yb + yl.origin(), y_row, s.ow,
                                        residual ? residual + t * rl->block_floats() + rl->origin() : nullptr,
                                        residual ? rl->wp() * kB : 0, trivial ? nullptr : &ep0};
    for (size_t oy = 0; oy < s.oh; ++oy) dw_blocked_uk_(&a, oy);
  };
  // As the direct tiles (WholeImageTasks): batch 2 / 4 / 8 of MobileNetV2 on 2 threads 0.97 / 0.99 / 0.98-0.99x.
  if (WholeImageTasks(nthreads, n))
    return HomedChunks(pool, nthreads, cancel, n * cblocks, [&](size_t t0, size_t t1) { for (size_t t = t0; t < t1; ++t) plane(t); });
  return pool.ParallelFor(blocks, nthreads, plane, cancel);
}

bool ConvOp::chain_pointwise() const {
  const WindowGeometry& g = spec_.window;
  return path_ == Path::kDirect && in_block_ == kernels::kNchwcBlock && !bf16_direct_ && spec_.group == 1 &&
         g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1;
}

ConvOp::DirectTiling ConvOp::Tiling(size_t ow) const {
  const size_t o_blocks = (spec_.c_out + kernels::kNchwcOutBlock - 1) / kernels::kNchwcOutBlock;
  const bool pairs = pair_uk_ != nullptr;
  const size_t segs = (ow + kernels::kNchwcMaxPixels - 1) / kernels::kNchwcMaxPixels;
  const size_t pair_segs = (ow + kernels::kNchwcPairPixels - 1) / kernels::kNchwcPairPixels;
  // Row pairs where two rows fit a tile: 14 pixels, or 16 for one vector of output channels on the
  // fp32 tiles: half the tile calls of 8-pixel rows (the digits model at batch 64, one thread:
  // its 16-channel 3x3s on 8x8 images 143 -> 117 us each, its 1 -> 16 stem 46 -> 34 us).
  const bool wide_pairs = !bf16_direct_ && spec_.c_out <= kernels::kNchwcBlock && ow <= kernels::kNchwcMaxPairRowPixels;
  return {pairs, pairs ? (o_blocks + 1) / 2 : o_blocks, pairs ? size_t{2} : size_t{1},
          !pairs && (2 * ow <= kernels::kNchwcMaxPixels || wide_pairs) ? size_t{2} : size_t{1}, (ow + segs - 1) / segs,
          (ow + pair_segs - 1) / pair_segs};
}

double ConvOp::DirectWork(size_t n, const WindowShape& s) const {
  const DirectTiling t = Tiling(s.ow);
  const size_t segs = t.pairs ? (s.ow + t.pair_w - 1) / t.pair_w : (s.ow + t.seg_w - 1) / t.seg_w;
  const double tiles = static_cast<double>(n * t.o_items * ((s.oh + t.row_step - 1) / t.row_step) * segs);
  return Flops(n, s.oh * s.ow) + tiles * kTileOverheadFlops;
}

void ConvOp::DirectRows(const float* xo, size_t hp, size_t wp, const WindowShape& s, size_t oy0, size_t oy1, float* y,
                        size_t y_row, size_t y_block, const float* residual, size_t res_row, size_t res_block,
                        bool residual_before_activation) const {
  constexpr size_t kB = kernels::kNchwcBlock, kO = kernels::kNchwcOutBlock;
  const WindowGeometry& g = spec_.window;
  const size_t c_blocks = kernels::NchwcBlocks(spec_.c_in);
  const size_t c_last = spec_.c_in - (c_blocks - 1) * kB;
  const DirectTiling tiling = Tiling(s.ow);
  const bool pairs = tiling.pairs;
  const size_t o_items = tiling.o_items, per_item = tiling.per_item, row_step = tiling.row_step;
  const size_t seg_w = tiling.seg_w, pair_w = tiling.pair_w;
  const bool trivial = !residual && spec_.activation == kernels::kActNone;
  for (size_t ob = 0; ob < o_items; ++ob) {
    const size_t oc0 = ob * per_item * kO, item_oc = per_item * kO;
    const bool pair = pairs && spec_.c_out > oc0 + 3 * kB;
    for (size_t oy = oy0; oy < oy1; oy += row_step) {
      const size_t rows = std::min(row_step, oy1 - oy);
      kernels::GemmEpilogue ep{nullptr, nullptr, residual ? residual + (oc0 / kB) * res_block : nullptr, 0,
                               spec_.activation, residual_before_activation ? 1 : 0, spec_.alpha, spec_.beta};
      kernels::NchwcConvArgs a{xo, c_blocks, hp, wp, c_last, w_ + oc0 / kO * ldw_, g.kh, g.kw, g.sh, g.sw,
                               bias_blocks_ + oc0, std::min(item_oc, spec_.c_out - oc0), y + (oc0 / kB) * y_block,
                               s.oh, s.ow, trivial ? nullptr : &ep, y_row, y_block, res_row, res_block, 0, nullptr, 0, 0,
                               ldw_};
      if (pair) {
        for (size_t ox0 = 0; ox0 < s.ow; ox0 += pair_w) pair_uk_(&a, oy, ox0, std::min(pair_w, s.ow - ox0), 1);
        continue;
      }
      for (size_t k = 0; k < per_item && oc0 + k * kO < spec_.c_out; ++k) {
        if (k > 0) {  // a pair item's second block alone
          a.w = static_cast<const float*>(a.w) + ldw_;
          a.bias += kO;
          a.y += (kO / kB) * y_block;
          if (ep.residual) ep.residual += (kO / kB) * res_block;
        }
        a.oc_valid = std::min(kO, spec_.c_out - oc0 - k * kO);
        for (size_t ox0 = 0; ox0 < s.ow; ox0 += seg_w) direct_uk_(&a, oy, ox0, std::min(seg_w, s.ow - ox0), rows);
      }
    }
  }
}

void ConvOp::DepthwiseRows(const float* xo, size_t x_row, size_t x_block, const WindowShape& s, size_t oy0, size_t oy1,
                           float* y, size_t y_row, size_t y_block) const {
  constexpr size_t kB = kernels::kNchwcBlock;
  const WindowGeometry& g = spec_.window;
  const size_t cblocks = kernels::NchwcBlocks(spec_.c_out), taps = g.kh * g.kw;
  const kernels::GemmEpilogue ep{nullptr, nullptr, nullptr, 0, spec_.activation, 0, spec_.alpha, spec_.beta};
  for (size_t cb = 0; cb < cblocks; ++cb) {
    const kernels::NchwcDepthwiseArgs a{xo + cb * x_block, x_row, dw_blocked_w_ + cb * taps * kB,
                                        dw_blocked_bias_ + cb * kB, g.kh, g.kw, g.sh, g.sw, y + cb * y_block, y_row, s.ow,
                                        nullptr, 0, spec_.activation == kernels::kActNone ? nullptr : &ep};
    for (size_t oy = oy0; oy < oy1; ++oy) dw_blocked_uk_(&a, oy);
  }
}

namespace {
// Per-thread scratch of ConvChain: the expanded rows and the depthwise output of a strip.
float* ChainScratch(size_t floats) {
  thread_local GrowingBuffer buf;
  return buf.Get(floats);
}
}  // namespace

// Half of L2. MobileNetV2 on the Xeon VM, fused against unfused (time ratio at batch 1 / 8 on one
// thread, batch 1 on two): L2/16 1.00 / 0.91 / 0.87, L2/8 0.96 / 0.87 / 0.84, L2/2 0.94 / 0.85 /
// 0.82, L2 0.95 / 0.89 / 0.85, 2 L2 1.00 / 0.90 / 0.85.
size_t ConvChain::ChainStripFloats() {
  const char* v = std::getenv("SONDE_CHAIN_STRIP_KB");
  const long kb = v ? std::strtol(v, nullptr, 10) : 0;
  const size_t bytes = kb > 0 ? static_cast<size_t>(kb) << 10 : Cpu().l2_bytes / 2;
  return bytes / sizeof(float);
}

std::string ConvChain::Check(size_t h, size_t w, const BlockedLayout& xl, const BlockedLayout& yl,
                             const BlockedLayout* rl) const {
  if (!depthwise || !project) return "a conv chain needs a depthwise and a projection conv";
  if (expand && !expand->chain_pointwise()) return "the expansion must be a 1x1 stride-1 fp32 conv on the direct path";
  if (!depthwise->chain_depthwise()) return "the depthwise conv must run on blocked activations";
  if (!project->chain_pointwise()) return "the projection must be a 1x1 stride-1 fp32 conv on the direct path";
  const size_t c = depthwise->spec().c_in;
  if (expand && expand->spec().c_out != c) return "the expansion's output channels are not the depthwise conv's";
  if (project->spec().c_in != c) return "the projection's input channels are not the depthwise conv's";
  if (xl.bf16 || yl.bf16 || (rl && rl->bf16)) return "a conv chain runs on float32 activations";
  if (xl.h != h || xl.w != w) return "x's blocked layout is not the input size";
  if (expand) {
    WindowShape e;
    std::string why = ResolveWindow(expand->spec().window, h, w, &e);
    if (!why.empty()) return why;
    if (e.pad_t || e.pad_l || e.pad_b || e.pad_r) return "the expansion must be unpadded";
  }
  WindowShape d, p;
  std::string why = ResolveWindow(depthwise->spec().window, h, w, &d);
  if (!why.empty()) return why;
  if (!expand) {
    // The depthwise conv reads x in place: its border is the padding.
    why = depthwise->CheckBlocked(h, w, xl, &yl, nullptr);
    if (!why.empty()) return why;
  }
  why = ResolveWindow(project->spec().window, d.oh, d.ow, &p);
  if (!why.empty()) return why;
  if (p.pad_t || p.pad_l || p.pad_b || p.pad_r) return "the projection must be unpadded";
  if (yl.h != d.oh || yl.w != d.ow) return "y's blocked layout is not the output size";
  if (rl && (rl->h != d.oh || rl->w != d.ow)) return "the residual's blocked layout is not the output size";
  return "";
}

bool ConvChain::Run(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                    const BlockedLayout& xl, size_t n, size_t h, size_t w, float* y, const BlockedLayout& yl,
                    const float* residual, const BlockedLayout* rl, bool residual_before_activation,
                    std::string* error) const {
  std::string why = Check(h, w, xl, yl, residual ? rl : nullptr);
  if (why.empty() && residual && !rl) why = "the residual must be blocked";
  if (!why.empty()) {
    *error = why;
    return false;
  }
  constexpr size_t kB = kernels::kNchwcBlock;
  const WindowGeometry& g = depthwise->spec().window;
  WindowShape e{h, w, 0, 0, 0, 0}, d, p;
  ResolveWindow(depthwise->spec().window, h, w, &d);
  ResolveWindow(project->spec().window, d.oh, d.ow, &p);
  const size_t c = depthwise->spec().c_in, cb = kernels::NchwcBlocks(c);
  const size_t x_blocks = kernels::NchwcBlocks(expand ? expand->spec().c_in : c);
  const size_t y_blocks = kernels::NchwcBlocks(project->spec().c_out);
  // The expanded rows of a strip, with the depthwise conv's padding around them: rows of ewp pixels,
  // the first pad_l and the last ewp - pad_l - w of them zero.
  const size_t ewp = std::max(d.pad_l + w, (d.ow - 1) * g.sw + g.kw), e_row = ewp * kB;
  const size_t tap_rows = g.kh > g.sh ? g.kh - g.sh : 0;  // expanded rows shared by consecutive strips
  // Strip height: its expanded rows and depthwise output within the scratch budget.
  const size_t budget = strip_floats / (cb * kB);
  const size_t per_row = (expand ? g.sh * ewp : 0) + d.ow;
  const size_t fixed = expand ? tap_rows * ewp : 0;
  const size_t strip = std::max<size_t>(1, std::min(d.oh, budget > fixed ? (budget - fixed) / per_row : 1));
  const size_t e_rows = expand ? (strip - 1) * g.sh + g.kh : 0;
  const size_t e_block = e_rows * e_row, d_block = strip * d.ow * kB;
  const size_t scratch = cb * (e_block + d_block);
  // Tasks: whole images where the threads divide the batch, else a band of rows per thread in every
  // image (each band computes its first strip's shared expanded rows again).
  const unsigned nthreads = std::max(1u, std::min(threads, pool.size()));
  const size_t bands = WholeImageTasks(nthreads, n) || nthreads == 1 ? 1 : std::min<size_t>(nthreads, d.oh);
  const size_t band_rows = (d.oh + bands - 1) / bands;
  const size_t x_row = xl.wp() * kB, y_row = yl.wp() * kB;
  const float* e_src = expand ? nullptr : x + ((xl.pad_t - d.pad_t) * xl.wp() + (xl.pad_l - d.pad_l)) * kB;
  std::atomic<bool> oom{false};
  const auto task = [&](size_t t) {
    const size_t b = t / bands, oy_begin = (t % bands) * band_rows, oy_end = std::min(d.oh, oy_begin + band_rows);
    if (oy_begin >= oy_end) return;
    float* const buf = ChainScratch(scratch);
    if (!buf) {
      oom.store(true);
      return;
    }
    float* const eb = buf;                // cb blocks of e_rows x ewp pixels
    float* const db = buf + cb * e_block;  // cb blocks of strip x d.ow pixels
    const float* const xb = x + b * x_blocks * xl.block_floats();
    float* const yb = y + b * y_blocks * yl.block_floats() + yl.origin();
    const float* const rb = residual ? residual + b * y_blocks * rl->block_floats() + rl->origin() : nullptr;
    // Image rows [held0, held1) of the expansion are in eb's rows from 0 (none yet).
    ptrdiff_t held0 = 0, held1 = 0;
    if (expand) {
      // The side columns are the depthwise padding: zero, and never written by the expansion.
      for (size_t k = 0; k < cb; ++k)
        for (size_t r = 0; r < e_rows; ++r) {
          float* line = eb + k * e_block + r * e_row;
          std::memset(line, 0, d.pad_l * kB * sizeof(float));
          std::memset(line + (d.pad_l + w) * kB, 0, (ewp - d.pad_l - w) * kB * sizeof(float));
        }
    }
    for (size_t oy0 = oy_begin; oy0 < oy_end; oy0 += strip) {
      const size_t oy1 = std::min(oy_end, oy0 + strip), rows = oy1 - oy0;
      const float* dw_x;
      size_t dw_row, dw_block;
      if (expand) {
        // Padded rows oy0 * sh .. of the depthwise input are image rows from r0 (negative: padding).
        const ptrdiff_t r0 = static_cast<ptrdiff_t>(oy0 * g.sh) - static_cast<ptrdiff_t>(d.pad_t);
        const ptrdiff_t r1 = r0 + static_cast<ptrdiff_t>((rows - 1) * g.sh + g.kh);
        ptrdiff_t from = r0;
        if (held1 > r0 && held0 <= r0) {
          // The previous strip's last rows are this one's first: move them up.
          const size_t keep = static_cast<size_t>(held1 - r0), skip = static_cast<size_t>(r0 - held0);
          if (skip)
            for (size_t k = 0; k < cb; ++k)
              std::memmove(eb + k * e_block, eb + k * e_block + skip * e_row, keep * e_row * sizeof(float));
          from = held1;
        }
        for (ptrdiff_t r = from; r < r1;) {
          float* const dst = eb + static_cast<size_t>(r - r0) * e_row;
          if (r < 0 || r >= static_cast<ptrdiff_t>(h)) {
            for (size_t k = 0; k < cb; ++k) std::memset(dst + k * e_block, 0, e_row * sizeof(float));
            ++r;
            continue;
          }
          const ptrdiff_t end = std::min<ptrdiff_t>(r1, static_cast<ptrdiff_t>(h));
          // Expanded image rows [r, end) into the strip's rows from r - r0, interior columns.
          expand->DirectRows(xb + xl.origin() + static_cast<size_t>(r) * x_row, xl.hp(), xl.wp(), e, 0,
                             static_cast<size_t>(end - r), dst + d.pad_l * kB, e_row, e_block, nullptr, 0, 0, false);
          r = end;
        }
        held0 = r0;
        held1 = r1;
        dw_x = eb;
        dw_row = e_row;
        dw_block = e_block;
      } else {
        dw_x = e_src + b * x_blocks * xl.block_floats() + oy0 * g.sh * x_row;
        dw_row = x_row;
        dw_block = xl.block_floats();
      }
      depthwise->DepthwiseRows(dw_x, dw_row, dw_block, d, 0, rows, db, d.ow * kB, d_block);
      // y's border around these rows, as the direct tiles leave it for a later conv's padding.
      for (size_t k = 0; k < y_blocks; ++k)
        ZeroBlockBorder(yb - yl.origin() + k * yl.block_floats(), yl, oy0, oy1);
      project->DirectRows(db, strip, d.ow, p, 0, rows, yb + oy0 * y_row, y_row, yl.block_floats(),
                          rb ? rb + oy0 * rl->wp() * kB : nullptr, rl ? rl->wp() * kB : 0,
                          rl ? rl->block_floats() : 0, residual_before_activation);
    }
  };
  // Each thread the same images (or band of rows) in every layer, as the direct tiles'.
  const bool ok = bands > 1 ? pool.ParallelForHomed(n * bands, nthreads, task, cancel)
                            : HomedChunks(pool, nthreads, cancel, n, [&](size_t b0, size_t b1) { for (size_t b = b0; b < b1; ++b) task(b); });
  // Reported as the job's OutOfMemoryError, like the other ops' scratch.
  if (oom.load()) throw std::bad_alloc();
  if (!ok && error->empty()) *error = "aborted";
  return ok;
}

bool ReorderNchwc(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, bool to_blocked, const float* x,
                  float* y, size_t n, size_t c, const BlockedLayout& l, std::string* error) {
  constexpr size_t kB = kernels::kNchwcBlock;
  kernels::F32PackNchwcRowUkernel pack = kernels::F32PackNchwcRowUkernelScalar();
  kernels::F32UnpackNchwcRowUkernel unpack = kernels::F32UnpackNchwcRowUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
  if (Cpu().Supports(IsaLevel::kAvx512)) {
    pack = kernels::F32PackNchwcRowUkernelAvx512();
    unpack = kernels::F32UnpackNchwcRowUkernelAvx512();
  }
#endif
  const size_t cb = kernels::NchwcBlocks(c), blocks = n * cb, hw = l.h * l.w, wp = l.wp(), row = wp * kB;
  // A block is one 16-channel slab of a plane: a 56x56 one is 200 KB, enough work for a task.
  const bool ok = pool.ParallelFor(blocks, std::max(1u, threads), [&](size_t t) {
    const size_t b = t / cb, ch0 = t % cb * kB, channels = std::min(kB, c - ch0);
    const float* src = to_blocked ? x + (b * c + ch0) * hw : x + t * l.block_floats();
    float* dst = to_blocked ? y + t * l.block_floats() : y + (b * c + ch0) * hw;
    if (to_blocked) {
      ZeroBlockBorder(dst, l, 0, l.h);
      for (size_t r = 0; r < l.h; ++r) pack(src + r * l.w, hw, l.w, dst + (l.pad_t + r) * row + l.pad_l * kB, channels);
    } else {
      for (size_t r = 0; r < l.h; ++r) unpack(src + (l.pad_t + r) * row + l.pad_l * kB, l.w, dst + r * l.w, hw, channels);
    }
  }, cancel);
  if (!ok) *error = "aborted";
  return ok;
}

std::string CheckPoolBlocked(size_t h, size_t w, const WindowGeometry& g, const BlockedLayout& xl,
                             const BlockedLayout& yl) {
#if defined(__x86_64__) || defined(_M_X64)
  if (!Cpu().Supports(IsaLevel::kAvx512)) return "blocked pooling needs AVX-512";
#else
  return "blocked pooling needs AVX-512";
#endif
  if (g.dh != 1 || g.dw != 1) return "blocked pooling has no dilation";
  if (xl.bf16 || yl.bf16) return "blocked pooling is float32";
  WindowShape s;
  std::string e = ResolveWindow(g, h, w, &s);
  if (!e.empty()) return e;
  if (xl.h != h || xl.w != w) return "x's blocked layout is not the input size";
  if (yl.h != s.oh || yl.w != s.ow) return "y's blocked layout is not the output size";
  return "";
}

bool RunPoolBlocked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, PoolKind kind, const float* x,
                    const BlockedLayout& xl, size_t blocks, size_t h, size_t w, const WindowGeometry& g,
                    bool count_include_pad, float* y, const BlockedLayout& yl, std::string* error) {
  std::string e = CheckPoolBlocked(h, w, g, xl, yl);
  if (!e.empty()) {
    *error = e;
    return false;
  }
  bool ok = false;
#if defined(__x86_64__) || defined(_M_X64)
  constexpr size_t kB = kernels::kNchwcBlock;
  WindowShape s;
  ResolveWindow(g, h, w, &s);
  const kernels::F32NchwcPoolUkernel uk = kernels::F32NchwcPoolUkernelAvx512();
  const size_t y_row = yl.wp() * kB;
  // A contiguous share of the block planes per thread, the same in every step (HomedChunks); one
  // thread only where a helper's hand-off would cost more than its taps (kMinHomedWorkPerThread).
  const unsigned nthreads = ThreadsForWork(std::max(1u, threads),
                                           static_cast<double>(blocks * kB * s.oh * s.ow * g.kh * g.kw), kMinHomedWorkPerThread);
  ok = HomedChunks(pool, nthreads, cancel, blocks, [&](size_t t0, size_t t1) {
    for (size_t t = t0; t < t1; ++t) {
      float* yb = y + t * yl.block_floats();
      ZeroBlockBorder(yb, yl, 0, s.oh);
      const kernels::NchwcPoolArgs a{x + t * xl.block_floats() + xl.origin(), xl.wp() * kB, h, w, g.kh, g.kw, g.sh, g.sw,
                                     s.pad_t, s.pad_l, kind == PoolKind::kMax ? kernels::kWindowMax : kernels::kWindowAvg,
                                     count_include_pad ? 1 : 0, yb + yl.origin(), y_row, s.ow};
      for (size_t oy = 0; oy < s.oh; ++oy) uk(&a, oy);
    }
  });
#else
  (void)pool, (void)threads, (void)cancel, (void)kind, (void)x, (void)blocks, (void)count_include_pad, (void)y;
#endif
  if (!ok) *error = "aborted";
  return ok;
}

bool RunGlobalAveragePoolBlocked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                                 size_t blocks, const BlockedLayout& l, float* y, std::string* error) {
  constexpr size_t kB = kernels::kNchwcBlock;
  const size_t row = l.wp() * kB;
  const float inv = 1.0f / static_cast<float>(l.h * l.w);
  const unsigned nthreads = ThreadsForWork(std::max(1u, threads), static_cast<double>(blocks * kB * l.h * l.w),
                                           kMinHomedWorkPerThread);
  const bool ok = HomedChunks(pool, nthreads, cancel, blocks, [&](size_t b0, size_t b1) {
    for (size_t blk = b0; blk < b1; ++blk) {
      // 16 lanes of one pixel are 16 channels: a plain lane-wise sum, which the compiler vectorises.
      float acc[kB] = {};
      const float* base = x + blk * l.block_floats() + l.origin();
      for (size_t r = 0; r < l.h; ++r)
        for (size_t ix = 0; ix < l.w; ++ix)
          for (size_t i = 0; i < kB; ++i) acc[i] += base[r * row + ix * kB + i];
      for (size_t i = 0; i < kB; ++i) y[blk * kB + i] = acc[i] * inv;
    }
  });
  if (!ok) *error = "aborted";
  return ok;
}


namespace {
// NCHW depthwise convs whose output rows are at most this wide run on the blocked kernel through
// per-task blocked copies (RunDepthwise): there the window kernel's row vectors are half empty or
// more. MobileNetV2's 3x3s, one thread, ms per call (window -> blocked): 7x7 960 0.106 -> 0.071,
// 14x14/2 576 0.091 -> 0.057; but 14x14 576 0.134 -> 0.161 and 28x28/2 192 0.074 -> 0.089 (rows of
// 14), where the copies cost more than the window kernel loses. SONDE_DW_BLOCKED_MAX_OW overrides it.
size_t DwBlockedMaxOw() {
  static const size_t v = [] {
    const char* e = std::getenv("SONDE_DW_BLOCKED_MAX_OW");
    return e ? static_cast<size_t>(std::strtoul(e, nullptr, 10)) : size_t{8};
  }();
  return v;
}
}  // namespace

bool ConvOp::RunDepthwise(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n,
                          size_t h, size_t w, const WindowShape& s, float* y, const kernels::GemmEpilogue& ep0) const {
  const WindowGeometry& g = spec_.window;
#if defined(__x86_64__) || defined(_M_X64)
  if (dw_blocked_uk_ && !ep0.residual && s.ow <= DwBlockedMaxOw()) {
    // Narrow outputs: per plane, the window kernel's padded copy and call cost as much as the taps
    // (a 7x7 plane is 49 outputs). A task takes 16 channels of one image instead, copies them into a
    // zero-bordered blocked tile (in L1/L2), runs the blocked kernel (a tap of a pixel is one FMA
    // over the 16 channels) and writes the planes back.
    constexpr size_t kB = kernels::kNchwcBlock;
    const kernels::F32PackNchwcRowUkernel pack = kernels::F32PackNchwcRowUkernelAvx512();
    const kernels::F32UnpackNchwcRowUkernel unpack = kernels::F32UnpackNchwcRowUkernelAvx512();
    const size_t hp = std::max(s.pad_t + h, (s.oh - 1) * g.sh + g.kh), wp = std::max(s.pad_l + w, (s.ow - 1) * g.sw + g.kw);
    const size_t cblocks = kernels::NchwcBlocks(spec_.c_out), taps = g.kh * g.kw, hwo = s.oh * s.ow;
    const size_t tile = hp * wp * kB;
    const kernels::GemmEpilogue ep{nullptr, nullptr, nullptr, 0, ep0.activation, 0, ep0.alpha, ep0.beta};
    std::atomic<bool> oom{false};
    const bool ok = pool.ParallelFor(n * cblocks, std::max(1u, threads), [&](size_t t) {
      float* buf = ThreadScratch(tile + hwo * kB);
      if (!buf) {
        oom.store(true);
        return;
      }
      const size_t b = t / cblocks, cb = t % cblocks, ch0 = cb * kB, nch = std::min(kB, spec_.c_out - ch0);
      const float* src = x + (b * spec_.c_out + ch0) * h * w;
      // The border rows, then each interior row with its side columns.
      std::memset(buf, 0, s.pad_t * wp * kB * sizeof(float));
      std::memset(buf + (s.pad_t + h) * wp * kB, 0, (hp - s.pad_t - h) * wp * kB * sizeof(float));
      for (size_t r = 0; r < h; ++r) {
        float* line = buf + (s.pad_t + r) * wp * kB;
        std::memset(line, 0, s.pad_l * kB * sizeof(float));
        std::memset(line + (s.pad_l + w) * kB, 0, (wp - s.pad_l - w) * kB * sizeof(float));
        pack(src + r * w, h * w, w, line + s.pad_l * kB, nch);
      }
      float* out = buf + tile;
      const kernels::NchwcDepthwiseArgs a{buf, wp * kB, dw_blocked_w_ + cb * taps * kB, dw_blocked_bias_ + cb * kB,
                                          g.kh, g.kw, g.sh, g.sw, out, s.ow * kB, s.ow, nullptr, 0,
                                          ep.activation == kernels::kActNone ? nullptr : &ep};
      float* dst = y + (b * spec_.c_out + ch0) * hwo;
      for (size_t oy = 0; oy < s.oh; ++oy) {
        dw_blocked_uk_(&a, oy);
        unpack(out + oy * s.ow * kB, s.ow, dst + oy * s.ow, hwo, nch);
      }
    }, cancel);
    if (oom.load()) throw std::bad_alloc();
    return ok;
  }
#endif
  const size_t planes = n * spec_.c_out, hwo = s.oh * s.ow;
  kernels::WindowArgs proto{};
  proto.ih = h; proto.iw = w; proto.oh = s.oh; proto.ow = s.ow;
  proto.kh = g.kh; proto.kw = g.kw; proto.sh = g.sh; proto.sw = g.sw; proto.dh = g.dh; proto.dw = g.dw;
  proto.pad_t = s.pad_t; proto.pad_l = s.pad_l;
  proto.op = kernels::kWindowConv;
  const size_t scratch = kernels::WindowScratchRows(&proto) * kernels::WindowScratchCols(&proto);
  const bool trivial = !ep0.residual && ep0.activation == kernels::kActNone;
  const size_t per = PlanesPerTask(h * w), tasks = (planes + per - 1) / per;
  std::atomic<bool> oom{false};
  const bool ok = pool.ParallelFor(tasks, std::max(1u, threads), [&](size_t t) {
    float* buf = ThreadScratch(scratch);
    if (!buf) {
      oom.store(true);
      return;
    }
    for (size_t p = t * per; p < std::min(planes, (t + 1) * per); ++p) {
      const size_t co = p % spec_.c_out;
      kernels::GemmEpilogue ep = ep0;
      if (ep.residual) ep.residual += p * hwo;
      kernels::WindowArgs a = proto;
      a.in = x + p * h * w;
      a.out = y + p * hwo;
      a.weights = w_ + co * ldw_;
      a.bias = bias_[co];
      a.ep = trivial ? nullptr : &ep;
      a.scratch = buf;
      window_uk_(&a);
    }
  }, cancel);
  if (oom.load()) throw std::bad_alloc();
  return ok;
}

bool RunPool(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, PoolKind kind, const float* x,
             size_t planes, size_t h, size_t w, const WindowGeometry& g, bool count_include_pad, ConvVariant variant,
             float* y, std::string* error) {
  WindowShape s;
  std::string e = ResolveWindow(g, h, w, &s);
  if (!e.empty()) {
    *error = e;
    return false;
  }
  kernels::F32WindowUkernel uk = kernels::F32WindowUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
  if (variant != ConvVariant::kReference && variant != ConvVariant::kScalar && variant != ConvVariant::kAvx2 &&
      Cpu().Supports(IsaLevel::kAvx512))
    uk = kernels::F32WindowUkernelAvx512();
#endif
  kernels::WindowArgs proto{};
  proto.ih = h; proto.iw = w; proto.oh = s.oh; proto.ow = s.ow;
  proto.kh = g.kh; proto.kw = g.kw; proto.sh = g.sh; proto.sw = g.sw; proto.dh = g.dh; proto.dw = g.dw;
  proto.pad_t = s.pad_t; proto.pad_l = s.pad_l;
  proto.op = kind == PoolKind::kMax ? kernels::kWindowMax : kernels::kWindowAvg;
  // Without pad counting, the divisor of output (oy, ox) is (taps in rows) x (taps in columns).
  std::vector<float> row_count, col_count;
  if (kind == PoolKind::kAverage && !count_include_pad) {
    auto count = [](size_t o, size_t stride, size_t k, size_t d, size_t pad, size_t in) {
      float c = 0;
      for (size_t t = 0; t < k; ++t) {
        const ptrdiff_t i = static_cast<ptrdiff_t>(o * stride + t * d) - static_cast<ptrdiff_t>(pad);
        c += i >= 0 && i < static_cast<ptrdiff_t>(in) ? 1.0f : 0.0f;
      }
      return c;
    };
    row_count.resize(s.oh);
    col_count.resize(s.ow);
    for (size_t o = 0; o < s.oh; ++o) row_count[o] = count(o, g.sh, g.kh, g.dh, s.pad_t, h);
    for (size_t o = 0; o < s.ow; ++o) col_count[o] = count(o, g.sw, g.kw, g.dw, s.pad_l, w);
    proto.row_count = row_count.data();
    proto.col_count = col_count.data();
  }
  const size_t scratch = kernels::WindowScratchRows(&proto) * kernels::WindowScratchCols(&proto);
  const size_t hwo = s.oh * s.ow;
  const size_t per = PlanesPerTask(h * w), tasks = (planes + per - 1) / per;
  std::atomic<bool> oom{false};
  const bool ok = pool.ParallelFor(tasks, std::max(1u, threads), [&](size_t t) {
    float* buf = ThreadScratch(scratch);
    if (!buf) {
      oom.store(true);
      return;
    }
    for (size_t p = t * per; p < std::min(planes, (t + 1) * per); ++p) {
      kernels::WindowArgs a = proto;
      a.in = x + p * h * w;
      a.out = y + p * hwo;
      a.scratch = buf;
      uk(&a);
    }
  }, cancel);
  if (oom.load()) throw std::bad_alloc();
  if (!ok) *error = "aborted";
  return ok;
}

bool RunGlobalAveragePool(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                          size_t planes, size_t hw, ConvVariant variant, float* y, std::string* error) {
  kernels::F32SumUkernel sum = kernels::F32SumUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
  if (variant != ConvVariant::kScalar && variant != ConvVariant::kAvx2 && Cpu().Supports(IsaLevel::kAvx512))
    sum = kernels::F32SumUkernelAvx512();
#endif
  const bool reference = variant == ConvVariant::kReference;
  const size_t per = PlanesPerTask(hw), tasks = (planes + per - 1) / per;
  const bool ok = pool.ParallelFor(tasks, std::max(1u, threads), [&](size_t t) {
    for (size_t p = t * per; p < std::min(planes, (t + 1) * per); ++p) {
      const float* xp = x + p * hw;
      if (reference) {
        double s = 0;
        for (size_t i = 0; i < hw; ++i) s += xp[i];
        y[p] = static_cast<float>(s / static_cast<double>(hw));
      } else {
        y[p] = sum(xp, hw) / static_cast<float>(hw);
      }
    }
  }, cancel);
  if (!ok) *error = "aborted";
  return ok;
}

}  // namespace sonde
