"""Each CPU kernel against a float64 numpy reference, at odd and round sizes, for every kernel
variant this CPU can run (avx512 / avx2 / generic)."""
import numpy as np
import pytest

import llamas
from llamas import ops
from tolerances import TOLERANCES, matmul_scale

SIZES = [1, 3, 31, 33, 97]
VARIANTS = ops.available_kernel_variants()


from conftest import rand  # noqa: E402  (the `variant` fixture is in conftest.py too)


def assert_close(actual, expected, dtype="float32", scale=None):
    tol = TOLERANCES[dtype]
    expected = np.asarray(expected, dtype=np.float64)
    scale = np.abs(expected) if scale is None else scale
    err = np.abs(actual.astype(np.float64) - expected)
    bound = tol["atol"] + tol["rtol"] * scale
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (
        f"max violation at {np.unravel_index(worst, err.shape)}: err {err.flat[worst]:.3g} > bound {bound.flat[worst]:.3g}")


def gelu_ref(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("m", SIZES + [8, 9, 256])
@pytest.mark.parametrize("k", [1, 33, 97, 300])
@pytest.mark.parametrize("n", [1, 31, 97, 1025])
def test_matmul(variant, m, k, n):
    a, b = rand(m, k, seed=1), rand(k, n, seed=2)
    out = ops.matmul(a, b)
    assert out.shape == (m, n) and out.dtype == np.float32
    # float32 rounding of a length-k dot product grows with sum |a||b|: use that as the scale.
    assert_close(out, a.astype(np.float64) @ b, scale=matmul_scale(a, b))


@pytest.mark.parametrize("m", [1, 5, 64])
def test_matmul_bit_identical_to_reference_and_across_batch(variant, m):
    a, b = rand(m, 200, seed=3), rand(200, 77, seed=4)
    fast = ops.matmul(a, b)
    if llamas.info()["cpu_features"] and variant != "generic":
        np.testing.assert_array_equal(fast, ops.reference_matmul(a, b))
    # Each row alone gives exactly the row computed in a batch (batch invariance).
    for i in range(m):
        np.testing.assert_array_equal(ops.matmul(a[i:i + 1], b)[0], fast[i])


@pytest.mark.parametrize("k", [255, 767, 769, 1700])
def test_blocked_products_over_several_k_blocks_bit_identical(variant, k):
    # The blocked path walks K in blocks (768 with 16 lanes, 256 with 8) and carries each C
    # element's FMA chain from one block to the next through C: K just under, past and well past a
    # block must still give the reference's bits, with B packed per call or read from panels.
    a, b = rand(70, k, seed=11), rand(k, 45, seed=12)
    fast = ops.matmul(a, b)
    assert_close(fast, a.astype(np.float64) @ b, scale=matmul_scale(a, b))
    if llamas.info()["cpu_features"] and variant != "generic":
        np.testing.assert_array_equal(fast, ops.reference_matmul(a, b))
        np.testing.assert_array_equal(ops.linear(a, ops.pack(b)), fast)
        np.testing.assert_array_equal(ops.matmul(a[:5], b), fast[:5])  # a few rows stream B instead


@pytest.mark.parametrize("m", [49, 52, 56, 57, 60, 256, 292, 296])
def test_blocked_products_last_row_panel_bit_identical(variant, m):
    # The blocked path's last row panel runs a 4- or 8-row tile when that covers it (12-row tiles:
    # 52 = 48 + 4, 56 = 48 + 8, 57 and 60 end on 9 and 12; 6-row tiles: 52 = 48 + 4) and its A
    # panel is packed that narrow, over every k block. Every row must keep the reference's bits,
    # with bias and GELU, B per call, from panels, and split by rows (M > N, M >= 2K: 292, 296).
    k, n = (40, 20) if m > 256 else (800, 70)
    a, b, bias = rand(m, k, seed=13), rand(k, n, seed=14, scale=0.1), rand(n, seed=15)
    fast = ops.matmul(a, b)
    assert_close(fast, a.astype(np.float64) @ b, scale=matmul_scale(a, np.abs(b)))
    if llamas.info()["cpu_features"] and variant != "generic":
        np.testing.assert_array_equal(fast, ops.reference_matmul(a, b))
    with_epilogue = ops.linear(a, b, bias, gelu=True)
    np.testing.assert_array_equal(ops.linear(a, ops.pack(b), bias, gelu=True), with_epilogue)
    for rows in (slice(m - 1, m), slice(m - 9, m)):  # the last rows alone take the few-row paths
        np.testing.assert_array_equal(ops.linear(a[rows], b, bias, gelu=True), with_epilogue[rows])


def placed(x, float_offset):
    """x copied to an array that starts float_offset floats past a 64-byte boundary."""
    raw = np.empty(x.size + 32, np.float32)
    start = (-(raw.ctypes.data % 64) // 4) % 16 + float_offset
    out = raw[start:start + x.size].reshape(x.shape)
    out[:] = x
    assert out.ctypes.data % 64 == 4 * float_offset
    return out


@pytest.mark.parametrize("m", [1, 3, 8])
def test_matmul_same_result_wherever_b_starts(variant, m):
    # Few-row products peel columns until B's loads are aligned (numpy puts large arrays 16 bytes
    # past a cache line): the sums must not change with where B starts, nor with N's ragged end.
    # (They peel only when every row starts at the same offset from a line: N = 304 is 19 lines;
    # the peeled head then leaves each thread's columns a ragged end.)
    a, b = rand(m, 67, seed=5), rand(67, 304, seed=6)
    first = ops.matmul(a, placed(b, 0))
    if llamas.info()["cpu_features"] and variant != "generic":
        np.testing.assert_array_equal(first, ops.reference_matmul(a, b))
    for offset in range(1, 16):
        np.testing.assert_array_equal(ops.matmul(a, placed(b, offset)), first, err_msg=f"B {offset} floats off")
    for n in (16, 32):  # one or two vectors: a 13-column head, then the rest as a tail
        np.testing.assert_array_equal(ops.matmul(a, placed(b[:, :n], 3)), first[:, :n])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("k", [5, 80, 301])
def test_linear_out_in_same_result_wherever_the_weight_starts(variant, m, k):
    # (N, K) weights as stored peel k (when every row starts at the same offset from a line:
    # K = 80 floats is 5 lines) and must still sum each output over k in ascending order.
    x, w = rand(m, k, seed=7), rand(37, k, seed=8)
    first = ops.linear(x, placed(w, 0), weight_layout="out_in")
    np.testing.assert_array_equal(first, ops.matmul(x, np.ascontiguousarray(w.T)))
    for offset in range(1, 16):
        np.testing.assert_array_equal(ops.linear(x, placed(w, offset), weight_layout="out_in"), first,
                                      err_msg=f"weight {offset} floats off")


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_small_batches_bit_identical_to_packed(variant, layout, dtype):
    # 1..9 rows take the streaming kernels (row groups of 1-4, column blocks of 1-2 registers);
    # 40 rows take the packed one. Every row must match bit for bit (batch invariance), at a
    # column count with ragged register blocks and an odd K.
    k, n = 203, 61
    x, w, bias = rand(40, k, seed=8), rand(k, n, seed=9, scale=0.1), rand(n, seed=10)
    stored = w if layout == "in_out" else np.ascontiguousarray(w.T)
    full = ops.linear(x, stored, bias, gelu=True, weight_layout=layout, weight_dtype=dtype)
    for m in range(1, 10):
        part = ops.linear(x[:m], stored, bias, gelu=True, weight_layout=layout, weight_dtype=dtype)
        np.testing.assert_array_equal(part, full[:m])


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1, 16, 61, 130, 300])
def test_linear_packed_panels_bit_identical(variant, layout, dtype, n):
    # Loaded models hold their matrices as panels of 16 columns: every row count (the exact-rows
    # kernel up to one register tile, the few-row tiles up to 30 (float32) or 36 (bfloat16) rows,
    # the blocked one beyond) must give bit for bit what the stored-layout kernels give, with a
    # ragged last panel and K past one 256-deep block.
    k = 301
    x, w, bias = rand(40, k, seed=11), rand(k, n, seed=12, scale=0.1), rand(n, seed=13)  # 40 rows: blocked
    stored = w if layout == "in_out" else np.ascontiguousarray(w.T)
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 20, 21, 22, 24, 25, 27, 28, 30, 31, 33, 34, 36, 37, 40]:
        plain = ops.linear(x[:m], stored, bias, gelu=True, weight_layout=layout, weight_dtype=dtype)
        packed = ops.linear(x[:m], stored, bias, gelu=True, weight_layout=layout, weight_dtype=dtype, packed=True)
        np.testing.assert_array_equal(packed, plain)


