"""CPU kernels on numpy arrays (float32), for tests, benchmarks and experiments.

    llamas.ops.matmul(a, b)                 # a @ b, (M, K) @ (K, N)
    llamas.ops.linear(x, w, bias, gelu=True)
    p = llamas.ops.pack(w)                  # the panel layout loaded models hold their weights in
    llamas.ops.linear(x, p, bias)           # ... used without repacking
    q = llamas.ops.pack(w, weight_dtype="int8")   # quantized; llamas.ops.dequantize(q) = what it stands for
    llamas.ops.layernorm(x, weight, bias, eps=1e-5)
    llamas.ops.attention(q, k, v)           # causal, (B, H, T, D)
    llamas.ops.gelu(x), llamas.ops.softmax(x), llamas.ops.log_softmax(x)
"""
from ._C import ops as _ops

matmul = _ops.matmul
linear = _ops.linear
layernorm = _ops.layernorm
residual_layernorm = _ops.residual_layernorm
attention = _ops.attention
gelu = _ops.gelu
softmax = _ops.softmax
log_softmax = _ops.log_softmax
reference_matmul = _ops.reference_matmul
pack = _ops.pack
dequantize = _ops.dequantize
PackedWeight = _ops.PackedWeight


def set_kernel_variant(name: str) -> None:
    """Forces a kernel variant ('avx512', 'avx2', 'neon' or 'generic'); raises if this CPU lacks it."""
    from . import _C
    _C.set_kernel_variant(name)


def kernel_variant() -> str:
    from . import _C
    return _C.kernel_variant()


def available_kernel_variants() -> list:
    from . import _C
    return list(_C.available_kernel_variants())
