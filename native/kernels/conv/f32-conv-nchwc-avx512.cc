// AVX-512 direct convolution on a channel-blocked input (see NchwcConvArgs in conv.h): the output
// tile is up to 14 pixels (one row segment, or two rows of <= 7) x 32 output channels, 28 zmm accumulators
// (pixel p, 16 channels each) + 2 weight vectors = 30 of 32 registers; the input value of pixel p
// and input channel c is a broadcast straight from memory (an embedded-broadcast FMA operand, no
// register). Per input channel and tap: 2 weight loads + 14 broadcasts feed 28 FMAs, so the loop
// stays FMA-bound on two load ports, and no pixel lane is wasted at 7x7 or 14x14 the way a
// 32-pixel GEMM panel is (7x7: 49 of 64 lanes used). Rows of 7 go in pairs: one 7-pixel tile
// re-streams the weights from L2 for half the FMAs (7x7x512 3x3 ran at ~110 GFLOP/s that way).
// The tile leaves through StoreNchwcTile (nchwc-avx512.h, shared with the bf16 tiles): blocked as
// held, or to NCHW through 16x16 register transposes.
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h for _mm512_setzero_ps/masked loads.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The same false report as -Wuninitialized where Transpose16x16 inlines into the tiles.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

#include "kernels/conv/conv.h"
#include "kernels/conv/nchwc-avx512.h"

