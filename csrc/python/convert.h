#pragma once
// numpy <-> Tensor conversion for the bindings: inputs are zero-copy views of C-contiguous arrays
// (others are copied once by numpy), outputs hand the Tensor's storage to numpy without a copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "llamas/error.h"
#include "llamas/tensor.h"
#include "models/gpt2.h"

namespace llamas {
namespace python {

namespace py = pybind11;

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

inline std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// A view of the array's memory; the caller keeps the array alive while the tensor is used.
inline Tensor view_of(const FloatArray& a) {
  return Tensor::view_external(const_cast<float*>(a.data()), shape_of(a), DType::F32, nullptr);
}

// "float32" or "bfloat16"; anything else fails naming the op and the argument.
// with_int8: weights and KV caches also take int8 (quantized, see i8_panel_bytes, kv_region_bytes);
// a compute dtype does not.
inline DType parse_dtype(const std::string& name, const char* op, const char* field = "dtype", bool with_int8 = false) {
  if (name == "float32") return DType::F32;
  if (name == "bfloat16") return DType::BF16;
  if (with_int8 && name == "int8") return DType::I8;
  if (with_int8) fail(op, field, " must be 'float32', 'bfloat16' or 'int8', got '", name, "'");
  fail(op, field, " must be 'float32' or 'bfloat16', got '", name, "'");
}

// A GPT-2 config from the dict of llamas.GPT2Config.to_native() (bind_model.cpp).
GPT2Config config_from_dict(const py::dict& d);

inline py::array_t<float> to_numpy(const Tensor& t) {
  auto* keep = new Tensor(t);
  py::capsule owner(keep, [](void* p) { delete static_cast<Tensor*>(p); });
  std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
  return py::array_t<float>(shape, t.data<float>(), owner);
}

}  // namespace python
}  // namespace llamas
