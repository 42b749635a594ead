"""The server's per-token path: pre-serialised SSE frames, the engine-to-event-loop inbox, the
batched inter-token-latency histogram, RequestHandle wake-ups, and the load test's own client
(bench/sse_client.py), which must reject every malformed stream."""
import asyncio
import json
import os
import random
import re
import sys
import threading
import time

import pytest

import llamas
from llamas.engine import RequestHandle
from llamas.scheduler import Chunk, Request, SamplingOptions
from llamas.server_sse import ChunkFormat, sse
from llamas.server_state import ResponseInbox

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from sse_client import StreamClient, StreamError  # noqa: E402

TEXTS = ["", " hello", 'say "hi"\n', "back\\slash\ttab", "caf\u00e9 \u2014 \U0001F600", "\x00\x1f\x7f", "</script>"]


# ---- SSE frames ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_prebuilt_text_frames_equal_json_dumps_of_the_chunk(kind, include_usage):
    model = 'odd "name" \u00e9\\'
    fmt = ChunkFormat("cmpl-abc", kind, 1700000000, model, include_usage)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    for text in TEXTS:
        for index in (0, 7, 130):
            for reason in (None, "stop", "length"):
                if kind == "chat":
                    choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                              "finish_reason": reason}
                else:
                    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
                d = {"id": "cmpl-abc", "object": obj, "created": 1700000000, "model": model, "choices": [choice]}
                if include_usage:
                    d["usage"] = None
                assert fmt.text(index, text, reason) == sse(d) == fmt.frame([choice])
                assert json.loads(fmt.text(index, text, reason)[6:]) == d
                if include_usage:  # continuous_usage_stats: the choice's usage so far
                    u = {"prompt_tokens": 7, "completion_tokens": index, "total_tokens": 7 + index}
                    assert fmt.text(index, text, reason, u) == sse(dict(d, usage=u)) == fmt.frame([choice], u)


# ---- engine thread -> event loop -------------------------------------------------------------------
def test_inbox_delivers_everything_in_order_and_survives_a_cancelled_take():
    async def main():
        inbox = ResponseInbox()
        loop = asyncio.get_running_loop()
        take = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        take.cancel()                                      # a client that went away mid-wait
        with pytest.raises(asyncio.CancelledError):
            await take
        got = []

        def producer():                                    # the engine thread: one wake-up per batch
            for step in range(50):
                loop.call_soon_threadsafe(lambda s=step: [inbox.put((s, i)) for i in range(3)])
                time.sleep(random.random() * 1e-4)
        t = threading.Thread(target=producer)
        t.start()
        while len(got) < 150:
            got += await asyncio.wait_for(inbox.take(), 10)
        t.join()
        assert got == [(s, i) for s in range(50) for i in range(3)]
    asyncio.run(main())


def _stream_fixture(include_usage=True):
    """A one-choice completions stream (the server's _stream) over fakes: its inbox, and what it
    writes."""
    from types import SimpleNamespace
    from llamas.server_generation import _Choice, _stream
    from llamas.server_protocol import GenParams
    state = SimpleNamespace(tokenizer=None, model_name="m")
    p = GenParams(prompts=["x"], stream=True, include_usage=include_usage)
    handle = SimpleNamespace(_req=SimpleNamespace(completion_tokens=0, cached_tokens=None))
    inbox = ResponseInbox()
    return _stream, state, p, handle, [_Choice(False)], inbox


