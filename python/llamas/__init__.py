"""llamas: an operating system for large language models.

A hand-written C++ engine (AVX-512/AVX2 kernels chosen at run time) that runs and trains
transformer language models, under a thin Python API:

    import llamas
    model = llamas.load("path/to/gpt2-folder")
    print(model.generate("Hello, my name is", max_new_tokens=20))
"""
from . import _C
from ._C import (
    LlamasError,
    cuda_available,
    get_num_threads,
)
from . import ops
from .config import GPT2Config
from .engine import Engine
from .model import Model, load
from .profile import profile
from .train import PRESETS, Trainer, WarmupCosine, create, evaluate

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use, in [1, 1024] (default: the CPUs, or $LLAMAS_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, int):  # (True would be 1, 2.5 a pybind error)
        raise LlamasError(f"[set_num_threads] thread count must be an integer in [1, 1024], got {n!r}")
    _C.set_num_threads(n)


def memory_stats() -> dict:
    """Caching allocator statistics: bytes in use, peak, cached, reserved, allocation and hit
    counts, and KV-cache blocks in use."""
    return dict(_C.memory_stats())


def empty_cache() -> None:
    """Returns the caching allocator's free blocks to the OS (blocks carved from a shared slab go
    back once every block of their slab is free), as torch.cuda.empty_cache does for its cache."""
    _C.empty_cache()


def info() -> dict:
    """Version, CPU, kernel variant, how bfloat16 and int8 compute run, threads and CUDA availability."""
    features = _C.cpu_features()
    return {
        "version": __version__,
        "cpu": _C.cpu_name(),
        "cpu_features": [name for name, on in features.items() if on],
        "kernel_variant": _C.kernel_variant(),
        "available_kernel_variants": list(_C.available_kernel_variants()),
        "bfloat16_compute": ("native (VDPBF16PS)" if _C.bf16_dot_native()
                             else "emulated (two FMAs a pair of k: same results, slower than float32 compute)"),
        "int8_compute": (("native (VPDPBUSD, operands ordered by VPERMB)" if features.get("avx512_vbmi")
                          else "native (VPDPBUSD, operands ordered by two shuffles)") if _C.i8_dot_native()
                         else "emulated (integer dots without VPDPBUSD: same results, slower than float32 compute)"),
        "threads": _C.get_num_threads(),
        # A model with more weight bytes than this reads them from memory at every token.
        "last_level_cache_bytes": _C.last_level_cache_bytes(),
        "cuda_available": _C.cuda_available(),
    }


__all__ = [
    "Engine", "GPT2Config", "LlamasError", "Model", "PRESETS", "Trainer", "WarmupCosine", "create", "cuda_available", "evaluate", "get_num_threads", "info", "load",
    "empty_cache", "memory_stats", "ops", "profile", "set_num_threads",
]