namespace sonde {
namespace kernels {
namespace {

constexpr size_t kB = kNchwcBlock;    // input channels per block (one zmm of floats)
constexpr size_t kOcb = kNchwcOutBlock;  // output channels per weight block

using avx512::Transpose16x16;

// How far ahead (in input channels, kOcb floats each) a blocked tile asks for its weights into L1.
// A 32-channel block's weights (e.g. 64 channels x 3x3: 74 KiB; 512 x 1x1: 64 KiB) do not fit in L1
// beside the tile's input lines, so every tile streams them from L2, two lines per 14-cycle
// iteration; the hardware did not keep that stream ahead of the FMAs. Whole ResNet-50, fp32, in one
// process against no prefetch (2-core Xeon VM): 8 channels ahead 0.965x time, 16 0.962x, 24 0.969x,
// 32 0.970x at batch 1 on one thread; at 16, 0.980x at batch 8, 0.962x / 0.978x on two threads;
// MobileNetV2 0.973x (batch 1). The pair tiles (few input channels, 64 output channels) gained
// nothing from the same (1.003x on ResNet-50, 1.015x on MobileNetV2), so they do not.
constexpr size_t kWeightPrefetchChannels = 16;

// Whole tiles in assembly: 14 pixels x 32 channels (one row, or row pairs of 7) and one vector of
// channels in row pairs of 8, over input blocks of 16 full channels or, for the stems, a plain NCHW
// input. As intrinsics, GCC keeps the accumulators in registers but pays for the loop nest (input
// block, tap row, tap, channel) in integer ops that compete with the FMAs for ports 0 and 5; here
// every channel of a block is unrolled with constant offsets and the loops count down in
// registers. The same FMAs in the same order per output as the intrinsic loop in Tile, and the same
// prefetches (next tap row's or next block's input lines, the weights 16 channels ahead, the next
// weight slice into L2), so the results are identical bit for bit. A standalone driver of the
// tiles, one Xeon core, input and weights in L2, interleaved with the intrinsic tiles: 3x3 over 64
// channels 229 -> 232 GFLOP/s, 1x1 over 256 channels at 56 wide 214 -> 229, over 1024 channels 223
// -> 234, over 64 channels 191 -> 202; the one-vector 3x3 16 -> 16 on 8x8 167-172 -> 178-183.
// Registers: pixel p's outputs in zmm p (channels 0-15) and zmm 14 + p (16-31), the channel's
// weights in zmm28/29, the broadcast input in zmm31.
constexpr size_t kAsmTilePixels = 14;
#define SONDE_T_FMA(r0, r1, addr)                       \
  "vbroadcastss " addr ", %%zmm31\n\t"                  \
  "vfmadd231ps %%zmm28, %%zmm31, %%zmm" #r0 "\n\t"      \
  "vfmadd231ps %%zmm29, %%zmm31, %%zmm" #r1 "\n\t"
// Pixel q of the first output row's input (base B) or the second's (B + rs bytes), channel c, stride SW.
#define SONDE_T_X0(B, q, c, SW) #q "*" #SW "*64+" #c "*4(%[" B "])"
#define SONDE_T_X1(B, q, c, SW) #q "*" #SW "*64+" #c "*4(%[" B "],%[rs])"
#define SONDE_T_X0S(B, q, c, SW) "(7+" #q ")*" #SW "*64+" #c "*4(%[" B "])"
// Channel c's weights, and theirs kWeightPrefetchChannels (16) channels of 128 bytes ahead.
#define SONDE_T_W(c)                                    \
  "prefetcht0 2048+" #c "*128(%[w])\n\t"                \
  "prefetcht0 2048+" #c "*128+64(%[w])\n\t"             \
  "vmovaps " #c "*128(%[w]), %%zmm28\n\t"               \
  "vmovaps " #c "*128+64(%[w]), %%zmm29\n\t"
// The FMAs of one channel (or one tap of a stem) over a tile's 14 pixels: WL loads the weights, XA
// addresses pixel q (< 7) of the first half, XB of the second: the second output row of a row pair,
// or pixels 7-13 of one row (the ...S address forms).
#define SONDE_T_PAIR7(WL, XA, XB, B, c, SW)                                                          \
  WL(c)                                                                                              \
  SONDE_T_FMA(0, 14, XA(B, 0, c, SW)) SONDE_T_FMA(1, 15, XA(B, 1, c, SW))                            \
  SONDE_T_FMA(2, 16, XA(B, 2, c, SW)) SONDE_T_FMA(3, 17, XA(B, 3, c, SW))                            \
  SONDE_T_FMA(4, 18, XA(B, 4, c, SW)) SONDE_T_FMA(5, 19, XA(B, 5, c, SW))                            \
  SONDE_T_FMA(6, 20, XA(B, 6, c, SW)) SONDE_T_FMA(7, 21, XB(B, 0, c, SW))                            \
  SONDE_T_FMA(8, 22, XB(B, 1, c, SW)) SONDE_T_FMA(9, 23, XB(B, 2, c, SW))                            \
  SONDE_T_FMA(10, 24, XB(B, 3, c, SW)) SONDE_T_FMA(11, 25, XB(B, 4, c, SW))                          \
  SONDE_T_FMA(12, 26, XB(B, 5, c, SW)) SONDE_T_FMA(13, 27, XB(B, 6, c, SW))
// One vector of output channels (NV = 1): pixel p in zmm p, the weights in zmm31, each input an
// embedded broadcast of its FMA (the intrinsic loop's form). No weight prefetch: a 16-channel
// block's weights are small (16 x 9 taps x 16 channels: 9 KiB), and the load ports are what this
// tile is bound by (a load per FMA).
#define SONDE_T_FMA1(r, addr) "vfmadd231ps " addr "%{1to16%}, %%zmm31, %%zmm" #r "\n\t"
#define SONDE_T_ONE8X2(WL, XA, XB, B, c, SW)                                                         \
  WL(c)                                                                                              \
  SONDE_T_FMA1(0, XA(B, 0, c, SW)) SONDE_T_FMA1(1, XA(B, 1, c, SW)) SONDE_T_FMA1(2, XA(B, 2, c, SW)) \
  SONDE_T_FMA1(3, XA(B, 3, c, SW)) SONDE_T_FMA1(4, XA(B, 4, c, SW)) SONDE_T_FMA1(5, XA(B, 5, c, SW)) \
  SONDE_T_FMA1(6, XA(B, 6, c, SW)) SONDE_T_FMA1(7, XA(B, 7, c, SW)) SONDE_T_FMA1(8, XB(B, 0, c, SW)) \
  SONDE_T_FMA1(9, XB(B, 1, c, SW)) SONDE_T_FMA1(10, XB(B, 2, c, SW)) SONDE_T_FMA1(11, XB(B, 3, c, SW)) \
  SONDE_T_FMA1(12, XB(B, 4, c, SW)) SONDE_T_FMA1(13, XB(B, 5, c, SW)) SONDE_T_FMA1(14, XB(B, 6, c, SW)) \
  SONDE_T_FMA1(15, XB(B, 7, c, SW))
#define SONDE_T_W1(c) "vmovaps " #c "*128(%[w]), %%zmm31\n\t"
// Channel c of a 16-channel input block.
#define SONDE_T_CH1(B, c, SW) SONDE_T_PAIR7(SONDE_T_W, SONDE_T_X0, SONDE_T_X0S, B, c, SW)
#define SONDE_T_CH2(B, c, SW) SONDE_T_PAIR7(SONDE_T_W, SONDE_T_X0, SONDE_T_X1, B, c, SW)
#define SONDE_T_CH8X2(B, c, SW) SONDE_T_ONE8X2(SONDE_T_W1, SONDE_T_X0, SONDE_T_X1, B, c, SW)
// A plain NCHW input (KB = 1, the stems): pixel q of the first output row (or the second, rs bytes
// further) at q * SW floats; one channel per tap, so no channel offset and no weight prefetch.
#define SONDE_T_P0(B, q, c, SW) #q "*" #SW "*4(%[" B "])"
#define SONDE_T_P1(B, q, c, SW) #q "*" #SW "*4(%[" B "],%[rs])"
#define SONDE_T_P0S(B, q, c, SW) "(7+" #q ")*" #SW "*4(%[" B "])"
#define SONDE_T_WS(c) "vmovaps (%[w]), %%zmm28\n\tvmovaps 64(%[w]), %%zmm29\n\t"
#define SONDE_T_WS1(c) "vmovaps (%[w]), %%zmm31\n\t"
#define SONDE_T_TAP14(B, SW) SONDE_T_PAIR7(SONDE_T_WS, SONDE_T_P0, SONDE_T_P0S, B, 0, SW)
#define SONDE_T_TAP7X2(B, SW) SONDE_T_PAIR7(SONDE_T_WS, SONDE_T_P0, SONDE_T_P1, B, 0, SW)
#define SONDE_T_TAP8X2(B, SW) SONDE_T_ONE8X2(SONDE_T_WS1, SONDE_T_P0, SONDE_T_P1, B, 0, SW)
#define SONDE_T_BLOCK(CH, B, SW)                                                                     \
  CH(B, 0, SW) CH(B, 1, SW) CH(B, 2, SW) CH(B, 3, SW) CH(B, 4, SW) CH(B, 5, SW) CH(B, 6, SW)         \
  CH(B, 7, SW) CH(B, 8, SW) CH(B, 9, SW) CH(B, 10, SW) CH(B, 11, SW) CH(B, 12, SW) CH(B, 13, SW)     \
  CH(B, 14, SW) CH(B, 15, SW)                                                                        \
  "add $2048, %[w]\n\t"
// The input lines of the next block (a plane further, at t), for a 1x1 tile: pixel q of the first
// output row's, or of the second's (rs bytes further).
#define SONDE_T_PF(q, SW) "prefetcht0 " #q "*" #SW "*64(%[t])\n\t"
#define SONDE_T_PFR(q, SW) "prefetcht0 " #q "*" #SW "*64(%[t],%[rs])\n\t"
#define SONDE_T_PF7(PF, SW) PF(0, SW) PF(1, SW) PF(2, SW) PF(3, SW) PF(4, SW) PF(5, SW) PF(6, SW)
#define SONDE_T_NEXT1(SW)                                                                            \
  SONDE_T_PF7(SONDE_T_PF, SW) SONDE_T_PF(7, SW) SONDE_T_PF(8, SW) SONDE_T_PF(9, SW) SONDE_T_PF(10, SW) \
  SONDE_T_PF(11, SW) SONDE_T_PF(12, SW) SONDE_T_PF(13, SW)
#define SONDE_T_NEXT2(SW) SONDE_T_PF7(SONDE_T_PF, SW) SONDE_T_PF7(SONDE_T_PFR, SW)
#define SONDE_T_NEXT8X2(SW) SONDE_T_PF7(SONDE_T_PF, SW) SONDE_T_PF(7, SW) SONDE_T_PF7(SONDE_T_PFR, SW) SONDE_T_PFR(7, SW)
// PrefetchWeightSlice: the next pf_step bytes of the slice at pf (64 at a time, up to pf_end) into L2.
#define SONDE_T_SLICE                                                                                \
  "mov %[pfstep], %[t]\n\t"                                                                          \
  "add %[pf], %[t]\n\t"                                                                              \
  "10:\n\t"                                                                                          \
  "cmp %[pfend], %[pf]\n\t"                                                                          \
  "jae 11f\n\t"                                                                                      \
  "cmp %[t], %[pf]\n\t"                                                                              \
  "jae 11f\n\t"                                                                                      \
  "prefetcht1 (%[pf])\n\t"                                                                           \
  "add $64, %[pf]\n\t"                                                                               \
  "jmp 10b\n\t"                                                                                      \
  "11:\n\t"
#define SONDE_T_LOAD(i) "vmovaps " #i "*64(%[acc]), %%zmm" #i "\n\t"
#define SONDE_T_SAVE(i) "vmovaps %%zmm" #i ", " #i "*64(%[acc])\n\t"
#define SONDE_T_ACCS16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define SONDE_T_ACCS28(M) SONDE_T_ACCS16(M) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23) M(24) M(25) M(26) M(27)
#define SONDE_T_CLOBBERS                                                                             \
  "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10", "zmm11",  \
  "zmm12", "zmm13", "zmm14", "zmm15", "zmm16", "zmm17", "zmm18", "zmm19", "zmm20", "zmm21",          \
  "zmm22", "zmm23", "zmm24", "zmm25", "zmm26", "zmm27", "zmm28", "zmm29", "zmm31", "cc", "memory"
// 1x1: the blocks in turn, x at the block's first pixel.
#define SONDE_T_ASM_1X1(ACCS, CH, NEXT, SW)                                                          \
  asm volatile(ACCS(SONDE_T_LOAD)                                                            \
               "1:\n\t"                                                                              \
               SONDE_T_SLICE                                                                         \
               "cmp $1, %[ncb]\n\t"                                                                  \
               "je 2f\n\t"                                                                           \
               "mov %[planeb], %[t]\n\t"                                                             \
               "add %[x], %[t]\n\t"                                                                  \
               NEXT(SW)                                                                              \
               "2:\n\t"                                                                              \
               SONDE_T_BLOCK(CH, "x", SW)                                                            \
               "add %[planeb], %[x]\n\t"                                                             \
               "dec %[ncb]\n\t"                                                                      \
               "jnz 1b\n\t"                                                                          \
               ACCS(SONDE_T_SAVE)                                                            \
               : [x] "+r"(x), [w] "+r"(w), [ncb] "+r"(ncb), [pf] "+r"(pf), [t] "=&r"(t)              \
               : [rs] "r"(rs), [acc] "r"(acc), [planeb] "m"(planeb), [pfend] "m"(pf_end),            \
                 [pfstep] "m"(pf_step)                                                               \
               : SONDE_T_CLOBBERS)
// The loops of the KxK and stem forms: over blocks (1:, x), tap rows (2:, xr) and taps (3:, nkx
// counting down); a form moves xt to the next tap itself.
#define SONDE_T_BLOCKS_ROWS "1:\n\tmov %[x], %[xr]\n\tmov %[kh], %[nky]\n\t2:\n\t"
#define SONDE_T_NEXT_TAP                                                                             \
  "dec %[nkx]\n\tjnz 3b\n\t"                                                                        \
  "add %[rowb], %[xr]\n\tdec %[nky]\n\tjnz 2b\n\t"                                                  \
  "add %[planeb], %[x]\n\tdec %[ncb]\n\tjnz 1b\n\t"
// KxK: blocks, tap rows (xr), taps (xt, a pixel of 64 bytes apart). Before each tap row, the lines of
// the next one (or of the next block's first), span pixels per output row.
#define SONDE_T_ASM_KXK(ACCS, CH, R2, SW)                                                            \
  asm volatile(ACCS(SONDE_T_LOAD)                                                            \
               SONDE_T_BLOCKS_ROWS                                                                   \
               "cmp $1, %[nky]\n\t"                                                                  \
               "je 5f\n\t"                                                                           \
               "mov %[rowb], %[t]\n\t"                                                               \
               "add %[xr], %[t]\n\t"                                                                 \
               "jmp 6f\n\t"                                                                          \
               "5:\n\t"                                                                              \
               "cmp $1, %[ncb]\n\t"                                                                  \
               "je 7f\n\t"                                                                           \
               "mov %[planeb], %[t]\n\t"                                                             \
               "add %[x], %[t]\n\t"                                                                  \
               "6:\n\t"                                                                              \
               "mov %[span], %[nkx]\n\t"                                                             \
               "8:\n\t"                                                                              \
               "prefetcht0 (%[t])\n\t"                                                               \
               R2                                                                                    \
               "add $64, %[t]\n\t"                                                                   \
               "dec %[nkx]\n\t"                                                                      \
               "jnz 8b\n\t"                                                                          \
               "7:\n\t"                                                                              \
               "mov %[xr], %[xt]\n\t"                                                                \
               "mov %[kw], %[nkx]\n\t"                                                               \
               "3:\n\t"                                                                              \
               SONDE_T_SLICE                                                                         \
               SONDE_T_BLOCK(CH, "xt", SW)                                                           \
               "add $64, %[xt]\n\t"                                                                  \
               SONDE_T_NEXT_TAP                                                                      \
               ACCS(SONDE_T_SAVE)                                                            \
               : [x] "+r"(x), [w] "+r"(w), [ncb] "+r"(ncb), [pf] "+r"(pf), [t] "=&r"(t),             \
                 [xr] "=&r"(xr), [xt] "=&r"(xt), [nky] "=&r"(nky), [nkx] "=&r"(nkx)                  \
               : [rs] "r"(rs), [acc] "r"(acc), [planeb] "m"(planeb), [rowb] "m"(rowb), [kh] "m"(kh), \
                 [kw] "m"(kw), [span] "m"(span), [pfend] "m"(pf_end), [pfstep] "m"(pf_step)          \
               : SONDE_T_CLOBBERS)

// KB = 1: channels (planes), tap rows (xr), taps (xt, a float apart), one channel's weights (128
// bytes) a tap.
#define SONDE_T_ASM_KB1(ACCS, TAP, SW)                                                               \
  asm volatile(ACCS(SONDE_T_LOAD)                                                                    \
               SONDE_T_BLOCKS_ROWS                                                                   \
               "mov %[xr], %[xt]\n\t"                                                                \
               "mov %[kw], %[nkx]\n\t"                                                               \
               "3:\n\t"                                                                              \
               TAP("xt", SW)                                                                         \
               "add $128, %[w]\n\t"                                                                  \
               "add $4, %[xt]\n\t"                                                                   \
               SONDE_T_NEXT_TAP                                                                      \
               ACCS(SONDE_T_SAVE)                                                                    \
               : [x] "+r"(x), [w] "+r"(w), [ncb] "+r"(ncb), [xr] "=&r"(xr), [xt] "=&r"(xt),          \
                 [nky] "=&r"(nky), [nkx] "=&r"(nkx)                                                  \
               : [rs] "r"(rs), [acc] "r"(acc), [planeb] "m"(planeb), [rowb] "m"(rowb), [kh] "m"(kh), \
                 [kw] "m"(kw)                                                                        \
               : SONDE_T_CLOBBERS)

// The tile's loops over its input (x: the first output pixel's input window, channel block 0) for
// NV vectors of output channels, R rows of P pixels at stride SW, accumulating into acc (zero on
// entry); the caller stores it.
template <size_t NV, size_t P, size_t SW, size_t R, size_t KB>
void TileLoopsAsm(const NchwcConvArgs* a, const float* x, __m512 (&acc)[NV][P * R]) {
  static_assert((NV == 2 && P * R == kAsmTilePixels) || (NV == 1 && P == 8 && R == 2), "a tile with an assembly form");
  static_assert(SW == 1 || SW == 2, "stride 1 or 2");
  static_assert(kB == 16 && kOcb == 32 && kWeightPrefetchChannels * kOcb * sizeof(float) == 2048, "the offsets");
  const float* w = static_cast<const float*>(a->w);
  const char* pf = a->pf;
  const char* const pf_end = pf ? pf + a->pf_bytes : nullptr;
  const size_t pf_step = a->pf_step;
  const size_t row = a->wp * KB;
  const size_t rowb = row * sizeof(float), planeb = a->hp * rowb;
  const size_t rs = R > 1 ? a->sh * rowb : 0;
  size_t ncb = a->c_blocks;
  if constexpr (KB == 1) {
    // The stems: no prefetch of any kind (their weights are small, their callers pass no slice).
    const size_t kh = a->kh, kw = a->kw;
    size_t xr, xt, nky, nkx;
    if constexpr (NV == 1 && SW == 1) SONDE_T_ASM_KB1(SONDE_T_ACCS16, SONDE_T_TAP8X2, 1);
    else if constexpr (NV == 1) SONDE_T_ASM_KB1(SONDE_T_ACCS16, SONDE_T_TAP8X2, 2);
    else if constexpr (R == 1 && SW == 1) SONDE_T_ASM_KB1(SONDE_T_ACCS28, SONDE_T_TAP14, 1);
    else if constexpr (R == 1) SONDE_T_ASM_KB1(SONDE_T_ACCS28, SONDE_T_TAP14, 2);
    else if constexpr (SW == 1) SONDE_T_ASM_KB1(SONDE_T_ACCS28, SONDE_T_TAP7X2, 1);
    else SONDE_T_ASM_KB1(SONDE_T_ACCS28, SONDE_T_TAP7X2, 2);
    return;
  }
  size_t t;
  if (a->kh * a->kw == 1) {
    if constexpr (NV == 1 && SW == 1) SONDE_T_ASM_1X1(SONDE_T_ACCS16, SONDE_T_CH8X2, SONDE_T_NEXT8X2, 1);
    else if constexpr (NV == 1) SONDE_T_ASM_1X1(SONDE_T_ACCS16, SONDE_T_CH8X2, SONDE_T_NEXT8X2, 2);
    else if constexpr (R == 1 && SW == 1) SONDE_T_ASM_1X1(SONDE_T_ACCS28, SONDE_T_CH1, SONDE_T_NEXT1, 1);
    else if constexpr (R == 1) SONDE_T_ASM_1X1(SONDE_T_ACCS28, SONDE_T_CH1, SONDE_T_NEXT1, 2);
    else if constexpr (SW == 1) SONDE_T_ASM_1X1(SONDE_T_ACCS28, SONDE_T_CH2, SONDE_T_NEXT2, 1);
    else SONDE_T_ASM_1X1(SONDE_T_ACCS28, SONDE_T_CH2, SONDE_T_NEXT2, 2);
    return;
  }
  const size_t kh = a->kh, kw = a->kw, span = (P - 1) * SW + a->kw;
  size_t xr, xt, nky, nkx;
  if constexpr (NV == 1 && SW == 1) SONDE_T_ASM_KXK(SONDE_T_ACCS16, SONDE_T_CH8X2, "prefetcht0 (%[t],%[rs])\n\t", 1);
  else if constexpr (NV == 1) SONDE_T_ASM_KXK(SONDE_T_ACCS16, SONDE_T_CH8X2, "prefetcht0 (%[t],%[rs])\n\t", 2);
  else if constexpr (R == 1 && SW == 1) SONDE_T_ASM_KXK(SONDE_T_ACCS28, SONDE_T_CH1, "", 1);
  else if constexpr (R == 1) SONDE_T_ASM_KXK(SONDE_T_ACCS28, SONDE_T_CH1, "", 2);
  else if constexpr (SW == 1) SONDE_T_ASM_KXK(SONDE_T_ACCS28, SONDE_T_CH2, "prefetcht0 (%[t],%[rs])\n\t", 1);
  else SONDE_T_ASM_KXK(SONDE_T_ACCS28, SONDE_T_CH2, "prefetcht0 (%[t],%[rs])\n\t", 2);
}
#undef SONDE_T_ASM_KXK
#undef SONDE_T_ASM_KB1
#undef SONDE_T_NEXT_TAP
#undef SONDE_T_BLOCKS_ROWS
#undef SONDE_T_TAP8X2
#undef SONDE_T_TAP7X2
#undef SONDE_T_TAP14
#undef SONDE_T_WS1
#undef SONDE_T_WS
#undef SONDE_T_P0S
#undef SONDE_T_P1
#undef SONDE_T_P0
#undef SONDE_T_ASM_1X1
#undef SONDE_T_CLOBBERS
#undef SONDE_T_ACCS28
#undef SONDE_T_ACCS16
#undef SONDE_T_SAVE
#undef SONDE_T_LOAD
#undef SONDE_T_SLICE
#undef SONDE_T_NEXT2
#undef SONDE_T_NEXT1
#undef SONDE_T_NEXT8X2
#undef SONDE_T_PF7
#undef SONDE_T_PFR
#undef SONDE_T_PF
#undef SONDE_T_BLOCK
#undef SONDE_T_CH2
#undef SONDE_T_CH1
#undef SONDE_T_CH8X2
#undef SONDE_T_W1
#undef SONDE_T_ONE8X2
#undef SONDE_T_FMA1
#undef SONDE_T_PAIR7
#undef SONDE_T_W
#undef SONDE_T_X0S
#undef SONDE_T_X1
#undef SONDE_T_X0
#undef SONDE_T_FMA

// R output rows of P pixels each (R * P <= 14 accumulators per output-channel vector); KB input
// channels per block: 16 (NCHW16c), or 1 for a plain padded NCHW input (see F32NchwConvUkernelAvx512).
// No predictive commoning: at KB = 1 and stride 2, pixel p's input at tap kx + 2 is pixel p + 1's at
// kx, and GCC kept those broadcasts alive across taps, spilling 14 of them and half the accumulators
// to the stack (a 7x7/2 stem ran at ~110 GFLOP/s that way).
template <size_t NV, size_t P, size_t SW, size_t R, size_t KB>
__attribute__((optimize("no-predictive-commoning"))) void Tile(const NchwcConvArgs* a, size_t oy, size_t ox0) {
  constexpr size_t kPix = R * P;
  __m512 acc[NV][kPix];
#pragma GCC unroll 16
  for (size_t p = 0; p < kPix; ++p)
    for (size_t v = 0; v < NV; ++v) acc[v][p] = _mm512_setzero_ps();
  const size_t row = a->wp * KB, plane = a->hp * row, row_step = a->sh * row;
  const float* w = static_cast<const float*>(a->w);
  const float* xb = static_cast<const float*>(a->x) + oy * row_step + ox0 * SW * KB;
  if constexpr ((KB == kB || KB == 1) && ((NV == 2 && kPix == kAsmTilePixels) || (NV == 1 && P == 8 && R == 2))) {
    if (a->c_last == KB && (KB > 1 || !a->pf)) {
      TileLoopsAsm<NV, P, SW, R, KB>(a, xb, acc);
      avx512::StoreNchwcTile<NV, P, R>(a, oy, ox0, acc);
      return;
    }
  }
  const char* pf = a->pf;
  const char* const pf_end = pf ? pf + a->pf_bytes : nullptr;
  for (size_t cb = 0; cb < a->c_blocks; ++cb, xb += plane) {
    // The last block's channels past c_last have zero weights: skipped, not multiplied.
    const size_t nc = cb + 1 == a->c_blocks ? a->c_last : KB;
    for (size_t ky = 0; ky < a->kh; ++ky) {
      if (KB > 1 && a->kh * a->kw > 1) {
        // The input lines of the next tap row (or the next block's first), asked of L1 a tap row
        // (kw x 16 channels of FMAs) ahead: a new row's lines missed L1 at its first taps. ResNet-50
        // in one process against none: n8 t1 0.977-0.988x time, n8 t2 0.994x, n1 t2 0.993x, n1 t1 0.998x.
        const float* nx = ky + 1 < a->kh ? xb + (ky + 1) * row : cb + 1 < a->c_blocks ? xb + plane : nullptr;
        if (nx) {
          const size_t span = (P - 1) * SW + a->kw;
          for (size_t r = 0; r < R; ++r)
            for (size_t q = 0; q < span; ++q)
              _mm_prefetch(reinterpret_cast<const char*>(nx + r * row_step + q * KB), _MM_HINT_T0);
        }
      }
      // With KB = 1 this is the innermost loop, and GCC's unroll by 2 spilled half the accumulators.
#pragma GCC unroll 1
      for (size_t kx = 0; kx < a->kw; ++kx) {
        avx512::PrefetchWeightSlice(pf, pf_end, a->pf_step);
        const float* xt = xb + ky * row + kx * KB;
        // A 1x1 tile's next input-channel block is kPix new lines a plane away, which no hardware
        // prefetcher follows: asked for into L1 one block ahead, so the FMAs do not stall on them
        // at every block boundary (the out-of-order window reaches ~1/3 of a block's iterations).
        // A 1x1 256 -> 64 at 56x56: 136-149 -> 152-171 GFLOP/s; KxK tiles reuse their lines across taps.
        if (KB > 1 && a->kh * a->kw == 1 && cb + 1 < a->c_blocks) {
#pragma GCC unroll 16
          for (size_t p = 0; p < kPix; ++p)
            _mm_prefetch(reinterpret_cast<const char*>(xt + plane + (p / P) * row_step + (p % P) * SW * KB), _MM_HINT_T0);
        }
        // Unrolling the 16 input channels too made GCC spill accumulators; this loop keeps all in registers.
#pragma GCC unroll 1
        for (size_t c = 0; c < nc; ++c, w += kOcb) {
          if (KB > 1) {
            // Past the item's last weights this reads the next block's (or beyond the array: a
            // prefetch never faults).
            _mm_prefetch(reinterpret_cast<const char*>(w + kWeightPrefetchChannels * kOcb), _MM_HINT_T0);
            if (NV > 1) _mm_prefetch(reinterpret_cast<const char*>(w + kWeightPrefetchChannels * kOcb + 16), _MM_HINT_T0);
          }
          const __m512 w0 = _mm512_load_ps(w);
          const __m512 w1 = NV > 1 ? _mm512_load_ps(w + 16) : w0;
#pragma GCC unroll 16
          for (size_t p = 0; p < kPix; ++p) {
            const __m512 xv = _mm512_set1_ps(xt[(p / P) * row_step + (p % P) * SW * KB + c]);
            acc[0][p] = _mm512_fmadd_ps(xv, w0, acc[0][p]);
            if (NV > 1) acc[NV - 1][p] = _mm512_fmadd_ps(xv, w1, acc[NV - 1][p]);
          }
        }
        w += (KB - nc) * kOcb;
      }
    }
  }
  avx512::StoreNchwcTile<NV, P, R>(a, oy, ox0, acc);
}

// 1x1 stride 1, P pixels of one row x 64 output channels (two 32-channel weight blocks, w_next
// floats apart): 4P accumulators + 4 weight vectors + the broadcast.
template <size_t P>
__attribute__((optimize("no-predictive-commoning"))) void PairTile(const NchwcConvArgs* a, size_t oy, size_t ox0) {
  __m512 acc[4][P];
#pragma GCC unroll 8
  for (size_t p = 0; p < P; ++p)
    for (size_t v = 0; v < 4; ++v) acc[v][p] = _mm512_setzero_ps();
  const size_t plane = a->hp * a->wp * kB;
  const float* w = static_cast<const float*>(a->w);
  const float* xb = static_cast<const float*>(a->x) + (oy * a->wp + ox0) * kB;
  const char* pf = a->pf;
  const char* const pf_end = pf ? pf + a->pf_bytes : nullptr;
  for (size_t cb = 0; cb < a->c_blocks; ++cb, xb += plane) {
    const size_t nc = cb + 1 == a->c_blocks ? a->c_last : kB;
    avx512::PrefetchWeightSlice(pf, pf_end, a->pf_step);
    // The next input-channel block's lines, one block ahead (as the 1x1 tiles above do).
    if (cb + 1 < a->c_blocks) {
#pragma GCC unroll 8
      for (size_t p = 0; p < P; ++p) _mm_prefetch(reinterpret_cast<const char*>(xb + plane + p * kB), _MM_HINT_T0);
    }
#pragma GCC unroll 1
    for (size_t c = 0; c < nc; ++c, w += kOcb) {
      const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
      const __m512 w2 = _mm512_load_ps(w + a->w_next), w3 = _mm512_load_ps(w + a->w_next + 16);
#pragma GCC unroll 8
      for (size_t p = 0; p < P; ++p) {
        const __m512 xv = _mm512_set1_ps(xb[p * kB + c]);
        acc[0][p] = _mm512_fmadd_ps(xv, w0, acc[0][p]);
        acc[1][p] = _mm512_fmadd_ps(xv, w1, acc[1][p]);
        acc[2][p] = _mm512_fmadd_ps(xv, w2, acc[2][p]);
        acc[3][p] = _mm512_fmadd_ps(xv, w3, acc[3][p]);
      }
    }
    w += (kB - nc) * kOcb;
  }
  avx512::StoreNchwcTile<4, P, 1>(a, oy, ox0, acc);
}

typedef void (*TileFn)(const NchwcConvArgs*, size_t, size_t);

#define SONDE_NCHWC_ROW(NV, SW, KB)                                                                            \
  {&Tile<NV, 1, SW, 1, KB>, &Tile<NV, 2, SW, 1, KB>, &Tile<NV, 3, SW, 1, KB>, &Tile<NV, 4, SW, 1, KB>,          \
   &Tile<NV, 5, SW, 1, KB>, &Tile<NV, 6, SW, 1, KB>, &Tile<NV, 7, SW, 1, KB>, &Tile<NV, 8, SW, 1, KB>,          \
   &Tile<NV, 9, SW, 1, KB>, &Tile<NV, 10, SW, 1, KB>, &Tile<NV, 11, SW, 1, KB>, &Tile<NV, 12, SW, 1, KB>,       \
   &Tile<NV, 13, SW, 1, KB>, &Tile<NV, 14, SW, 1, KB>}
#define SONDE_NCHWC_ROW_PAIR(NV, SW, KB)                                                                       \
  {&Tile<NV, 1, SW, 2, KB>, &Tile<NV, 2, SW, 2, KB>, &Tile<NV, 3, SW, 2, KB>, &Tile<NV, 4, SW, 2, KB>,          \
   &Tile<NV, 5, SW, 2, KB>, &Tile<NV, 6, SW, 2, KB>, &Tile<NV, 7, SW, 2, KB>}
static_assert(kNchwcMaxPixels == 14, "the tables below list 14 tile widths (7 for row pairs)");
// [vectors of output channels - 1][stride - 1][pixels - 1]
template <size_t KB>
struct TileTables {
  static constexpr TileFn kTiles[2][2][kNchwcMaxPixels] = {{SONDE_NCHWC_ROW(1, 1, KB), SONDE_NCHWC_ROW(1, 2, KB)},
                                                           {SONDE_NCHWC_ROW(2, 1, KB), SONDE_NCHWC_ROW(2, 2, KB)}};
  static constexpr TileFn kRowPairTiles[2][2][kNchwcMaxPixels / 2] = {
      {SONDE_NCHWC_ROW_PAIR(1, 1, KB), SONDE_NCHWC_ROW_PAIR(1, 2, KB)},
      {SONDE_NCHWC_ROW_PAIR(2, 1, KB), SONDE_NCHWC_ROW_PAIR(2, 2, KB)}};
  // One vector of output channels: row pairs of 8 pixels too (16 accumulators), [stride - 1].
  static constexpr TileFn kWideRowPairTiles[2] = {&Tile<1, 8, 1, 2, KB>, &Tile<1, 8, 2, 2, KB>};
};
#undef SONDE_NCHWC_ROW
#undef SONDE_NCHWC_ROW_PAIR

template <size_t KB>
void F32DirectConvAvx512(const NchwcConvArgs* a, size_t oy, size_t ox0, size_t np, size_t rows) {
  const size_t nv = a->oc_valid > 16 ? 1 : 0;
  if (rows == 2 && np > kNchwcMaxPixels / 2) TileTables<KB>::kWideRowPairTiles[a->sw - 1](a, oy, ox0);
  else if (rows == 2) TileTables<KB>::kRowPairTiles[nv][a->sw - 1][np - 1](a, oy, ox0);
  else TileTables<KB>::kTiles[nv][a->sw - 1][np - 1](a, oy, ox0);
}

static_assert(kNchwcPairPixels == 6, "the table below lists 6 pair tile widths");
void F32PointwisePairAvx512(const NchwcConvArgs* a, size_t oy, size_t ox0, size_t np, size_t) {
  static constexpr TileFn kPairTiles[kNchwcPairPixels] = {&PairTile<1>, &PairTile<2>, &PairTile<3>,
                                                         &PairTile<4>, &PairTile<5>, &PairTile<6>};
  kPairTiles[np - 1](a, oy, ox0);
}

void F32PackNchwcRowAvx512(const float* src, size_t plane, size_t w, float* dst, size_t channels) {
  __m512 r[16];
  for (size_t x0 = 0; x0 < w; x0 += 16, dst += 16 * kB) {
    const size_t np = w - x0 < 16 ? w - x0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << np) - 1);
    for (size_t l = 0; l < kB; ++l) r[l] = l < channels ? _mm512_maskz_loadu_ps(m, src + l * plane + x0) : _mm512_setzero_ps();
    Transpose16x16(r);
    for (size_t p = 0; p < np; ++p) _mm512_storeu_ps(dst + p * kB, r[p]);
  }
}

// 16 pixels at a time: their 16-channel vectors in, transposed, one masked row of each channel out.
void F32UnpackNchwcRowAvx512(const float* src, size_t w, float* dst, size_t plane, size_t channels) {
  __m512 r[16];
  for (size_t x0 = 0; x0 < w; x0 += 16, src += 16 * kB) {
    const size_t np = w - x0 < 16 ? w - x0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << np) - 1);
    for (size_t p = 0; p < 16; ++p) r[p] = p < np ? _mm512_loadu_ps(src + p * kB) : _mm512_setzero_ps();
    Transpose16x16(r);
    for (size_t l = 0; l < channels; ++l) _mm512_mask_storeu_ps(dst + l * plane + x0, m, r[l]);
  }
}

