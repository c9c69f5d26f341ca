// Quantised-weight matrix products: y[m][n] = sum_k x[m][k] * W[n][k] for weights W stored as GGUF
// (and ggml) store them: N rows of K contiguous elements (ne0 = K, ne1 = N), each row of type
//   f32 | f16 (IEEE half) | bf16 | q8_0 | q4_0.
// Block layouts (ggml-common.h): q8_0 = { fp16 d; int8 q[32] } (34 bytes), value = q * d;
// q4_0 = { fp16 d; uint8 qs[16] } (18 bytes), element j < 16 is the low nibble of qs[j] and element
// j + 16 its high nibble, value = (nibble - 8) * d.
//
// Precision definition (what the 'reference' computes with exact double sums):
// - f32/f16/bf16 weights: x is used as given (fp32); weights widen to fp32 exactly; the fast
//   kernels sum in fp32 (so |err| <= (K + 2) u sum |x w|, u = 2^-24).
// - q8_0/q4_0 weights: x is first quantised, per row and block of 32, to int8 with an fp32 scale
//   (as llama.cpp does for its q8_0 . q8_0 and q4_0 . q8_0 dot products, but keeping the scale in
//   fp32 where llama.cpp rounds it to fp16):
//     amax = max |x_i|; dx = amax / 127; q_i = rint(x_i * (127 / amax)) (fp32 ops, round to nearest
//     even; q = 0 when amax = 0); a block holding NaN or +-Inf gets dx = NaN (its rows' outputs NaN).
//   Blocks whose amax is below 2^-120 count as zero (dx = 0, q = 0): 127 / amax would overflow
//   fp32 there, and their contribution is below 2^-115 |w|.
//   Then y = sum over blocks b of dw_b * dx_b * isum_b with isum_b = sum_i qw_i * qx_i exact in
//   int32 (|isum| <= 32 * 128 * 127). The reference sums that in double. The fast kernels keep a
//   block's integer sum in up to 8 int32 lanes, multiply each lane by fp32(dw_b * dx_b) and add all
//   lane products in fp32 (in any order), so |err| <= (8 nb + 4) u sum_b |dw_b dx_b| sum_i |qw_i qx_i|
//   with nb = K / 32 blocks.
// Only C headers here: ISA-specific translation units include this file.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace sonde {
namespace kernels {

// kQuantQ8_0x32 is no file type: q8_0 weights repacked at load (below); the first
// kQuantFileTypeCount types are the ones a GGUF tensor or a caller's bytes can hold.
enum QuantWeightType : int32_t {
  kQuantF32 = 0, kQuantF16 = 1, kQuantBf16 = 2, kQuantQ8_0 = 3, kQuantQ4_0 = 4, kQuantQ8_0x32 = 5, kQuantTypeCount = 6
};
const int32_t kQuantFileTypeCount = 5;

const size_t kQuantBlock = 32;
const size_t kQ8_0BlockBytes = 34;
const size_t kQ4_0BlockBytes = 18;
// Activation rows one microkernel call handles (each weight block is decoded once for all of them).
const size_t kQuantMaxMr = 4;

// Activations as the kernel wants them, pointing at the group's first row.
//   f32 form: x rows (x, ldx).
//   q8 form: int8 q (q_stride bytes per row, K rounded up to an even number of blocks, zero
//   padded), fp32 scales d (d_stride floats per row, one per block, zero padded);
//   corr (VNNI kernels only): per block, -offset * sum(q of the block) (corr_stride int32 per row,
//   zero padded), where offset is what the kernel adds to the weights to make them unsigned (128
//   for q8_0, 8 for q4_0): the start value of the block's int32 sum.
struct QuantActs {
  const float* x;
  size_t ldx;
  const int8_t* q;
  size_t q_stride;
  const float* d;
  size_t d_stride;
  const int32_t* corr;
  size_t corr_stride;  // int32 elements per row
};

// kQuantActU8 (the blocked GEMM of the block types): q holds q + 128 as uint8 (the unsigned operand
// of vpdpbusd); the weights' own sums carry the correction, so there is no corr.
enum QuantActForm : int32_t { kQuantActF32 = 0, kQuantActQ8 = 1, kQuantActQ8Corr = 2, kQuantActU8 = 3 };

// y[i * ldy] = dot(row i of the activations, weight row w) for i < mr (mr <= kQuantMaxMr).
// w: the weight row (K elements or K/32 blocks), any alignment; the kernel reads exactly its bytes.
typedef void (*QuantDotUkernel)(size_t mr, size_t k, const uint8_t* w, const QuantActs* a, float* y, size_t ldy);

// The one-activation-row (decode) form of fn: y[j] = dot(the activation row, weight row j) for
// j < nr, the rows row_bytes apart, read one after another as a single stream, without a call per
// row. Float types only: the block types' single row goes through the GEMM's row-dot companion
// (QuantGemvUkernel below), whose bits it must keep.
typedef void (*QuantDotRowsUkernel)(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, const QuantActs* a, float* y);

struct QuantDotUkernelInfo {
  QuantDotUkernel fn;  // null: no kernel for this type at this ISA
  int32_t act_form;    // QuantActForm
  int32_t corr_offset; // kQuantActQ8Corr: 128 (q8_0) or 8 (q4_0)
  const char* name;
  QuantDotRowsUkernel rows = nullptr;  // null: fn serves one activation row too
};

// Blocked GEMM (prefill, M rows at once): the weights are packed per panel of kQuantGemmNr rows
// into a layout whose one vector load serves 16 weight rows, then every tile of activation rows
// runs over the packed panel, so each weight is decoded once per call instead of once per group
// of kQuantMaxMr rows. The precision definition is the same as the dot kernels':
// - float types: panel = K x 32 fp32 (element p of row r at p * 32 + r); each output is one fp32
//   FMA chain over p in order.
// - q8_0 / q4_0: panel = K/32 blocks of { int8 w[8 groups][32 rows][4], fp32 dw[32],
//   int32 corr[32] = -128 * sum of the row's 32 w } (1280 bytes); a block's integer sum of one
//   output lives in one int32 lane (vpdpbusd of u8 x + 128 by s8 w, started at corr), converted to
//   fp32 and FMA'd with fp32(dw * dx).
// Rows past nr in the last panel are packed as zeros (dw = 0) and never stored.
const size_t kQuantGemmNr = 32;
const size_t kQuantGemmBlockPanelBytes = 1280;

// Packs rows [0, nr) (nr <= 32) of the weights (row r at w + r * row_bytes) into panel (64-byte
// aligned, QuantGemmPanelBytes(type, k) bytes).
typedef void (*QuantGemmPack)(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, uint8_t* panel);
// y[i * ldy + j] = dot(activation row i, panel row j) for i < mr (<= the kernel's mr), j < nr.
typedef void (*QuantGemmUkernel)(size_t mr, size_t nr, size_t k, const uint8_t* panel, const QuantActs* a, float* y,
                                 size_t ldy);

// The row-dot (GEMV, few activation rows) companion of a blocked GEMM whose every output equals the
// GEMM's bit for bit, so that a token's results do not depend on how many rows share the call (a
// prefill against its token-by-token decode, a sequence decoded alone or in a batch): 16 weight rows
// per call, read where they lie, each output the same exact per-block integer sums and the same
// fp32 FMA chain over the blocks as the GEMM. y[i * ldy + j] for i < mr (< kQuantGemvMaxMr), j < nr
// (<= 16); activations in the kQuantActQ8Corr form (corr_offset of the info).
const size_t kQuantGemvRows = 16;
const size_t kQuantGemvMaxMr = 8;
typedef void (*QuantGemvUkernel)(size_t mr, size_t nr, size_t k, const uint8_t* w, size_t row_bytes, const QuantActs* a,
                                 float* y, size_t ldy);

struct QuantGemmUkernelInfo {
  QuantGemmPack pack;   // null: no blocked GEMM for this type at this ISA
  QuantGemmUkernel fn;
  size_t mr;            // activation rows per microkernel call
  int32_t act_form;     // kQuantActF32 | kQuantActU8
  const char* name;
  QuantGemvUkernel gemv = nullptr;  // null: the dot kernels serve few rows (not bit-identical)
  int32_t gemv_corr_offset = 0;
};

static inline size_t QuantGemmPanelBytes(int32_t t, size_t k) {
  return t == kQuantQ8_0 || t == kQuantQ4_0 ? k / 32 * kQuantGemmBlockPanelBytes : k * kQuantGemmNr * 4;
}

// q8_0x32: q8_0 weights repacked once (at a model's load) for the VNNI kernels, so that a decode
// step's single activation row streams aligned full cache lines and needs no shuffle: rows in
// groups of 32 (the last group padded with zero rows), each group K/32 blocks of 1088 bytes
// (= 32 rows x 34, 17 cache lines): the 32 rows' fp16 scales (64 bytes), then for each 4-byte
// group j < 8 of the block the 32 rows' bytes 4j..4j+3 as uint8 q + 128 (128 bytes, row r at 4r).
// A group takes exactly 32 * row_bytes bytes, so a row offset that is a multiple of 32 (a group,
// an expert of a stacked tensor) lies at the same byte offset as in the row layout.
// One kernel reads it for every M (tiles of up to 4 activation rows over a group, vpdpbusd of the
// unsigned weights by the broadcast int8 activations, started at -128 * sum(x) of the block: the
// kQuantActQ8Corr form), with each output the GEMM's arithmetic: the block's exact integer sum in
// one int32 lane, converted and FMA'd with fp32(dw * dx), blocks in order. So its results equal the
// row-layout q8_0 kernels of kQuantGemmUkernelInfo (GEMM and gemv companion) bit for bit, and a row
// does not depend on the batch it is in.
const size_t kQ8_0x32Rows = 32;
const size_t kQ8_0x32BlockBytes = kQ8_0x32Rows * kQ8_0BlockBytes;  // 1088
const size_t kQ8_0x32MaxMr = 4;

// Bytes of n rows of k (a multiple of 32) in the q8_0x32 layout: whole groups of 32 rows.
static inline size_t QuantQ8_0x32Bytes(size_t n, size_t k) {
  return (n + kQ8_0x32Rows - 1) / kQ8_0x32Rows * kQ8_0x32Rows * (k / kQuantBlock * kQ8_0BlockBytes);
}

// Repacks rows [0, nr) (nr <= 32; row r at w + r * row_bytes, q8_0) into one q8_0x32 group at out
// (32 * row_bytes bytes; rows past nr get scale 0 and weights 0).
void RepackQ8_0x32Group(size_t nr, size_t k, const uint8_t* w, size_t row_bytes, uint8_t* out);
// y[i * ldy + j] = dot(activation row i, row j of the group) for i < mr (<= kQ8_0x32MaxMr), j < nr
// (<= 32; the group is whole). Activations in the kQuantActQ8Corr form with offset 128.
typedef void (*QuantQ8_0x32Ukernel)(size_t mr, size_t nr, size_t k, const uint8_t* group, const QuantActs* a, float* y,
                                    size_t ldy);

// Row bytes of K elements of type t (K a multiple of 32 for the block types).
static inline size_t QuantRowBytes(int32_t t, size_t k) {
  switch (t) {
    case kQuantF32: return k * 4;
    case kQuantF16: case kQuantBf16: return k * 2;
    case kQuantQ8_0: case kQuantQ8_0x32: return k / kQuantBlock * kQ8_0BlockBytes;
    case kQuantQ4_0: return k / kQuantBlock * kQ4_0BlockBytes;
    default: return 0;
  }
}

static inline uint16_t QuantLoadU16(const uint8_t* p) {
  uint16_t v;
  __builtin_memcpy(&v, p, 2);
  return v;
}

QuantDotUkernelInfo QuantDotUkernelScalar(int32_t type);
#if defined(__x86_64__) || defined(_M_X64)
QuantDotUkernelInfo QuantDotUkernelAvx2(int32_t type);
QuantDotUkernelInfo QuantDotUkernelAvx512(int32_t type);
QuantDotUkernelInfo QuantDotUkernelAvx512Vnni(int32_t type);
// Blocked GEMM kernels: float types (avx512) and block types (avx512vnni); others return nulls.
QuantGemmUkernelInfo QuantGemmUkernelAvx512(int32_t type);
QuantGemmUkernelInfo QuantGemmUkernelAvx512Vnni(int32_t type);
QuantQ8_0x32Ukernel QuantQ8_0x32UkernelAvx512Vnni();
#endif

// The activation quantiser of the precision definition, for one row of k (a multiple of 32)
// floats: writes nb_pad = round_up(k / 32, 2) blocks of q (zero padded) and d, and the block sums.
void QuantizeActivationRow(const float* x, size_t k, int8_t* q, float* d, int32_t* sums);
#if defined(__x86_64__) || defined(_M_X64)
// The same quantiser in AVX-512, equal to it bit for bit (the same fp32 max, division, product and
// round-to-nearest-even conversion): a decode step quantises ~7k activations per layer, which the
// scalar loop took ~2% of a q8_0 step over.
void QuantizeActivationRowAvx512(const float* x, size_t k, int8_t* q, float* d, int32_t* sums);
#endif
// Dequantises one weight row of k elements to fp32 (exactly: every stored value is representable).
void DequantizeRow(int32_t type, const uint8_t* w, size_t k, float* out);
// The reference: exact double sums of the precision definition for one output element.
double QuantDotReference(int32_t type, const uint8_t* w, size_t k, const float* x, const int8_t* q, const float* d);

}  // namespace kernels
}  // namespace sonde
