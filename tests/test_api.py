"""Python API, generation semantics, bad input and the CLI, on the tiny committed fixture."""
import gc
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import llamas

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "gpt2-tiny")


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


def test_info_reports_cpu_and_cuda():
    info = llamas.info()
    assert info["kernel_variant"] in info["available_kernel_variants"]
    assert info["cuda_available"] is False and llamas.cuda_available() is False
    assert info["threads"] >= 1
    assert isinstance(info["cpu"], str) and info["cpu"]


def _arm_cpuinfo(*cores):
    """A Linux AArch64 /proc/cpuinfo: one block per (implementer, part) given."""
    return "\n".join(f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes\n"
                     f"CPU implementer\t: {imp}\nCPU architecture: 8\nCPU variant\t: 0x3\n"
                     f"CPU part\t: {part}\nCPU revision\t: 1\n" for i, (imp, part) in enumerate(cores))


def test_arm_cpu_name_from_proc_cpuinfo():
    name = llamas._C._arm_cpu_name_from_cpuinfo
    assert name(_arm_cpuinfo(("0x41", "0xd0c"), ("0x41", "0xd0c"))) == "ARM Neoverse N1"  # Graviton2
    assert name(_arm_cpuinfo(*[("0x41", "0xd40")] * 64)) == "ARM Neoverse V1"
    # big.LITTLE (an RK3588): each kind once, in order, counted
    rk3588 = [("0x41", "0xd05")] * 4 + [("0x41", "0xd0b")] * 4
    assert name(_arm_cpuinfo(*rk3588)) == "ARM Cortex-A55 x4 + ARM Cortex-A76 x4"
    assert name(_arm_cpuinfo(("0xc0", "0xac3"))) == "Ampere AmpereOne"
    assert name(_arm_cpuinfo(("0x61", "0x039"))) == "implementer 0x61 part 0x039"  # unknown: the numbers
    # texts that name no ARM core: x86's, empty, a part without its implementer, values not numbers
    assert name("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n") == ""
    assert name("") == "" and name("CPU part\t: 0xd0c\n") == ""
    assert name("CPU implementer\t: ARM\nCPU part\t: 0xd0c\n") == ""
    assert name("CPU implementer : 0x41\r\nCPU part : 0xd0c\r\n") == "ARM Neoverse N1"


def test_generate_text_ids_and_batch(model):
    text = model.generate("When shall we", max_new_tokens=10)
    assert isinstance(text, str) and text
    ids = model.tokenizer.encode("When shall we")
    out_ids = model.generate(ids, max_new_tokens=10)
    assert isinstance(out_ids, list) and all(isinstance(i, int) for i in out_ids)
    assert model.tokenizer.decode(out_ids) == text
    batch = model.generate(["When shall we", "Alas, poor"], max_new_tokens=10)
    assert batch[0] == text and batch[1] == model.generate("Alas, poor", max_new_tokens=10)


def test_stream_equals_non_stream_and_never_splits_utf8(model):
    full = model.generate("When shall we", max_new_tokens=30)
    pieces = list(model.generate("When shall we", max_new_tokens=30, stream=True))
    assert "".join(pieces) == full
    ids = model.tokenizer.encode("When shall we")
    assert list(model.generate(ids, max_new_tokens=5, stream=True)) == model.generate(ids, max_new_tokens=5)


def test_stop_string_is_not_leaked(model):
    full = model.generate("When shall we", max_new_tokens=30)
    stop = full[5:8]
    cut = full[:full.find(stop)]
    assert model.generate("When shall we", max_new_tokens=30, stop=stop) == cut
    assert "".join(model.generate("When shall we", max_new_tokens=30, stop=[stop], stream=True)) == cut


def test_sampling_is_deterministic_per_seed(model):
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    a = model.generate("When shall we", seed=7, **kw)
    assert a == model.generate("When shall we", seed=7, **kw)
    outs = {model.generate("When shall we", seed=s, **kw) for s in range(5)}
    assert len(outs) > 1
    # A batch of prompts with one seed gives each prompt what it gives alone.
    assert model.generate(["When shall we", "Alas"], seed=7, **kw)[0] == a


