#include "llamas/cuda.h"
#include "llamas/error.h"

namespace llamas {

bool cuda_available() { return false; }

void cuda_unavailable(const char* op) {
  fail(op, "has no CUDA implementation: llamas was built without CUDA (no nvcc/cuBLAS at build time)");
}

}  // namespace llamas
