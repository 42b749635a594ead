#pragma once
// The CUDA backend's entry points seen by the core. Without nvcc and cuBLAS the stub in
// csrc/cuda/cuda_stub.cpp answers: cuda_available() is false and every op says "built without CUDA".

namespace llamas {

bool cuda_available();
[[noreturn]] void cuda_unavailable(const char* op);

}  // namespace llamas