def test_forward_shape_and_rows_independent_of_batch(model):
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    logits = model.forward(ids)
    assert logits.shape == (2, 4, model.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(model.forward(ids[1:]), logits[1:])


def test_generation_frees_kv_blocks(model):
    before = llamas.memory_stats()["kv_cache_blocks_in_use"]
    model.generate(["When shall we", "Alas"], max_new_tokens=20)
    assert llamas.memory_stats()["kv_cache_blocks_in_use"] == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=1e-320), "top_p.*float32"),  # positive, but 0 once the engine holds it as a float32
    (dict(repetition_penalty=1e-320), "repetition_penalty.*float32"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=-1), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-5), "seed"),
    (dict(seed=2 ** 64 + 5), r"seed must be an integer in \[0, 2\^64\)"),  # (was taken as seed 5)
    (dict(stop=5), "stop"),
    (dict(stream="no"), "stream must be True or False"),
])
def test_bad_sampling_parameters(model, kwargs, match):
    with pytest.raises(llamas.LlamasError, match=match):
        model.generate("When", **kwargs)


def test_forward_takes_a_batch_whose_total_passes_the_context(model):
    ctx = model.config.n_positions
    ids = np.arange(2 * (ctx - 1)).reshape(2, ctx - 1) % model.config.vocab_size  # 2 (ctx - 1) > ctx tokens in all
    out = model.forward(ids)
    assert out.shape == (2, ctx - 1, model.config.vocab_size)
    assert np.allclose(out[1], model.forward(ids[1:])[0], atol=1e-5)
    with pytest.raises(llamas.LlamasError, match=f"sequences of {ctx + 1} tokens but the context length is {ctx}"):
        model.forward(np.zeros((1, ctx + 1), dtype=np.int64))


