"""compute_dtype="bfloat16": matrix products with bfloat16 activations, summed in k pairs as the
AVX512_BF16 instruction VDPBF16PS does (csrc/cpu/gemm_bf16_dot_impl.h). The kernel is checked bit for
bit against that definition written in numpy, on every kernel variant (avx512 uses the instruction
where the CPU has it, the others form the same sums with FMAs), and the model against float32."""
import numpy as np
import pytest

import llamas
from llamas import ops

from conftest import rand  # noqa: E402  (the `variant` fixture is in conftest.py too)


def to_bf16(x):
    """x rounded to bfloat16 (nearest, ties to even), back as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def pair_sum_definition(x, w, bias=None):
    """bias + x @ w as compute_dtype='bfloat16' defines it: x and w rounded to bfloat16; per k pair,
    the odd product added first, then the even one, each add rounded once to float32 (a product of
    two bfloat16 is exact in float32, so numpy's float32 multiply and add give exactly that). An odd
    K's last pair adds 0 x 0 first."""
    a, b = to_bf16(x), to_bf16(w)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    if bias is not None:
        acc += bias.astype(np.float32)
    for k in range(0, a.shape[1], 2):
        if k + 1 < a.shape[1]:
            acc = acc + a[:, k + 1, None] * b[None, k + 1]
        else:
            acc = acc + np.float32(0)
        acc = acc + a[:, k, None] * b[None, k]
    return acc


@pytest.mark.parametrize("k", [1, 2, 7, 256, 301, 513])
def test_linear_bfloat16_compute_is_the_pair_sum_bit_for_bit(variant, k):
    # Row counts through every path: each row count up to one register tile (decode), the blocked
    # tiles with a last tile of 4, 8 or 12 rows, a second 120-row block; columns ragged against the
    # 16-wide panels and the 32-wide tiles; K odd (a last half pair), one pair, past a 256-deep block.
    n = 75
    x, w, bias = rand(130, k, seed=1), rand(k, n, seed=2, scale=0.1), rand(n, seed=3)
    want = pair_sum_definition(x, w, bias)
    packed = ops.pack(w, weight_dtype="bfloat16")
    for m in [1, 2, 3, 4, 5, 8, 11, 12, 13, 16, 20, 24, 29, 40, 121, 130]:
        got = ops.linear(x[:m], packed, bias, compute_dtype="bfloat16")
        np.testing.assert_array_equal(got, want[:m], err_msg=f"m={m} k={k}")
    # The plain reference kernel is the same definition.
    np.testing.assert_array_equal(ops.reference_matmul(x[:13], w, compute_dtype="bfloat16"),
                                  pair_sum_definition(x[:13], w))


def test_linear_bfloat16_compute_rows_alone_equal_the_batch(variant):
    # Batch invariance: a row computed alone is bit-identical to the same row in any batch, with the
    # GELU epilogue and the stored-layout entry point (which packs the weight first).
    x, w, bias = rand(40, 203, seed=4), rand(61, 203, seed=5, scale=0.1), rand(61, seed=6)
    full = ops.linear(x, w, bias, gelu=True, weight_layout="out_in", weight_dtype="bfloat16", compute_dtype="bfloat16")
    for m in range(1, 15):
        part = ops.linear(x[m:m + 1], w, bias, gelu=True, weight_layout="out_in", weight_dtype="bfloat16",
                          compute_dtype="bfloat16")
        np.testing.assert_array_equal(part[0], full[m])
    plain = ops.linear(x, w, bias, weight_layout="out_in", weight_dtype="bfloat16", compute_dtype="bfloat16")
    np.testing.assert_array_equal(plain, pair_sum_definition(x, np.ascontiguousarray(w.T), bias))


def test_linear_bfloat16_compute_rejects_bad_input():
    x, w = rand(3, 8), rand(8, 5)
    with pytest.raises(llamas.LlamasError, match="bfloat16 compute needs bfloat16 or int8 weights"):
        ops.linear(x, w, compute_dtype="bfloat16")
    with pytest.raises(llamas.LlamasError, match="bfloat16 compute needs bfloat16 or int8 weights"):
        ops.linear(x, ops.pack(w), compute_dtype="bfloat16")
    with pytest.raises(llamas.LlamasError, match="compute_dtype must be 'float32', 'bfloat16' or 'int8', got 'fp8'"):
        ops.linear(x, w, weight_dtype="bfloat16", compute_dtype="fp8")


def test_model_close_to_float32_and_rows_alone_equal_the_batch(case):
    m = llamas.load(case.folder, dtype="bfloat16", compute_dtype="bfloat16")
    assert (m.dtype, m.kv_dtype, m.compute_dtype) == ("bfloat16", "bfloat16", "bfloat16")
    assert "compute_dtype=bfloat16" in repr(m)
    got = m.forward(case.input_ids).astype(np.float64)
    diff = np.abs(got - case.logits.astype(np.float64))
    # One more bfloat16 rounding per product than bfloat16 weights alone: the same tolerance as
    # test_bfloat16_close_to_float32, and different logits from bfloat16 weights with float32 compute.
    assert diff.max() < 0.05 * case.scale, f"max |diff| {diff.max():.3g} >= {0.05 * case.scale:.3g}"
    assert not np.array_equal(got, llamas.load(case.folder, dtype="bfloat16").forward(case.input_ids))
    # Rows alone equal the batch (decode against prefill: test_gpt2_parity's
    # test_decode_rows_equal_prefill_rows).
    for row in range(case.input_ids.shape[0]):
        np.testing.assert_array_equal(m.forward(case.input_ids[row:row + 1])[0], got[row].astype(np.float32))


def test_load_rejects_bad_compute_dtype(case):
    with pytest.raises(llamas.LlamasError, match=r"compute_dtype='bfloat16' needs bfloat16 or int8 weights"):
        llamas.load(case.folder, compute_dtype="bfloat16")
    with pytest.raises(llamas.LlamasError, match="compute_dtype must be 'float32', 'bfloat16' or 'int8', got 'fp8'"):
        llamas.load(case.folder, dtype="bfloat16", compute_dtype="fp8")
    assert llamas.load(case.folder).compute_dtype == "float32"


@pytest.mark.parametrize("key,native_fn,features", [
    ("bfloat16_compute", "bf16_dot_native", {"avx512_bf16"}),            # VDPBF16PS
    ("int8_compute", "i8_dot_native", {"avx512_vnni"})])                 # VPDPBUSD (int8 compute)
def test_info_says_how_each_dot_instruction_runs(variant, key, native_fn, features):
    native = getattr(llamas._C, native_fn)()
    assert llamas.info()[key].startswith("native" if native else "emulated")
    if variant != "avx512":  # only the AVX-512 build can hold these instructions
        assert not native
    if native:
        assert features <= set(llamas.info()["cpu_features"])