@pytest.mark.parametrize("dtype,n", [("float32", 1811), ("bfloat16", 3611), ("int8", 7211)])
def test_few_rows_of_a_large_matrix_equal_rows_alone(variant, dtype, n):
    # 5-12 rows of a matrix over 2 MiB take the wide few-row tiles without the next-tile fetches
    # (smaller ones, above, take them): each row must still be what it gives alone.
    k = 301
    x, w = rand(12, k, seed=21), rand(k, n, seed=22, scale=0.1)
    for m in (5, 6, 7, 8, 9, 12):
        batch = ops.linear(x[:m], w, weight_dtype=dtype, packed=True)
        for i in (0, m - 1):
            np.testing.assert_array_equal(ops.linear(x[i:i + 1], w, weight_dtype=dtype, packed=True)[0], batch[i])


def test_linear_packed_matches_numpy(variant):
    x, w, bias = rand(9, 130, seed=14), rand(130, 45, seed=15, scale=0.1), rand(45, seed=16)
    out = ops.linear(x, w, bias, packed=True)
    ref = x.astype(np.float64) @ w + bias
    assert_close(out, ref, scale=matmul_scale(x, np.abs(w)) + np.abs(bias))
    packed = ops.pack(w)  # packed once, used many times
    assert (packed.in_features, packed.out_features, packed.dtype) == (130, 45, "float32")
    assert packed.nbytes == 3 * 16 * 130 * 4  # 45 columns padded to 3 panels of 16
    np.testing.assert_array_equal(ops.linear(x, packed, bias), out)
    assert ops.pack(w, weight_dtype="bfloat16").nbytes == packed.nbytes // 2


