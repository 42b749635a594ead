"""The one tolerance table for kernel tests: (relative, absolute) error allowed against a float64
numpy reference, per dtype. Attention additionally obeys the 2x rule in test_kernels.py."""

TOLERANCES = {
    "float32": {"rtol": 1e-5, "atol": 1e-5},
    # bfloat16 weights: 8 bits of mantissa, so each product carries up to 2^-9 relative error.
    "bfloat16": {"rtol": 2e-2, "atol": 2e-2},
}


def matmul_scale(a, b):
    """Error scale of a dot product: sum_k |a_mk| |b_kn| (float32 rounding grows with it)."""
    import numpy as np
    return np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
