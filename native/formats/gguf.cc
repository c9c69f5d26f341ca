#include "formats/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <unordered_set>

namespace sonde {

namespace {

// ggml's type table (ggml.c type_traits): name, elements per block, bytes per block.
struct TypeRow { uint32_t id; GgmlTypeTraits t; };
const TypeRow kTypes[] = {
    {0, {"f32", 1, 4}},        {1, {"f16", 1, 2}},         {2, {"q4_0", 32, 18}},     {3, {"q4_1", 32, 20}},
    {6, {"q5_0", 32, 22}},     {7, {"q5_1", 32, 24}},      {8, {"q8_0", 32, 34}},     {9, {"q8_1", 32, 36}},
    {10, {"q2_K", 256, 84}},   {11, {"q3_K", 256, 110}},   {12, {"q4_K", 256, 144}},  {13, {"q5_K", 256, 176}},
    {14, {"q6_K", 256, 210}},  {15, {"q8_K", 256, 292}},   {16, {"iq2_xxs", 256, 66}}, {17, {"iq2_xs", 256, 74}},
    {18, {"iq3_xxs", 256, 98}}, {19, {"iq1_s", 256, 50}},  {20, {"iq4_nl", 32, 18}},  {21, {"iq3_s", 256, 110}},
    {22, {"iq2_s", 256, 82}},  {23, {"iq4_xs", 256, 136}}, {24, {"i8", 1, 1}},        {25, {"i16", 1, 2}},
    {26, {"i32", 1, 4}},       {27, {"i64", 1, 8}},        {28, {"f64", 1, 8}},       {29, {"iq1_m", 256, 56}},
    {30, {"bf16", 1, 2}},      {34, {"tq1_0", 256, 54}},   {35, {"tq2_0", 256, 66}},  {39, {"mxfp4", 32, 17}},
};

// Nested arrays deeper than this are rejected (real files use at most 2 levels); it bounds the
// recursion of the validator and of the JS conversion.
constexpr int kMaxDepth = 8;
// Arrays are converted to JS arrays when the file is read; a count beyond this (real tokenizers have
// a few hundred thousand entries) would exhaust the JS heap, which is fatal, so it is refused.
constexpr uint64_t kMaxArrayElements = uint64_t(1) << 26;
// ggml's GGML_MAX_DIMS.
constexpr uint32_t kMaxDims = 4;

std::string Hex(uint32_t v) {
  char b[16];
  snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

// Bounds-checked little-endian cursor over the mapping. Every read names what it reads, so a
// truncated or corrupt file gives "truncated <what> at offset X (needs N bytes, file has S)".
class Cursor {
 public:
  Cursor(const uint8_t* base, uint64_t size, std::string* error) : base_(base), size_(size), error_(error) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  bool Need(uint64_t n, const std::string& what) {
    if (n <= left()) return true;
    *error_ = "truncated GGUF file: " + what + " needs " + std::to_string(n) + " bytes at offset " +
              std::to_string(pos_) + ", but the file has " + std::to_string(size_) + " bytes";
    return false;
  }
  bool U32(uint32_t* v, const std::string& what) {
    if (!Need(4, what)) return false;
    *v = GgufLoadU32(base_ + pos_);
    pos_ += 4;
    return true;
  }
  bool U64(uint64_t* v, const std::string& what) {
    if (!Need(8, what)) return false;
    *v = GgufLoadU64(base_ + pos_);
    pos_ += 8;
    return true;
  }
  bool Skip(uint64_t n, const std::string& what) {
    if (!Need(n, what)) return false;
    pos_ += n;
    return true;
  }
  bool Str(std::string* s, const std::string& what) {
    uint64_t len;
    if (!U64(&len, what + " length") || !Need(len, what)) return false;
    if (s) s->assign(reinterpret_cast<const char*>(base_ + pos_), len);
    pos_ += len;
    return true;
  }
  bool Fail(const std::string& message) {
    *error_ = message + " (at offset " + std::to_string(pos_) + ")";
    return false;
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  std::string* error_;
};

bool ValidType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::kFloat64); }

// Walks one value of type t at the cursor, checking every length against the file.
bool SkipValue(Cursor& c, GgufValueType t, const std::string& what, int depth) {
  const size_t scalar = GgufScalarSize(t);
  if (scalar) return c.Skip(scalar, what);
  if (t == GgufValueType::kString) return c.Str(nullptr, what);
  // Array: element type, count, elements.
  if (depth >= kMaxDepth) return c.Fail("GGUF: " + what + ": arrays nested deeper than " + std::to_string(kMaxDepth));
  uint32_t et;
  uint64_t count;
  if (!c.U32(&et, what + " element type")) return false;
  if (!ValidType(et)) return c.Fail("GGUF: " + what + ": unknown array element type " + std::to_string(et));
  if (!c.U64(&count, what + " element count")) return false;
  const GgufValueType e = static_cast<GgufValueType>(et);
  const size_t es = GgufScalarSize(e);
  // The smallest encoding of one element: its bytes, a string's length field, an array's header.
  const uint64_t min_elem = es ? es : (e == GgufValueType::kString ? 8 : 12);
  if (count > c.left() / min_elem)
    return c.Fail("GGUF: " + what + ": array count " + std::to_string(count) + " of " + GgufValueTypeName(e) +
                  " cannot fit in the " + std::to_string(c.left()) + " bytes left in the file");
  if (count > kMaxArrayElements)
    return c.Fail("GGUF: " + what + ": array of " + std::to_string(count) + " elements (sonde reads at most " +
                  std::to_string(kMaxArrayElements) + ")");
  if (es) return c.Skip(count * es, what);
  for (uint64_t i = 0; i < count; ++i)
    if (!SkipValue(c, e, what + "[" + std::to_string(i) + "]", depth + 1)) return false;
  return true;
}

}  // namespace

const char* GgufValueTypeName(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8: return "uint8";
    case GgufValueType::kInt8: return "int8";
    case GgufValueType::kUint16: return "uint16";
    case GgufValueType::kInt16: return "int16";
    case GgufValueType::kUint32: return "uint32";
    case GgufValueType::kInt32: return "int32";
    case GgufValueType::kFloat32: return "float32";
    case GgufValueType::kBool: return "bool";
    case GgufValueType::kString: return "string";
    case GgufValueType::kArray: return "array";
    case GgufValueType::kUint64: return "uint64";
    case GgufValueType::kInt64: return "int64";
    case GgufValueType::kFloat64: return "float64";
  }
  return "?";
}