def test_pack_rejects_bad_input():
    with pytest.raises(llamas.LlamasError, match="weight_layout"):
        ops.pack(rand(4, 4), weight_layout="sideways")
    with pytest.raises(llamas.LlamasError, match="2-D"):
        ops.pack(rand(4))
    with pytest.raises(llamas.LlamasError, match=r"input must be \(M, 130\)"):
        ops.linear(rand(2, 129), ops.pack(rand(130, 45)))
    with pytest.raises(llamas.LlamasError, match="bias"):
        ops.linear(rand(2, 130), ops.pack(rand(130, 45)), rand(44))


@pytest.mark.parametrize("m", [1, 4, 40])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear(variant, m, layout, gelu, dtype):
    k, n = 97, 130
    x, w, bias = rand(m, k, seed=5), rand(k, n, seed=6, scale=0.1), rand(n, seed=7)
    stored = w if layout == "in_out" else np.ascontiguousarray(w.T)
    out = ops.linear(x, stored, bias, gelu=gelu, weight_layout=layout, weight_dtype=dtype)
    w_used = w.astype(np.float64)
    if dtype == "bfloat16":  # compare against the rounded weights, so only float32 rounding remains
        bits = w.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
        w_used = rounded.view(np.float32).astype(np.float64)
    ref = x.astype(np.float64) @ w_used + bias
    scale = matmul_scale(x, np.abs(w_used)) + np.abs(bias)
    if gelu:
        ref = gelu_ref(ref)
    assert_close(out, ref, scale=scale)


def test_linear_rejects_bad_shapes():
    with pytest.raises(llamas.LlamasError, match=r"\[linear\].*features"):
        ops.linear(rand(3, 4), rand(5, 6))
    with pytest.raises(llamas.LlamasError, match=r"\[matmul\]"):
        ops.matmul(rand(3, 4), rand(5, 6))
    with pytest.raises(llamas.LlamasError, match="weight_layout"):
        ops.linear(rand(3, 4), rand(4, 6), weight_layout="sideways")
    with pytest.raises(llamas.LlamasError, match="bias"):
        ops.linear(rand(3, 4), rand(4, 6), rand(5))


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("c", SIZES + [768, 1025])
def test_layernorm(variant, rows, c):
    x, w, b = rand(rows, c, seed=8, scale=3.0) + 1.5, rand(c, seed=9), rand(c, seed=10)
    out = ops.layernorm(x, w, b, eps=1e-5)
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = x64.var(-1, keepdims=True)
    ref = (x64 - mean) / np.sqrt(var + 1e-5) * w + b
    assert_close(out, ref, scale=np.abs(ref) + np.abs(w) + 1)