def test_nan_weights_give_one_clear_error_and_no_logged_traceback(tmp_path, caplog):
    from llamas.safetensors_io import read_safetensors, write_safetensors
    folder = tmp_path / "nan"
    shutil.copytree(TINY, folder)
    tensors, meta = read_safetensors(str(folder / "model.safetensors"))
    tensors = {k: v.copy() for k, v in tensors.items()}
    name = next(k for k in tensors if k.endswith("ln_f.weight"))
    tensors[name][:] = np.nan
    write_safetensors(str(folder / "model.safetensors"), tensors, meta)
    broken = llamas.load(str(folder))
    with caplog.at_level(logging.INFO):
        with pytest.raises(llamas.LlamasError) as e:
            broken.generate("When shall we", max_new_tokens=3)
    assert not str(e.value).startswith("[generate] [") and "NaN" in str(e.value), str(e.value)
    assert "engine step failed" not in caplog.text  # (raised to the caller: logging it too said it twice)
    r = run_cli("generate", "--model", str(folder), "When shall we", "--max-new-tokens", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("llamas: error") == 1, r.stderr
    assert "engine step failed" not in r.stderr


def test_a_top_k_past_the_vocabulary_keeps_every_token(model):
    kw = dict(max_new_tokens=8, temperature=1.0, seed=4)
    assert model.generate("When", top_k=2 ** 40, **kw) == model.generate("When", top_k=0, **kw)


def test_bad_prompts(model):
    with pytest.raises(llamas.LlamasError, match="empty prompt"):
        model.generate("")
    with pytest.raises(llamas.LlamasError, match="empty prompt"):
        model.generate([])
    with pytest.raises(llamas.LlamasError, match="out of range"):
        model.generate([1, 99999])
    with pytest.raises(llamas.LlamasError, match="out of range"):
        model.forward([[1, -1]])
    with pytest.raises(llamas.LlamasError, match="context length"):
        model.generate([1] * (model.config.n_positions + 1))
    with pytest.raises(llamas.LlamasError, match="2-D"):
        model.forward([1, 2, 3])
    # A str that is not valid Unicode (tokenizers itself says only "TextInputSequence must be str").
    with pytest.raises(llamas.LlamasError, match="lone surrogate at character 2"):
        model.generate("ab\udcff")
    with pytest.raises(llamas.LlamasError, match="lone surrogate"):
        model.generate(["fine", "\ud800"])


def test_prompts_of_the_wrong_type_are_refused_not_converted(model):
    # bytes iterate as ints and int() truncates floats: both used to pass as (wrong) token ids.
    for prompt in (b"When", bytearray(b"When"), memoryview(b"When")):
        with pytest.raises(llamas.LlamasError, match="got " + type(prompt).__name__ + r" \(decode it to str first\)"):
            model.generate(prompt, max_new_tokens=2)
    with pytest.raises(llamas.LlamasError, match="token ids must be ints, got float64 1.5"):
        model.generate(np.array([1.5, 2.0]), max_new_tokens=2)
    with pytest.raises(llamas.LlamasError, match="token ids must be ints, got float 2.5"):
        model.generate([[1, 2.5]], max_new_tokens=2)
    with pytest.raises(llamas.LlamasError, match="not bools"):
        model.generate(np.array([True, False]), max_new_tokens=2)
    with llamas.Engine(model) as engine, pytest.raises(llamas.LlamasError, match="token ids must be ints"):
        engine.submit(np.array([1.0, 2.0]), max_new_tokens=2)
    # numpy integer ids are ids.
    ids = [int(i) for i in model.tokenizer.encode("When")]
    assert model.generate(np.array(ids, dtype=np.int64), max_new_tokens=3, temperature=0.0) == \
        model.generate(ids, max_new_tokens=3, temperature=0.0)


def test_generation_stops_at_context_end(model):
    n = model.config.n_positions
    out = model.generate([1] * (n - 3), max_new_tokens=50)
    assert len(out) <= 4


def _copy_model(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(TINY, dst)
    return dst


def test_missing_and_truncated_weights(tmp_path):
    d = _copy_model(tmp_path)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(llamas.LlamasError, match="truncated"):
        llamas.load(d)
    weights.write_bytes(b"\x01")
    with pytest.raises(llamas.LlamasError, match="too short"):
        llamas.load(d)
    weights.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(llamas.LlamasError, match="json"):
        llamas.load(d)
    weights.unlink()
    with pytest.raises(llamas.LlamasError, match="model.safetensors not found"):
        llamas.load(d)
    with pytest.raises(llamas.LlamasError, match="not a folder"):
        llamas.load(tmp_path / "nowhere")


def rewrite_header(path, edit):
    """The safetensors file at path with its JSON header changed by edit(header dict)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_a_model_folder_whose_name_is_not_utf8(tmp_path):
    folder = os.path.join(os.fsencode(str(tmp_path)), b"m\xffx")
    try:
        shutil.copytree(os.fsencode(TINY), folder)
    except OSError:
        pytest.skip("this file system takes only UTF-8 names")
    model = llamas.load(os.fsdecode(folder))  # (surrogate escapes, as sys.argv holds such a name)
    assert model.generate("When shall we", max_new_tokens=4) == llamas.load(TINY).generate("When shall we",
                                                                                         max_new_tokens=4)


def test_a_config_with_fewer_layers_than_the_weights_or_files_that_are_not_files(tmp_path):
    d = _copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layer"] -= 1  # (the checkpoint's last layer would be left out, silently)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llamas.LlamasError, match=f"the checkpoint has a layer {cfg['n_layer']} but config.json's "
                                                 f"n_layer is {cfg['n_layer']}"):
        llamas.load(d)
    cfg["n_layer"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    if hasattr(os, "mkfifo"):  # a pipe blocked the load forever
        os.remove(d / "model.safetensors")
        os.mkfifo(d / "model.safetensors")
        with pytest.raises(llamas.LlamasError, match="not a regular file"):
            llamas.load(d)
        os.remove(d / "config.json")
        os.mkfifo(d / "config.json")
        with pytest.raises(llamas.LlamasError, match="not a regular file"):
            llamas.load(d)


def test_bad_data_offsets_are_refused(tmp_path):
    d = _copy_model(tmp_path)
    weights = d / "model.safetensors"
    original = weights.read_bytes()

    def overlap(h):  # one layer norm's weight read from where another's is
        names = sorted(k for k in h if k.endswith("ln_1.weight"))
        h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
    rewrite_header(weights, overlap)
    with pytest.raises(llamas.LlamasError, match="overlap in the data section"):
        llamas.load(d)

    def backwards(h):
        name = next(k for k in h if k.endswith("ln_f.bias"))
        a, b = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b, a]
    weights.write_bytes(original)
    rewrite_header(weights, backwards)
    with pytest.raises(llamas.LlamasError, match="data_offsets that run backwards"):
        llamas.load(d)

    def overflow(h):
        name = next(k for k in h if k.endswith("ln_f.bias"))
        h[name]["shape"] = [2 ** 40, 2 ** 40]
    weights.write_bytes(original)
    rewrite_header(weights, overflow)
    with pytest.raises(llamas.LlamasError, match="element count overflows"):
        llamas.load(d)


def test_wrong_shape_dtype_and_model_type(tmp_path):
    d = _copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = cfg["n_embd"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llamas.LlamasError, match="shape"):
        llamas.load(d)
    cfg = json.loads(open(os.path.join(TINY, "config.json")).read())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llamas.LlamasError, match="model_type"):
        llamas.load(d)
    # A tensor stored as int32 instead of float.
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k.endswith("ln_f.weight"))
    header[name]["dtype"] = "I32"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(llamas.LlamasError, match="dtype I32"):
        llamas.load(d)
    with pytest.raises(llamas.LlamasError, match="dtype"):
        llamas.load(TINY, dtype="float8")


@pytest.mark.parametrize("key, value, match", [
    ("layer_norm_epsilon", "x", "layer_norm_epsilon must be a positive number"),
    ("layer_norm_epsilon", 0, "layer_norm_epsilon"),
    ("layer_norm_epsilon", 1e300, "layer_norm_epsilon"),
    ("n_inner", 0, "n_inner must be null or a positive integer"),
    ("n_inner", [], "n_inner"),
    ("eos_token_id", -1, "eos_token_id must be null or a token id"),
    ("eos_token_id", "x", "eos_token_id"),
    ("eos_token_id", [0, 1], "eos_token_id"),
    ("bos_token_id", -1, "bos_token_id"),
    ("scale_attn_weights", 0, "scale_attn_weights must be true or false"),
    ("scale_attn_by_inverse_layer_idx", "yes", "scale_attn_by_inverse_layer_idx"),
    ("tie_word_embeddings", False, "tie_word_embeddings is false"),
    ("reorder_and_upcast_attn", 1, "reorder_and_upcast_attn must be true or false"),
])
def test_bad_config_values_are_named(tmp_path, key, value, match):
    d = _copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llamas.LlamasError, match=match):
        llamas.load(d)


def test_null_eos_falls_back_to_the_tokenizer(tmp_path):
    d = _copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = cfg["bos_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    m = llamas.load(d)
    assert m.config.eos_token_id is None
    assert m.tokenizer.eos_token_id == m.tokenizer.token_to_id("<|endoftext|>") is not None


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llamas", *args], capture_output=True, text=True, timeout=120)


def test_cli_generate_matches_api(model):
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == model.generate("When shall we", max_new_tokens=12)


def test_cli_generate_reads_the_prompt_from_stdin_or_a_file(model, tmp_path):
    want = model.generate("When shall we", max_new_tokens=12)
    r = subprocess.run([sys.executable, "-m", "llamas", "generate", "--model", TINY, "-", "--max-new-tokens", "12"],
                       input="When shall we".encode(), capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.decode().rstrip("\n") == want, r.stderr
    (tmp_path / "p.txt").write_text("When shall we", encoding="utf-8")
    r = run_cli("generate", "--model", TINY, "--file", str(tmp_path / "p.txt"), "--max-new-tokens", "12", "--stats")
    assert r.returncode == 0 and r.stdout.rstrip("\n") == want, r.stderr
    n_prompt = len(model.tokenizer.encode("When shall we"))
    assert re.search(rf"\[stats\] prompt {n_prompt} tokens, generated 12 in [0-9.]+ s; time to first token [0-9.]+ ms, "
                     r"then [0-9.]+ tokens/s; 12 forward steps$", r.stderr.strip()), r.stderr
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    for args, fragment in ((["x", "--file", str(tmp_path / "p.txt")], "not both"),
                           ([], "no prompt: give it as an argument, or with --file"),
                           (["--file", str(tmp_path / "bad.txt")], "is not UTF-8 (byte 3)"),
                           (["--file", str(tmp_path / "none.txt")], "cannot read the prompt from"),
                           (["--file", str(tmp_path)], "cannot read the prompt from")):
        r = run_cli("generate", "--model", TINY, *args)
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_stream_counts_what_it_produced(model):
    stream = model.generate("When shall we", max_new_tokens=12, stream=True)
    assert stream.stats()["generated_tokens"] == 0
    text = "".join(stream)
    s = stream.stats()
    assert text == model.generate("When shall we", max_new_tokens=12)
    assert s["prompt_tokens"] == len(model.tokenizer.encode("When shall we")) and s["generated_tokens"] == 12
    assert 0 <= s["time_to_first_token_s"] <= s["total_s"]
    assert s["steps"] == 12 and s["draft_tokens"] == s["accepted_tokens"] == 0  # a prefill, then 11 decode steps
    ids = list(model.generate([5, 6, 7], max_new_tokens=4, stream=True))
    assert ids == model.generate([5, 6, 7], max_new_tokens=4)
    gc.collect()
    base = llamas.memory_stats()["kv_cache_blocks_in_use"]
    early = model.generate("When shall we", max_new_tokens=50, stream=True)
    next(early)
    assert llamas.memory_stats()["kv_cache_blocks_in_use"] > base
    early.close()                                  # frees its sequence now
    assert llamas.memory_stats()["kv_cache_blocks_in_use"] == base
    assert early.stats()["finish_reason"] == "cancelled" and early.stats()["generated_tokens"] == 1


def test_tiny_temperatures_sample_the_maximum(model):
    # 1/T large (1e30) or overflowing (subnormal T) must still pick the most likely token, never NaN.
    greedy = model.generate("When shall we", max_new_tokens=12)
    for t in (1e-30, 1e-45):
        assert model.generate("When shall we", max_new_tokens=12, temperature=t, seed=3) == greedy


def test_cli_kv_dtype_flag():
    half_kv = llamas.load(TINY, kv_dtype="bfloat16")
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "12", "--kv-dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == half_kv.generate("When shall we", max_new_tokens=12)
    r = run_cli("generate", "--model", TINY, "hi", "--kv-dtype", "float16")
    assert r.returncode == 2 and "--kv-dtype" in r.stderr


def test_cli_compute_dtype_flag():
    from llamas.server import create_app
    fast = llamas.load(TINY, dtype="bfloat16", compute_dtype="bfloat16")
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "12", "--dtype", "bfloat16",
                "--compute-dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == fast.generate("When shall we", max_new_tokens=12)
    r = run_cli("generate", "--model", TINY, "hi", "--compute-dtype", "bfloat16")  # float32 weights
    assert r.returncode != 0 and "compute_dtype='bfloat16' needs bfloat16 or int8 weights" in r.stderr
    with pytest.raises(llamas.LlamasError, match=r"\[serve\] compute_dtype='bfloat16' needs bfloat16 or int8 weights"):
        create_app(TINY, compute_dtype="bfloat16")
    # int8 compute (W8A8) with int8 weights; bfloat16 weights cannot take it.
    w8a8 = llamas.load(TINY, dtype="int8", compute_dtype="int8")
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "12", "--dtype", "int8",
                "--compute-dtype", "int8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == w8a8.generate("When shall we", max_new_tokens=12)
    r = run_cli("generate", "--model", TINY, "hi", "--dtype", "bfloat16", "--compute-dtype", "int8")
    assert r.returncode != 0 and "compute_dtype='int8' needs int8 weights" in r.stderr
    with pytest.raises(llamas.LlamasError, match=r"\[serve\] compute_dtype='int8' needs int8 weights"):
        create_app(TINY, dtype="bfloat16", compute_dtype="int8")


def test_cli_int8_dtype():
    quantized = llamas.load(TINY, dtype="int8")
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "12", "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == quantized.generate("When shall we", max_new_tokens=12)
    r = run_cli("bench", "--model", TINY, "--dtype", "int8", "-p", "8", "-n", "4", "-r", "1")
    assert r.returncode == 0 and "| int8, kv bfloat16 |" in r.stdout, r.stdout + r.stderr


def test_cli_help_info_bench_and_errors():
    for sub in ("generate", "info", "bench"):
        r = run_cli(sub, "--help")
        assert r.returncode == 0 and "usage" in r.stdout
    r = run_cli("info")
    assert r.returncode == 0 and "kernel_variant" in r.stdout
    r = run_cli("bench", "--model", TINY, "-p", "16", "-n", "8", "-r", "2")
    assert r.returncode == 0, r.stderr
    assert "pp16" in r.stdout and "tg8" in r.stdout and "±" in r.stdout
    r = run_cli("bench", "--model", TINY, "-p", "16", "-n", "8", "-r", "2", "-b", "1,3")
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| gpt2")]
    assert [(c[5].strip(), c[6].strip()) for c in rows] == [("1", "pp16"), ("1", "tg8"), ("3", "pp16"), ("3", "tg8")]
    r = run_cli("bench", "--model", TINY, "-b", "0")
    assert r.returncode == 2 and "batch sizes must be in [1, 256]" in r.stderr
    r = run_cli("generate", "--model", TINY, "hi", "--temperature", "-2")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = run_cli("generate", "--model", "/definitely/not/here", "hi")
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_cli_generate_says_when_the_context_ended_it():
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "500", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert re.search(r"stopped after \d+ tokens at the end of the model's context \(128 positions; the prompt took \d+\)",
                     r.stderr), r.stderr
    r = run_cli("generate", "--model", TINY, "When shall we", "--max-new-tokens", "5", "--ignore-eos")
    assert r.returncode == 0 and "context" not in r.stderr, r.stderr


def test_cli_generate_says_when_a_structured_output_was_cut_short():
    # The bundled model (byte-level BPE with an end-of-text token, so structured output works).
    r = run_cli("generate", "A record: ", "--json", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "the output is incomplete: --max-new-tokens ended it before it matched --json" in r.stderr, r.stderr
    r = run_cli("generate", "Answer:", "--choice", "yes", "--choice", "no", "--max-new-tokens", "50")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no") and "incomplete" not in r.stderr, r.stderr


def test_generation_stream_reports_its_finish_reason(model):
    s = model.generate("When shall we", max_new_tokens=4, ignore_eos=True, stream=True)
    assert s.stats()["finish_reason"] is None  # not ended yet
    "".join(s)
    assert s.stats()["finish_reason"] == "length"
    s = model.generate("When shall we", max_new_tokens=40, stop=[" "], stream=True)
    "".join(s)
    assert s.stats()["finish_reason"] == "stop"


def test_cli_generate_into_a_closed_pipe_exits_quietly():
    # `llamas generate ... | head -1`: the reader goes away mid-stream; no traceback.
    p = subprocess.Popen([sys.executable, "-m", "llamas", "generate", "--model", TINY, "When shall we",
                          "--max-new-tokens", "120", "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before it has started (imports, loading): its first write finds no reader
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_cli_version_and_flag_type_errors_name_what_was_expected():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llamas {llamas.__version__}"
    r = run_cli("generate", "hi", "--max-new-tokens", "abc")
    assert r.returncode == 2 and "argument --max-new-tokens: expected a positive integer, got 'abc'" in r.stderr
    r = run_cli("serve", "--port", "http")
    assert r.returncode == 2 and "argument --port: expected a port number in [0, 65535], got 'http'" in r.stderr
    r = run_cli("train", "--data", "d", "--steps", "1", "--lr", "fast")
    assert r.returncode == 2 and "argument --lr: expected a number >= 0, got 'fast'" in r.stderr
    assert "_int" not in r.stderr and "_float" not in r.stderr


def test_a_bad_generation_config_is_named_at_load(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(TINY, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 5.0, "top_k": None}))
    with pytest.raises(llamas.LlamasError, match=r"\[load\] .*generation_config.json: top_p must be in"):
        llamas.load(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.5, "top_k": None}))
    assert llamas.load(str(folder)).generation_config == {"do_sample": True, "top_p": 0.5}  # (null: not set)


def test_cli_bench_fits_its_default_lengths_to_a_short_context():
    # pp512 and tg128 are separate tests on new sequences: with 128 positions, pp runs 128 prompt
    # tokens and tg 127 tokens after its 1-token prompt, each with a note; lengths asked for must fit.
    r = run_cli("bench", "--model", TINY, "-r", "1")
    assert r.returncode == 0, r.stderr
    assert "pp128" in r.stdout and "tg127" in r.stdout, r.stdout
    assert "context is 128 positions, so pp's prompt: 128 tokens (default 512" in r.stderr
    assert "tg's tokens after its 1-token prompt: 127 tokens (default 128" in r.stderr
    r = run_cli("bench", "--model", TINY, "-p", "128", "-n", "127", "-r", "1")
    assert r.returncode == 0 and "default" not in r.stderr, r.stderr
    r = run_cli("bench", "--model", TINY, "-p", "129", "-n", "8")
    assert r.returncode == 2 and "--prompt-tokens 129 does not fit the model's context of 128 positions" in r.stderr
    r = run_cli("bench", "--model", TINY, "-p", "8", "-n", "128")
    assert r.returncode == 2 and "--gen-tokens 128 does not fit" in r.stderr and "at most 127" in r.stderr


def test_generation_config_sets_sampling_defaults(tmp_path):
    # A model folder's generation_config.json (Hugging Face's) supplies the sampling parameters a
    # caller leaves out; explicit arguments win; without do_sample it stays greedy.
    src = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.9, "top_k": 5, "repetition_penalty": 1.3}))
    configured, plain = llamas.load(str(folder)), llamas.load(src)
    prompt = "Hello, my name is"
    assert configured.generation_config == {"do_sample": True, "temperature": 0.9, "top_k": 5, "repetition_penalty": 1.3}
    sampled = configured.generate(prompt, max_new_tokens=12, seed=3)
    assert sampled == plain.generate(prompt, max_new_tokens=12, seed=3, temperature=0.9, top_k=5, repetition_penalty=1.3)
    assert configured.generate(prompt, max_new_tokens=12, temperature=0.0, repetition_penalty=1.0) == \
        plain.generate(prompt, max_new_tokens=12)
    configured.save(tmp_path / "saved")
    assert llamas.load(str(tmp_path / "saved")).generation_config == configured.generation_config
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.9}))
    assert llamas.load(str(folder)).generation_config == {}
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(llamas.LlamasError, match="generation_config.json"):
        llamas.load(str(folder))


def test_text_stream_decodes_incrementally_like_the_whole_sequence():
    # Byte-level tokenizers let the stream decode only the new tokens; the pieces must still add
    # up to decoding everything at once, whatever ids come (split UTF-8 characters included).
    from llamas.streaming import TextStream
    from llamas.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(os.path.join(FIXTURES, "gpt2-tokenizer"))
    assert tok.decodes_by_concatenation
    rng = np.random.default_rng(0)
    multibyte = tok.encode("naïve café — 日本語 🙂 ") * 3
    for trial in range(20):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, 40)] if trial % 2 else \
            [int(i) for i in rng.permutation(multibyte)]
        stream = TextStream(tok)
        text = "".join(stream.push(i) for i in ids) + stream.finish()
        assert text == tok.decode(ids)


def test_text_stream_with_the_bytes_table_gives_the_same_pieces():
    # Once the tokenizer's bytes table exists (an Engine builds it), streams look tokens up in it
    # instead of calling the tokenizer: every piece must be the same, stop strings, split UTF-8
    # characters, end-of-text and ids past the tokenizer's vocabulary included.
    from llamas.streaming import TextStream
    from llamas.tokenizer import Tokenizer
    plain = Tokenizer.from_folder(os.path.join(FIXTURES, "gpt2-tokenizer"))
    tabled = Tokenizer.from_folder(os.path.join(FIXTURES, "gpt2-tokenizer"))
    assert plain.piece_bytes(build=False) is None
    table = tabled.piece_bytes()
    assert len(table) == tabled.vocab_size and table[15496] == b"Hello" and table[995] == b" world"
    assert table[tabled.eos_token_id] == b"<|endoftext|>"
    rng = np.random.default_rng(1)
    multibyte = plain.encode("naïve café — 日本語 🙂 é") * 3 + [tabled.eos_token_id, tabled.vocab_size + 3]
    for trial in range(40):
        ids = [int(i) for i in rng.integers(0, plain.vocab_size, 40)] if trial % 2 else \
            [int(i) for i in rng.permutation(multibyte)]
        stop = [["é"], ["日本", "\ufffd"], [" the", "é —"], []][trial % 4]
        b, b_plain = TextStream(tabled, stop, include_stop=trial % 3 == 0), TextStream(plain, stop, include_stop=trial % 3 == 0)
        assert b._pieces is table and b_plain._pieces is None
        for i in ids:
            assert b.push(i) == b_plain.push(i)
            if b.stopped:
                break
        assert b.stopped == b_plain.stopped and b.finish() == b_plain.finish() and b.text == b_plain.text


def test_a_stop_strings_start_is_held_while_a_character_is_split():
    # "好" is three tokens of byte-level BPE here; with the stop "好好", the first "好" used to go out
    # when half of the second arrived (the held-back text ended in U+FFFD, not in "好").
    from llamas.streaming import TextStream
    from llamas.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(os.path.join(FIXTURES, "gpt2-tokenizer"))
    for stop, before in (("好好", ""), ("\n用户", "答案：好的"), ("🙂🙂é", "界好é"), ("é", "naïve caf")):
        ids = tok.encode(before + stop + " and more")
        for tabled in (False, True):
            if tabled:
                tok.piece_bytes()
            for _ in range(3):
                stream = TextStream(tok, [stop])
                out = ""
                for i in ids:
                    out += stream.push(i)
                    if stream.stopped:
                        break
                assert stream.stopped and out == before == stream.text, (stop, out)
    # end to end: the bundled model held to one choice, which holds the stop string
    bundled = llamas.load()
    assert bundled.generate("Q:", choices=["答案：好的\n用户：谢谢"], stop=["\n用户"], max_new_tokens=40) == "答案：好的"


def test_a_model_larger_than_the_cache_streams_its_weights_with_the_same_results(tmp_path):
    # Weights larger than the last-level cache (LLAMAS_LLC_BYTES stands in for a small cache) are
    # read one panel at a time by decode's products: the same logits and tokens, bit for bit.
    script = ("import llamas, numpy as np, sys; m = llamas.load(sys.argv[1]); "
              "ids = m.tokenizer.encode('Hello world'); "
              "np.save(sys.argv[2], m.forward([ids[:1]])); "
              "print(m.weights_streamed, llamas.info()['last_level_cache_bytes'], "
              "m.generate(ids, max_new_tokens=12), m.generate([ids, ids[:1]], max_new_tokens=6))")
    runs = {}
    for llc in ("1", str(1 << 40)):
        out = str(tmp_path / f"logits-{llc}.npy")
        env = dict(os.environ, LLAMAS_LLC_BYTES=llc, PYTHONPATH=os.pathsep.join(sys.path))
        r = subprocess.run([sys.executable, "-c", script, TINY, out], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[llc] = (r.stdout.split(" ", 2), np.load(out))
    (streamed, cache, tokens), logits = runs["1"]
    (cached, cache_big, tokens_big), logits_big = runs[str(1 << 40)]
    assert (streamed, cache, cached, cache_big) == ("True", "1", "False", str(1 << 40))
    assert tokens == tokens_big
    np.testing.assert_array_equal(logits, logits_big)
