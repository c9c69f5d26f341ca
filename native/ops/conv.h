// Convolution-family operators (NCHW float32 at the edges): Conv2d with BatchNormalization folded
// and the bias/activation/residual epilogue fused, created once (validate, fold, pack) and run many
// times; max/average pooling and global average pooling.
//
// How a convolution runs (chosen at creation):
// - dense and grouped: per image and group, Y[C_out/g x OH*OW] = W[C_out/g x K] * cols(X)[K x OH*OW]
//   on the GEMM microkernels of kernels/gemm, with K = C_in/g * kh * kw. The weights are the GEMM's
//   A operand (rows read in place, folded once at creation); the activations are im2col'ed straight
//   into the microkernel's B panels (32 output pixels x a K block, in L1/L2) inside each task, so the
//   output is written in NCHW with no layout pass, and a 1x1 stride-1 conv's "im2col" is a memcpy of
//   input rows. The bias is one more K row (weights column = bias, activation row = 1), so the
//   unmodified per-column GemmEpilogue applies the activation and the residual (NCHW, ldr = OH*OW)
//   in registers.
// - direct (AVX-512, group 1, C_in a multiple of 16, stride 1 or 2, no dilation): weights packed
//   once in 32-output-channel blocks; each run copies the input into a zero-padded channel-blocked
//   (NCHW16c) buffer and the NCHWc kernel of kernels/conv computes 14-pixel x 32-channel tiles,
//   writing NCHW with the same epilogue. It replaces the GEMM path where the GEMM wastes panel lanes
//   or repeats its im2col (small planes, many channels); see ConvOp::Create for the measured rule.
// - depthwise (group = C_in = C_out): the window kernel of kernels/conv on each channel plane.
// - bf16 precision: weights rounded to bf16 once. Where the CPU has AVX512_BF16 they are stored as
//   bf16 pairs: convs the direct path fits run the bf16 direct tiles (vdpbf16ps; a pair is two
//   input channels, or for a stem two taps of a row; an fp32 input is converted to a bf16 copy per
//   run, the bias stays fp32 in the epilogue), so they join the plan's blocked runs like fp32 direct
//   convs; the rest run on the vdpbf16ps GEMM kernel (the activations rounded to bf16 as they are
//   packed, like the bf16 GEMM; the bias split into three bf16 terms hi+mid+lo so it stays
//   fp32-exact). Elsewhere (or with an explicit fp32 variant) the rounded weights run on the fp32
//   kernels with fp32 activations.
// - 'reference': the direct double-accumulating loop of kernels/conv (slow; what tests compare to).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/conv/conv.h"
#include "kernels/gemm/gemm.h"
#include "kernels/gemm/lowp-gemm.h"
#include "runtime/thread_pool.h"