def test_direct_writes_keep_event_order_across_a_held_back_write():
    # Plain tokens are written from the delivery callback while the stream's task waits; a write
    # the transport holds back (flow control: the ASGI send awaits) must finish, in order, before
    # anything after it, and everything after it goes through the task until it has.
    _stream, state, p, handle, choices, inbox = _stream_fixture()
    texts = [f"t{i} " for i in range(12)]

    async def main():
        written, gate = [], asyncio.get_running_loop().create_future()
        in_task = []

        async def send(message):
            if len(written) == 4 and not gate.done():      # the fifth write waits for the gate
                await gate
            written.append(message)
            in_task.append(asyncio.current_task() is not None)
        task = asyncio.ensure_future(_stream(state, "completion", p, "cmpl-1", 0, [handle], choices, inbox, 1, send))
        await asyncio.sleep(0)
        for i, t in enumerate(texts):                      # one engine step per delivery callback
            asyncio.get_running_loop().call_soon(inbox.put, (0, Chunk(t, [i], None, None)))
            await asyncio.sleep(0)
            if i == 6:
                gate.set_result(None)
        handle._req.completion_tokens = len(texts)
        inbox.put((0, Chunk("", [], None, "length")))
        await asyncio.wait_for(task, 10)
        return written, in_task
    written, in_task = asyncio.run(main())
    body = b"".join(m["body"] for m in written).decode()
    events = [json.loads(e[6:]) for e in body.split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "".join(texts)
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 12
    assert body.endswith("data: [DONE]\n\n") and [m["more_body"] for m in written][-1] is False
    assert not in_task[0] and in_task[4]                   # direct from the callback; the held-back one by the task
    assert inbox.direct is None                            # the writer's cycle is broken at the end


def test_cancelling_a_stream_during_a_held_back_write_cancels_the_write():
    # Server shutdown or a client gone while flow control holds a direct write back: the task's
    # cancellation reaches the held-back send (its cleanup runs) and the task ends cancelled.
    _stream, state, p, handle, choices, inbox = _stream_fixture()

    async def main():
        sends, cleaned = [], []

        async def send(message):
            sends.append(message)
            try:
                await asyncio.get_running_loop().create_future()   # never resumes by itself
            finally:
                cleaned.append(True)
        task = asyncio.ensure_future(_stream(state, "completion", p, "cmpl-1", 0, [handle], choices, inbox, 1, send))
        await asyncio.sleep(0)
        inbox.put((0, Chunk("a", [1], None, None)))       # written directly, then held back
        assert inbox.blocked is not None and len(sends) == 1
        await asyncio.sleep(0)
        inbox.put((0, Chunk("b", [2], None, None)))       # queued behind it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        return sends, cleaned
    sends, cleaned = asyncio.run(main())
    assert len(sends) == 1 and b"\"a\"" in sends[0]["body"] and cleaned == [True]


def test_a_failing_direct_write_is_left_to_the_task():
    _stream, state, p, handle, choices, inbox = _stream_fixture(include_usage=False)

    async def main():
        calls = []

        async def send(message):
            calls.append(message)
            raise ConnectionResetError("connection reset")
        task = asyncio.ensure_future(_stream(state, "completion", p, "cmpl-1", 0, [handle], choices, inbox, 1, send))
        await asyncio.sleep(0)
        inbox.put((0, Chunk("a", [1], None, None)))       # the direct write raises: queued instead
        assert inbox.direct is None
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(task, 10)               # the task's own send meets the error
        return calls
    calls = asyncio.run(main())
    assert len(calls) == 2 and calls[0] == calls[1]


class _NoEngine:
    def _cancel(self, req):
        req.cancelled = True


def _handle():
    req = Request([1, 2], 4, SamplingOptions())
    return RequestHandle(_NoEngine(), req, True)


def test_request_handle_wakes_blocked_readers_without_losing_a_chunk():
    # _push skips the Condition when nobody waits; a reader blocked in chunks() or result() (no
    # timeout) in another thread must still be woken for every chunk: a lost wake-up leaves it
    # blocked, and the join below gives up on it.
    for trial in range(200):
        h = _handle()
        got, result = [], []

        def reader():
            got.extend(c.text for c in h.chunks())

        def waiter():
            result.append(h.result().text)
        threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=waiter, daemon=True)]
        for t in threads:
            t.start()
        if trial % 2:
            time.sleep(random.random() * 1e-3)
        for i in range(5):
            h._push(Chunk(str(i), [i], None, "length" if i == 4 else None))
        for t in threads:
            t.join(20)
            assert not t.is_alive(), f"trial {trial}: a reader was never woken"
        assert got == ["0", "1", "2", "3", "4"] and result == ["01234"]


# ---- metrics -----------------------------------------------------------------------------------------
def test_batch_histogram_exposes_what_prometheus_histogram_does():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from llamas.server_metrics import _ITL, BatchHistogram
    rng = random.Random(0)
    values = [rng.choice(_ITL) for _ in range(100)] + [rng.random() * 3 for _ in range(500)] + [0.0, 1e6]
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("x_seconds", "doc", buckets=_ITL, registry=r1)
    h2 = BatchHistogram("x_seconds", "doc", _ITL, r2)
    for v in values:
        h1.observe(v)
    h2.observe_many(values[:300])
    h2.observe_many(values[300:])

    def samples(registry):  # (name, labels) -> value; the created timestamps differ, the sum's rounding may
        out = {}
        for family in registry.collect():
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out
    a, b = samples(r1), samples(r2)
    assert a.keys() == b.keys()
    for key in a:
        if key[0].endswith("_created"):
            continue
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
    strip = lambda text: re.sub(r"(_created|_sum) \S+", r"\1 X", text)  # noqa: E731
    assert strip(generate_latest(r1).decode()) == strip(generate_latest(r2).decode())


