"""llamas.profile(): per-op and per-layer-type time tables for inference and training, off by default."""
import os
import subprocess
import sys

import numpy as np
import pytest

import llamas
from llamas import ops

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


def test_nothing_is_recorded_outside_the_block(model):
    with llamas.profile():
        model.forward(np.array([[1, 2, 3]]))
    llamas._C.profiler_reset()
    model.forward(np.array([[1, 2, 3]]))  # profiling off again
    assert llamas._C.profiler_entries() == []


def test_forward_ops_and_layer_types(model):
    L = model.config.n_layer
    with llamas.profile() as prof:
        model.forward(np.array([[1, 2, 3, 4, 5]]))
    by_op = {name: calls for name, calls, _ in prof.by_op()}
    # Four products per layer and the lm_head; one attention and one KV write per layer.
    assert by_op["gemm"] == 4 * L + 1
    assert by_op["attention"] == by_op["kv_cache_write"] == L
    by_layer = {name: calls for name, calls, _ in prof.by_layer()}
    for region in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "attn.core", "attn.kv_write", "ln_1", "ln_2"):
        assert by_layer[region] == L, region
    assert by_layer["lm_head"] == 1 and by_layer["embedding"] == 1
    # Each op is counted once: both tables split the same total.
    total = sum(e[3] for e in prof.entries)
    assert sum(s for _, _, s in prof.by_op()) == pytest.approx(total)
    assert sum(s for _, _, s in prof.by_layer()) == pytest.approx(total)
    table = prof.table()
    assert "gemm" in table and "layer type" in table and "mlp.fc" in table


def test_generation_samples_in_its_own_layer_type(model):
    with llamas.profile() as prof:
        model.generate([1, 2, 3], max_new_tokens=4)
    by_layer = {name: calls for name, calls, _ in prof.by_layer()}
    assert by_layer["sampling"] == 4  # one batched draw per step
    assert by_layer["lm_head"] == 4   # the prompt's last row, then one per decoded token (the last is not fed back)


def test_ops_outside_a_model_are_labelled_as_such():
    with llamas.profile() as prof:
        ops.matmul(np.ones((3, 4), np.float32), np.ones((4, 5), np.float32))
    ((name, calls, _),) = prof.by_layer()
    assert (name, calls) == ("(outside the model)", 1)


def test_training_step_layer_types():
    cfg = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    trainer = llamas.Trainer(llamas.create(cfg, seed=0), lr=1e-3)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8))
    with llamas.profile() as prof:
        trainer.step(x, y)
    by_layer = {name: calls for name, calls, _ in prof.by_layer()}
    for region in ("attn.qkv", "mlp.fc", "lm_head", "loss", "mlp.fc backward", "attn.core backward",
                   "embedding backward", "optimizer"):
        assert region in by_layer, region
    by_op = {name for name, _, _ in prof.by_op()}
    assert {"gemm", "attention_backward", "adamw", "cross_entropy"} <= by_op
    assert "backward" not in by_op  # no op spans others: the share column adds up to 100%


def test_cli_profile_flag_prints_both_tables():
    r = subprocess.run([sys.executable, "-m", "llamas", "generate", "--model", TINY, "Hi", "--max-new-tokens", "3",
                        "--profile"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "mean us" in r.stderr and "layer type" in r.stderr and "attn.qkv" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llamas", "generate", "--model", TINY, "Hi", "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "layer type" not in r.stderr


def test_profiles_nest():
    model = llamas.load(TINY)
    ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int32)
    with llamas.profile() as alone:
        model.forward(ids)
    one = sum(e[2] for e in alone.entries)
    with llamas.profile() as outer:
        model.forward(ids)
        with llamas.profile() as inner:
            model.forward(ids)
        model.forward(ids)  # still counted: the inner block neither wiped nor stopped the outer
    assert sum(e[2] for e in inner.entries) == one
    assert sum(e[2] for e in outer.entries) == 3 * one
    with llamas.profile() as after:
        pass
    assert after.entries == []