namespace sonde {

enum class ConvAutoPad : int32_t { kNotSet = 0, kSameUpper = 1, kSameLower = 2, kValid = 3 };
enum class ConvVariant { kAuto, kReference, kScalar, kAvx2, kAvx512, kAvx512Bf16, kAmx };
enum class ConvPrecision { kFp32, kBf16 };

bool ParseConvVariant(const std::string& name, ConvVariant* out);
const char* ConvVariantName(ConvVariant v);
// Empty if the variant can run on this CPU (for this precision); otherwise why not.
std::string ConvVariantUnavailable(ConvVariant v, ConvPrecision p);

// Kernel window, strides, dilations and padding of a conv or pooling over H x W.
struct WindowGeometry {
  size_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1;
  size_t pad_t = 0, pad_l = 0, pad_b = 0, pad_r = 0;  // used when auto_pad is kNotSet
  ConvAutoPad auto_pad = ConvAutoPad::kNotSet;
};

struct WindowShape {
  size_t oh = 0, ow = 0, pad_t = 0, pad_l = 0, pad_b = 0, pad_r = 0;
};

// Output size and the effective pads for an input of h x w (ONNX rules: SAME_UPPER puts the odd
// pad at the end, SAME_LOWER at the beginning). Empty string if valid; otherwise why not (a zero
// stride or dilation, a pad as large as the dilated kernel, an output size <= 0).
std::string ResolveWindow(const WindowGeometry& g, size_t h, size_t w, WindowShape* out);

struct BatchNormParams {
  const float* scale = nullptr;  // gamma
  const float* bias = nullptr;   // beta
  const float* mean = nullptr;
  const float* variance = nullptr;
  double epsilon = 1e-5;
};

struct ConvSpec {
  size_t c_in = 0, c_out = 0, group = 1;
  WindowGeometry window;
  int32_t activation = kernels::kActNone;  // GemmActivation
  float alpha = 0.0f, beta = 0.0f;
};

// A channel-blocked (NCHW16c) activation: c channels (a multiple of 16) of an h x w interior inside
// a zero border (what a later conv's padding reads). Image b, channel ch, pixel (y, x) is element
//   (((b * c / 16 + ch / 16) * hp() + pad_t + y) * wp() + pad_l + x) * 16 + ch % 16,
// a float, or a bf16 (uint16) where bf16 is set: a value only bf16 direct convs read, which its
// producer (a bf16 direct conv too) stores rounded, so no reader converts it.
// A run of direct convs keeps its activations in this layout (lib/session/plan.ts, PlanBlocked).
struct BlockedLayout {
  size_t h = 0, w = 0, pad_t = 0, pad_l = 0, pad_b = 0, pad_r = 0;
  bool bf16 = false;
  size_t elem_bytes() const { return bf16 ? 2 : 4; }
  size_t hp() const { return pad_t + h + pad_b; }
  size_t wp() const { return pad_l + w + pad_r; }
  size_t block_floats() const { return hp() * wp() * 16; }
  size_t origin() const { return (pad_t * wp() + pad_l) * 16; }
  bool present() const { return h != 0; }
};

// The weights a conv reads first (its first tile row's block): what the conv before it in a plan
// asks into L2 during its last tiles, so that a layer does not start on weights from memory.
struct WeightSpan {
  const char* data = nullptr;
  size_t bytes = 0;
};

struct ConvChain;

class ConvOp {
 public:
  // weights: [c_out][c_in/group][kh][kw]; bias: c_out or null; bn: null or all four arrays of c_out.
  // Returns null with *error set when the spec is inconsistent. Throws std::bad_alloc.
  static std::unique_ptr<ConvOp> Create(const float* weights, const float* bias, const BatchNormParams* bn,
                                        const ConvSpec& spec, ConvPrecision precision, ConvVariant variant,
                                        std::string* error);
  ~ConvOp();

  // x: [n][c_in][h][w]; y: [n][c_out][oh][ow] (see ResolveWindow); residual: y's shape or null.
  // Returns false with *error set (cancelled: error "aborted"; out of memory: "out of memory").
  bool Run(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n, size_t h,
           size_t w, float* y, const float* residual, bool residual_before_activation, std::string* error) const;

  // Whether RunBlocked can run this conv: the direct NCHW16c path (y blocked or NCHW), or a depthwise
  // conv with no dilation on AVX-512 (y blocked only). Channels need not be whole blocks of 16.
  // blocked_bf16(): it also takes a bf16 blocked x and writes a bf16 blocked y (the bf16 direct path).
  bool blocked_bf16() const { return bf16_direct_; }
  bool blocked() const {
    return (path_ == Path::kDirect && in_block_ == kernels::kNchwcBlock) || dw_blocked_uk_ != nullptr;
  }
  bool blocked_needs_blocked_y() const { return path_ == Path::kDepthwise; }
  // A stem (the direct tiles on a padded NCHW copy of a few input channels) reads an NCHW x only,
  // but RunBlocked may give it a blocked y (and residual): x's layout then absent.
  bool blocked_y_from_nchw() const { return path_ == Path::kDirect && in_block_ == 1; }
  // Empty if RunBlocked may run with these layouts on an h x w input: x's border covers this conv's
  // padding and every tap, y's (and the residual's) interior is the output size, channels whole
  // blocks. Otherwise why not.
  std::string CheckBlocked(size_t h, size_t w, const BlockedLayout& xl, const BlockedLayout* yl,
                           const BlockedLayout* rl) const;
  // Run() on a blocked x (layout xl, border zero). y and the residual are both blocked (yl, rl;
  // y's border is zeroed here) or both NCHW (null layouts); the residual may be null. x and y hold
  // bf16 where their layouts say so (blocked_bf16() only; the residual is always float). With
  // blocked_y_from_nchw(), xl absent (h = 0): x is NCHW and y blocked.
  // next: the following layer's FirstWeights(), prefetched during this conv's last tiles (direct path).
  bool RunBlocked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                  const BlockedLayout& xl, size_t n, size_t h, size_t w, float* y, const BlockedLayout* yl,
                  const float* residual, const BlockedLayout* rl, bool residual_before_activation,
                  std::string* error, const WeightSpan& next = {}) const;
  // Empty unless this conv runs the direct tiles.
  WeightSpan FirstWeights() const;

