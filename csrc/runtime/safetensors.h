#pragma once
// Reads .safetensors files by memory-mapping them: tensors are views into the mapping (no copy)
// for float32 and bfloat16; float16 is widened to float32 once. Every header field is checked, and
// a truncated or malformed file is refused with a message naming the file.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "llamas/tensor.h"

namespace llamas {

struct SafetensorsEntry {
  std::string dtype;  // as written: "F32", "BF16", "F16", "I32", ...
  std::vector<int64_t> shape;
  size_t offset = 0;  // into the data section
  size_t nbytes = 0;
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  // A float32 or bfloat16 view (float16 is converted to a float32 copy); throws for other dtypes.
  Tensor get(const std::string& name) const;
  size_t file_size() const { return size_; }
  // madvise(MADV_DONTNEED) on the pages of this read-only mapping under [data, data + bytes), when
  // that lies in it (a tensor from get() that was not converted; otherwise nothing): they leave
  // this process's RSS, and views stay valid, reading the file again on their next touch.
  void release_pages(const void* data, size_t bytes) const;

 private:
  std::string path_;
  std::shared_ptr<void> mapping_;
  const uint8_t* data_ = nullptr;  // start of the data section
  size_t size_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
};

}  // namespace llamas
