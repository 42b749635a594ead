"""Prefix caching: KV blocks shared by reference between sequences (Sequence.share_blocks / adopt),
the PrefixCache that keeps finished sequences' blocks, and the engine and server using it. A hit
must give exactly the tokens a full prefill gives (the kernels are batch-invariant)."""
import gc
import os

import httpx
import pytest

import llamas
from llamas._C import LlamasError
from llamas.prefix_cache import PrefixCache

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
SYSTEM = "You are a helpful assistant who answers in the voice of a Shakespearean fool. "


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


def blocks_in_use() -> int:
    # Collect first: a sequence another test left in a traceback's frame is freed by the cyclic
    # collector, which could otherwise run in the middle of a test and change the count.
    gc.collect()
    return llamas.memory_stats()["kv_cache_blocks_in_use"]


def decode(model, seq, first_ids, steps):
    out = model._native.step([(seq, first_ids, True)])
    for _ in range(steps):
        out += model._native.step([(seq, [out[-1]], True)])
    return out


# ---- shared blocks -----------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_adopted_blocks_give_the_same_tokens_as_a_full_prefill(kv_dtype):
    model = llamas.load(TINY, kv_dtype=kv_dtype)
    cfg = model.config.to_native()
    ids = [(11 * i + 3) % 512 for i in range(40)]
    base = blocks_in_use()
    donor = llamas._C.Sequence(cfg, logprobs=2)
    donor_out = decode(model, donor, ids, 20)
    assert donor.length == 60 and blocks_in_use() - base == 4
    refs = donor.share_blocks(0, 2)
    assert [r.dtype for r in refs] == [kv_dtype] * 2
    adopter = llamas._C.Sequence(cfg, logprobs=2)
    adopter.adopt(refs, ids[:32])
    assert adopter.length == 32 and adopter.tokens == ids[:32]
    assert blocks_in_use() - base == 4                 # shared, not copied
    first = model._native.step([(adopter, ids[32:], True)])
    assert first == donor_out[:1]
    assert decode(model, adopter, [first[0]], 19) == donor_out[1:]
    donor.release()                                     # its own blocks go; the shared two stay
    assert blocks_in_use() - base == 2 + 2
    del refs
    assert blocks_in_use() - base == 4
    adopter.release()
    assert blocks_in_use() == base


def test_share_and_adopt_refuse_bad_requests(model):
    cfg = model.config.to_native()
    seq = llamas._C.Sequence(cfg)
    model._native.step([(seq, list(range(1, 41)), False)])   # 40 positions: blocks 0, 1 full, 2 not
    with pytest.raises(LlamasError, match="block 2 is not a full block"):
        seq.share_blocks(2, 1)
    with pytest.raises(LlamasError, match="first >= 0"):
        seq.share_blocks(-1, 1)
    refs = seq.share_blocks(0, 2)
    with pytest.raises(LlamasError, match="has been fed nothing"):
        seq.adopt(refs, list(range(32)))
    fresh = llamas._C.Sequence(cfg)
    with pytest.raises(LlamasError, match="needs their 32 tokens, got 31"):
        fresh.adopt(refs, list(range(31)))
    other = llamas.load()                                 # the bundled model: another shape
    with pytest.raises(LlamasError, match="another shape"):
        llamas._C.Sequence(other.config.to_native()).adopt(refs, list(range(32)))
    fresh.adopt(refs[:1], list(range(16)))
    assert fresh.length == 16
    seq.release()
    fresh.release()


def test_blocks_of_another_kv_dtype_are_refused_at_the_next_step(model):
    bf = llamas.load(TINY, kv_dtype="bfloat16")
    cfg = model.config.to_native()
    donor = llamas._C.Sequence(cfg)
    bf._native.step([(donor, list(range(1, 17)), False)])
    seq = llamas._C.Sequence(cfg)
    seq.adopt(donor.share_blocks(0, 1), list(range(1, 17)))
    with pytest.raises(LlamasError, match="holds bfloat16 entries but the model writes float32"):
        model._native.step([(seq, [5], True)])


# ---- the cache ------------------------------------------------------------------------------------
def test_prefix_cache_finds_the_longest_cached_prefix_and_evicts_chain_ends_first(model):
    cfg = model.config.to_native()
    ids = list(range(1, 65))                              # 4 full blocks
    base = blocks_in_use()
    seq = llamas._C.Sequence(cfg)
    model._native.step([(seq, ids, False)])
    block_bytes = seq.kv_bytes // seq.kv_blocks
    cache = PrefixCache(max_bytes=3 * block_bytes)
    assert cache.insert(seq) == 4 and cache.blocks == 3  # over budget: the chain's end went first
    assert len(cache.lookup(ids, 10)) == 3
    assert len(cache.lookup(ids, 2)) == 2                # never more than asked
    assert len(cache.lookup(ids[:16] + [9] * 48, 10)) == 1   # diverges in block 1
    assert cache.lookup([9] + ids[1:], 10) == []
    assert cache.hit_tokens == 16 * (3 + 2 + 1)
    seq.release()
    assert blocks_in_use() - base == 3                    # the cache's blocks outlive the sequence
    cache.clear()
    assert blocks_in_use() == base