  const ConvSpec& spec() const { return spec_; }
  size_t bytes() const { return bytes_; }
  const char* path() const;     // "gemm", "depthwise" or "reference"
  const char* ukernel() const;  // the microkernel's name
  ConvVariant variant() const { return variant_; }
  ConvPrecision precision() const { return precision_; }

 private:
  friend struct ConvChain;
  enum class Path { kGemm, kGemmBf16, kDepthwise, kDirect, kReference };
  ConvOp() = default;
  // What ConvChain runs: a 1x1 stride-1 unpadded conv on the fp32 direct tiles, or a blocked
  // depthwise conv.
  bool chain_pointwise() const;
  bool chain_depthwise() const { return dw_blocked_uk_ != nullptr; }
  // How the direct tiles cover an output of width ow: items of one 32-channel block, or two with the
  // pair tiles (per_item); rows two at a time for narrow outputs; row segments of at most
  // kNchwcMaxPixels (kNchwcPairPixels for pairs) pixels, of equal widths. RunDirectTiles and
  // DirectRows both follow it, so a pixel sums in the same order either way.
  struct DirectTiling {
    bool pairs;
    size_t o_items, per_item, row_step, seg_w, pair_w;
  };
  DirectTiling Tiling(size_t ow) const;
  // FLOPs of the conv over n images of `pixels` output pixels each.
  double Flops(size_t n, size_t pixels) const {
    return 2.0 * static_cast<double>(n * spec_.c_out * pixels) * static_cast<double>(kg_);
  }
  // The work of the direct tiles over n images, for ThreadsForWork: their FLOPs and each tile's
  // fixed cost (kTileOverheadFlops in conv.cc).
  double DirectWork(size_t n, const WindowShape& s) const;
  // Output rows [oy0, oy1) of one image, every output channel, on the calling thread (fp32 direct
  // path): xo at this conv's padded (0, 0) of the image's first 16-channel block (hp x wp pixels
  // per block); y (and the residual, may be null) blocked at the image's interior (0, 0) of its
  // first block, rows and blocks the given numbers of floats apart. Borders are not written.
  void DirectRows(const float* xo, size_t hp, size_t wp, const WindowShape& s, size_t oy0, size_t oy1, float* y,
                  size_t y_row, size_t y_block, const float* residual, size_t res_row, size_t res_block,
                  bool residual_before_activation) const;
  // The same for the blocked depthwise conv: xo at its padded (0, 0) of block 0, rows x_row and
  // blocks x_block floats apart; no residual.
  void DepthwiseRows(const float* xo, size_t x_row, size_t x_block, const WindowShape& s, size_t oy0, size_t oy1,
                     float* y, size_t y_row, size_t y_block) const;
  bool RunGemm(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n, size_t h,
               size_t w, const WindowShape& s, float* y, const kernels::GemmEpilogue& ep) const;
  bool RunPointwise(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n, size_t hw,
                    float* y, const kernels::GemmEpilogue& ep) const;
  bool RunDirect(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n, size_t h,
                 size_t w, const WindowShape& s, float* y, const kernels::GemmEpilogue& ep,
                 const BlockedLayout* yl = nullptr, const BlockedLayout* rl = nullptr, const WeightSpan& next = {}) const;
  // The direct kernel over a blocked input (fp32, or bf16 with bf16_direct_) whose origin xo is this
  // conv's padded (0, 0) (hp x wp pixels per channel block): y NCHW (yl null) or blocked (residual
  // too, rl).
  bool RunDirectTiles(ThreadPool& pool, unsigned nthreads, const CancelFlag* cancel, const void* xo, size_t hp,
                      size_t wp, size_t n, const WindowShape& s, float* y, const BlockedLayout* yl,
                      const kernels::GemmEpilogue& ep, const BlockedLayout* rl, const WeightSpan& next = {}) const;
  bool RunDepthwise(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, size_t n,
                    size_t h, size_t w, const WindowShape& s, float* y, const kernels::GemmEpilogue& ep) const;
  bool RunDepthwiseBlocked(ThreadPool& pool, unsigned nthreads, const CancelFlag* cancel, const float* xo,
                           const BlockedLayout& xl, size_t n, const WindowShape& s, float* y, const BlockedLayout& yl,
                           const float* residual, const BlockedLayout* rl, const kernels::GemmEpilogue& ep) const;

