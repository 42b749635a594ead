"""llamas.Engine and the shared Scheduler: continuous batching in-process, chunked prefill,
cancellation, queue limits, shutdown."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import llamas
from conftest import SlowNative  # noqa: E402
from llamas.engine import Engine, EngineClosed, QueueFull, Request, SamplingOptions, Scheduler

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-tiny")
PROMPTS = ["When shall we", "Alas, poor", "To be or not", "Now is the winter", "Friends, Romans", "O Romeo"]


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


def kv_blocks():
    return llamas.memory_stats()["kv_cache_blocks_in_use"]


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_engine_matches_generate_from_many_threads(model):
    expected = {p: model.generate(p, max_new_tokens=12 + i) for i, p in enumerate(PROMPTS)}
    results = {}
    with Engine(model, max_batch=4) as engine:
        def client(i, p):
            results[p] = engine.submit(p, max_new_tokens=12 + i).result(timeout=30)
        threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {p: r.text for p, r in results.items()} == expected
        # Batched: far fewer steps than tokens. (Queued all at once: threads on a busy box may
        # submit so far apart that each request runs alone, as this test once saw: 87 steps for
        # 87 tokens.)
        steps0 = engine.steps
        items = [engine.make_request(p, max_new_tokens=12 + i) for i, p in enumerate(PROMPTS)]
        handles = engine.enqueue([(req, as_text, None) for req, as_text in items])
        assert [h.result(timeout=30).text for h in handles] == [expected[p] for p in PROMPTS]
        assert engine.steps - steps0 < sum(h.result().completion_tokens for h in handles) / 2
        # The engine thread's own account of its steps: every step counted, its sequences (more
        # than one a step: batched), and seconds in forwards and between them.
        t = engine.timing
        assert t.steps == engine.steps and t.steps < t.rows <= t.steps * engine.max_batch
        assert t.forward_seconds > 0 and 0 <= t.gil_wait_seconds <= t.forward_seconds and t.host_seconds > 0
        r = results[PROMPTS[0]]
        assert r.finish_reason == "length" and r.completion_tokens == 12 and len(r.token_ids) == 12
        assert r.prompt_tokens == len(model.tokenizer.encode(PROMPTS[0]))
        # Iterating a handle streams pieces (text prompt) or ids (id prompt).
        assert "".join(engine.submit(PROMPTS[0], max_new_tokens=12)) == expected[PROMPTS[0]]
        ids = model.tokenizer.encode(PROMPTS[1])
        assert list(engine.submit(ids, max_new_tokens=5)) == model.generate(ids, max_new_tokens=5)
    assert kv_blocks() == 0


def test_sampling_with_seed_is_batch_invariant(model):
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1,
              presence_penalty=0.3, frequency_penalty=0.2)
    alone = [model.generate(p, seed=i, **kw) for i, p in enumerate(PROMPTS)]
    with Engine(model, max_batch=16) as engine:
        handles = [engine.submit(p, seed=i, **kw) for i, p in enumerate(PROMPTS)]
        assert [h.result(timeout=30).text for h in handles] == alone


def test_chunked_prefill_is_exact_and_does_not_stall_decoding(model):
    long_prompt = list(range(1, 100))
    expected_long = model.generate(long_prompt, max_new_tokens=8)
    expected_short = model.generate("When shall we", max_new_tokens=20)
    events = []
    sched = Scheduler(model, max_batch=4, prefill_chunk=16, max_prefill_tokens=16)
    short = Request(model.tokenizer.encode("When shall we"), 20, SamplingOptions(),
                    sink=lambda c: events.append(("short", c)))
    long = Request(long_prompt, 8, SamplingOptions(), sink=lambda c: events.append(("long", c)))
    sched.add(short)
    sched.step()  # the short prompt is prefilled and decoding
    sched.add(long)
    steps = 0
    while sched.step():
        steps += 1
        # While the long prompt prefills 16 tokens per step, the short stream gets a token every step.
        if long.stats.first_token is None and not short.finished:
            assert len([e for e in events if e[0] == "short"]) == steps + 1
    text = "".join(c.text for who, c in events if who == "short")
    ids = [t for who, c in events if who == "long" for t in c.token_ids]
    assert text == expected_short and ids == expected_long
    assert kv_blocks() == 0


def test_cancel_frees_kv_memory_and_reports_cancelled(model):
    # 5 ms per step: 80 tokens take >= 0.4 s, so the cancel lands mid-stream even when this thread
    # is descheduled for a while (the bare model finishes 80 tokens in ~50 ms).
    slow = llamas.Model(SlowNative(model._native, 0.005), model.config, model.tokenizer, model.path)
    with Engine(slow, max_batch=2) as engine:
        h = engine.submit(list(range(1, 40)), max_new_tokens=80)
        it = h.chunks(timeout=30)
        next(it)
        assert kv_blocks() > 0
        h.cancel()
        r = h.result(timeout=5)
        assert r.finish_reason == "cancelled" and r.completion_tokens < 80
        assert kv_blocks() == 0
        # A queued request can be cancelled before it is admitted.
        a = engine.submit("When shall we", max_new_tokens=60)
        b = engine.submit("When shall we", max_new_tokens=60)
        c = engine.submit("When shall we", max_new_tokens=60)
        c.cancel()
        assert c.result(timeout=10).finish_reason == "cancelled"
        assert a.result(timeout=30).finish_reason == b.result(timeout=30).finish_reason == "length"
    assert kv_blocks() == 0


def test_stop_logprobs_and_logit_bias(model):
    full = model.generate("When shall we", max_new_tokens=30)
    stop = full[6:9]
    with Engine(model) as engine:
        r = engine.submit("When shall we", max_new_tokens=30, stop=[stop]).result(timeout=30)
        assert r.text == full[:full.find(stop)] and r.finish_reason == "stop"
        assert "".join(engine.submit("When shall we", max_new_tokens=30, stop=stop)) == r.text
        r = engine.submit("When shall we", max_new_tokens=6, logprobs=5).result(timeout=30)
        assert len(r.logprobs) == 6 and [lp.token_id for lp in r.logprobs] == r.token_ids
        for lp in r.logprobs:
            assert lp.logprob <= 0 and len(lp.top) == 5 and lp.top[0][0] == lp.token_id  # greedy: the top one
            assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
        r = engine.submit("When shall we", max_new_tokens=5, logit_bias={77: 100.0}).result(timeout=30)
        assert r.token_ids == [77] * 5


def test_queue_limit_shutdown_and_bad_input(model):
    slow = llamas.Model(SlowNative(model._native, 0.01), model.config, model.tokenizer, model.path)
    engine = Engine(slow, max_batch=1, max_queue=1)
    running = engine.submit("When shall we", max_new_tokens=60)
    next(running.chunks(timeout=30))
    waiting = engine.submit("Alas", max_new_tokens=5)
    with pytest.raises(QueueFull):
        engine.submit("Alas", max_new_tokens=5)
    engine.shutdown(drain=True, timeout=30)  # stops accepting, finishes both
    assert running.result(timeout=0).finish_reason == "length" and waiting.result(timeout=0).completion_tokens == 5
    with pytest.raises(EngineClosed):
        engine.submit("Alas")
    with Engine(model) as e:
        for kwargs in (dict(temperature=-1), dict(max_new_tokens=0), dict(logprobs=21), dict(logit_bias={99999: 1}),
                       dict(logit_bias={1: 500}), dict(stop=3)):
            with pytest.raises(llamas.LlamasError):
                e.submit("When", **kwargs)
        with pytest.raises(llamas.LlamasError, match="context length"):
            e.submit([1] * (model.config.n_positions + 1))
    # Not draining: running requests are cancelled (slow steps: at full speed the 100 tokens could
    # all be out before shutdown is called, and the request would end with "length").
    e = Engine(slow)
    h = e.submit("When shall we", max_new_tokens=100)
    next(h.chunks(timeout=30))
    e.shutdown(drain=False, timeout=10)
    assert h.result(timeout=0).finish_reason == "cancelled"
    assert kv_blocks() == 0


def test_engine_thread_exits_when_idle(model):
    engine = Engine(model, idle_exit=0.05)
    assert engine.submit("Hi", max_new_tokens=3).result(timeout=30).completion_tokens == 3
    deadline = time.time() + 5
    while engine._thread is not None and time.time() < deadline:
        time.sleep(0.01)
    assert engine._thread is None
    assert engine.submit("Hi", max_new_tokens=3).result(timeout=30).completion_tokens == 3  # restarts
    engine.close()


def test_a_finished_request_is_freed_without_the_cyclic_collector(model):
    # The handle's request held the handle's _push as its sink: a cycle that kept each finished
    # request's chunks alive until the collector ran (thousands at 16 streaming clients).
    import gc
    import weakref
    engine = llamas.Engine(model)
    try:
        gc.collect()
        gc.disable()
        h = engine.submit("When shall we", max_new_tokens=5)
        assert h.result(timeout=30).finish_reason == "length"
        ref = weakref.ref(h)
        del h
        assert ref() is None
    finally:
        gc.enable()
        engine.shutdown()


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_decode_steps_match_the_forward_pass_across_kv_blocks(kv_dtype):
    # A decoding sequence's new key and value are written by the attention kernel itself, per
    # head, in the thread that then reads them (prompt chunks are written before attention). Each
    # decode step's log-probabilities must match the forward pass over the same tokens at that
    # position, past several 16-position blocks, alone and beside a sequence still prefilling.
    m = llamas.load(TINY, kv_dtype=kv_dtype)
    cfg = m.config.to_native()
    ids = [(7 * i + 3) % m.config.vocab_size for i in range(44)]
    logits = m.forward(np.array([ids], dtype=np.int32))[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    seq = llamas._C.Sequence(cfg, logprobs=3)
    other = llamas._C.Sequence(cfg)
    m._native.step([(seq, ids[:5], True)])
    for t in range(5, len(ids)):
        entries = [(seq, [ids[t]], True)]
        if t % 3 == 0:  # a prompt chunk in the same step: written before attention, not by it
            entries.append((other, ids[:4], False))
        m._native.step(entries)
        top = dict(seq.last_top_logprobs)
        best = int(np.argmax(logp[t]))
        assert best in top and abs(top[best] - logp[t, best]) < 1e-4, (t, top, logp[t, best])


EXIT_WHILE_RUNNING = """
import sys, threading, time
import llamas
model = llamas.load(sys.argv[1])
engine = llamas.Engine(model)
handles = [engine.submit("ROMEO:", max_new_tokens=200, ignore_eos=True) for _ in range(4)]
threading.Thread(target=lambda: [model.generate(["O"] * 4, max_new_tokens=50) for _ in iter(int, 1)],
                 daemon=True).start()
