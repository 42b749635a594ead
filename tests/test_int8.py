"""int8 weights: quantized at packing (each column, 32 rows at a time, as int8 times one float32
scale), turned back into q * scale inside the GEMM. The quantization is checked against its numpy
definition, and every int8 product bit for bit against the float32 product over the dequantized
weights, on every kernel variant and row count (so batch invariance carries over)."""
import os

import numpy as np
import pytest

import llamas
from llamas import ops

from conftest import rand  # noqa: E402  (the `variant` fixture is in conftest.py too)

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")


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
    if n > 1:                                     # ties: scale 1 (max 127), halves round to even
        w[:, 1] = np.resize(np.array([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5], np.float32), k)
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
    if n > 1 and k >= 7:
        assert got[:7, 1].tolist() == [127.0, 0.0, 2.0, 2.0, 0.0, -2.0, 126.0]


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


@pytest.mark.parametrize("k", [7, 64, 301])
def test_int8_with_bfloat16_compute_is_the_pair_sum_of_the_dequantized_weights(variant, k):
    # bfloat16 compute over int8 panels: each weight q * scale rounded to bfloat16, then the pair
    # sums of test_bf16_compute's definition; decode's chunked conversion and the blocked path's
    # per-block one give the same bits at every row count.
    from test_bf16_compute import pair_sum_definition
    n = 75
    x, w, bias = rand(130, k, seed=5), rand(k, n, seed=6, scale=0.1), rand(n, seed=7)
    packed = ops.pack(w, weight_dtype="int8")
    want = pair_sum_definition(x, ops.dequantize(packed), bias)
    for m in [1, 2, 3, 5, 12, 13, 16, 20, 40, 130]:
        got = ops.linear(x[:m], packed, bias, compute_dtype="bfloat16")
        np.testing.assert_array_equal(got, want[:m], err_msg=f"m={m}")


def test_int8_rejects_bad_input():
    w = rand(8, 5)
    with pytest.raises(llamas.LlamasError, match="weight_dtype must be 'float32', 'bfloat16' or 'int8', got 'int4'"):
        ops.pack(w, weight_dtype="int4")
    with pytest.raises(llamas.LlamasError, match="bfloat16 compute needs bfloat16 or int8 weights, got float32"):
        ops.linear(rand(2, 8), ops.pack(w), compute_dtype="bfloat16")
    with pytest.raises(llamas.LlamasError, match="dequantize.*expects int8 panels, got bfloat16"):
        ops.dequantize(ops.pack(w, weight_dtype="bfloat16"))
    with pytest.raises(llamas.LlamasError, match=r"input must be \(M, 8\)"):
        ops.linear(rand(2, 7), ops.pack(w, weight_dtype="int8"))
    for bad in (np.nan, np.inf):  # would poison (or silently clamp) a whole block: refused
        v = w.copy()
        v[5, 3] = bad
        with pytest.raises(llamas.LlamasError, match=r"int8 weights must be finite, got (nan|inf) at row 5 of column 3"):
            ops.pack(v, weight_dtype="int8")


# ---- models loaded with dtype="int8" ----------------------------------------------------------
import shutil  # noqa: E402

from test_gpt2_parity import read_safetensors, write_safetensors  # noqa: E402


def test_int8_model_is_the_float32_model_of_its_dequantized_weights(case, tmp_path):
    """The int8 model's logits are bit for bit those of a float32 model whose matrices are the
    dequantized int8 weights (Conv1D matrices quantized along their input rows, wte along its
    rows, as the tied lm_head reads it; token embeddings come from the same values): all of the
    int8 model's error is the quantization's."""
    tensors, meta = read_safetensors(case.folder / "model.safetensors")
    for name, (dtype, shape, raw) in tensors.items():
        w = np.frombuffer(raw, np.float32).reshape(shape)
        if name.endswith("wte.weight"):
            tensors[name] = (dtype, shape, np.ascontiguousarray(quantize_definition(np.ascontiguousarray(w.T)).T).tobytes())
        elif len(shape) == 2 and not name.endswith("wpe.weight"):
            tensors[name] = (dtype, shape, quantize_definition(w).tobytes())
    folder = tmp_path / "dequantized"
    shutil.copytree(case.folder, folder)
    write_safetensors(folder / "model.safetensors", tensors, meta)
    q = llamas.load(case.folder, dtype="int8", kv_dtype="float32")
    np.testing.assert_array_equal(q.forward(case.input_ids), llamas.load(folder).forward(case.input_ids))


def assert_close_to_float32(got, case):
    """An int8 model's logits against transformers' float32 ones. A quantization step is max |w| /
    127 of each 32 weights, coarser than bfloat16's 2^-8 of each weight where one weight of the
    block is much larger than the rest (these random fixtures' largest error: 1.4 at a logit scale
    of 12.5); argmaxes may only flip where the float32 gap is within twice the error."""
    ref = case.logits.astype(np.float64)
    diff = np.abs(got - ref)
    assert diff.max() < 0.15 * case.scale, f"int8 max |diff| {diff.max():.3g} >= {0.15 * case.scale:.3g}"
    top2 = np.sort(ref, axis=-1)[..., -2:]
    agree = got.argmax(-1) == ref.argmax(-1)
    assert np.all(agree | (top2[..., 1] - top2[..., 0] <= 2 * diff.max(axis=-1)))
    assert agree.mean() >= 0.75