// Each tap of a pixel is one FMA over its 16 channels (the blocked layout's point: NCHW needs a
// shuffle or a gather per tap at stride 2). Four pixels per pass keep four independent FMA chains
// in flight against the 4-cycle latency; the tap weights come from L1.
inline __m512 DepthwiseFinish(const NchwcDepthwiseArgs* a, __m512 v, const float* res) {
  const GemmEpilogue* ep = a->ep;
  if (!ep) return v;
  if (!res) return avx512::Activate(v, ep);
  const __m512 r = _mm512_loadu_ps(res);
  return ep->residual_before_activation ? avx512::Activate(_mm512_add_ps(v, r), ep)
                                        : _mm512_add_ps(avx512::Activate(v, ep), r);
}

void F32NchwcDepthwiseAvx512(const NchwcDepthwiseArgs* a, size_t oy) {
  const __m512 bias = _mm512_loadu_ps(a->bias);
  const float* xr = a->x + oy * a->sh * a->x_row;
  float* yr = a->y + oy * a->y_row;
  const float* rr = a->residual ? a->residual + oy * a->res_row : nullptr;
  const size_t step = a->sw * kB;
  size_t ox = 0;
  for (; ox + 4 <= a->ow; ox += 4) {
    __m512 acc0 = bias, acc1 = bias, acc2 = bias, acc3 = bias;
    const float* wt = a->w;
    for (size_t ky = 0; ky < a->kh; ++ky) {
      const float* xt = xr + ky * a->x_row + ox * step;
      for (size_t kx = 0; kx < a->kw; ++kx, xt += kB, wt += kB) {
        const __m512 w = _mm512_loadu_ps(wt);
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(xt), w, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(xt + step), w, acc1);
        acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 2 * step), w, acc2);
        acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 3 * step), w, acc3);
      }
    }
    const __m512 accs[4] = {acc0, acc1, acc2, acc3};
    for (size_t p = 0; p < 4; ++p)
      _mm512_storeu_ps(yr + (ox + p) * kB, DepthwiseFinish(a, accs[p], rr ? rr + (ox + p) * kB : nullptr));
  }
  for (; ox < a->ow; ++ox) {
    __m512 acc = bias;
    const float* wt = a->w;
    for (size_t ky = 0; ky < a->kh; ++ky) {
      const float* xt = xr + ky * a->x_row + ox * step;
      for (size_t kx = 0; kx < a->kw; ++kx, xt += kB, wt += kB)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(xt), _mm512_loadu_ps(wt), acc);
    }
    _mm512_storeu_ps(yr + ox * kB, DepthwiseFinish(a, acc, rr ? rr + ox * kB : nullptr));
  }
}