def test_prefix_cache_off_at_zero_bytes(model):
    seq = llamas._C.Sequence(model.config.to_native())
    model._native.step([(seq, list(range(1, 33)), False)])
    cache = PrefixCache(0)
    assert cache.insert(seq) == 0 and cache.blocks == 0
    seq.release()


def run_engine(model, prompts, cache_mb, **kw):
    with llamas.Engine(model, prefix_cache_mb=cache_mb, max_batch=4) as engine:
        results = []
        for p in prompts:   # one at a time: each finds the blocks of the ones before
            results.append(engine.submit(p, **kw).result(timeout=60))
        stats = (engine.prefix_cache.hit_tokens, engine.prefix_cache.blocks) if engine.prefix_cache else None
    return results, stats


@pytest.mark.parametrize("kw", [dict(max_new_tokens=12),
                                dict(max_new_tokens=12, temperature=0.9, seed=7, repetition_penalty=1.3),
                                dict(max_new_tokens=8, logprobs=3, frequency_penalty=0.5)])
def test_engine_with_a_prefix_cache_gives_the_same_results(model, kw):
    prompts = [SYSTEM + q for q in ("Who art thou?", "What is the hour?", "Who art thou?", "Sing!")]
    base = blocks_in_use()
    plain, _ = run_engine(model, prompts, 0, **kw)
    cached, (hits, blocks) = run_engine(model, prompts, 4, **kw)
    for a, b in zip(plain, cached):
        assert (a.text, a.token_ids, a.logprobs, a.finish_reason) == (b.text, b.token_ids, b.logprobs, b.finish_reason)
    shared = len(model.tokenizer.encode(SYSTEM)) // 16 * 16
    assert hits >= 3 * shared > 0 and blocks > 0
    assert blocks_in_use() == base                         # shutdown dropped the cache


def test_engine_prefix_cache_keeps_to_its_budget_and_follows_chat_turns(model):
    with llamas.Engine(model, prefix_cache_mb=0.25) as engine:
        first = engine.submit(SYSTEM + "Hello", max_new_tokens=20).result(timeout=60)
        # The next turn starts with the whole first exchange: its generated tokens' blocks hit too.
        turn = SYSTEM + "Hello" + first.text + " And then?"
        r = engine.submit(turn, max_new_tokens=5).result(timeout=60)
        assert r.cached_tokens >= (len(model.tokenizer.encode(SYSTEM + "Hello")) + 20 - 1) // 16 * 16 - 16
        for i in range(30):
            engine.submit(f"{i} " * 40, max_new_tokens=4).result(timeout=60)
        assert engine.prefix_cache.bytes <= 0.25 * 2 ** 20
        assert engine.prefix_cache.evicted_blocks > 0


def test_concurrent_requests_sharing_prefixes_equal_each_alone(model):
    # Sequences adopt blocks while others finish and insert theirs, in one running batch.
    prompts = [SYSTEM * (1 + i % 2) + f"Question {i}?" for i in range(24)]
    with llamas.Engine(model) as engine:
        alone = [engine.submit(p, max_new_tokens=10).result(timeout=60).token_ids for p in prompts]
    with llamas.Engine(model, prefix_cache_mb=1, max_batch=8) as engine:
        for wave in range(2):
            handles = [engine.submit(p, max_new_tokens=10) for p in prompts]
            assert [h.result(timeout=120).token_ids for h in handles] == alone
        assert engine.prefix_cache.hit_tokens > 0


def test_a_prompt_is_shared_as_soon_as_it_is_in(model):
    # The first request is still generating when the second arrives: its prompt's blocks were
    # cached when its prefill ended, not when it finishes. (Driven step by step: no timing.)
    from llamas.prefix_cache import PrefixCache
    from llamas.scheduler import Request, SamplingOptions, Scheduler
    sched = Scheduler(model, prefix_cache=PrefixCache(4 << 20))
    long = Request(model.tokenizer.encode(SYSTEM + "Tell me a long tale."), 30, SamplingOptions(seed=0))
    sched.add(long)
    while not long.completion_tokens:
        sched.step()
    short = Request(model.tokenizer.encode(SYSTEM + "And a short one."), 3, SamplingOptions(seed=0))
    sched.add(short)
    while not short.finished:
        sched.step()
    assert not long.finished and short.cached_tokens == len(model.tokenizer.encode(SYSTEM)) // 16 * 16
    sched.abort_all()
    sched.prefix_cache.clear()


@pytest.mark.parametrize("bad", [-1, True, "1", float("nan")])
def test_engine_rejects_a_bad_prefix_cache_size(model, bad):
    with pytest.raises(LlamasError, match="prefix_cache_mb"):
        llamas.Engine(model, prefix_cache_mb=bad)


