"""compute_dtype="int8": int8 activations over int8 weights (W8A8, as llama.cpp's Q8_0 x Q8_0 dot
products; csrc/cpu/gemm_i8_dot_impl.h). Each row of x is quantized per 32-k block as the weights
are, each block's integer dot is exact, and one fused multiply-add per block scales it by both
scales. The kernel is checked bit for bit against that definition written in numpy, on every kernel
variant (avx512 runs VPDPBUSD where the CPU has AVX512_VNNI, the others integer dots without it) and
every row count's path, and the model against float32."""
import numpy as np
import pytest

import llamas
from llamas import ops

from conftest import rand  # noqa: E402  (the `variant` fixture is in conftest.py too)
from test_int8 import assert_close_to_float32  # noqa: E402


def quantize_blocks(x):
    """(R, K) float32 -> (q (R, blocks*32) int64, scale (R, blocks) float32): each row's blocks of 32
    as int8 times max |x| / 127, q = x / scale rounded to nearest even (zero past K)."""
    rows, k = x.shape
    blocks = (k + 31) // 32
    padded = np.zeros((rows, blocks * 32), np.float32)
    padded[:, :k] = x
    b = padded.reshape(rows, blocks, 32)
    scale = (np.abs(b).max(axis=-1) / np.float32(127)).astype(np.float32)
    inverse = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint(b * inverse[..., None]), -127, 127).astype(np.int64)
    return q.reshape(rows, -1), scale


def w8a8_definition(x, w, bias=None):
    """bias + x @ w as compute_dtype='int8' defines it: for each 32-k block in order,
    c = fma(float(integer dot of the block), sa * sw, c), rounded once to float32. The fma is formed
    in float64: the product is exact there (a dot < 2^20 times a 24-bit scale) and the sum rounds
    to float32 the same way but for a tie after float64 rounding (~2^-29 a sum)."""
    qa, sa = quantize_blocks(x)
    qw, sw = quantize_blocks(np.ascontiguousarray(w.T))   # weights: per column
    acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
    if bias is not None:
        acc += bias.astype(np.float32)
    for b in range(sa.shape[1]):
        dot = qa[:, 32 * b:32 * b + 32] @ qw[:, 32 * b:32 * b + 32].T
        scale = (sa[:, b, None] * sw[None, :, b]).astype(np.float32)
        acc = (dot.astype(np.float64) * scale.astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
    return acc


@pytest.mark.parametrize("k", [1, 4, 31, 33, 256, 301, 513])
def test_linear_int8_compute_is_the_definition_bit_for_bit(variant, k):
    # Row counts through every path: 1-6 rows (decode: each thread quantizes the rows itself), then
    # blocked 6-row tiles with a last of 2 or 4; columns ragged against the 16-wide panels and the
    # 2-panel tiles; K past one 256-deep pass, and not a multiple of 4 (a last partial quad).
    n = 75
    x, w, bias = rand(130, k, seed=1), rand(k, n, seed=2, scale=0.1), rand(n, seed=3)
    x[:, ::5] *= 20                                   # outliers: blocks with very different scales
    x[3, :] = 0.0                                     # an all-zero row: scales 0, products 0
    want = w8a8_definition(x, w, bias)
    packed = ops.pack(w, weight_dtype="int8")
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 13, 16, 17, 29, 40, 121, 130]:
        got = ops.linear(x[:m], packed, bias, compute_dtype="int8")
        np.testing.assert_array_equal(got, want[:m], err_msg=f"m={m} k={k}")
    # The plain reference kernel is the same definition.
    np.testing.assert_array_equal(ops.reference_matmul(x[:13], w, compute_dtype="int8"), w8a8_definition(x[:13], w))


def test_linear_int8_compute_rows_alone_equal_the_batch(variant):
    # Batch invariance: a row computed alone is bit-identical to the same row in any batch, with the
    # GELU epilogue and the stored-layout entry point (which quantizes the weight first).
    x, w, bias = rand(40, 203, seed=4), rand(61, 203, seed=5, scale=0.1), rand(61, seed=6)
    full = ops.linear(x, w, bias, gelu=True, weight_layout="out_in", weight_dtype="int8", compute_dtype="int8")
    for m in range(0, 40, 3):
        part = ops.linear(x[m:m + 1], w, bias, gelu=True, weight_layout="out_in", weight_dtype="int8",
                          compute_dtype="int8")
        np.testing.assert_array_equal(part[0], full[m])
    plain = ops.linear(x, w, bias, weight_layout="out_in", weight_dtype="int8", compute_dtype="int8")
    np.testing.assert_array_equal(plain, w8a8_definition(x, np.ascontiguousarray(w.T), bias))


def test_linear_int8_compute_same_bits_at_any_thread_count(variant):
    x, w = rand(50, 300, seed=11), rand(300, 170, seed=12, scale=0.1)
    packed = ops.pack(w, weight_dtype="int8")
    before = llamas.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            llamas.set_num_threads(threads)
            outs.append([ops.linear(x[:m], packed, compute_dtype="int8") for m in (1, 5, 50)])
    finally:
        llamas.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


def test_linear_int8_compute_close_to_float32():
    # Per-block scales keep the error near int8 weights' own: ~1% of the output scale here.
    x, w = rand(64, 768, seed=7), rand(768, 300, seed=8, scale=0.05)
    want = x.astype(np.float64) @ w.astype(np.float64)
    got = ops.linear(x, w, weight_dtype="int8", compute_dtype="int8")
    weights_only = ops.linear(x, w, weight_dtype="int8")
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.02 * scale
    assert np.abs(got - want).max() < 2.5 * np.abs(weights_only - want).max()