  ConvSpec spec_;
  ConvPrecision precision_ = ConvPrecision::kFp32;
  ConvVariant variant_ = ConvVariant::kScalar;
  Path path_ = Path::kReference;
  size_t kg_ = 0;     // K of one group: c_in/group * kh * kw
  size_t ldw_ = 0;    // floats (fp32) or uint32 pairs (bf16) per weight row
  size_t k_run_ = 0;  // K the GEMM runs: kg_ plus the bias row(s)
  bool has_bias_ = false;
  bool pointwise_ = false;  // 1x1 stride 1 unpadded on AVX-512: B read in place, no im2col
  kernels::F32ConvGemmUkernelInfo pointwise_uk_{};
  float* w_ = nullptr;          // fp32: c_out x ldw_ (bias in column kg_ on the GEMM path)
  uint32_t* w_pairs_ = nullptr; // bf16 pairs: c_out x ldw_
  std::vector<float> bias_;     // folded bias (reference / depthwise)
  float* bias_blocks_ = nullptr;  // direct: folded bias, zero-padded to whole 32-channel blocks
  size_t bytes_ = 0;
  kernels::F32GemmUkernelInfo f32_uk_{};
  kernels::LowpGemmUkernelInfo bf16_uk_{};
  kernels::F32WindowUkernel window_uk_ = nullptr;
  kernels::F32NchwcConvUkernel direct_uk_ = nullptr;
  // fp32 1x1 stride 1 with few input channels: tiles of two 32-channel blocks (null: not used).
  kernels::F32NchwcConvUkernel pair_uk_ = nullptr;
  kernels::F32PackNchwcRowUkernel pack_uk_ = nullptr;
  // bf16 precision on the direct path: weights in w_pairs_, the input converted to a bf16 copy per run.
  bool bf16_direct_ = false;
  bool amx_ = false;  // the bf16 direct path on AMX tiles
  kernels::F32ToBf16Ukernel to_bf16_uk_ = nullptr;
  // Input channels per block of the direct path: 16 (NCHW16c), or 1 for a few-channel input (a
  // stem) that runs on a zero-padded NCHW copy and never on blocked activations.
  size_t in_block_ = kernels::kNchwcBlock;
  // Depthwise on blocked activations: weights [c / 16][kh * kw][16].
  kernels::F32NchwcDepthwiseUkernel dw_blocked_uk_ = nullptr;
  float* dw_blocked_w_ = nullptr;
  float* dw_blocked_bias_ = nullptr;  // inside dw_blocked_w_: the bias, zero-padded to whole blocks
  // im2col into B panels: AVX-512 next to the AVX-512 GEMM kernels (its rows are 32-float panels).
  kernels::F32Im2colUkernel im2col_uk_ = kernels::F32Im2colUkernelScalar();
  const char* window_name_ = "";
};

