"""llamas against reference outputs of Hugging Face transformers (torch float32), stored in
tests/fixtures/ by tools/make_fixtures.py. Needs only numpy and llamas: no torch, no transformers."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import llamas
from llamas.tokenizer import Tokenizer

NEW_TOKENS = 20


class Case:
    def __init__(self, folder):
        self.folder = folder
        data = np.load(folder / "expected.npz")
        self.input_ids = data["input_ids"]            # (2, T)
        self.logits = data["logits"]                  # (2, T, V) float32
        self.greedy_ids = data["greedy_ids"]          # (2, NEW_TOKENS), eos not masked
        self.meta = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
        self.eos = self.meta["eos_token_id"]
        self.scale = max(1.0, float(np.abs(self.logits).max()))

    def expected_new_ids(self, row):
        """What llamas should return: the reference ids up to (excluding) the first EOS."""
        ids = self.greedy_ids[row].tolist()
        return ids[:ids.index(self.eos)] if self.eos in ids else ids


@pytest.fixture(scope="module")
def model(case):
    return llamas.load(case.folder)


# ---- a tiny safetensors reader / writer (no safetensors package) ---------------------------------
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    """Returns (tensors as {name: (dtype str, shape, raw bytes)}, metadata or None)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensors[name] = (info["dtype"], list(info["shape"]), raw[base + start:base + end])
    return tensors, meta


def write_safetensors(path, tensors, meta=None):
    header, chunks, offset = {}, [], 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for c in chunks:
            f.write(c)


