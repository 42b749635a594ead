#include "llamas/tensor.h"

#include <cstring>
#include <sstream>

#include "llamas/allocator.h"
#include "llamas/error.h"

namespace llamas {

struct Tensor::Storage {
  void* data = nullptr;
  std::shared_ptr<void> external_owner;  // null when the block came from the allocator
  ~Storage() {
    if (!external_owner && data) cpu_free(data);
  }
};

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::I32: return 4;
    case DType::I8: return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::I32: return "int32";
    case DType::I8: return "int8";
  }
  return "?";
}

const char* device_name(Device device) { return device == Device::CPU ? "cpu" : "cuda"; }

static int64_t count_elements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    LLAMAS_CHECK(d >= 0, "tensor", "negative dimension ", d);
    n *= d;
  }
  return n;
}

int64_t Tensor::numel() const { return count_elements(shape_); }

Tensor Tensor::empty(const std::vector<int64_t>& shape, DType dtype, Device device) {
  LLAMAS_CHECK(device == Device::CPU, "tensor", "device ", device_name(device),
               " has no allocator in this build");
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  t.storage_ = std::make_shared<Storage>();
  size_t bytes = static_cast<size_t>(count_elements(shape)) * dtype_size(dtype);
  t.storage_->data = cpu_allocate(bytes == 0 ? 1 : bytes);
  return t;
}

Tensor Tensor::zeros(const std::vector<int64_t>& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  std::memset(t.raw(), 0, t.nbytes());
  return t;
}

Tensor Tensor::view_external(void* data, const std::vector<int64_t>& shape, DType dtype,
                             std::shared_ptr<void> owner, Device device) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->data = data;
  t.storage_->external_owner = owner ? std::move(owner) : std::shared_ptr<void>(data, [](void*) {});
  return t;
}

void* Tensor::raw() const { return storage_ ? storage_->data : nullptr; }

Tensor Tensor::reshape(const std::vector<int64_t>& shape) const {
  LLAMAS_CHECK(count_elements(shape) == numel(), "reshape", "cannot view ", describe(), " as ",
               count_elements(shape), " elements");
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::slice(int64_t offset, const std::vector<int64_t>& shape) const {
  LLAMAS_CHECK(offset >= 0 && offset + count_elements(shape) <= numel(), "slice", "elements [", offset, ", ",
               offset + count_elements(shape), ") are outside ", describe());
  auto owner = std::make_shared<Tensor>(*this);
  return view_external(static_cast<char*>(raw()) + offset * dtype_size(dtype_), shape, dtype_, owner, device_);
}

std::string Tensor::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype_) << "[";
  for (size_t i = 0; i < shape_.size(); ++i) os << (i ? ", " : "") << shape_[i];
  os << "]";
  return os.str();
}

}  // namespace llamas