def test_inter_token_latency_count_is_one_less_than_tokens_per_sequence():
    from test_server import TINY, ThreadServer, metric
    import httpx
    from llamas.server import create_app
    with ThreadServer(create_app(llamas.load(TINY))) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        before = metric(http, "llamas_inter_token_latency_seconds_count")
        for stream in (False, True):
            r = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0,
                                                   "logit_bias": {"77": 100}, "stream": stream})
            assert r.status_code == 200
        assert metric(http, "llamas_inter_token_latency_seconds_count") == before + 2 * 5
        assert metric(http, "llamas_inter_token_latency_seconds_bucket", 'le="+Inf"') == before + 2 * 5


# ---- the load test's client --------------------------------------------------------------------------
def test_load_client_counts_tokens_of_a_real_stream():
    from test_server import TINY, ThreadServer
    from llamas.server import create_app
    model = llamas.load(TINY)
    with ThreadServer(create_app(model)) as s:
        async def main():
            c = StreamClient(s.url)
            results = []
            for max_tokens in (1, 7, 20):  # three requests on one keep-alive connection
                results.append(await c.complete({"prompt": [1, 2, 3], "max_tokens": max_tokens, "temperature": 0,
                                                 "logit_bias": {"77": 100}, "stream": True,
                                                 "stream_options": {"include_usage": True}}))
            with pytest.raises(StreamError, match="HTTP 400"):
                await c.complete({"prompt": "x", "max_tokens": 0, "stream": True})
            c.close()
            return results
        results = asyncio.run(main())
    assert [r.tokens for r in results] == [1, 7, 20]
    assert all(r.first is not None and r.last >= r.first for r in results)


OK_CHUNK = b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"a","logprobs":null,"finish_reason":%s}],"usage":null}\n\n'  # noqa: E501
USAGE = b'data: {"id":"c","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'  # noqa: E501
DONE = b"data: [DONE]\n\n"
GOOD = OK_CHUNK % b"null" + OK_CHUNK % b'"length"' + USAGE + DONE


def _chunked(body: bytes, pieces: int = 3) -> bytes:
    cut = sorted(random.Random(len(body)).sample(range(1, len(body)), pieces - 1))
    parts = [body[a:b] for a, b in zip([0] + cut, cut + [len(body)])]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("body,error", [
    (GOOD, None),
    (OK_CHUNK % b"null" + USAGE + DONE, "DONE. before a finish_reason"),
    (OK_CHUNK % b'"length"' + DONE, "before a finish_reason and the usage"),
    (OK_CHUNK % b'"length"' + USAGE, "without data: .DONE."),
    (GOOD.replace(b'"text":"a"', b'"text":7', 1), "a bad choice"),
    (GOOD.replace(b'"length"', b'"maybe"'), "a bad choice"),
    (GOOD.replace(b'"index":0', b'"index":1', 1), "a bad choice"),
    (GOOD.replace(b'"object":"text_completion"', b'"object":"x"', 1), "not a completion chunk"),
    (b"data: {not json}\n\n" + GOOD, "not JSON"),
    (b'data: {"error":{"message":"boom"}}\n\n', "boom"),
    (GOOD.replace(b'"completion_tokens":2', b'"completion_tokens":"2"'), "usage chunk"),
    (GOOD + OK_CHUNK % b"null", "after data: .DONE."),
    (OK_CHUNK % b'"stop"' + OK_CHUNK % b"null" + USAGE + DONE, "after its finish_reason"),
    (b"event: x\n\n" + GOOD, "not a data event"),
    (GOOD + b"data: {", "inside an event"),
])
def test_load_client_rejects_every_malformed_stream(body, error):
    async def main():
        async def serve(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + _chunked(body))
            await writer.drain()
            await reader.read()  # keep the connection open until the client closes it
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = StreamClient(f"http://127.0.0.1:{port}")
        try:
            return await asyncio.wait_for(c.complete({"prompt": "x"}), 10)
        finally:
            c.close()
            server.close()
    if error is None:
        assert asyncio.run(main()).tokens == 2
    else:
        with pytest.raises(StreamError, match=error):
            asyncio.run(main())