def test_int8_model_close_to_float32(case):
    m = llamas.load(case.folder, dtype="int8")
    assert (m.dtype, m.kv_dtype, m.compute_dtype) == ("int8", "bfloat16", "float32")  # int8 is a weight format
    f32 = llamas.load(case.folder)
    assert m.weight_bytes < 0.5 * f32.weight_bytes
    got = m.forward(case.input_ids).astype(np.float64)
    ref = case.logits.astype(np.float64)
    assert_close_to_float32(got, case)
    # With bfloat16 compute on top (each dequantized weight and activation rounded to bfloat16).
    both = llamas.load(case.folder, dtype="int8", compute_dtype="bfloat16").forward(case.input_ids).astype(np.float64)
    assert np.abs(both - ref).max() < 0.15 * case.scale
    # Rows alone equal the batch; a float32 KV cache can be chosen.
    for row in range(case.input_ids.shape[0]):
        np.testing.assert_array_equal(m.forward(case.input_ids[row:row + 1])[0], got[row].astype(np.float32))
    assert llamas.load(case.folder, dtype="int8", kv_dtype="float32").kv_dtype == "float32"


def test_int8_load_names_a_tensor_that_cannot_be_quantized(case, tmp_path):
    tensors, meta = read_safetensors(case.folder / "model.safetensors")
    name = next(n for n in tensors if n.endswith("h.1.mlp.c_fc.weight"))
    dtype, shape, raw = tensors[name]
    w = np.frombuffer(raw, np.float32).copy()
    w[7] = np.nan
    tensors[name] = (dtype, shape, w.tobytes())
    folder = tmp_path / "corrupt"
    shutil.copytree(case.folder, folder)
    write_safetensors(folder / "model.safetensors", tensors, meta)
    with pytest.raises(llamas.LlamasError, match=r"tensor '.*h\.1\.mlp\.c_fc\.weight'.*must be finite, got nan"):
        llamas.load(folder, dtype="int8")
    llamas.load(folder)  # float32 loads it (and would propagate the NaN, as transformers does)


def test_int8_model_rejects_bad_combinations(case):
    with pytest.raises(llamas.LlamasError, match="dtype must be 'float32', 'bfloat16' or 'int8', got 'int4'"):
        llamas.load(case.folder, dtype="int4")
    with pytest.raises(llamas.LlamasError, match="kv_dtype must be 'float32', 'bfloat16' or 'int8'.*got 'int4'"):
        llamas.load(case.folder, dtype="int8", kv_dtype="int4")


# ---- int8 KV cache ------------------------------------------------------------------------------
def quantize_heads(x):
    """(B, H, T, D) -> what an int8 KV cache stands for: each (b, h, t) vector as int8 times
    max |x| / 127 (rounded to nearest even)."""
    scale = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inverse = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    return np.clip(np.rint(x * inverse), -127, 127).astype(np.float32) * scale


@pytest.mark.parametrize("t,d", [(1, 24), (17, 64), (33, 59), (97, 32)])
def test_attention_int8_kv(variant, t, d):
    """An int8 KV cache: the kernel equals exact attention over the quantized k and v (scores
    scaled per key, probabilities per value), within the float32 2x rule."""
    from test_kernels import attention_ref
    q, k, v = rand(2, 3, t, d, seed=40), rand(2, 3, t, d, seed=41), rand(2, 3, t, d, seed=42)
    out = ops.attention(q, k, v, kv_dtype="int8")
    kq, vq = quantize_heads(k), quantize_heads(v)
    exact = attention_ref(q, kq, vq)
    naive_err = np.abs(attention_ref(q, kq, vq, np.float32) - exact).max()
    assert np.abs(out - exact).max() <= 2 * naive_err + 1e-6
    assert np.abs(out - attention_ref(q, k, v)).max() > 1e-4  # the quantization is really there


def test_int8_kv_cache_bytes_and_accuracy(case):
    f32 = llamas.load(case.folder)
    m = llamas.load(case.folder, kv_dtype="int8")
    assert m.kv_dtype == "int8"
    got = m.forward(case.input_ids).astype(np.float64)
    assert np.abs(got - case.logits.astype(np.float64)).max() < 0.15 * case.scale
    cfg = m.config
    head_dim = cfg.n_embd // cfg.n_head
    seqs = {}
    for name, model in (("float32", f32), ("int8", m)):
        seq = llamas._C.Sequence(model.config.to_native(), seed=0)
        model._native.step([(seq, case.input_ids[0, :20].tolist(), True)])
        seqs[name] = seq
    blocks = seqs["int8"].kv_blocks
    assert seqs["float32"].kv_blocks == blocks > 0
    # Per block and layer, keys and values: 16 positions x n_head x (head_dim int8 + a float32 scale).
    assert seqs["int8"].kv_bytes == blocks * cfg.n_layer * 2 * 16 * cfg.n_head * (head_dim + 4)
    assert seqs["float32"].kv_bytes == blocks * cfg.n_layer * 2 * 16 * cfg.n_head * head_dim * 4
    for seq in seqs.values():
        seq.release()


CUT_WHILE_LOADED = """
import os, shutil, sys
import llamas
folder = sys.argv[1]
model = llamas.load(folder, dtype=sys.argv[2])
expected = model.generate("When shall we", max_new_tokens=6)
os.truncate(os.path.join(folder, "model.safetensors"), 0)  # as `cp new.safetensors` over it starts
assert model.generate("When shall we", max_new_tokens=6) == expected
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_loaded_model_reads_no_page_of_its_file(tmp_path, dtype):
    # Matrices are packed and vectors copied at load: the checkpoint cut short on disk while a model
    # runs changes nothing (the norms, biases and wpe were views of the mapping: SIGBUS).
    import shutil
    import subprocess
    import sys
    folder = tmp_path / "m"
    shutil.copytree(TINY, folder)
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(llamas.__file__)))
    env = dict(os.environ, PYTHONPATH=python_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CUT_WHILE_LOADED, str(folder), dtype], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-1000:])