size_t GgufScalarSize(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8: case GgufValueType::kInt8: case GgufValueType::kBool: return 1;
    case GgufValueType::kUint16: case GgufValueType::kInt16: return 2;
    case GgufValueType::kUint32: case GgufValueType::kInt32: case GgufValueType::kFloat32: return 4;
    case GgufValueType::kUint64: case GgufValueType::kInt64: case GgufValueType::kFloat64: return 8;
    default: return 0;
  }
}

const GgmlTypeTraits* GgmlTypeInfo(uint32_t type) {
  for (const TypeRow& r : kTypes)
    if (r.id == type) return &r.t;
  return nullptr;
}

std::shared_ptr<const GgufFile> GgufFile::Open(const std::string& path, std::string* error, bool* format_error) {
  *format_error = false;
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *error = "cannot open '" + path + "': " + strerror(errno);
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    *error = "'" + path + "' is not a regular file";
    close(fd);
    return nullptr;
  }
  std::shared_ptr<GgufFile> f(new GgufFile());
  f->size_ = static_cast<uint64_t>(st.st_size);
  if (f->size_ > 0) {
    // Read-only private mapping: pages come from the page cache on first touch, nothing is copied,
    // and a write through a stray pointer faults instead of changing the file.
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      *error = "cannot map '" + path + "': " + strerror(errno);
      close(fd);
      return nullptr;
    }
    f->base_ = static_cast<uint8_t*>(p);
  }
  f->fd_ = fd;  // for ReadAt; the mapping alone would keep the file alive
  try {
    if (!f->Parse(error)) {
      *format_error = true;
      *error = "'" + path + "': " + *error;
      return nullptr;
    }
  } catch (const std::bad_alloc&) {
    *error = "out of memory reading the GGUF header of '" + path + "'";
    return nullptr;
  }
  return f;
}