def test_linear_int8_compute_non_finite_rows_stay_in_their_row(variant):
    x, w = rand(9, 70, seed=9), rand(70, 20, seed=10)
    x[2, 40] = np.nan
    x[5, 3] = np.inf
    got = ops.linear(x, w, weight_dtype="int8", compute_dtype="int8")
    assert np.isnan(got[2]).all() and np.isnan(got[5]).all()
    finite = [r for r in range(9) if r not in (2, 5)]
    np.testing.assert_array_equal(got[finite], w8a8_definition(x[finite], w))


def test_linear_int8_compute_rejects_bad_input():
    x, w = rand(3, 8), rand(8, 5)
    for weight_dtype in ("float32", "bfloat16"):
        with pytest.raises(llamas.LlamasError, match=f"int8 compute needs int8 weights, got {weight_dtype} ones"):
            ops.linear(x, w, weight_dtype=weight_dtype, compute_dtype="int8")
        with pytest.raises(llamas.LlamasError, match="int8 compute needs int8 weights"):
            ops.linear(x, ops.pack(w, weight_dtype=weight_dtype), compute_dtype="int8")
    with pytest.raises(llamas.LlamasError, match="compute_dtype must be 'float32', 'bfloat16' or 'int8', got 'int4'"):
        ops.linear(x, w, weight_dtype="int8", compute_dtype="int4")
    with pytest.raises(llamas.LlamasError, match="input must be"):
        ops.linear(rand(3, 9), ops.pack(w, weight_dtype="int8"), compute_dtype="int8")


def test_model_close_to_float32_and_rows_alone_equal_the_batch(case):
    m = llamas.load(case.folder, dtype="int8", compute_dtype="int8")
    assert (m.dtype, m.kv_dtype, m.compute_dtype) == ("int8", "bfloat16", "int8")
    assert "compute_dtype=int8" in repr(m)
    got = m.forward(case.input_ids).astype(np.float64)
    # int8 weights' tolerance: the activations' blocks are quantized as the weights' are, so their
    # error is of the same size.
    assert_close_to_float32(got, case)
    assert not np.array_equal(got, llamas.load(case.folder, dtype="int8").forward(case.input_ids))
    for row in range(case.input_ids.shape[0]):
        np.testing.assert_array_equal(m.forward(case.input_ids[row:row + 1])[0], got[row].astype(np.float32))


def test_load_rejects_int8_compute_without_int8_weights(case):
    for dtype in ("float32", "bfloat16"):
        with pytest.raises(llamas.LlamasError, match=r"compute_dtype='int8' needs int8 weights: pass dtype='int8'"):
            llamas.load(case.folder, dtype=dtype, compute_dtype="int8")
    m = llamas.load(case.folder, dtype="bfloat16")
    with pytest.raises(llamas.LlamasError, match="compute_dtype int8 needs int8 weights"):
        m._native.compute_dtype = "int8"
    assert m.compute_dtype == "float32"


CHECK_HIDDEN = """
import sys
import numpy as np, llamas
from llamas import ops
rng = np.random.default_rng(0)
hidden = set(sys.argv[1].split(","))
info = llamas.info()
assert not hidden & set(info["cpu_features"]), info
assert info["int8_compute"].startswith("emulated" if "avx512_vnni" in hidden else "native"), info
if "avx512_vbmi" in hidden:
    assert "two shuffles" in info["int8_compute"], info
assert info["bfloat16_compute"].startswith("emulated" if "avx512_bf16" in hidden else "native"), info
for m, k, n in [(1, 301, 75), (5, 64, 33), (16, 256, 70), (37, 513, 40)]:
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    for cd in ("int8", "bfloat16"):
        got = ops.linear(x, w, weight_dtype=cd, compute_dtype=cd)
        assert np.array_equal(got, ops.reference_matmul(x, w, compute_dtype=cd)), (m, k, n, cd)
print("ok")
"""


@pytest.mark.skipif(not {"avx512f", "avx512_vnni", "avx512_vbmi", "avx512_bf16"} <= set(llamas.info()["cpu_features"]),
                    reason="needs a CPU with AVX-512 VNNI, VBMI and BF16 to hide them from")
@pytest.mark.parametrize("hidden", ["avx512_bf16,avx512_vnni", "avx512_vbmi"])
def test_avx512_variant_without_some_instructions_gives_the_same_bits(hidden):
    # LLAMAS_CPU_HIDE runs the avx512 variant as on a CPU without those features: without VNNI and
    # BF16 (Skylake-X) the integer dots (VPMADDWD) and the FMA pair sums; without VBMI (Cascade Lake)
    # VPDPBUSD with its operands transposed by two shuffles instead of VPERMB. Against the definition.
    import os
    import subprocess
    import sys
    env = dict(os.environ, LLAMAS_KERNEL="avx512", LLAMAS_CPU_HIDE=hidden)
    out = subprocess.run([sys.executable, "-c", CHECK_HIDDEN, hidden], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_cpu_hide_reports_an_unknown_feature():
    import os
    import subprocess
    import sys
    env = dict(os.environ, LLAMAS_CPU_HIDE="avx9000")
    out = subprocess.run([sys.executable, "-c", "import llamas; print(llamas._C.kernel_variant())"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == llamas._C.kernel_variant()
    assert "LLAMAS_CPU_HIDE names an unknown CPU feature 'avx9000' (ignored)" in out.stderr