// One 16-channel vector per tap: the clipped window's taps row by row, max or sum as the NCHW
// window kernel combines them (max(v, acc); acc + v), then its divisor.
void F32NchwcPoolAvx512(const NchwcPoolArgs* a, size_t oy) {
  const bool max = a->op == kWindowMax;
  const ptrdiff_t iy0 = static_cast<ptrdiff_t>(oy * a->sh) - static_cast<ptrdiff_t>(a->pad_t);
  const size_t ky0 = iy0 < 0 ? static_cast<size_t>(-iy0) : 0;
  const ptrdiff_t ky_end = static_cast<ptrdiff_t>(a->h) - iy0;
  const size_t ky1 = ky_end < static_cast<ptrdiff_t>(a->kh) ? static_cast<size_t>(ky_end < 0 ? 0 : ky_end) : a->kh;
  const __m512 inv_taps = _mm512_set1_ps(1.0f / static_cast<float>(a->kh * a->kw));
  float* yr = a->y + oy * a->y_row;
  for (size_t ox = 0; ox < a->ow; ++ox) {
    const ptrdiff_t ix0 = static_cast<ptrdiff_t>(ox * a->sw) - static_cast<ptrdiff_t>(a->pad_l);
    const size_t kx0 = ix0 < 0 ? static_cast<size_t>(-ix0) : 0;
    const ptrdiff_t kx_end = static_cast<ptrdiff_t>(a->w) - ix0;
    const size_t kx1 = kx_end < static_cast<ptrdiff_t>(a->kw) ? static_cast<size_t>(kx_end < 0 ? 0 : kx_end) : a->kw;
    __m512 acc = _mm512_set1_ps(max ? -INFINITY : 0.0f);
    for (size_t ky = ky0; ky < ky1; ++ky) {
      const float* row = a->x + static_cast<size_t>(iy0 + static_cast<ptrdiff_t>(ky)) * a->x_row;
      for (size_t kx = kx0; kx < kx1; ++kx) {
        const __m512 v = _mm512_loadu_ps(row + static_cast<size_t>(ix0 + static_cast<ptrdiff_t>(kx)) * kB);
        acc = max ? _mm512_max_ps(v, acc) : _mm512_add_ps(acc, v);
      }
    }
    if (!max) {
      acc = a->count_include_pad
                ? _mm512_mul_ps(acc, inv_taps)
                : _mm512_div_ps(acc, _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(ky1 > ky0 ? ky1 - ky0 : 0)),
                                                   _mm512_set1_ps(static_cast<float>(kx1 > kx0 ? kx1 - kx0 : 0))));
    }
    _mm512_storeu_ps(yr + ox * kB, acc);
  }
}

}  // namespace

F32NchwcPoolUkernel F32NchwcPoolUkernelAvx512() { return F32NchwcPoolAvx512; }
F32NchwcDepthwiseUkernel F32NchwcDepthwiseUkernelAvx512() { return F32NchwcDepthwiseAvx512; }
F32NchwcConvUkernel F32NchwcConvUkernelAvx512() { return F32DirectConvAvx512<kB>; }
F32NchwcConvUkernel F32NchwConvUkernelAvx512() { return F32DirectConvAvx512<1>; }
F32NchwcConvUkernel F32NchwcPointwisePairUkernelAvx512() { return F32PointwisePairAvx512; }
F32PackNchwcRowUkernel F32PackNchwcRowUkernelAvx512() { return F32PackNchwcRowAvx512; }
F32UnpackNchwcRowUkernel F32UnpackNchwcRowUkernelAvx512() { return F32UnpackNchwcRowAvx512; }

}  // namespace kernels
}  // namespace sonde
