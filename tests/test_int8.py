"""int8 weights: quantized at packing (each column, 32 rows at a time, as int8 times one float32
scale), turned back into q * scale inside the GEMM. The quantization is checked against its numpy
definition, and every int8 product bit for bit against the float32 product over the dequantized
weights, on every kernel variant and row count (so batch invariance carries over)."""
import numpy as np
import pytest

import llamas
from llamas import ops

from conftest import rand  # noqa: E402  (the `variant` fixture is in conftest.py too)


def quantize_definition(w):
    """(K, N) float32 -> what int8 panels stand for: per column and block of 32 rows, scale =
    max |w| / 127 and q = w / scale rounded to nearest even (0 where the block is all zero)."""
    out = np.zeros_like(w)
    for b0 in range(0, w.shape[0], 32):
        block = w[b0:b0 + 32]
        scale = (np.abs(block).max(axis=0) / np.float32(127)).astype(np.float32)
        inverse = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
        q = np.clip(np.rint(block * inverse), -127, 127).astype(np.float32)
        out[b0:b0 + 32] = q * scale
    return out


@pytest.mark.parametrize("k,n", [(1, 5), (31, 16), (33, 17), (64, 130), (301, 61)])
def test_dequantized_weights_are_the_definition(k, n):
    w = rand(k, n, seed=1, scale=0.1)
    w[:, 0] = 0.0                                 # an all-zero column: scale 0, weights 0, no NaN
    packed = ops.pack(w, weight_dtype="int8")
    assert (packed.dtype, packed.in_features, packed.out_features) == ("int8", k, n)
    panels, blocks = (n + 15) // 16, (k + 31) // 32
    assert packed.nbytes == panels * (k * 16 + blocks * 16 * 4)   # 1.125 bytes a weight
    got = ops.dequantize(packed)
    np.testing.assert_array_equal(got, quantize_definition(w))
    assert np.all(got[:, 0] == 0)
    # The same from a (N, K) stored matrix, and within half a quantization step of w.
    np.testing.assert_array_equal(ops.dequantize(ops.pack(np.ascontiguousarray(w.T), weight_layout="out_in",
                                                          weight_dtype="int8")), got)
    step = np.abs(w).reshape(-1, n).max(axis=0) / 127
    assert np.all(np.abs(got - w) <= step / 2 + 1e-7)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_int8_products_equal_float32_over_the_dequantized_weights(variant, layout):
    # Every row count through every path (exact-row tiles, few-row tiles, the blocked path with
    # its dequantized B blocks), K past one 256-deep block and ragged against the 32-row scale
    # blocks, a ragged last panel: bit for bit the float32 product over ops.dequantize's matrix.
    k, n = 301, 61
    x, w, bias = rand(130, k, seed=2), rand(k, n, seed=3, scale=0.1), rand(n, seed=4)
    stored = w if layout == "in_out" else np.ascontiguousarray(w.T)
    packed = ops.pack(stored, weight_layout=layout, weight_dtype="int8")
    as_float = ops.pack(ops.dequantize(packed))
    for m in [1, 2, 3, 4, 5, 8, 12, 13, 16, 20, 29, 37, 40, 49, 130]:
        got = ops.linear(x[:m], packed, bias, gelu=True)
        np.testing.assert_array_equal(got, ops.linear(x[:m], as_float, bias, gelu=True), err_msg=f"m={m}")
    # The stored-matrix entry point packs int8 first.
    np.testing.assert_array_equal(ops.linear(x[:7], stored, bias, weight_layout=layout, weight_dtype="int8"),
                                  ops.linear(x[:7], packed, bias))


def test_int8_rejects_bad_input():
    w = rand(8, 5)
    with pytest.raises(llamas.LlamasError, match="weight_dtype must be 'float32', 'bfloat16' or 'int8', got 'int4'"):
        ops.pack(w, weight_dtype="int4")
    with pytest.raises(llamas.LlamasError, match="bfloat16 compute needs bfloat16 weights, got int8"):
        ops.linear(rand(2, 8), ops.pack(w, weight_dtype="int8"), compute_dtype="bfloat16")
    with pytest.raises(llamas.LlamasError, match="dequantize.*expects int8 panels, got bfloat16"):
        ops.dequantize(ops.pack(w, weight_dtype="bfloat16"))
    with pytest.raises(llamas.LlamasError, match=r"input must be \(M, 8\)"):
        ops.linear(rand(2, 7), ops.pack(w, weight_dtype="int8"))
