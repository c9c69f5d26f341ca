// Convolution-family microkernels that are not a GEMM: the sliding-window kernel (depthwise
// convolution, max pool, average pool) on one NCHW channel plane, global average pooling, and the
// direct reference convolution. Dense and grouped convolutions run on the GEMM microkernels of
// kernels/gemm (see ops/conv.cc). Pure functions: no allocation, no threads, no globals; only C
// headers, because ISA-specific translation units include this file.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/gemm/gemm.h"

namespace sonde {
namespace kernels {

enum WindowOp : int32_t {
  kWindowConv = 0,  // depthwise: sum of w[ky][kx] * x, + bias, then the GemmEpilogue activation/residual
  kWindowMax = 1,
  kWindowAvg = 2,
};

// One channel plane. The kernel first copies the plane into `scratch` surrounded by the padding
// value (0 for conv and avg, -inf for max) so that the inner loops are branch-free vector loads;
// the scratch plane is rows x cols = WindowScratchRows x WindowScratchCols floats.
struct WindowArgs {
  const float* in;
  size_t ih, iw;
  float* out;
  size_t oh, ow;
  size_t kh, kw, sh, sw, dh, dw, pad_t, pad_l;
  int32_t op;              // WindowOp
  const float* weights;    // conv: kh*kw taps of this channel
  float bias;              // conv
  // avg without pad counting: in-bounds taps per output row (oh) and column (ow); null: divide by
  // kh*kw (count_include_pad).
  const float* row_count;
  const float* col_count;
  // conv only, may be null: activation and residual (residual points at this plane, ldr = ow;
  // scale and bias of the epilogue are unused: the bias is the scalar above).
  const GemmEpilogue* ep;
  float* scratch;
};

// Scratch plane: every row/column a window can touch. Columns run to the last 16-lane chunk's
// reach: a chunk starting at output column ox reads input columns ox*sw + kx*dw + [0, 16*sw) (the
// stride-2 path loads 32 consecutive floats, a gather at most lane 15*sw), all below
// ow16*sw + (kw-1)*dw, so no slack is needed past that (and small planes fill little padding).
static inline size_t WindowScratchRows(const WindowArgs* a) { return (a->oh - 1) * a->sh + (a->kh - 1) * a->dh + 1; }
static inline size_t WindowScratchCols(const WindowArgs* a) {
  const size_t ow16 = (a->ow + 15) / 16 * 16;
  size_t c = ow16 * a->sw + (a->kw - 1) * a->dw;
  if (c < a->pad_l + a->iw) c = a->pad_l + a->iw;
  return c;
}

typedef void (*F32WindowUkernel)(const WindowArgs* a);
// Sum of n floats (global average pooling divides by n).
typedef float (*F32SumUkernel)(const float* x, size_t n);

F32WindowUkernel F32WindowUkernelScalar();
F32SumUkernel F32SumUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
F32WindowUkernel F32WindowUkernelAvx512();
F32SumUkernel F32SumUkernelAvx512();
#endif

// im2col straight into a GEMM B panel: rows k0 .. k0+kc-1 of cols(X) for output pixels
// j0 .. j0+ncols-1, each row nr floats (zero past ncols), row k at panel + (k - k0) * nr. Row k < kg
// is (channel, ky, kx) = (k / (kh kw), k / kw % kh, k % kw) of x; rows kg .. kg+bias_rows-1 are
// ones (the bias row of the weights), later rows zero.
struct Im2colArgs {
  const float* x;  // the group's first channel plane of one image
  size_t h, w, oh, ow, kh, kw, sh, sw, dh, dw, pad_t, pad_l;
  size_t kg, bias_rows;
};
typedef void (*F32Im2colUkernel)(const Im2colArgs* a, size_t k0, size_t kc, size_t j0, size_t ncols, size_t nr,
                                 float* panel);
F32Im2colUkernel F32Im2colUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
F32Im2colUkernel F32Im2colUkernelAvx512();
#endif

// Pointwise (1x1, stride 1, no pads) convolution straight from NCHW: C[mr x nr] (+)= A[mr x kc]
// (element (i, k) at a[i * lda + k * ldk]) * B[kc x nr] with B row k at b + k * ldb (the input's channel planes, read in
// place; lanes past nr are not read), accumulators seeded with row_bias[i] when it is non-null (the
// first K block), GemmEpilogue on the last block (null otherwise).
typedef void (*F32ConvGemmUkernel)(size_t mr, size_t nr, size_t kc, const float* a, size_t lda, size_t ldk, const float* b,
                                   size_t ldb, const float* row_bias, float* c, size_t ldc, bool accumulate,
                                   const GemmEpilogue* ep);
struct F32ConvGemmUkernelInfo {
  F32ConvGemmUkernel fn;
  uint32_t mr, nr;
  const char* name;
};
#if defined(__x86_64__) || defined(_M_X64)
F32ConvGemmUkernelInfo F32ConvGemmUkernelAvx512();
#endif

// Direct convolution on a channel-blocked copy of the input (NCHW16c), output written in NCHW.
// Input of one image: [c_blocks][hp][wp][16] floats, zero in the padding and in channels past C_in,
// so every tap of every output pixel is in range (hp >= (oh-1)*sh + kh, wp >= (ow-1)*sw + kw).
// Weights of one block of 32 output channels: [c_blocks][kh][kw][16 input channels][32 outputs],
// zero past C_out, 64-byte aligned. Strides sw of 1 or 2, no dilation. One call computes output rows
// oy .. oy+rows-1 (rows 1, or 2 with np <= 7, or with np <= kNchwcMaxPairRowPixels when oc_valid <=
// 16 on the fp32 AVX-512 tiles), columns ox0 .. ox0+np-1 (np <= kNchwcMaxPixels) of
// the block's first oc_valid channels, adds
// bias[0..31] and applies ep's activation and residual (ep->residual at the same NCHW offset as y;
// ldr, scale and bias of ep unused), or none when ep is null.
constexpr size_t kNchwcBlock = 16;
// Blocks of a c-channel blocked tensor: the last one partial when c is not a multiple of 16 (its
// lanes past c hold zeros, or what a depthwise conv or pool makes of zeros: finite values that a
// reader ignores, as the weights of those input channels are zero).
constexpr size_t NchwcBlocks(size_t c) { return (c + kNchwcBlock - 1) / kNchwcBlock; }
constexpr size_t kNchwcOutBlock = 32;
constexpr size_t kNchwcMaxPixels = 14;
// Row pairs of one-vector tiles (16 output channels or fewer): rows of up to 8 pixels (16
// accumulators), so an 8-pixel-wide output (an 8x8 image's 3x3 conv) takes half the tile calls.
constexpr size_t kNchwcMaxPairRowPixels = 8;
constexpr size_t kNchwcPairPixels = 6;
// Blocked output (y_row != 0): y points at output pixel (0, 0) of the channel block oc0 / 16 of one
// image, in a blocked tensor whose rows are y_row floats apart and whose 16-channel blocks are
// y_block floats apart (border columns and rows around the oh x ow interior are not written); the
// residual (ep->residual, may be null) is blocked the same way with its own res_row / res_block;
// whole vectors are stored, a partial block's lanes past oc_valid as zeros. The tile leaves as it is held, 16 channels of a pixel per
// vector, so no transpose or gather is needed.
struct NchwcConvArgs {
  const void* x;  // float, or bf16 (uint16) for the bf16 kernel
  size_t c_blocks, hp, wp;
  size_t c_last;  // input channels in the last block (16 when whole; the kernel skips the rest)
  const void* w;  // float, or bf16 pairs for the bf16 kernel
  size_t kh, kw, sh, sw;
  const float* bias;
  size_t oc_valid;
  float* y;  // channel oc0 of one image, NCHW (y_row == 0) or blocked
  size_t oh, ow;
  const GemmEpilogue* ep;
  size_t y_row, y_block;      // blocked output; 0: NCHW
  size_t res_row, res_block;  // blocked residual
  int y_bf16;                 // blocked output stored as bf16 (uint16 elements; the bf16 kernel only)
  // Bytes the tile asks L2 for while it computes (the weights of the output-channel block the
  // thread runs next, a slice per tile: from memory they take as long as the tile's FMAs, and one
  // tile waiting on them alone cost a 7x7x512 3x3 conv 0.9 of its 2.4 ms), pf_step bytes per
  // (input-channel block, tap) iteration; null for none. Not the stem tiles (small weights).
  const char* pf;
  size_t pf_bytes, pf_step;
  // The pair tiles (F32NchwcPointwisePairUkernelAvx512): floats from w to the next 32-channel
  // block's weights, whose outputs are channels oc0 + 32 .. oc0 + 63 (oc_valid counts both).
  size_t w_next;
};
typedef void (*F32NchwcConvUkernel)(const NchwcConvArgs* a, size_t oy, size_t ox0, size_t np, size_t rows);
// Depthwise convolution on NCHW16c (one weight per channel and tap, no dilation): output row oy of
// one 16-channel block. x points at this conv's padded (0, 0) of the block (rows x_row floats
// apart, every tap in range); w holds kh*kw vectors of 16 channel weights; bias 16 floats; y (and
// the residual, may be null) at the block's interior (0, 0), rows y_row (res_row) apart. ep: the
// activation and residual order (its pointers unused), or null for none.
struct NchwcDepthwiseArgs {
  const float* x;
  size_t x_row;
  const float* w;
  const float* bias;
  size_t kh, kw, sh, sw;
  float* y;
  size_t y_row, ow;
  const float* residual;
  size_t res_row;
  const GemmEpilogue* ep;
};
typedef void (*F32NchwcDepthwiseUkernel)(const NchwcDepthwiseArgs* a, size_t oy);
// Max or average pooling (no dilation) on NCHW16c: output row oy of one 16-channel block. x points at
// the block's interior (0, 0), rows x_row floats apart; taps outside the h x w interior are skipped
// (the window is clipped), so the border's zeros never count as values. y at the output block's
// interior (0, 0), rows y_row apart. The same taps in the same order, and the same divisor, as the
// NCHW window kernel: bit for bit its results.
struct NchwcPoolArgs {
  const float* x;
  size_t x_row, h, w;
  size_t kh, kw, sh, sw, pad_t, pad_l;
  int32_t op;              // kWindowMax or kWindowAvg
  int32_t count_include_pad;
  float* y;
  size_t y_row, ow;
};
typedef void (*F32NchwcPoolUkernel)(const NchwcPoolArgs* a, size_t oy);
// One input row of a block's channel planes into blocked form: dst[ix * 16 + l] = src[l * plane + ix]
// for l < channels (<= 16; a tensor's last, partial block), 0 for the lanes past them; ix < w.
typedef void (*F32PackNchwcRowUkernel)(const float* src, size_t plane, size_t w, float* dst, size_t channels);
// The inverse: dst[l * plane + ix] = src[ix * 16 + l], ix < w, l < channels (<= 16).
typedef void (*F32UnpackNchwcRowUkernel)(const float* src, size_t w, float* dst, size_t plane, size_t channels);
// dst[i] = src[i] rounded to bf16 (nearest even; denormals flushed to zero, as vdpbf16ps reads them).
typedef void (*F32ToBf16Ukernel)(const float* src, size_t n, uint16_t* dst);
F32PackNchwcRowUkernel F32PackNchwcRowUkernelScalar();
F32UnpackNchwcRowUkernel F32UnpackNchwcRowUkernelScalar();
#if defined(__x86_64__) || defined(_M_X64)
F32NchwcConvUkernel F32NchwcConvUkernelAvx512();
// The same tiles on a plain zero-padded NCHW input, for convs with a few input channels (image
// stems: 3 of them would fill 3 of a block's 16 lanes): x of one image is [c_in][hp][wp] (c_blocks
// = c_in), weights [c_in][kh][kw][32 outputs]; everything else as above. Each tap is then one
// broadcast per pixel against the 32-channel weight vectors, with no zero channels multiplied.
F32NchwcConvUkernel F32NchwConvUkernelAvx512();
// 1x1 stride 1 on NCHW16c, two adjacent 32-channel weight blocks at once (w and w + w_next): a tile
// of up to kNchwcPairPixels pixels of one row (rows = 1) x 64 channels, 24 accumulators. Each input
// broadcast feeds 4 FMAs instead of 2, so an input line is read once per 64 outputs: for few input
// channels (K <= 128: a tile's FMAs are few beside its loads and stores) it outruns the 14 x 32
// tile (64 -> 256 on 56x56, isolated: 165 -> 193 GFLOP/s).
F32NchwcConvUkernel F32NchwcPointwisePairUkernelAvx512();
F32PackNchwcRowUkernel F32PackNchwcRowUkernelAvx512();
F32UnpackNchwcRowUkernel F32UnpackNchwcRowUkernelAvx512();
F32NchwcDepthwiseUkernel F32NchwcDepthwiseUkernelAvx512();
F32NchwcPoolUkernel F32NchwcPoolUkernelAvx512();
// The NCHW16c tiles with vdpbf16ps (AVX512_BF16): x is a bf16 copy of the blocked input (same
// geometry, uint16 elements, so the channels 2j, 2j+1 of a pixel are one 32-bit broadcast), and the
// weights of a 32-channel block are [c_blocks][kh][kw][8 pairs][32 outputs][2] bf16 (the pair's
// lower channel in the low half, vdpbf16ps's operand order). Each pair and tap: 2 weight loads + 14
// broadcasts feed 28 dot products of 2, twice the FMA path's multiply-adds per instruction.
F32NchwcConvUkernel Bf16NchwcConvUkernelAvx512Bf16();
// The stem form (a few input channels, like F32NchwConvUkernelAvx512): x a zero-padded bf16 NCHW
// copy [c_in][hp][wp] with wp >= (ow - 1) * sw + 2 ceil(kw / 2) (an odd kw reads one zero column
// more), weights [c_in][kh][ceil(kw / 2) pairs of taps kx = 2j, 2j + 1][32 outputs][2] bf16.
F32NchwcConvUkernel Bf16NchwConvUkernelAvx512Bf16();
F32ToBf16Ukernel F32ToBf16UkernelAvx512Bf16();
// The NCHW16c bf16 tiles on AMX (AMX-BF16): the same input, weights and store as
// Bf16NchwcConvUkernelAvx512Bf16, a tile dot product per pair of taps (and per lone tap) of a
// channel block.
F32NchwcConvUkernel Bf16NchwcConvUkernelAmx();
#endif

// The independent reference convolution, straight from the definition, accumulating in double:
// y[b][co][oy][ox] = act(bias[co] + sum_{c, ky, kx} w[co][c][ky][kx] * x[b][g*cg + c][iy][ix])
// (+ residual, before or after act as ep says; ep may be null). Weights: c_out rows of ldw floats,
// the first cg*kh*kw of each used. Slow on purpose; tests and the 'reference' variant use it.
struct ConvRefArgs {
  const float* x;
  size_t n, c_in, h, w;
  const float* weights;
  size_t ldw;
  const float* bias;  // c_out or null
  size_t c_out, group, kh, kw, sh, sw, dh, dw, pad_t, pad_l, oh, ow;
  float* y;
  const float* residual;  // same shape as y, or null
  const GemmEpilogue* ep; // activation and residual order; its pointers are ignored
};
void F32ConvReference(const ConvRefArgs* a, size_t batch_index, size_t out_channel);

}  // namespace kernels
}  // namespace sonde