threading.Thread(target=lambda: [model.forward([[1, 2, 3, 4] * 8] * 4) for _ in iter(int, 1)],
                 daemon=True).start()
time.sleep(float(sys.argv[2]))
sys.exit(3)
"""


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_the_process_exits_with_its_status_while_requests_run(delay):
    # Engine requests and daemon threads inside generate() and forward() when the interpreter
    # exits: the process used to abort (std::terminate, status 134) as CPython ended those
    # threads on their way back to the GIL, through pybind11's noexcept destructors.
    python_dir = os.path.dirname(os.path.dirname(os.path.abspath(llamas.__file__)))
    env = dict(os.environ, PYTHONPATH=python_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", EXIT_WHILE_RUNNING, TINY, str(delay)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr


def test_leaving_a_stream_early_cancels_its_request(model):
    slow = llamas.Model(SlowNative(model._native, 0.003), model.config, model.tokenizer, model.path)
    with Engine(slow, max_batch=4) as engine:
        def stopped_after(n, how):
            h = engine.submit("O Romeo", max_new_tokens=100, ignore_eos=True)
            if how == "raise":
                try:
                    for i, _ in enumerate(h):
                        if i == n:
                            raise KeyError("a bug in the consuming loop")
                except KeyError:
                    pass
            else:
                it = iter(h)
                for _ in range(n):
                    next(it)
                if how == "close":
                    it.close()
                else:
                    del it
            r = h.result(timeout=30)
            return r.finish_reason, r.completion_tokens
        for how in ("close", "drop", "raise"):
            reason, tokens = stopped_after(3, how)
            assert reason == "cancelled" and tokens < 100, how
        assert wait_until(lambda: kv_blocks() == 0)
        h = engine.submit("O Romeo", max_new_tokens=5)  # read to its end: nothing to cancel
        assert "".join(h) == h.result().text and h.result().finish_reason in ("length", "stop")
        h = engine.submit("O Romeo", max_new_tokens=5)
        next(iter(h.chunks()))                             # chunks() only looks
        assert h.result(timeout=30).finish_reason in ("length", "stop")


def test_an_engine_thread_failure_ends_each_request_with_its_reason(model, caplog):
    calls = []

    def on_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("hook bug")
    engine = Engine(model, on_step=on_step)
    try:
        h = engine.submit("O Romeo", max_new_tokens=50, ignore_eos=True)
        with pytest.raises(llamas.LlamasError, match="the engine thread failed: RuntimeError: hook bug"):
            "".join(h)
        r = h.result(timeout=30)
        assert r.finish_reason == "error" and "hook bug" in r.error
        assert caplog.text.count("engine thread failed") == 1
        again = engine.submit("O Romeo", max_new_tokens=3)  # a new engine thread serves the next
        assert again.result(timeout=30).completion_tokens == 3
    finally:
        engine.shutdown(drain=False)


def test_shutdown_from_a_callback_stops_the_engine(model):
    holder = {}

    def on_finish(req):
        holder["engine"].shutdown(drain=False)  # from the engine thread itself
    engine = holder["engine"] = Engine(model, on_finish=on_finish)
    assert engine.submit("O Romeo", max_new_tokens=3).result(timeout=30).completion_tokens == 3
    with pytest.raises(EngineClosed):
        engine.submit("O Romeo", max_new_tokens=3)
    assert wait_until(lambda: engine._thread is None)


def test_asyncio_services_await_and_stream_without_blocking_the_loop(model):
    import asyncio
    slow = llamas.Model(SlowNative(model._native, 0.002), model.config, model.tokenizer, model.path)
    expected = {p: model.generate(p, max_new_tokens=10) for p in PROMPTS}
    with Engine(slow, max_batch=8) as engine:
        async def main():
            ticks = 0

            async def ticker():  # the loop keeps running while requests are awaited
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)
            t = asyncio.ensure_future(ticker())

            async def stream(p):
                return "".join([piece async for piece in engine.submit(p, max_new_tokens=10, temperature=0)])
            texts = await asyncio.gather(*(stream(p) for p in PROMPTS))
            results = await asyncio.gather(*(engine.submit(p, max_new_tokens=10, temperature=0).aresult()
                                             for p in PROMPTS))
            ids = [t async for t in engine.submit(model.tokenizer.encode(PROMPTS[0]), max_new_tokens=4, temperature=0)]
            h = engine.submit(PROMPTS[0], max_new_tokens=100, ignore_eos=True)
            async for _ in h:
                break                                    # leaving early cancels it
            waiting = engine.submit(PROMPTS[0], max_new_tokens=100, ignore_eos=True)
            task = asyncio.ensure_future(waiting.aresult())
            await asyncio.sleep(0.02)
            task.cancel()                                # a cancelled await cancels the request
            with pytest.raises(asyncio.CancelledError):
                await task
            t.cancel()
            return texts, results, ids, h, waiting, ticks
        texts, results, ids, h, waiting, ticks = asyncio.run(main())
    assert texts == [expected[p] for p in PROMPTS] == [r.text for r in results]
    assert ids == model.generate(model.tokenizer.encode(PROMPTS[0]), max_new_tokens=4)
    assert h.result(timeout=10).finish_reason == "cancelled" and waiting.result(timeout=10).finish_reason == "cancelled"
    assert ticks > 20
