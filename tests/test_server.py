"""The OpenAI-compatible server: the official openai client, raw httpx for every bad input, auth,
limits, continuous batching, cancellation, memory, metrics, logs and SIGTERM. Servers run on free
127.0.0.1 ports (uvicorn in a background thread, or `llamas serve` in a subprocess) and are shut
down by each fixture."""
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import llamas
from conftest import SlowNative  # noqa: E402
from llamas.server import create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "fixtures", "gpt2-tiny")
PROMPT = "When shall we three meet again"
KEY = "sekret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    def __init__(self, app, **config_kwargs):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                **config_kwargs)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    @property
    def state(self):
        return self.app.state.llamas


@pytest.fixture(scope="module")
def model():
    return llamas.load(TINY)


@pytest.fixture(scope="module")
def srv(model):
    with ThreadServer(create_app(model, max_batch=16)) as s:
        yield s


@pytest.fixture(scope="module")
def limited(model):
    """A second app in the same process: API key, tiny body limit, one running sequence, no queue
    (and slow steps, so that a 64-token stream is still running when the next request comes)."""
    slow_model = llamas.Model(SlowNative(model._native, 0.01), model.config, model.tokenizer, model.path)
    app = create_app(slow_model, api_key=KEY, max_batch=1, max_queue=0, max_body_bytes=4096, max_tokens=64,
                     model_name="tiny")
    with ThreadServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def slow(model):
    slow_model = llamas.Model(SlowNative(model._native, 0.01), model.config, model.tokenizer, model.path)
    with ThreadServer(create_app(slow_model)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


def metric(http, name: str, labels: str = "") -> float:
    text = http.get("/metrics").text
    key = name + ("{" + labels + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def served_client(model, **app_kwargs):
    """An httpx client of a ThreadServer running create_app(model, **app_kwargs)."""
    with ThreadServer(create_app(model, **app_kwargs)) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            yield c


def wait_healthy(proc, url: str, timeout: float = 30) -> None:
    """Waits until a `llamas serve` subprocess answers /health with 200 (fails if it exits)."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def assert_still_serving(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


# ---- the official client ------------------------------------------------------------------------
def test_completions_stream_equals_non_stream(client, model, srv, http):
    assert http.get("/health").json() == {"status": "ok", "model": "gpt2-tiny"}
    assert [m.id for m in client.models.list().data] == ["gpt2-tiny"]
    r = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    text = r.choices[0].text
    assert text == model.generate(PROMPT, max_new_tokens=24)  # the same scheduler as Model.generate
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    n_prompt = len(model.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)
    chunks = list(client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24
    # Token ids in, and a batch of prompts: choices ordered prompt-major.
    ids = model.tokenizer.encode(PROMPT)
    r = client.completions.create(model="gpt2-tiny", prompt=[ids, "Alas, poor"], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == text[:len(r.choices[0].text)] and r.choices[1].text == model.generate(
        "Alas, poor", max_new_tokens=8)


class RecordSends:
    """ASGI middleware keeping every message the app sends per HTTP request: (path, [messages])."""

    def __init__(self, app):
        self.app = app
        self.requests = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        log = []
        self.requests.append((scope["path"], log))

        async def record(message):
            log.append(message)
            await send(message)
        await self.app(scope, receive, record)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_a_stream_ends_in_one_body_message(model, kind):
    """The last engine step's chunks, the usage chunk and [DONE] go out in the message that ends the
    body (one write to the socket), and every earlier message carries at least one event."""
    rec = RecordSends(create_app(model))
    with ThreadServer(rec) as s:
        body = {"max_tokens": 12, "temperature": 0, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": PROMPT}]
        else:
            body["prompt"] = PROMPT
        with httpx.Client(base_url=s.url, timeout=30) as c:
            streamed = c.post(f"/v1/{'chat/' if kind == 'chat' else ''}completions", json=body).text
    (path, messages), = [r for r in rec.requests if r[0].startswith("/v1/")]
    assert messages[0]["type"] == "http.response.start"
    bodies = [m for m in messages[1:] if m["type"] == "http.response.body"]
    assert len(bodies) == len(messages) - 1
    assert [m.get("more_body", False) for m in bodies] == [True] * (len(bodies) - 1) + [False]
    assert all(m["body"].startswith(b"data: ") for m in bodies)
    assert b"".join(m["body"] for m in bodies).decode() == streamed
    last = bodies[-1]["body"].decode()
    events = [e for e in last.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 24  # 2 choices x 12 tokens
    chunks = [json.loads(e[6:])["choices"][0] for e in events[:-2]]
    assert any(c["finish_reason"] == "length" for c in chunks)  # the last step's finish is in this message
    every = [json.loads(e[6:])["choices"] for e in streamed.split("\n\n") if e.startswith("data: {")]
    # Both choices end; with a prompt over 16 tokens (chat's template) the second shares the first's
    # prefill and runs one step behind it, so their finishes may come in different messages.
    assert sorted(c[0]["index"] for c in every if c and c[0]["finish_reason"] == "length") == [0, 1]


def test_a_middleware_added_to_the_app_sees_every_streamed_event(model):
    """Streamed events skip the app's middleware chain only while no middleware but the server's own
    is installed: one a user adds (here it counts body bytes) must see the whole body."""
    seen = []

    class CountBody:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def counting(message):
                if message["type"] == "http.response.body":
                    seen.append(len(message.get("body", b"")))
                await send(message)
            await self.app(scope, receive, counting)
    app = create_app(model)
    app.add_middleware(CountBody)
    with ThreadServer(app) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            text = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "stream": True}).text
    assert text.endswith("data: [DONE]\n\n") and sum(seen) == len(text.encode()) and len(seen) > 2


def test_chat_stream_equals_non_stream(client, http, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="gpt2-tiny", messages=messages, max_tokens=20, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.object == "chat.completion"
    # The plain template (no chat_template in the fixture): "role: content" lines, then "assistant:".
    prompt = "system: You are terse.\nuser: Say hello.\nassistant:"
    assert msg.content == model.generate(prompt, max_new_tokens=20)
    tok = http.post("/tokenize", json={"messages": messages}).json()
    assert tok["tokens"] == model.tokenizer.encode(prompt) and r.usage.prompt_tokens == tok["count"]
    chunks = list(client.chat.completions.create(model="gpt2-tiny", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_are_never_leaked(client, model):
    full = model.generate(PROMPT, max_new_tokens=30)
    out_ids = model.generate(model.tokenizer.encode(PROMPT), max_new_tokens=30)
    # A stop string that spans a token boundary: the last character of token k and the first of k+1.
    for k in range(2, 20):
        a, b = model.tokenizer.decode(out_ids[:k]), model.tokenizer.decode(out_ids[:k + 1])
        if a and b.startswith(a) and len(b) > len(a) and "\ufffd" not in b:
            break
    stop = a[-1] + b[len(a)]
    cut = full[:full.find(stop)]
    assert len(cut) <= len(a) - 1
    r = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="gpt2-tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == cut and not any(stop in p for p in pieces)


def test_n_seed_logprobs_and_logit_bias(client, model):
    kw = dict(model="gpt2-tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=3, n=3)
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) > 1
    assert [c.text for c in client.completions.create(**kw).choices] == [c.text for c in r.choices]
    assert r.usage.completion_tokens == 30
    streamed = {}
    for c in client.completions.create(stream=True, **kw):
        streamed[c.choices[0].index] = streamed.get(c.choices[0].index, "") + c.choices[0].text
    assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]
    # Sampling extras reach the sampler: top_k=1 is greedy.
    r = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=8, temperature=1.5,
                                  extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.0})
    assert r.choices[0].text == model.generate(PROMPT, max_new_tokens=8)
    # Legacy completions logprobs (top 5).
    r = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 5 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[tok] == pytest.approx(v) and max(top.values()) == pytest.approx(v)  # greedy: the best token
    stream_lp = [c.choices[0].logprobs for c in client.completions.create(
        model="gpt2-tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5, stream=True)
        if c.choices[0].logprobs]
    assert sum((x.token_logprobs for x in stream_lp), []) == lp.token_logprobs
    assert sum((x.text_offset for x in stream_lp), []) == lp.text_offset
    # Chat logprobs.
    r = client.chat.completions.create(model="gpt2-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    assert len(r.choices[0].logprobs.content) == 4 and len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    # logit_bias forces a token.
    r = client.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=5, temperature=0,
                                  logit_bias={"77": 100})
    assert r.choices[0].text == model.tokenizer.decode([77] * 5)


def test_tokenize_detokenize_and_health(http, model):
    r = http.post("/tokenize", json={"prompt": PROMPT})
    ids = model.tokenizer.encode(PROMPT)
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 128}
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": model.tokenizer.decode(ids)}
    assert http.get("/v1/models/gpt2-tiny").json()["id"] == "gpt2-tiny"
    assert http.get("/v1/models/other").status_code == 404
    for path in ("/health", "/v1/models", "/version", "/metrics"):  # health checkers that ask with HEAD
        r = http.head(path)
        assert r.status_code == 200 and r.content == b"", path
    assert http.head("/v1/completions").status_code == 405


# ---- bad input: raw httpx ----------------------------------------------------------------------
LONG = "When shall we three meet again " * 40
BAD = [
    # (path, body (dict, or raw bytes), expected status, expected param or None, substring of the message)
    ("/v1/completions", {"prompt": PROMPT, "temperature": 1e9}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": -1}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1e-320}, 400, "top_p", "float32"),  # 0 once it is a float32
    ("/v1/completions", {"prompt": PROMPT, "repetition_penalty": 1e-320}, 400, "repetition_penalty", "float32"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": 1.5}, 400, "top_k", "integer"),
    ("/v1/completions", {"prompt": PROMPT, "min_p": 2}, 400, "min_p", "min_p"),
    ("/v1/completions", {"prompt": PROMPT, "repetition_penalty": 0}, 400, "repetition_penalty", ""),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 3}, 400, "presence_penalty", ""),
    ("/v1/completions", {"prompt": PROMPT, "frequency_penalty": -2.5}, 400, "frequency_penalty", ""),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1000}, 400, "max_tokens", "128"),
    ("/v1/completions", {"prompt": PROMPT, "n": 10000}, 400, "n", "n"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n", "n"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -2 ** 63 - 1}, 400, "seed", "seed"),
    ("/v1/completions", {"prompt": PROMPT, "seed": "7"}, 400, "seed", "integer"),
    ("/v1/completions", {"prompt": PROMPT, "stop": 5}, 400, "stop", "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["a"] * 17}, 400, "stop", "16"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, 400, "logprobs", "5"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"x": 1}}, 400, "logit_bias", "token"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"99999": 1}}, 400, "logit_bias", "vocabulary"),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 101}}, 400, "logit_bias", "100"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    ("/v1/completions", {"prompt": PROMPT, "bogus": 1}, 400, "bogus", "Unrecognized"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4"}, 400, "model", "does not exist"),
    ("/v1/completions", {"prompt": PROMPT, "model": 3}, 400, "model", "string"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", ""),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", ""),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": [[1, 2], "x", None]}, 400, "prompt", ""),
    ("/v1/completions", b'{"prompt": "\\ud800 lone surrogate"}', 400, "prompt", "UTF-8"),
    # Lone surrogates echoed back in an error (a model name, an unknown key) are escaped, not a 500.
    ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', 400, "model", "UTF-8"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "a\\udfff"}', 400, "model",
     "UTF-8"),
    ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', 400, "\ud800", "Unrecognized"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "128"),
    ("/v1/completions", b'{"prompt": "\xff\xfe bad bytes"}', 400, None, "UTF-8"),
    ("/v1/completions", b'{"prompt": "unterminated', 400, None, "JSON"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None, "JSON"),
    ("/v1/completions", b"[1, 2, 3]", 400, None, "object, got array"),
    ("/v1/completions", b"null", 400, None, "object, got null"),
    ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, None, "more than 4300 digits"),
    ("/v1/completions", b"", 400, None, "empty"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, None, "JSON"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least one"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "array"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools[0].function", "must be an object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "128"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400,
     "top_logprobs", "logprobs"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
    ("/tokenize", {}, 400, "prompt", "one of"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens", "vocabulary"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "array"),
]


def test_a_compressed_body_is_refused(http):
    import gzip
    r = http.post("/v1/completions", content=gzip.compress(json.dumps({"prompt": PROMPT}).encode()),
                  headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding", r.text
    assert_still_serving(http)


def test_every_bad_input_gets_a_400_and_the_server_keeps_serving(http, model):
    for path, body, status, param, text in BAD:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, (path, body if not isinstance(body, bytes) else body[:40], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
        assert text.lower() in err["message"].lower(), (body, err)
    # A prompt longer than the context names both token counts.
    n = len(model.tokenizer.encode(LONG))
    msg = http.post("/v1/completions", json={"prompt": LONG}).json()["error"]["message"]
    assert str(n) in msg and "128" in msg
    # 404 and 405 in the same format.
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert_still_serving(http)


def test_a_huge_prompt_does_not_stall_other_requests(srv, http):
    huge = "When shall we three meet again " * 25000  # 775 kB: tokenised off the event loop
    done = {}

    def post_huge():
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": huge}, timeout=60)
        done["huge"] = time.time()
        done["error"] = r.json()["error"]
    t = threading.Thread(target=post_huge)
    t.start()
    time.sleep(0.05)
    assert_still_serving(http)
    small = time.time()
    t.join()
    assert small < done["huge"] and "context length is 128 tokens" in done["error"]["message"]


def test_auth_body_limit_max_tokens_and_queue_full(limited, model):
    with httpx.Client(base_url=limited.url, timeout=30) as h:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3}
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = h.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert h.get("/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert h.post("/v1/completions", json=body, headers=auth).status_code == 200
        # Bodies over --max-body-bytes: 413 (declared length, and chunked without one).
        big = dict(body, prompt="x" * 5000)
        r = h.post("/v1/completions", json=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = h.post("/v1/completions", content=iter([json.dumps(big).encode()]), headers=auth)
        assert r.status_code == 413
        # max_tokens beyond the server's cap.
        r = h.post("/v1/completions", json=dict(body, max_tokens=65), headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        # One sequence runs, none may wait: a second request while the first streams gets 429.
        openai_client = openai.OpenAI(base_url=limited.url + "/v1", api_key=KEY, max_retries=0)
        # Sampled, so end-of-text is biased out: a stream that drew it early (a ~1/vocab chance per
        # token with a random seed) ended with "stop" before the 429 check, a flaky failure.
        no_eos = {str(model.tokenizer.eos_token_id): -100}
        stream = openai_client.completions.create(model="tiny", prompt="Hi", max_tokens=64, stream=True, seed=7,
                                                  logit_bias=no_eos)
        it = iter(stream)
        next(it)
        r = h.post("/v1/completions", json=body, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai_client.completions.create(model="tiny", prompt="Hi", max_tokens=3)
        rest = list(it)
        assert [c.choices[0].finish_reason for c in rest][-1] == "length"
        assert h.post("/v1/completions", json=body, headers=auth).status_code == 200
        assert metric(h, "llamas_requests_total", 'endpoint="/v1/completions",status="429"') == 2


# ---- continuous batching -----------------------------------------------------------------------
def test_16_concurrent_greedy_requests_equal_each_alone(srv, http):
    prompts = [f"{PROMPT} {i}" * (1 + i % 3) for i in range(16)]
    kinds = ["stream" if i % 2 else "plain" for i in range(16)]
    alone = []
    for i, p in enumerate(prompts):
        r = http.post("/v1/completions", json={"prompt": p, "max_tokens": 20 + i, "temperature": 0})
        alone.append(r.json()["choices"][0]["text"])
    steps_before = srv.state.engine.steps

    async def one(ac, i):
        body = {"prompt": prompts[i], "max_tokens": 20 + i, "temperature": 0}
        if kinds[i] == "plain":
            r = await ac.post("/v1/completions", json=body)
            return r.json()["choices"][0]["text"]
        text = ""
        async with ac.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(16)))

    together = asyncio.run(main())
    assert together == alone
    total_tokens = sum(20 + i for i in range(16))
    assert srv.state.engine.steps - steps_before < total_tokens / 2  # they really ran batched


# ---- cancellation and memory -------------------------------------------------------------------
def wait_for(fn, timeout=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return True
        time.sleep(0.01)
    return fn()


def test_disconnect_mid_stream_frees_the_sequence(slow):
    http = httpx.Client(base_url=slow.url, timeout=30)
    cancelled = metric(http, "llamas_sequences_finished_total", 'finish_reason="cancelled"')
    body = {"prompt": [1, 2, 3], "max_tokens": 120, "temperature": 0}  # 120 steps of >= 10 ms
    with httpx.Client(base_url=slow.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert metric(http, "llamas_requests_running") == 1 and metric(http, "llamas_kv_cache_blocks_in_use") > 0
            assert metric(http, "llamas_kv_cache_bytes_in_use") > 0
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: metric(http, "llamas_kv_cache_blocks_in_use") == 0
                    and metric(http, "llamas_kv_cache_bytes_in_use") == 0
                    and metric(http, "llamas_requests_running") == 0, timeout=1.0)
    assert metric(http, "llamas_sequences_finished_total", 'finish_reason="cancelled"') == cancelled + 1
    # A non-streaming client that gives up is cancelled too.
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body, timeout=0.2)
    assert wait_for(lambda: metric(http, "llamas_kv_cache_blocks_in_use") == 0
                    and metric(http, "llamas_requests_running") == 0, timeout=1.0)
    assert metric(http, "llamas_sequences_finished_total", 'finish_reason="cancelled"') == cancelled + 2
    assert_still_serving(http)
    http.close()


def test_200_sequential_requests_leave_allocator_bytes_unchanged(http):
    assert_still_serving(http)
    before = llamas.memory_stats()["bytes_in_use"]
    for i in range(200):
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 4, "temperature": 0.7, "seed": i, "stream": i % 2 == 1}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200
    assert llamas.memory_stats()["bytes_in_use"] == before
    assert metric(http, "llamas_allocator_bytes_in_use") == before
    assert metric(http, "llamas_kv_cache_blocks_in_use") == 0


# ---- metrics and logs --------------------------------------------------------------------------
def test_metrics_and_one_json_log_line_per_request(srv, http, caplog):
    with caplog.at_level(logging.INFO, logger="llamas.server"):
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        rid = r.json()["id"]
        http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
        assert wait_for(lambda: len([x for x in caplog.records if x.name == "llamas.server"]) >= 2)
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "llamas.server"]
    ok = [x for x in lines if x.get("id") == rid]
    assert len(ok) == 1
    ok = ok[0]
    assert ok["status"] == 200 and ok["completion_tokens"] == 5 and ok["prompt_tokens"] > 0
    assert ok["finish_reason"] == ["length"] and ok["ttft_s"] > 0 and ok["e2e_s"] >= ok["ttft_s"]
    assert any(x["status"] == 400 and x["error"] == "invalid_value" for x in lines)
    text = http.get("/metrics").text
    for name in ("llamas_requests_total", "llamas_prompt_tokens_total", "llamas_generation_tokens_total",
                 "llamas_time_to_first_token_seconds_bucket", "llamas_inter_token_latency_seconds_bucket",
                 "llamas_e2e_request_latency_seconds_bucket", "llamas_request_queue_time_seconds_bucket",
                 "llamas_requests_running", "llamas_requests_waiting", "llamas_kv_cache_blocks_in_use",
                 "llamas_kv_cache_bytes_in_use",
                 "llamas_allocator_bytes_in_use", "llamas_allocator_peak_bytes", "llamas_allocator_bytes_reserved",
                 "process_resident_memory_bytes"):
        assert name in text, name
    assert metric(http, "llamas_allocator_bytes_reserved") >= metric(http, "llamas_allocator_bytes_in_use") > 0
    assert metric(http, "process_resident_memory_bytes") > metric(http, "llamas_allocator_bytes_in_use")
    assert metric(http, "llamas_requests_total", 'endpoint="/v1/completions",status="200"') > 0
    info = next(line for line in text.splitlines() if line.startswith("llamas_model_info{"))
    for label in ('dtype="float32"', 'kv_dtype="float32"', 'compute_dtype="float32"',
                  f'kernel_variant="{llamas._C.kernel_variant()}"', f'version="{llamas.__version__}"',
                  f'i8_dot_native="{str(llamas._C.i8_dot_native()).lower()}"'):
        assert label in info, (label, info)
    assert info.endswith(" 1.0")
    # The engine thread's step counters: 5 tokens were generated above, each by one step.
    steps = metric(http, "llamas_engine_steps_total")
    assert steps >= 5 and metric(http, "llamas_engine_step_sequences_total") >= steps
    forward = metric(http, "llamas_engine_forward_seconds_total")
    assert forward > 0 and 0 <= metric(http, "llamas_engine_gil_wait_seconds_total") <= forward
    assert metric(http, "llamas_engine_host_seconds_total") > 0


# ---- loading, chat templates, shutdown ----------------------------------------------------------
def test_health_is_503_while_loading_and_chat_template(tmp_path, model):
    folder = tmp_path / "chatty"
    shutil.copytree(TINY, folder)
    template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
                "<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|endoftext|>"}))
    gate = threading.Event()

    def loader():
        gate.wait(10)
        return llamas.load(folder)

    app = create_app(loader)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            assert (await ac.get("/health")).status_code == 503
            r = await ac.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            gate.set()
            deadline = time.time() + 10
            while (await ac.get("/health")).status_code != 200:
                assert time.time() < deadline
                await asyncio.sleep(0.01)
            msgs = [{"role": "user", "content": "hi"}]
            r = await ac.post("/tokenize", json={"messages": msgs})
            assert r.json()["tokens"] == model.tokenizer.encode("<user>hi\n<assistant>")
            r = await ac.post("/v1/chat/completions", json={"model": "chatty", "messages": msgs, "max_tokens": 5,
                                                            "temperature": 0})
            assert r.json()["choices"][0]["message"]["content"] == model.generate("<user>hi\n<assistant>",
                                                                                   max_new_tokens=5)
            r = await ac.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
            assert r.status_code == 400 and "no tools" in r.json()["error"]["message"]
    asyncio.run(main())
    app.state.llamas.engine.close()

    # An unexpected exception in a handler is a 500 in the same JSON format, not a dead server.
    @app.get("/boom")
    async def boom():
        raise RuntimeError("kaput")

    async def check_boom():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            r = await ac.get("/boom")
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert (await ac.get("/health")).status_code == 200
    asyncio.run(check_boom())
    broken = create_app(str(tmp_path / "missing"))
    deadline = time.time() + 10
    while broken.state.llamas.load_error is None:
        assert time.time() < deadline
        time.sleep(0.01)

    async def check_broken():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=broken), base_url="http://t") as ac:
            r = await ac.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "error"
    asyncio.run(check_broken())


def test_cli_serve_sigterm_finishes_running_requests_then_exits(tmp_path, model):
    # A model big enough that 120 tokens take a while (random weights, the fixture's tokenizer).
    folder = str(tmp_path / "medium")
    llamas.create(dict(vocab_size=512, n_embd=384, n_layer=6, n_head=6, n_positions=512), seed=1,
                  tokenizer=model.tokenizer).save(folder)
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "llamas", "serve", "--model", folder, "--port", str(port),
                             "--api-key-file", str(key_file), "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        t_start = time.time()
        stream = iter(c.completions.create(model="medium", prompt=[1, 2, 3], max_tokens=120, temperature=0,
                                           stream=True))
        first = next(stream)
        # A client stuck partway through its body does not hold the shutdown up: it gets a 503.
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                        "Content-Length: 100\r\n\r\n{\"prom".encode())
        t_signal = time.time()
        proc.send_signal(signal.SIGTERM)

        def refused():
            try:
                httpx.get(url + "/health", timeout=0.5)
                return False
            except httpx.TransportError:
                return True
        assert wait_for(refused, timeout=2.0)  # no new connections ...
        rest = list(stream)                    # ... but the running request finishes
        text = first.choices[0].text + "".join(x.choices[0].text for x in rest)
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
        assert stalled.recv(1000).startswith(b"HTTP/1.1 503")
        stalled.close()
        served = llamas.load(folder)
        assert text == served.tokenizer.decode(served.generate([1, 2, 3], max_new_tokens=120))
        log_lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        done = [x for x in log_lines if x.get("event") == "request" and x.get("completion_tokens") == 120]
        assert len(done) == 1 and done[0]["status"] == 200
        # The last token came after the signal: the request was running when it arrived.
        print("signal after", t_signal - t_start, "s; request took", done[0]["e2e_s"], "s")
        assert done[0]["e2e_s"] > t_signal - t_start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def cli_server(folder, *args):
    """A `llamas serve --model folder` subprocess, healthy: (process, its openai client)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamas", "serve", "--model", folder, "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        yield proc, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_sighup_drains_like_sigterm():
    # A closed terminal or SSH session: the running stream finishes, then the server exits 0
    # (SIGHUP ended the process at once, cutting every stream without a log line).
    with cli_server(TINY, "--log-format", "json") as (proc, c):
        stream = iter(c.completions.create(model="gpt2-tiny", prompt=[1, 2, 3], max_tokens=100, stream=True,
                                           extra_body={"ignore_eos": True}))
        next(stream)
        proc.send_signal(signal.SIGHUP)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines()]  # --log-format json: every line
        assert [x["completion_tokens"] for x in lines if x["event"] == "request"] == [100]
        assert {"event": "log", "level": "info", "logger": "uvicorn.error", "message": "Shutting down"} in lines


def test_cli_serve_second_ctrl_c_stops_at_once_without_tracebacks(tmp_path, model):
    folder = str(tmp_path / "medium")
    llamas.create(dict(vocab_size=512, n_embd=384, n_layer=6, n_head=6, n_positions=1024), seed=1,
                  tokenizer=model.tokenizer).save(folder)
    with cli_server(folder) as (proc, c):
        stream = iter(c.completions.create(model="medium", prompt=[1, 2, 3], max_tokens=1000, stream=True))
        next(stream)
        proc.send_signal(signal.SIGINT)   # stop accepting, let the stream finish ...
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)   # ... no: stop now
        status = proc.wait(timeout=30)
        err = proc.stderr.read()
        assert status == 130, err             # as an interrupted program, quietly
        assert "Traceback" not in err and "CancelledError" not in err and "terminate called" not in err, err
        assert "ERROR" not in err, err
        cut = [json.loads(line) for line in err.splitlines() if '"event":"request"' in line]
        assert len(cut) == 1 and cut[0]["cancelled"] is True and cut[0]["finish_reason"] in ([None], ["cancelled"])
        with pytest.raises(Exception):    # the stream was cut, not finished
            for chunk in stream:
                assert chunk.choices[0].finish_reason is None


