#pragma once
// Tensor: a contiguous, row-major array with a shape, a dtype and a device. Storage is either a
// block from the caching allocator or an external view (a memory-mapped weight file) kept alive by
// a shared owner, so weights are never copied.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace llamas {

enum class DType : uint8_t { F32, BF16, I32, I8 };
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
const char* device_name(Device device);

class Tensor {
 public:
  Tensor() = default;
  // Uninitialised memory from the caching allocator.
  static Tensor empty(const std::vector<int64_t>& shape, DType dtype, Device device = Device::CPU);
  static Tensor zeros(const std::vector<int64_t>& shape, DType dtype, Device device = Device::CPU);
  // A view of memory owned by someone else; `owner` keeps it alive (for example a file mapping).
  static Tensor view_external(void* data, const std::vector<int64_t>& shape, DType dtype,
                              std::shared_ptr<void> owner, Device device = Device::CPU);

  bool defined() const { return storage_ != nullptr; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? i + shape_.size() : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  std::string describe() const;  // "float32[12, 64]"

  void* raw() const;
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }

  // Same storage, new shape with the same number of elements.
  Tensor reshape(const std::vector<int64_t>& shape) const;
  // Elements [offset, offset + numel(shape)) of this tensor as a tensor of `shape`; it keeps this
  // tensor's storage alive (parameters as views of one flat buffer).
  Tensor slice(int64_t offset, const std::vector<int64_t>& shape) const;

 private:
  struct Storage;
  std::shared_ptr<Storage> storage_;
  std::vector<int64_t> shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
};

}  // namespace llamas