def test_residual_layernorm_matches_add_then_norm(variant):
    x, d, w, b = rand(7, 97, seed=11), rand(7, 97, seed=12), rand(97, seed=13), rand(97, seed=14)
    new_x, out = ops.residual_layernorm(x, d, w, b)
    np.testing.assert_array_equal(new_x, x + d)
    np.testing.assert_array_equal(out, ops.layernorm(x + d, w, b))


@pytest.mark.parametrize("n", SIZES + [1024, 4099])
def test_gelu(variant, n):
    x = np.concatenate([rand(n, seed=15, scale=4.0), np.float32([-30.0, -9.0, 0.0, 1e-6, 9.0, 30.0])])
    assert_close(ops.gelu(x), gelu_ref(x))


@pytest.mark.parametrize("cols", SIZES + [50257])
def test_softmax(variant, cols):
    x = rand(3, cols, seed=16, scale=5.0)
    if cols > 1:
        x[0, 0] = -np.inf  # a masked entry gets exactly 0
    ref = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    out = ops.softmax(x)
    if cols > 1:
        assert out[0, 0] == 0.0
    assert_close(out, ref)


@pytest.mark.parametrize("cols", SIZES + [255, 256, 257, 4096, 50257])
def test_log_softmax(variant, cols):
    # Runs of 256 summed in float lanes, their sums in double: against float64 numpy and the plain
    # double loop (reference=True) at lengths around the run size and GPT-2's vocabulary.
    x = rand(3, cols, seed=17, scale=6.0)
    if cols > 1:
        x[1, 0] = -np.inf  # a masked entry: -inf out, the rest normalised without it
    x64 = x.astype(np.float64)
    ref = x64 - (np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x64.max(-1, keepdims=True))
    out = ops.log_softmax(x)
    assert out.shape == x.shape and out.dtype == np.float32
    if cols > 1:
        assert out[1, 0] == -np.inf
    finite = np.isfinite(ref)
    assert_close(out[finite], ref[finite])
    assert_close(ops.log_softmax(x, reference=True)[finite], ref[finite])
    assert np.allclose(np.exp(out.astype(np.float64)).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_log_softmax_of_large_logits(variant, scale):
    # x - (max + log sum) in float32 lost log sum at |x| ~ 1e8 ([1e8, 1e8] gave [0, 0]): the
    # normaliser is a double, so each output is (x - max) - log sum to float32's precision.
    x = np.array([[scale, scale], [scale, scale - 1.0], [-scale, -scale - 2.0]], dtype=np.float32)
    x64 = x.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    ref = (x64 - m) - np.log(np.exp(x64 - m).sum(-1, keepdims=True))
    for reference in (False, True):
        assert np.allclose(ops.log_softmax(x, reference=reference), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("where", [0, 300, 4095])
def test_log_softmax_of_a_row_without_a_distribution_is_nan(variant, bad, where):
    # The kernel's exp clamps its input, so a NaN would otherwise count as exp(-88): checked
    # separately, anywhere in the row; the other rows are untouched.
    x = rand(2, 4096, seed=18, scale=3.0)
    if bad == "all -inf":
        x[0] = -np.inf
    else:
        x[0, where] = np.nan if bad == "nan" else np.inf
    for reference in (False, True):
        out = ops.log_softmax(x, reference=reference)
        assert np.isnan(out[0]).all()
        assert np.isfinite(out[1]).all()


def attention_ref(q, k, v, dtype=np.float64):
    q, k, v = (t.astype(dtype) for t in (q, k, v))
    T, D = q.shape[-2], q.shape[-1]
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(dtype(D))
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("t", [1, 3, 16, 17, 33, 97])
@pytest.mark.parametrize("d", [1, 24, 59, 64, 111])
def test_attention(variant, t, d):
    b, h = 2, 3
    q, k, v = rand(b, h, t, d, seed=17), rand(b, h, t, d, seed=18), rand(b, h, t, d, seed=19)
    out = ops.attention(q, k, v)
    exact = attention_ref(q, k, v)
    # The error against float64 may be at most twice that of a straightforward float32 version.
    naive_err = np.abs(attention_ref(q, k, v, np.float32) - exact).max()
    err = np.abs(out - exact).max()
    assert err <= 2 * naive_err + 1e-6, (err, naive_err)


def test_attention_long_sequence(variant):
    q, k, v = (rand(1, 2, 1025, 64, seed=s, scale=0.5) for s in (20, 21, 22))
    out = ops.attention(q, k, v)
    exact = attention_ref(q, k, v)
    naive_err = np.abs(attention_ref(q, k, v, np.float32) - exact).max()
    assert np.abs(out - exact).max() <= 2 * naive_err + 1e-6


def to_bf16(x):
    """x rounded to bfloat16 (nearest, ties to even), back as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("t", [1, 3, 17, 33, 97])
@pytest.mark.parametrize("d", [1, 24, 59, 64, 111])
def test_attention_bfloat16_kv(variant, t, d):
    """A bfloat16 KV cache: the kernel equals exact attention over k and v rounded to bfloat16
    (the query and the arithmetic stay float32), within the float32 2x rule."""
    b, h = 2, 3
    q, k, v = rand(b, h, t, d, seed=27), rand(b, h, t, d, seed=28), rand(b, h, t, d, seed=29)
    out = ops.attention(q, k, v, kv_dtype="bfloat16")
    kr, vr = to_bf16(k), to_bf16(v)
    exact = attention_ref(q, kr, vr)
    naive_err = np.abs(attention_ref(q, kr, vr, np.float32) - exact).max()
    assert np.abs(out - exact).max() <= 2 * naive_err + 1e-6
    # ... and it is not the float32 cache's result (the rounding is really there) unless t == 1
    # and v alone decides the output (then v's rounding still shows).
    assert not np.array_equal(out, ops.attention(q, k, v))


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("t,d", [(1, 7), (19, 64), (40, 33)])
def test_attention_against_reference_kernel(variant, kv_dtype, t, d):
    """The tiled online-softmax kernel against the plain reference kernel on the same paged blocks."""
    q, k, v = rand(2, 3, t, d, seed=30), rand(2, 3, t, d, seed=31), rand(2, 3, t, d, seed=32)
    fast = ops.attention(q, k, v, kv_dtype=kv_dtype)
    ref = ops.attention(q, k, v, kv_dtype=kv_dtype, reference=True)
    np.testing.assert_allclose(fast, ref, rtol=2e-5, atol=2e-6)


def test_attention_rejects_bad_input():
    with pytest.raises(llamas.LlamasError, match=r"\[attention\]"):
        ops.attention(rand(1, 2, 3, 4), rand(1, 2, 3, 4), rand(1, 2, 3, 5))
    with pytest.raises(llamas.LlamasError, match="head dimension"):
        ops.attention(rand(1, 1, 2, 300), rand(1, 1, 2, 300), rand(1, 1, 2, 300))
    with pytest.raises(llamas.LlamasError, match="kv_dtype must be 'float32', 'bfloat16' or 'int8', got 'float16'"):
        ops.attention(rand(1, 1, 2, 4), rand(1, 1, 2, 4), rand(1, 1, 2, 4), kv_dtype="float16")


def test_thread_count_does_not_change_results():
    a, b = rand(70, 300, seed=23), rand(300, 200, seed=24)
    before = llamas.get_num_threads()
    try:
        llamas.set_num_threads(1)
        one = ops.matmul(a, b)
        llamas.set_num_threads(3)
        three = ops.matmul(a, b)
    finally:
        llamas.set_num_threads(before)
    np.testing.assert_array_equal(one, three)
    for bad in (0, 1025, True, 2.5, "2"):
        with pytest.raises(llamas.LlamasError, match="thread count"):
            llamas.set_num_threads(bad)


def test_memory_stats_track_allocations():
    llamas.ops.matmul(rand(64, 64), rand(64, 64))
    stats = llamas.memory_stats()
    for key in ("bytes_in_use", "peak_bytes_in_use", "allocations", "cache_hits", "kv_cache_blocks_in_use"):
        assert key in stats
    before = stats["cache_hits"]
    for _ in range(3):
        llamas.ops.matmul(rand(64, 64), rand(64, 64))
    after = llamas.memory_stats()
    assert after["cache_hits"] > before
    assert after["peak_bytes_in_use"] >= after["bytes_in_use"]


def test_cached_blocks_serve_requests_down_to_half_their_size():
    # Sizes no other test uses: a cached 3 x 7001 float32 output (84 KB, class 96 KiB) serves the
    # outputs of classes 80, 56 and 48 KiB, so a server's shifting batch shapes reuse blocks
    # instead of reserving new ones.
    a = rand(3, 16)
    llamas.ops.matmul(a, rand(16, 7001))
    reserved = llamas.memory_stats()["bytes_reserved"]
    for n in (6000, 4500, 3700):
        np.testing.assert_allclose(llamas.ops.matmul(a, b := rand(16, n)), a @ b, rtol=1e-5, atol=1e-5)
        assert llamas.memory_stats()["bytes_reserved"] == reserved, n


def test_mid_sized_blocks_share_slabs_and_go_back_whole():
    # Blocks of 128 KiB - 2 MiB are carved from 16 MiB huge-page slabs: 40 live outputs of ~320
    # KB each span slabs without overlapping (each keeps its own product), and once all are freed
    # empty_cache returns the slabs they filled (reserved bytes back where they were).
    llamas.empty_cache()
    before = llamas.memory_stats()["bytes_reserved"]
    a = rand(4, 16, seed=3)
    bs = [rand(16, 20000 + 16 * i, seed=100 + i) for i in range(40)]
    outs = [ops.matmul(a, b) for b in bs]
    for b, out in zip(bs, outs):
        np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)
    assert llamas.memory_stats()["bytes_reserved"] - before >= 40 * 4 * 20000 * 4
    del outs, out
    llamas.empty_cache()
    after = llamas.memory_stats()
    assert after["bytes_reserved"] <= before
    assert after["bytes_reserved"] >= after["bytes_in_use"] + after["bytes_cached"]


def test_unknown_kernel_variant_is_refused():
    with pytest.raises(llamas.LlamasError, match="not available"):
        ops.set_kernel_variant("avx9000")


def test_hiding_the_best_variants_feature_falls_back_to_the_next_variant():
    # x86-64: without avx512f the avx2 variant runs (without avx2 too, generic); AArch64: without
    # neon, generic. The other architecture's features are listed and all off.
    import os
    import platform
    import subprocess
    import sys
    features = llamas._C.cpu_features()
    x86 = ("avx2", "avx512f", "avx512_vnni")
    arm = ("neon", "asimd_dotprod", "arm_bf16", "arm_i8mm")
    assert set(x86 + arm) <= set(features)
    machine = platform.machine().lower()
    other = arm if machine in ("x86_64", "amd64") else x86 if machine in ("aarch64", "arm64") else ()
    assert not any(features[name] for name in other), features
    variants = llamas.info()["available_kernel_variants"]
    hide_to_expected = {"avx512f": "avx2" if "avx2" in variants else "generic", "avx512f,avx2": "generic",
                        "neon": "generic"}
    for hide, expected in hide_to_expected.items():
        if not any(features[name] for name in hide.split(",")):
            continue
        env = dict(os.environ, LLAMAS_CPU_HIDE=hide)
        env.pop("LLAMAS_KERNEL", None)
        out = subprocess.run([sys.executable, "-c", "import llamas; print(llamas._C.kernel_variant())"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == expected, (hide, out.stdout, out.stderr)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("n", [1, 16, 61, 300])
def test_streamed_panels_give_the_same_bits(variant, dtype, n):
    # Weights a model reads from memory (larger than the last-level cache: streamed=True) run one
    # row one panel at a time instead of several side by side: the same bits as the tiles for
    # weights in cache at every row count, with a ragged last panel and an odd K.
    k = 203
    x, w, bias = rand(9, k, seed=31), rand(k, n, seed=32, scale=0.1), rand(n, seed=33)
    cached, streamed = ops.pack(w, weight_dtype=dtype), ops.pack(w, weight_dtype=dtype, streamed=True)
    assert streamed.streamed and not cached.streamed
    for m in range(1, 10):
        got = ops.linear(x[:m], streamed, bias, gelu=m % 2 == 0)
        np.testing.assert_array_equal(got, ops.linear(x[:m], cached, bias, gelu=m % 2 == 0), err_msg=f"{m} rows")
        if dtype == "float32" and m % 2:
            assert_close(got, x[:m].astype(np.float64) @ w + bias, scale=matmul_scale(x[:m], np.abs(w)) + np.abs(bias))
