#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "llamas/error.h"
#include "runtime/json.h"

namespace llamas {
namespace {

size_t element_size(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2") return 1;
  return 0;
}

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) bits = sign;
    else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const char* op = "safetensors";
  // A pipe would block the open until a writer came, a device never end: only regular files.
  struct stat before;
  if (::stat(path.c_str(), &before) == 0 && !S_ISREG(before.st_mode))
    fail(op, path, ": not a regular file (a folder, a device or a pipe)");
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(op, path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(op, path, ": cannot stat (", std::strerror(errno), ")");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(op, path, ": file is ", size_, " bytes, too short for a safetensors header (truncated?)");
  }
  void* map = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) fail(op, path, ": mmap failed (", std::strerror(errno), ")");
  size_t size = size_;
  mapping_ = std::shared_ptr<void>(map, [size](void* p) { munmap(p, size); });
  const uint8_t* bytes = static_cast<const uint8_t*>(map);
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(bytes[i]) << (8 * i);
  if (header_len > size_ - 8 || header_len > (100u << 20))
    fail(op, path, ": header claims ", header_len, " bytes but the file has ", size_ - 8,
         " after the length field (truncated or not a safetensors file)");
  std::string header(reinterpret_cast<const char*>(bytes + 8), header_len);
  JsonValue root = parse_json(header, path + " header");
  if (root.kind != JsonValue::Kind::Object) fail(op, path, ": header is not a JSON object");
  data_ = bytes + 8 + header_len;
  const size_t data_size = size_ - 8 - header_len;
  for (auto& kv : root.object) {
    if (kv.first == "__metadata__") continue;
    const JsonValue& t = kv.second;
    const JsonValue* dtype = t.find("dtype");
    const JsonValue* shape = t.find("shape");
    const JsonValue* offsets = t.find("data_offsets");
    if (!dtype || dtype->kind != JsonValue::Kind::String || !shape || shape->kind != JsonValue::Kind::Array ||
        !offsets || offsets->kind != JsonValue::Kind::Array || offsets->array.size() != 2)
      fail(op, path, ": tensor '", kv.first, "' needs dtype, shape and two data_offsets");
    SafetensorsEntry e;
    e.dtype = dtype->string;
    size_t esize = element_size(e.dtype);
    if (esize == 0) fail(op, path, ": tensor '", kv.first, "' has unknown dtype ", e.dtype);
    uint64_t numel = 1;
    for (auto& d : shape->array) {
      if (!d.is_integer || d.integer < 0) fail(op, path, ": tensor '", kv.first, "' has a bad shape");
      e.shape.push_back(d.integer);
      if (d.integer != 0 && numel > UINT64_MAX / uint64_t(d.integer) / 16)
        fail(op, path, ": tensor '", kv.first, "' has a shape whose element count overflows");
      numel *= uint64_t(d.integer);
    }
    for (auto& o : offsets->array)
      if (!o.is_integer || o.integer < 0) fail(op, path, ": tensor '", kv.first, "' has bad data_offsets");
    uint64_t begin = offsets->array[0].integer, end = offsets->array[1].integer;
    if (end < begin)
      fail(op, path, ": tensor '", kv.first, "' has data_offsets that run backwards [", begin, ", ", end, "]");
    if (end - begin != numel * esize)
      fail(op, path, ": tensor '", kv.first, "' spans ", end - begin, " bytes but its shape needs ", numel * esize);
    if (end > data_size)
      fail(op, path, ": tensor '", kv.first, "' ends at byte ", end, " of the data section but the file holds only ",
           data_size, " (truncated file?)");
    e.offset = begin;
    e.nbytes = end - begin;
    entries_[kv.first] = e;
  }
  // Tensors may not share bytes (the format's rule): an overlapping header loaded one tensor's data
  // as another's without a word.
  std::vector<std::pair<uint64_t, const std::string*>> by_offset;
  for (const auto& kv : entries_)
    if (kv.second.nbytes > 0) by_offset.push_back({kv.second.offset, &kv.first});
  std::sort(by_offset.begin(), by_offset.end());
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsEntry& prev = entries_.at(*by_offset[i - 1].second);
    if (prev.offset + prev.nbytes > by_offset[i].first)
      fail(op, path, ": tensors '", *by_offset[i - 1].second, "' and '", *by_offset[i].second,
           "' overlap in the data section (bytes ", by_offset[i].first, " to ", prev.offset + prev.nbytes, ")");
  }
}

void SafetensorsFile::release_pages(const void* data, size_t bytes) const {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(mapping_.get()), end = begin + size_;
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  if (!mapping_ || p < begin || p + bytes > end || bytes == 0) return;
  // Whole pages only: a page shared with a neighbouring tensor is dropped too, which is harmless
  // (it is read again from the file if touched).
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t first = p / page * page, last = (p + bytes + page - 1) / page * page;
  // Advice only: a failure changes nothing but the RSS.
  madvise(reinterpret_cast<void*>(first), std::min(last, (end + page - 1) / page * page) - first, MADV_DONTNEED);
}

Tensor SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail("safetensors", path_, ": no tensor named '", name, "'");
  const SafetensorsEntry& e = it->second;
  void* ptr = const_cast<uint8_t*>(data_ + e.offset);
  if (e.dtype == "F32") return Tensor::view_external(ptr, e.shape, DType::F32, mapping_);
  if (e.dtype == "BF16") return Tensor::view_external(ptr, e.shape, DType::BF16, mapping_);
  if (e.dtype == "F16") {
    Tensor t = Tensor::empty(e.shape, DType::F32);
    const uint16_t* src = static_cast<const uint16_t*>(ptr);
    float* dst = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      uint16_t h;
      std::memcpy(&h, src + i, 2);
      dst[i] = half_to_float(h);
    }
    return t;
  }
  fail("safetensors", path_, ": tensor '", name, "' has dtype ", e.dtype, "; expected F32, BF16 or F16");
}

}  // namespace llamas
