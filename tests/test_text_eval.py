"""`llamas eval --file`: perplexity of a text through the inference engine, in sliding windows."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import llamas
from llamas._C import LlamasError
from llamas.text_eval import text_perplexity, windows

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")
TEXT = ("When shall we three meet again\nIn thunder, lightning, or in rain?\nWhen the hurlyburly's done,\n"
        "When the battle's lost and won.\nThat will be ere the set of sun.\n") * 3


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.mark.parametrize("n, seq, stride", [(2, 2, 1), (10, 4, 4), (100, 16, 5), (101, 16, 16), (37, 40, 7)])
def test_windows_count_every_token_once_with_enough_context(n, seq, stride):
    counted = []
    for b, e, first in windows(n, seq, stride):
        assert e - b <= seq and b < first <= e
        for pos in range(first, e):
            counted.append(pos)
            if b > 0:
                assert pos - b >= seq - stride  # context inside its window
    if stride < seq:
        assert counted == list(range(1, n))
    else:  # non-overlapping windows cannot predict a window's first token
        assert counted == [p for p in range(1, n) if p % seq != 0]


def reference_nll(model, ids, seq, stride):
    total, count = 0.0, 0
    for b, e, first in windows(len(ids), seq, stride):
        logits = model.forward(np.array([ids[b:e]]))[0].astype(np.float64)
        z = logits - logits.max(-1, keepdims=True)
        ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
        for pos in range(first, e):
            total -= ls[pos - b - 1, ids[pos]]
            count += 1
    return total / count, count


@pytest.mark.parametrize("seq, stride, batch", [(128, 64, 8), (32, 9, 3), (17, 17, 1)])
def test_text_perplexity_matches_a_forward_pass_reference(model, seq, stride, batch):
    ids = model.tokenizer.encode(TEXT)
    r = text_perplexity(model, ids, seq, stride, batch)
    want, count = reference_nll(model, ids, seq, stride)
    assert r["tokens"] == count and abs(r["nll"] - want) < 1e-5
    assert r["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_text_perplexity_refuses_too_little_text(model):
    with pytest.raises(LlamasError, match="at least 2 are needed"):
        text_perplexity(model, [5], 8, 4)
    with pytest.raises(LlamasError, match="stride <= seq"):
        text_perplexity(model, [5, 6, 7], 8, 9)


def run_eval(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "llamas", "eval", "--model", TINY, *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_eval_file(model, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    r = run_eval("--file", str(path), "--seq", "32", "--stride", "9")
    assert r.returncode == 0, r.stderr
    want, count = reference_nll(model, model.tokenizer.encode(TEXT), 32, 9)

    def reported(out):
        m = re.search(r"loss ([0-9.]+) nats/token, perplexity ([0-9.]+) \(([0-9,]+) tokens", out)
        assert m, out
        return float(m.group(1)), float(m.group(2)), int(m.group(3).replace(",", ""))
    loss, ppl, tokens = reported(r.stdout)
    assert tokens == count and loss == pytest.approx(want, abs=1e-4) and ppl == pytest.approx(math.exp(want), rel=1e-4)
    assert "float32 weights, float32 KV cache" in r.stdout and "24/24 windows" in r.stderr
    r = run_eval("--file", "-", "--seq", "32", "--stride", "9", stdin=TEXT)
    assert r.returncode == 0 and reported(r.stdout) == (loss, ppl, tokens), r.stderr
    r = run_eval("--file", str(path), "--dtype", "bfloat16", "--kv-dtype", "bfloat16", "--max-tokens", "50")
    assert r.returncode == 0 and "(49 tokens" in r.stdout and "bfloat16 weights, bfloat16 KV cache" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--file", "X", "--data", "Y"], "not allowed with argument"),
    (["--data", "Y", "--stride", "4"], "--stride applies to --file only"),
    (["--file", "T", "--seq", "8", "--stride", "9"], "--stride 9 is longer than --seq 8"),
    (["--file", "T", "--seq", "4096"], "exceeds the model's context"),
    (["--file", "SHORT"], "at least 2 are needed"),
    (["--file", "BAD"], "is not UTF-8"),
    (["--file", "NONE"], "cannot read the text from"),
    ([], "one of the arguments --data --file is required"),
])
def test_cli_eval_file_errors(tmp_path, args, fragment):
    (tmp_path / "T").write_text(TEXT, encoding="utf-8")
    (tmp_path / "SHORT").write_text("W", encoding="utf-8")
    (tmp_path / "BAD").write_bytes(b"ok \xff")
    (tmp_path / "Y").mkdir()
    args = [str(tmp_path / a) if a in ("X", "Y", "T", "SHORT", "BAD", "NONE") else a for a in args]
    r = run_eval(*args)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