GgufFile::~GgufFile() {
  if (base_) munmap(base_, size_);
  if (fd_ >= 0) close(fd_);
}

bool GgufFile::ReadAt(uint64_t offset, size_t n, uint8_t* dst) const {
  if (offset > size_ || n > size_ - offset) return false;
  while (n > 0) {
    const ssize_t r = pread(fd_, dst, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    dst += r;
    offset += static_cast<uint64_t>(r);
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool GgufFile::Parse(std::string* error) {
  Cursor c(base_, size_, error);
  uint32_t magic;
  if (!c.U32(&magic, "header (magic)")) return false;
  if (magic != 0x46554747u)  // "GGUF" read as a little-endian u32
    return c.Fail("not a GGUF file: magic is " + Hex(magic) + ", expected 0x46554747 (\"GGUF\")");
  if (!c.U32(&version_, "header (version)")) return false;
  if (version_ != 2 && version_ != 3) {
    if ((version_ & 0xFFFF) == 0 && version_ != 0)
      return c.Fail("unsupported GGUF version " + Hex(version_) + ": a big-endian file (sonde reads little-endian GGUF)");
    return c.Fail("unsupported GGUF version " + std::to_string(version_) + " (sonde reads versions 2 and 3)");
  }
  uint64_t n_tensors = 0, n_kv = 0;
  if (!c.U64(&n_tensors, "header (tensor count)") || !c.U64(&n_kv, "header (metadata count)")) return false;
  // A count larger than the file cannot be real (every entry takes bytes): reject it outright.
  // Smaller ones are only trusted as far as the file can hold them (at least 13 bytes per key/value:
  // key length, type, one byte of value; 24 per tensor info: name length, n_dims, type, offset), so
  // the reservations below are bounded by the file size and a truncated entry is reported by the
  // loops, naming the section it is in.
  if (n_kv > size_)
    return c.Fail("GGUF header: metadata count " + std::to_string(n_kv) + " cannot fit in a file of " +
                  std::to_string(size_) + " bytes");
  if (n_tensors > size_)
    return c.Fail("GGUF header: tensor count " + std::to_string(n_tensors) + " cannot fit in a file of " +
                  std::to_string(size_) + " bytes");
  kvs_.reserve(std::min<uint64_t>(n_kv, c.left() / 13));
  std::unordered_set<std::string> keys;
  for (uint64_t i = 0; i < n_kv; ++i) {
    GgufKv kv;
    const std::string what = "metadata key #" + std::to_string(i);
    if (!c.Str(&kv.key, what)) return false;
    const std::string named = what + " ('" + kv.key + "')";
    if (!keys.insert(kv.key).second) return c.Fail("GGUF: duplicate " + named);
    uint32_t t;
    if (!c.U32(&t, named + " type")) return false;
    if (!ValidType(t)) return c.Fail("GGUF: " + named + " has unknown value type " + std::to_string(t));
    kv.type = static_cast<GgufValueType>(t);
    kv.value_offset = c.pos();
    if (!SkipValue(c, kv.type, named + " " + GgufValueTypeName(kv.type) + " value", 0)) return false;
    if (kv.key == "general.alignment") {
      if (kv.type != GgufValueType::kUint32) return c.Fail("GGUF: general.alignment must be a uint32");
      const uint32_t a = GgufLoadU32(base_ + kv.value_offset);
      if (a == 0 || (a & (a - 1)) != 0) return c.Fail("GGUF: general.alignment " + std::to_string(a) + " is not a power of two");
      alignment_ = a;
    }
    kvs_.push_back(std::move(kv));
  }
  tensors_.reserve(std::min<uint64_t>(n_tensors, c.left() / 24));
  std::unordered_set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo ti;
    const std::string what = "tensor info #" + std::to_string(i);
    if (!c.Str(&ti.name, what + " name")) return false;
    const std::string named = what + " ('" + ti.name + "')";
    if (!names.insert(ti.name).second) return c.Fail("GGUF: duplicate tensor name in " + named);
    if (!c.U32(&ti.n_dims, named + " dimension count")) return false;
    if (ti.n_dims > kMaxDims)
      return c.Fail("GGUF: " + named + " has " + std::to_string(ti.n_dims) + " dimensions (at most 4)");
    uint64_t elements = 1;
    bool overflow = false;
    for (uint32_t d = 0; d < kMaxDims; ++d) {
      ti.dims[d] = 1;
      if (d < ti.n_dims && !c.U64(&ti.dims[d], named + " dims")) return false;
      // ggml keeps sizes in int64_t: the element count must stay below 2^63.
      if (ti.dims[d] > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(elements, ti.dims[d], &elements) ||
          elements > static_cast<uint64_t>(INT64_MAX))
        overflow = true;
    }
    if (overflow) return c.Fail("GGUF: " + named + " has too many elements");
    if (!c.U32(&ti.type, named + " type")) return false;
    const GgmlTypeTraits* tt = GgmlTypeInfo(ti.type);
    if (!tt) return c.Fail("GGUF: " + named + " has unknown tensor type id " + std::to_string(ti.type));
    if (ti.dims[0] % tt->block_size != 0)
      return c.Fail("GGUF: " + named + " of type " + tt->name + " has ne0 = " + std::to_string(ti.dims[0]) +
                    ", not a multiple of its block size " + std::to_string(tt->block_size));
    if (!c.U64(&ti.offset, named + " data offset")) return false;
    ti.elements = elements;
    ti.bytes = elements / tt->block_size * tt->type_size;  // < 2^63 / 1 * 292: checked below
    if (elements / tt->block_size > UINT64_MAX / tt->type_size) return c.Fail("GGUF: " + named + " is too large");
    tensors_.push_back(std::move(ti));
  }
  // The data section starts at the next multiple of the alignment after the tensor infos.
  const uint64_t end = c.pos();
  const uint64_t pad = (alignment_ - end % alignment_) % alignment_;
  data_offset_ = end + pad;
  if (!tensors_.empty() && data_offset_ > size_)
    return c.Fail("truncated GGUF file: the tensor data section should start at offset " + std::to_string(data_offset_) +
                  ", but the file has " + std::to_string(size_) + " bytes");
  for (const GgufTensorInfo& ti : tensors_) {
    if (ti.offset % alignment_ != 0)
      return c.Fail("GGUF: tensor '" + ti.name + "' data offset " + std::to_string(ti.offset) +
                    " is not a multiple of the alignment " + std::to_string(alignment_));
    const uint64_t avail = size_ - data_offset_;
    if (ti.offset > avail || ti.bytes > avail - ti.offset) {
      *error = "truncated GGUF file: tensor '" + ti.name + "' data needs bytes [" + std::to_string(data_offset_ + ti.offset) +
               ", " + std::to_string(data_offset_ + ti.offset + ti.bytes) + ") of the file, but the file has " +
               std::to_string(size_) + " bytes";
      return false;
    }
  }
  return true;
}

long GgufFile::FindKey(const std::string& key) const {
  for (size_t i = 0; i < kvs_.size(); ++i)
    if (kvs_[i].key == key) return static_cast<long>(i);
  return -1;
}

long GgufFile::FindTensor(const std::string& name) const {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (tensors_[i].name == name) return static_cast<long>(i);
  return -1;
}

}  // namespace sonde
