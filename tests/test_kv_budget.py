"""The KV-cache budget (Engine's kv_cache_mb, create_app's, `--kv-cache-mb`): admission reserves a
request's whole length, requests that do not fit wait, one that never could is refused, and the
output is the same as without a budget."""
import concurrent.futures
import os
import subprocess
import sys

import pytest

import llamas
from llamas import server_state
from llamas.server import create_app

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


def mb_for_blocks(model, blocks: int) -> float:
    return blocks * model.kv_block_bytes / 2 ** 20


def test_block_bytes_follow_the_kv_dtype(model):
    c = model.config
    head_dim = c.n_embd // c.n_head
    assert model.kv_block_bytes == 2 * c.n_layer * c.n_head * head_dim * 16 * 4
    b = llamas.load(TINY, kv_dtype="bfloat16")
    assert b.kv_block_bytes * 2 == model.kv_block_bytes
    q = llamas.load(TINY, kv_dtype="int8")  # one byte an entry + a float32 scale per head and position
    assert q.kv_block_bytes == 2 * c.n_layer * (c.n_head * head_dim * 16 + c.n_head * 16 * 4)


def test_engine_queues_what_does_not_fit_and_gives_the_same_tokens(model):
    want = [model.generate(f"{PROMPT} {i}", max_new_tokens=40, ignore_eos=True) for i in range(6)]
    # Each request needs ceil((prompt + 40) / 16) = 4 blocks here; 9 blocks run two at a time.
    need = -(-(len(model.tokenizer.encode(f"{PROMPT} 0")) + 40) // 16)
    assert need == 4
    peak = []
    with llamas.Engine(model, max_batch=16, kv_cache_mb=mb_for_blocks(model, 9)) as engine:
        assert engine.kv_budget_bytes == 9 * model.kv_block_bytes
        engine.on_step = lambda: peak.append((engine.num_running, engine.kv_reserved_bytes))
        # queued at once, so the first step already finds all six waiting
        handles = engine.enqueue([(*engine.make_request(f"{PROMPT} {i}", max_new_tokens=40, ignore_eos=True), None)
                                  for i in range(6)])
        got = [h.result().text for h in handles]
        assert engine.kv_reserved_bytes == 0
    assert got == want
    assert max(n for n, _ in peak) == 2
    assert max(r for _, r in peak) == 8 * model.kv_block_bytes


def test_engine_refuses_a_request_that_could_never_fit(model):
    with llamas.Engine(model, kv_cache_mb=mb_for_blocks(model, 3)) as engine:
        assert engine.kv_max_positions() == 48
        with pytest.raises(llamas.LlamasError, match=r"needs 4 KV-cache blocks .* holds 3 .* lower max_new_tokens "
                                                     r"to at most \d+ or raise kv_cache_mb"):
            engine.submit(PROMPT, max_new_tokens=50)
        assert engine.submit(PROMPT, max_new_tokens=20).result().finish_reason == "length"
        with pytest.raises(llamas.LlamasError, match=r"the prompt has 60 tokens, but kv_cache_mb holds 3 KV-cache "
                                                     r"blocks: at most 48 positions a request"):
            engine.submit(list(range(60)), max_new_tokens=1)
    with llamas.Engine(model, kv_cache_mb=1e6) as engine:  # more than the context needs: no per-request cap
        assert engine.kv_max_positions() is None


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 2.0 ** 40, "8", True])
def test_kv_cache_mb_must_be_a_positive_number(model, bad):
    with pytest.raises(llamas.LlamasError, match=r"kv_cache_mb must be a number of MiB in \(0, 2\^40\)"):
        llamas.Engine(model, kv_cache_mb=bad)
    with pytest.raises(llamas.LlamasError, match=r"kv_cache_mb must be a number of MiB in \(0, 2\^40\)"):
        create_app(model, kv_cache_mb=bad)


def test_less_than_one_block_is_refused(model):
    with pytest.raises(llamas.LlamasError, match="less than one KV-cache block of this model"):
        llamas.Engine(model, kv_cache_mb=mb_for_blocks(model, 1) * 0.9)


def test_server_budget_limits_max_tokens_and_queues_requests(model):
    from test_server import metric, served_client
    blocks = 5  # 80 positions a request
    with served_client(model, max_batch=16, kv_cache_mb=mb_for_blocks(model, blocks)) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and "--kv-cache-mb" in err["message"] and "at most 80 positions" in \
            err["message"]
        r = c.post("/v1/completions", json={"prompt": [1] * 90, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        # Without max_tokens a chat completion may use what the budget leaves (not the whole context).
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                                                 "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 80
        # Eight requests of 3 blocks each: one runs at a time; all finish, each as it would alone.
        body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        alone = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda _: c.post("/v1/completions", json=body), range(8)))
        assert all(t.status_code == 200 and t.json()["choices"][0]["text"] == alone for t in texts)
        assert metric(c, "llamas_kv_cache_budget_bytes") == blocks * model.kv_block_bytes
        assert metric(c, "llamas_kv_cache_reserved_bytes") == 0
    with served_client(model, max_batch=16) as c:
        assert metric(c, "llamas_kv_cache_budget_bytes") == 0  # no limit: the batch fits in memory


def test_auto_budget_limits_only_what_memory_cannot_hold(model, monkeypatch):
    per_sequence = -(-model.config.n_positions // 16) * model.kv_block_bytes
    assert server_state.auto_kv_cache_mb(model, 16) is None  # this machine holds 16 full contexts
    page = 4096
    pages = (model.weight_bytes + 2 * 4 * per_sequence) // page  # room for 4 full sequences
    monkeypatch.setattr(server_state.os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else pages)
    budget = server_state.auto_kv_cache_mb(model, 16)
    assert budget is not None and 3.9 * per_sequence <= budget * 2 ** 20 <= 4 * per_sequence
    assert server_state.auto_kv_cache_mb(model, 3) is None


def test_cli_kv_cache_mb_flag():
    r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--kv-cache-mb", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "argument --kv-cache-mb: must be a finite number > 0, got 0" in r.stderr
    # Less than one block: found when the model has loaded (after the port is bound); the server
    # stops with the reason instead of answering 503 forever.
    r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--model", TINY, "--port", "0", "--kv-cache-mb",
                        "0.001"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-500:]
    assert "llamas: error: [serve] the model did not load: [engine] kv_cache_mb=0.001 is less than one" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert "--kv-cache-mb" in r.stdout
