#pragma once
// Argument checks the op dispatchers share (ops.cpp, attention_op.cpp).
#include "llamas/cuda.h"
#include "llamas/error.h"
#include "llamas/tensor.h"

namespace llamas {
namespace ops {

inline void require_f32(const Tensor& t, const char* op, const char* what) {
  LLAMAS_CHECK(t.defined(), op, what, " is missing");
  LLAMAS_CHECK(t.dtype() == DType::F32, op, what, " must be float32, got ", t.describe());
}

inline void require_cpu(const Tensor& t, const char* op) {
  if (t.device() != Device::CPU) cuda_unavailable(op);
}

}  // namespace ops
}  // namespace llamas