# ---- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_call_in_fresh_process(fixtures_dir, dtype):
    # The very first parallel region of a process (here: load, then forward and generate, with
    # nothing touching the thread pool before) must not hang. Run in a child with a time limit so
    # a hang shows up as a failure, not a stuck test run; in this process the pool is already warm.
    code = ("import sys, llamas; m = llamas.load(sys.argv[1], dtype=sys.argv[2]); "
            "print(m.forward([[1, 2, 3]]).shape, len(m.generate([1, 2, 3], max_new_tokens=3)))")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(llamas.__file__))] + [p for p in [env.get("PYTHONPATH")] if p])
    try:
        out = subprocess.run([sys.executable, "-c", code, str(fixtures_dir / "gpt2-tiny"), dtype], env=env,
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load + first forward ({dtype}) in a fresh process did not finish in 60 s")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] in {"0", "1", "2", "3"}


def test_fixture_sanity(case):
    # Guards against a broken fixture rather than a broken engine.
    assert case.input_ids.shape[0] == 2 and case.logits.shape[:2] == case.input_ids.shape
    assert case.greedy_ids.shape == (2, NEW_TOKENS)
    for row in case.greedy_ids.tolist():
        assert len(set(row)) > 5, f"degenerate greedy continuation {row}"


def test_config(case, model):
    assert model.config.vocab_size == case.logits.shape[-1]
    assert model.tokenizer is not None and model.tokenizer.eos_token_id == case.eos


def test_logits_match(case, model):
    got = model.forward(case.input_ids)
    assert got.dtype == np.float32 and got.shape == case.logits.shape
    err = np.abs(got.astype(np.float64) - case.logits)
    where = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= 1e-4 * case.scale, (
        f"max |logit error| {err.max():.3g} at {where} > {1e-4 * case.scale:.3g} (scale {case.scale:.3g})")


def test_logits_single_rows_match_batch(case, model):
    # Each row alone gives the same logits as inside the batch (within float32 rounding).
    batch = model.forward(case.input_ids)
    for row in range(case.input_ids.shape[0]):
        alone = model.forward(case.input_ids[row:row + 1])
        np.testing.assert_allclose(alone[0], batch[row], rtol=0, atol=1e-5 * case.scale)


def test_tokenizer_matches_fixture(case, model):
    assert model.tokenizer.encode(case.meta["prompt_text"]) == case.input_ids[0].tolist()
    assert model.tokenizer.encode(case.meta["prompt_texts"][1]) == case.input_ids[1].tolist()


@pytest.mark.parametrize("row", [0, 1])
def test_greedy_ids(case, model, row):
    got = model.generate(case.input_ids[row].tolist(), max_new_tokens=NEW_TOKENS)
    assert got == case.expected_new_ids(row)


def test_batch_equals_single(case, model):
    prompts = [case.input_ids[0].tolist(), case.input_ids[1].tolist()]
    batch = model.generate(prompts, max_new_tokens=NEW_TOKENS)
    alone = [model.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    assert batch == alone
    assert batch == [case.expected_new_ids(0), case.expected_new_ids(1)]


def test_batch_of_different_lengths(case, model):
    # A shorter first prompt must not disturb the second (nor the other way round).
    prompts = [case.input_ids[0, :5].tolist(), case.input_ids[1].tolist()]
    batch = model.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert batch[1] == case.expected_new_ids(1)
    assert batch[0] == model.generate(prompts[0], max_new_tokens=NEW_TOKENS)


def test_greedy_text(case, model):
    text = model.generate(case.meta["prompt_text"], max_new_tokens=NEW_TOKENS)
    assert text == case.meta["greedy_text"]
    ids = model.generate(model.tokenizer.encode(case.meta["prompt_text"]), max_new_tokens=NEW_TOKENS)
    assert model.tokenizer.decode(ids) == case.meta["greedy_text"]


def test_bfloat16_close_to_float32(case, model):
    bf = llamas.load(case.folder, dtype="bfloat16")
    assert bf.dtype == "bfloat16"
    got = bf.forward(case.input_ids).astype(np.float64)
    ref = case.logits.astype(np.float64)
    diff = np.abs(got - ref)
    assert diff.max() < 0.05 * case.scale, f"bf16 max |diff| {diff.max():.3g} >= {0.05 * case.scale:.3g}"
    # An argmax may only flip where the float32 top-1/top-2 gap is within the bf16 error: with every
    # logit off by at most d, a gap over 2d cannot close. Wider gaps must keep their argmax.
    top2 = np.sort(ref, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    d = diff.max(axis=-1)
    agree = got.argmax(-1) == ref.argmax(-1)
    assert np.all(agree | (gap <= 2 * d)), "bf16 argmax flipped where the float32 gap exceeds twice the error"
    assert agree.mean() >= 0.75, f"bf16 argmax agrees at only {agree.mean():.0%} of positions"


def test_bfloat16_checkpoint_is_the_same_model_at_either_dtype(case, tmp_path):
    """A checkpoint stored in bfloat16 holds values float32 represents exactly, and every GEMM path
    sums in the same order: loaded as bfloat16 (bfloat16 panels; token embeddings read from the
    interleaved lm_head panels) or as float32 (float32 panels; embeddings from the stored table), its
    logits are bit-identical."""
    tensors, meta = read_safetensors(case.folder / "model.safetensors")
    as_bf16 = {}
    for name, (dtype, shape, raw) in tensors.items():
        bits = np.frombuffer(raw, np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        as_bf16[name] = ("BF16", shape, rounded.tobytes())
    folder = tmp_path / "bf16"
    shutil.copytree(case.folder, folder)
    write_safetensors(folder / "model.safetensors", as_bf16, meta)
    bf = llamas.load(folder, dtype="bfloat16", kv_dtype="float32")
    f32 = llamas.load(folder, dtype="float32")
    ids = np.concatenate([case.input_ids, np.arange(case.input_ids.shape[1])[None] % bf.config.vocab_size])
    assert np.array_equal(bf.forward(ids), f32.forward(ids))


def test_kv_dtype_defaults_to_the_weights_and_can_be_chosen(case, model):
    assert model.kv_dtype == "float32"
    assert llamas.load(case.folder, dtype="bfloat16").kv_dtype == "bfloat16"
    # A float32 model with a bfloat16 cache: only keys and values are rounded, so its logits stay
    # within the bfloat16 tolerance of the float32 ones, and differ from them.
    half_kv = llamas.load(case.folder, kv_dtype="bfloat16")
    assert (half_kv.dtype, half_kv.kv_dtype) == ("float32", "bfloat16")
    got = half_kv.forward(case.input_ids).astype(np.float64)
    diff = np.abs(got - case.logits.astype(np.float64))
    assert 0 < diff.max() < 0.05 * case.scale
    full_kv = llamas.load(case.folder, dtype="bfloat16", kv_dtype="float32")
    assert full_kv.kv_dtype == "float32"
    assert not np.array_equal(full_kv.forward(case.input_ids), llamas.load(case.folder, dtype="bfloat16").forward(case.input_ids))
    with pytest.raises(llamas.LlamasError, match="kv_dtype must be 'float32', 'bfloat16' or 'int8'"):
        llamas.load(case.folder, kv_dtype="float16")


@pytest.mark.parametrize("dtype,kv_dtype,compute_dtype", [
    ("bfloat16", "float32", "float32"), ("bfloat16", "bfloat16", "float32"), ("bfloat16", "bfloat16", "bfloat16"),
    ("int8", "bfloat16", "float32"), ("int8", "float32", "float32"), ("int8", "bfloat16", "bfloat16"),
    ("int8", "int8", "bfloat16"), ("bfloat16", "int8", "float32"), ("int8", "bfloat16", "int8"), ("int8", "int8", "int8")])
def test_decode_rows_equal_prefill_rows(case, dtype, kv_dtype, compute_dtype):
    # Decoding reads the keys and values the cache stored (rounded or not) exactly as a prefill
    # over the same tokens does, and a one-row product sums as a many-row one (bfloat16 compute
    # and int8 weights too), so greedy decode is the argmax chain of one forward pass.
    m = llamas.load(case.folder, dtype=dtype, kv_dtype=kv_dtype, compute_dtype=compute_dtype)
    prompt = case.input_ids[0, :5].tolist()
    out = m.generate(prompt, max_new_tokens=8)
    logits = m.forward(np.array([prompt + out[:-1]], dtype=np.int32))[0]
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == out
    # A batch equals each prompt alone.
    prompts = [prompt, case.input_ids[1, :3].tolist()]
    assert m.generate(prompts, max_new_tokens=6) == [m.generate(p, max_new_tokens=6) for p in prompts]


def test_bfloat16_kv_cache_holds_half_the_bytes(case):
    sizes = {}
    for kv_dtype in ("float32", "bfloat16"):
        m = llamas.load(case.folder, kv_dtype=kv_dtype)
        seq = llamas._C.Sequence(m.config.to_native(), seed=0)
        before = llamas.memory_stats()["kv_cache_bytes_in_use"]
        m._native.step([(seq, case.input_ids[0, :20].tolist(), True)])
        sizes[kv_dtype] = (seq.kv_blocks, seq.kv_bytes)
        assert llamas.memory_stats()["kv_cache_bytes_in_use"] - before == seq.kv_bytes
        # One model's cache cannot be continued by a model writing the other dtype.
        other = llamas.load(case.folder, kv_dtype="bfloat16" if kv_dtype == "float32" else "float32")
        with pytest.raises(llamas.LlamasError, match="KV cache holds"):
            other._native.step([(seq, [1], True)])
        seq.release()
    assert sizes["float32"][0] == sizes["bfloat16"][0] > 0
    assert sizes["float32"][1] == 2 * sizes["bfloat16"][1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_save_keeps_the_checkpoint_values(case, tmp_path, dtype):
    # A loaded model computes from its packed panels; what it saves are the checkpoint's own
    # tensors, unchanged (a bfloat16 or int8 model does not round the float32 file it came from).
    loaded = llamas.load(case.folder, dtype=dtype)
    loaded.save(tmp_path / "saved")
    original, _ = read_safetensors(case.folder / "model.safetensors")
    saved, _ = read_safetensors(tmp_path / "saved" / "model.safetensors")
    assert set(saved) <= set(original) and "transformer.h.0.attn.c_attn.weight" in saved
    for name, value in saved.items():
        assert value == original[name], name
    again = llamas.load(tmp_path / "saved", dtype=dtype)
    np.testing.assert_array_equal(again.forward(case.input_ids), loaded.forward(case.input_ids))


def test_weights_without_transformer_prefix(case, model, tmp_path):
    tensors, meta = read_safetensors(case.folder / "model.safetensors")
    assert any(k.startswith("transformer.") for k in tensors)
    stripped = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()}
    assert not any(k.startswith("transformer.") for k in stripped)
    write_safetensors(tmp_path / "model.safetensors", stripped, meta)
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(case.folder / f, tmp_path / f)
    other = llamas.load(tmp_path)
    np.testing.assert_array_equal(other.forward(case.input_ids), model.forward(case.input_ids))


def test_safetensors_roundtrip_helpers(case, tmp_path):
    # The helpers above rewrite a file byte-for-byte when nothing changes (tensors, order, meta).
    tensors, meta = read_safetensors(case.folder / "model.safetensors")
    write_safetensors(tmp_path / "copy.safetensors", tensors, meta)
    again, meta2 = read_safetensors(tmp_path / "copy.safetensors")
    assert again == tensors and meta2 == meta
    dtype, shape, data = tensors["transformer.wte.weight"]
    wte = np.frombuffer(data, dtype=_NP_DTYPES[dtype]).reshape(shape)
    assert wte.shape == (case.logits.shape[-1], model_width(case))


def model_width(case):
    return json.loads((case.folder / "config.json").read_text())["n_embd"]


def test_gpt2_tokenizer(fixtures_dir):
    tok = Tokenizer.from_folder(str(fixtures_dir / "gpt2-tokenizer"))
    assert tok.vocab_size == 50257
    assert tok.eos_token_id == 50256
    ids = tok.encode("Hello world")
    assert ids == [15496, 995]
    assert tok.decode(ids) == "Hello world"
    text = "The quick brown fox, naïve café — ok?"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_prefix_rows_bit_identical_at_every_length(case, kv_dtype):
    # Prefill attention serves query rows in groups (6 on AVX2), and the rows left over one at a
    # time, as decode does: a prompt cut at any length must give bit for bit the rows it gives
    # inside a longer prompt, whichever way its rows were grouped.
    m = llamas.load(case.folder, kv_dtype=kv_dtype)
    ids = case.input_ids[:1]
    full = m.forward(ids)
    for n in sorted({1, 2, 5, 6, 7, 11, 12, 13, ids.shape[1] - 1}):
        if 0 < n < ids.shape[1]:
            np.testing.assert_array_equal(m.forward(ids[:, :n]), full[:, :n])
