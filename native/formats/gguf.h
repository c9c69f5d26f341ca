// GGUF (v2, v3; little-endian) memory-mapped read-only. Open() maps the whole file and validates the
// header, every metadata value, every tensor info and every tensor's data range against the file
// size before anything is exposed, so later code can read any recorded offset without checks.
// Weights are never copied: TensorData() points into the mapping, which lives as long as the
// shared_ptr does (a running kernel holds one, so dispose() during a run unmaps when it finishes).
//
// Metadata values are not decoded into a tree at open (a tokenizer's 150k-string array would cost
// more than the mapping itself); each key records where its value lies in the file, and ValueAt()
// walks the already-validated bytes on demand.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sonde {

enum class GgufValueType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6, kBool = 7,
  kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};
const char* GgufValueTypeName(GgufValueType t);

// ggml tensor type ids (ggml.h). Removed ids (4, 5, 31-33, 36-38) are unknown.
enum GgmlType : uint32_t {
  kGgmlF32 = 0, kGgmlF16 = 1, kGgmlQ4_0 = 2, kGgmlQ8_0 = 8, kGgmlBF16 = 30,
};
struct GgmlTypeTraits {
  const char* name;       // ggml_type_name: "f32", "q4_0", "q4_K", ...
  uint32_t block_size;    // elements per block (1 for plain types)
  uint32_t type_size;     // bytes per block
};
// Null for an unknown id.
const GgmlTypeTraits* GgmlTypeInfo(uint32_t type);

struct GgufKv {
  std::string key;
  GgufValueType type;
  uint64_t value_offset;  // file offset of the value (for arrays: of the element type field)
};

struct GgufTensorInfo {
  std::string name;
  uint32_t n_dims;
  uint64_t dims[4];       // ne0 (contiguous) first; unused dims are 1
  uint32_t type;          // GgmlType id (known)
  uint64_t offset;        // relative to the data section
  uint64_t bytes;
  uint64_t elements;
};

class GgufFile {
 public:
  // Returns null with *error set (and *format_error = true when the file is not a valid GGUF,
  // false when it could not be opened or mapped at all).
  static std::shared_ptr<const GgufFile> Open(const std::string& path, std::string* error, bool* format_error);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t file_size() const { return size_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  const std::vector<GgufKv>& kvs() const { return kvs_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const uint8_t* bytes() const { return base_; }
  const uint8_t* TensorData(size_t i) const { return base_ + data_offset_ + tensors_[i].offset; }
  // Copies n bytes at offset of the file into dst with pread: a copy out of the page cache, which
  // on a VM runs several times faster than first-touch faults of the same pages through the
  // mapping (a load that reads whole tensors once, such as a repack, needs no mapped pages).
  // False on a read error or a range past the end.
  bool ReadAt(uint64_t offset, size_t n, uint8_t* dst) const;
  // Index of the key or tensor, or -1.
  long FindKey(const std::string& key) const;
  long FindTensor(const std::string& name) const;

 private:
  GgufFile() = default;
  bool Parse(std::string* error);
  uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  int fd_ = -1;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<GgufKv> kvs_;
  std::vector<GgufTensorInfo> tensors_;
};

// Reads validated values (the reader checked every length at open): little-endian loads.
inline uint64_t GgufLoadU64(const uint8_t* p) { uint64_t v; __builtin_memcpy(&v, p, 8); return v; }
inline uint32_t GgufLoadU32(const uint8_t* p) { uint32_t v; __builtin_memcpy(&v, p, 4); return v; }
// Byte size of a scalar value type (0 for string/array).
size_t GgufScalarSize(GgufValueType t);

}  // namespace sonde