def test_a_body_that_stops_arriving_or_a_client_that_leaves_mid_body(model, caplog, monkeypatch):
    from llamas import server_state
    monkeypatch.setattr(server_state, "BODY_TIMEOUT_S", 1.0)
    with ThreadServer(create_app(model)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        port = int(srv.url.rsplit(":", 1)[1])
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", port)) as s:  # stops sending: 408 after the timeout
            s.sendall(head + b"Content-Length: 100\r\n\r\n{\"prompt\"")
            s.settimeout(10)
            reply = s.recv(2000)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply[:300]
        with caplog.at_level(logging.INFO, logger="llamas.server"):
            with socket.create_connection(("127.0.0.1", port)) as s:  # leaves mid-body: a 499, no traceback
                s.sendall(head + b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hi\"")
                time.sleep(0.2)
            assert wait_for(lambda: metric(http, "llamas_requests_total",
                                           'endpoint="/v1/completions",status="499"') == 1, timeout=5)
        assert "unhandled error" not in caplog.text and metric(http, "llamas_requests_total",
                                                               'endpoint="/v1/completions",status="500"') == 0
        assert_still_serving(http)


def test_a_client_that_stops_reading_is_cut_after_the_write_timeout(model, caplog, monkeypatch):
    from llamas import server_state
    monkeypatch.setattr(server_state, "WRITE_TIMEOUT_S", 1.0)
    with ThreadServer(create_app(model)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        port = int(srv.url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "n": 64, "stream": True, "ignore_eos": True,
                           "logprobs": 5}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with caplog.at_level(logging.INFO, logger="llamas.server"):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", port))
            try:
                s.sendall((head + body) * 4)  # ~10 MB of events, and never read
                # Cut after the timeout: its sequences freed, the connection closed.
                assert wait_for(lambda: '"stalled":true' in caplog.text, timeout=30)
                assert wait_for(lambda: metric(http, "llamas_requests_running") == 0
                                and llamas.memory_stats()["kv_cache_blocks_in_use"] == 0, timeout=10)
                s.settimeout(10)
                while s.recv(1 << 16):  # (what was sent before the cut), then the end
                    pass
            finally:
                s.close()
        assert "unhandled error" not in caplog.text and "Traceback" not in caplog.text
        assert_still_serving(http)


def test_an_app_serves_again_after_its_lifespan_ended(model):
    from starlette.testclient import TestClient
    app = create_app(model)
    for _ in range(2):  # pytest's pattern: one app, a client per test
        with TestClient(app) as c:
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    assert app.state.llamas.draining


def test_an_app_mounted_under_a_prefix_labels_its_endpoints(model):
    from fastapi import FastAPI
    from starlette.testclient import TestClient
    outer, app = FastAPI(), create_app(model)
    outer.mount("/llm", app)
    with TestClient(app), TestClient(outer) as c:  # (a mounted app's lifespan is its owner's to run)
        assert c.post("/llm/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
        text = c.get("/llm/metrics").text
    assert 'llamas_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text


def test_a_request_cancelled_in_the_queue_is_not_a_served_latency(model, caplog):
    # The first request runs ~2 s (100 steps of 20 ms): the second, impatient after 0.3 s, is still
    # queued behind it however slow the machine (with 40 steps of 10 ms, a sanitizer build's run
    # once admitted it first).
    slow_model = llamas.Model(SlowNative(model._native, 0.02), model.config, model.tokenizer, model.path)
    with served_client(slow_model, max_batch=1) as http, caplog.at_level(logging.INFO, logger="llamas.server"):
        def running():
            return metric(http, "llamas_requests_running")
        first = threading.Thread(target=lambda: http.post("/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "temperature": 0}))
        first.start()
        assert wait_for(lambda: running() == 1, timeout=10)
        with httpx.Client(base_url=str(http.base_url), timeout=0.3) as impatient:
            with pytest.raises(httpx.TimeoutException):  # waits behind the first, then leaves
                impatient.post("/v1/completions", json={"prompt": PROMPT + " and more", "max_tokens": 5},
                               headers={"X-Request-Id": "gave-up-1"})
        first.join(30)
        assert wait_for(lambda: metric(http, "llamas_sequences_finished_total",
                                       'finish_reason="cancelled"') == 1, timeout=10)
        prompt = len(model.tokenizer.encode(PROMPT))
        assert metric(http, "llamas_prompt_tokens_total") == prompt  # the cancelled prompt was never processed
        assert metric(http, "llamas_e2e_request_latency_seconds_count") == 1
        assert metric(http, "llamas_request_queue_time_seconds_count") == 1
        assert http.get("/v1/nowhere", headers={"X-Request-Id": "lost-2"}).status_code == 404
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith('{"event":"request"')]
    ids = {x["id"]: x for x in lines}
    assert ids["cmpl-gave-up-1"]["status"] == 499 and ids["cmpl-gave-up-1"]["finish_reason"] == ["cancelled"]
    assert ids["lost-2"]["status"] == 404  # errors keep the client's id


def test_request_heads_have_a_clock_and_a_size_limit(model, monkeypatch):
    from llamas import server_http
    monkeypatch.setattr(server_http, "HEAD_TIMEOUT_S", 1.0)
    with ThreadServer(create_app(model), http=server_http.guarded_protocol()) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        port = int(srv.url.rsplit(":", 1)[1])

        def reply(data: bytes, then=None) -> bytes:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.settimeout(10)
                t0 = time.time()
                if data:
                    s.sendall(data)
                if then:
                    then(s)
                got = b""
                while chunk := s.recv(1 << 16):
                    got += chunk
                assert time.time() - t0 < 8
                return got

        assert reply(b"") == b""  # connected and silent: closed after the timeout
        slow = reply(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Len")  # a head that stops
        assert slow.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow, slow[:200]
        huge = reply(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024))
        assert huge.startswith(b"HTTP/1.1 431") and b"headers_too_large" in huge, huge[:200]

        def trickle(s):  # one request served, then the next head a byte at a time: cut, not held
            s.recv(1 << 16)
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.1)
        kept = reply(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", then=trickle)
        assert kept.startswith(b"HTTP/1.1 408") and b"request_timeout" in kept, kept[:300]
        # A head followed by a large body in the same packets is one head, not an oversized one.
        text = "word " * 60_000
        r = http.post("/tokenize", json={"prompt": text})
        assert r.status_code == 200 and r.json()["count"] > 0
        assert_still_serving(http)


def test_a_graceful_stop_aborts_connections_whose_client_stopped_reading(monkeypatch):
    from llamas import server_http, server_state
    monkeypatch.setattr(server_state, "WRITE_TIMEOUT_S", 1.5)

    class Transport:
        def __init__(self, unsent):
            self.unsent, self.aborted = unsent, False

        def get_write_buffer_size(self):
            return self.unsent() if callable(self.unsent) else self.unsent

        def abort(self):
            self.aborted = True

    class Conn:
        def __init__(self, transport):
            self.transport, self.client = transport, ("127.0.0.1", 1)

    sizes = iter(range(10**6, 0, -1000))
    stuck, reading, done = Conn(Transport(5000)), Conn(Transport(lambda: next(sizes))), Conn(Transport(0))
    state = type("State", (), {"connections": {stuck, reading, done}})()

    async def run():
        watchdog = asyncio.ensure_future(server_http.abort_stalled_connections(state))
        await asyncio.sleep(4.2)
        watchdog.cancel()
    asyncio.run(run())
    assert stuck.transport.aborted and not reading.transport.aborted and not done.transport.aborted


def test_cli_serve_refuses_an_address_it_cannot_listen_on_before_loading():
    # A port another server holds, and an address this machine does not have: a clear error and
    # status 2 at once, not uvicorn's bind error (status 3) after the model has loaded.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        for args, expect in ((["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                             (["--host", "nosuchhost.invalid", "--port", "0"], "'nosuchhost.invalid' is not an address"),
                             (["--host", "0.0.0.2", "--port", "0"], "cannot listen on 0.0.0.2:0")):
            r = subprocess.run([sys.executable, "-m", "llamas", "serve", "--model", TINY] + args, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])
            assert "model_loaded" not in r.stderr
    finally:
        holder.close()