// An inverted-residual block (MobileNetV2's, EfficientNet's without squeeze-excitation): an optional
// 1x1 expansion, a depthwise conv and a 1x1 projection (+ a residual), each with its own folded
// epilogue, on blocked x and y. It runs in strips of output rows per image: a strip's expanded rows
// and depthwise output are made in per-thread scratch a part of L2 in size and consumed at once, so
// those two tensors, the largest of such a network (112x112x96 floats is 4.8 MB per image), never
// travel to memory and back as whole tensors between three passes. Each pixel's arithmetic is the
// unfused convs', so results are bit-identical to running the three.
struct ConvChain {
  std::shared_ptr<const ConvOp> expand;  // null: none (the block's x is the depthwise conv's input)
  std::shared_ptr<const ConvOp> depthwise, project;
  // A strip's scratch (expanded rows and depthwise output) in floats; see ChainStripFloats.
  size_t strip_floats = ChainStripFloats();

  // The scratch size chains are made with: half of L2, or SONDE_CHAIN_STRIP_KB (read as a chain is
  // made, i.e. when a plan is built: tests use tiny strips to cross strip boundaries on small images).
  static size_t ChainStripFloats();
  // Empty if the chain can run on an h x w input with these layouts (x's border covering the
  // depthwise padding when there is no expansion; y and the residual the output size), else why not.
  std::string Check(size_t h, size_t w, const BlockedLayout& xl, const BlockedLayout& yl, const BlockedLayout* rl) const;
  // x blocked (xl), y blocked (yl; its border zeroed here), residual blocked (rl) or null. Returns
  // false with *error set when cancelled ("aborted"); throws std::bad_alloc without scratch memory.
  bool Run(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x, const BlockedLayout& xl,
           size_t n, size_t h, size_t w, float* y, const BlockedLayout& yl, const float* residual,
           const BlockedLayout* rl, bool residual_before_activation, std::string* error) const;
};

enum class PoolKind { kMax = 0, kAverage = 1 };

// x: [n*c planes][h][w] -> y: [n*c][oh][ow]. count_include_pad: average divides by kh*kw (ONNX's
// count_include_pad = 1) instead of by the in-bounds taps. variant: kReference runs the scalar
// kernel (it is the reference), kAuto the widest available.
bool RunPool(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, PoolKind kind, const float* x,
             size_t planes, size_t h, size_t w, const WindowGeometry& g, bool count_include_pad, ConvVariant variant,
             float* y, std::string* error);

// NCHW x [n][c][l.h][l.w] -> blocked y (to_blocked, border zeroed), or blocked x -> NCHW y.
// c a multiple of 16.
bool ReorderNchwc(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, bool to_blocked, const float* x,
                  float* y, size_t n, size_t c, const BlockedLayout& l, std::string* error);

// RunPool on blocked (NCHW16c) x and y of `blocks` whole 16-channel blocks (AVX-512, no dilation):
// the same results as RunPool on the NCHW planes; y's border is zeroed. Empty string from
// CheckPoolBlocked if it may run with these layouts on an h x w input, else why not.
std::string CheckPoolBlocked(size_t h, size_t w, const WindowGeometry& g, const BlockedLayout& xl,
                             const BlockedLayout& yl);
bool RunPoolBlocked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, PoolKind kind, const float* x,
                    const BlockedLayout& xl, size_t blocks, size_t h, size_t w, const WindowGeometry& g,
                    bool count_include_pad, float* y, const BlockedLayout& yl, std::string* error);

// y[b * c + ch] = mean of the interior of channel ch of image b of a blocked x; blocks = n * c / 16.
bool RunGlobalAveragePoolBlocked(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                                 size_t blocks, const BlockedLayout& l, float* y, std::string* error);

// y[p] = mean of plane p (h*w floats); reference sums in double.
bool RunGlobalAveragePool(ThreadPool& pool, unsigned threads, const CancelFlag* cancel, const float* x,
                          size_t planes, size_t hw, ConvVariant variant, float* y, std::string* error);

}  // namespace sonde