def test_scoring_requests_bypass_the_cache_but_feed_it(model):
    with llamas.Engine(model, prefix_cache_mb=4) as engine:
        a = engine.submit(SYSTEM, max_new_tokens=0, prompt_logprobs=1).result(timeout=60)
        b = engine.submit(SYSTEM, max_new_tokens=0, prompt_logprobs=1).result(timeout=60)
        assert a.prompt_logprobs == b.prompt_logprobs == model.score(SYSTEM, top_logprobs=1)
        assert engine.submit(SYSTEM + "Hi", max_new_tokens=2).result(timeout=60).cached_tokens > 0
    with llamas.Engine(model) as engine:
        assert engine.submit(SYSTEM, max_new_tokens=2).result(timeout=60).cached_tokens is None


# ---- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(model):
    from test_server import ThreadServer
    from llamas.server import create_app
    with ThreadServer(create_app(model, max_batch=16, prefix_cache_mb=8)) as s:
        yield s


def test_server_reports_cached_tokens_and_cache_metrics(srv, model):
    body = {"prompt": SYSTEM + "Who goes there?", "max_tokens": 6, "temperature": 0}
    first = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    n = len(model.tokenizer.encode(body["prompt"]))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    metrics = httpx.get(srv.url + "/metrics").text
    line = [x for x in metrics.splitlines() if x.startswith("llamas_prefix_cache_hit_tokens ")][0]
    assert float(line.split()[1]) >= (n - 1) // 16 * 16
    assert "llamas_prefix_cache_bytes " in metrics and "llamas_prefix_cache_blocks " in metrics


@pytest.mark.parametrize("bad", [-1, "x", True])
def test_create_app_rejects_a_bad_prefix_cache_size(model, bad):
    from llamas.server import create_app
    with pytest.raises(LlamasError, match="prefix_cache_mb"):
        create_app(model, prefix_cache_mb=bad)


@pytest.mark.parametrize("value, fragment", [("-1", "must be a finite number >= 0"), ("nan", "must be a finite number"),
                                             ("x", "expected a number >= 0, got 'x'"), ("1e30", "prefix_cache_mb")])
def test_cli_serve_rejects_a_bad_prefix_cache_size(value, fragment):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--model", TINY, "--port", "0",
                        "--prefix-cache-mb", value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


# ---- siblings: requests with the same prompt share its prefill -----------------------------------------
LONG = SYSTEM + "Tell me of the king."


@pytest.mark.parametrize("max_new_tokens", [1, 8])  # 1: the leader ends in the step its prefill does
def test_siblings_share_one_prefill_and_give_the_same_results(model, max_new_tokens):
    kw = [dict(max_new_tokens=max_new_tokens, temperature=0.9, seed=s) for s in range(4)]
    base = blocks_in_use()
    with llamas.Engine(model) as engine:
        alone = [engine.submit(LONG, **k).result(timeout=60).token_ids for k in kw]
        shared_before = engine._sched.shared_prompt_tokens
    with llamas.Engine(model, prefill_chunk=8) as engine:
        # Queued in one call, as the server queues the choices of n = 4: admitted in the same step.
        handles = engine.enqueue([(engine.make_request(LONG, **k)[0], True, None) for k in kw])
        assert [h.result(timeout=60).token_ids for h in handles] == alone
        n_blocks = (len(model.tokenizer.encode(LONG)) - 1) // 16
        assert engine._sched.shared_prompt_tokens == 3 * n_blocks * 16 and shared_before == 0
    assert blocks_in_use() == base


def test_a_sibling_computes_the_prompt_itself_when_its_leader_goes(model):
    from llamas.scheduler import Request, SamplingOptions, Scheduler
    want = model.generate(model.tokenizer.encode(LONG), max_new_tokens=6)
    base = blocks_in_use()
    sched = Scheduler(model, prefill_chunk=4)
    out = {}
    leader, follower = (Request(model.tokenizer.encode(LONG), 6, SamplingOptions(seed=0),
                                sink=lambda c, k=k: out.setdefault(k, []).append(c)) for k in ("leader", "follower"))
    sched.add(leader)
    sched.add(follower)
    sched.step()                                       # the leader's first chunk; the follower waits for it
    assert leader.completion_tokens == 0 and sched.running[1].leader is sched.running[0]
    leader.cancelled = True
    while sched.step():
        pass
    assert leader.finish_reason == "cancelled" and follower.finish_reason == "length"
    assert [t for c in out["follower"] for t in c.token_ids] == want and sched.shared_prompt_tokens == 0
    assert blocks_in_use() == base


def test_a_batch_of_equal_prompts_equals_each_alone(model):
    assert model.generate([LONG, LONG, "Alas", LONG], max_new_tokens=7) == [
        model.generate(p, max_new_tokens=7) for p in (LONG, LONG, "Alas", LONG)]
