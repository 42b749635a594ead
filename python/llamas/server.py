"""An OpenAI-compatible HTTP server over `llamas.Engine` (continuous batching).

    from llamas.server import create_app
    app = create_app(llamas.load("DIR"))            # an ASGI app: uvicorn, or mount it in yours
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize, GET /metrics. `llamas serve` runs it from the command line.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import List, Optional, Union

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ._C import LlamasError
from .engine import Engine, EngineClosed, QueueFull
from .engine import Request as EngineRequest
from .engine import SamplingOptions
from .server_metrics import CONTENT_TYPE_LATEST, ServerMetrics, log_request
from .server_protocol import (APIError, ChatTemplate, GenParams, bad, check_token_ids, check_unknown,
                              chat_logprobs, completion_logprobs, get_bool, get_str, parse_chat,
                              parse_completion, parse_json_body, parse_messages)

log = logging.getLogger("llamas.server")

ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
             "/metrics")
OPEN_PATHS = ("/health", "/metrics")      # answered without the API key
_THREAD_TOKENIZE_CHARS = 4096             # longer texts are tokenised off the event loop


class _Dispatcher:
    """Hands chunks from the engine thread to event-loop queues with one loop wake-up per engine
    step (call_soon_threadsafe writes to a pipe; once per chunk costs more than the chunk)."""

    def __init__(self):
        self._pending: dict = {}   # loop -> [(asyncio.Queue, item)]; touched by the engine thread only

    def push(self, loop, queue, item) -> None:
        self._pending.setdefault(loop, []).append((queue, item))

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


def _deliver(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class ServerState:
    """Everything one app needs; `app.state.llamas`."""

    def __init__(self, *, model_name: Optional[str], api_key: Optional[str], max_batch: int,
                 max_queue: int, max_tokens: Optional[int], max_body_bytes: int, prefill_chunk: int,
                 chat_template: Optional[str]):
        self.model = None
        self.engine: Optional[Engine] = None
        self.tokenizer = None
        self.model_name = model_name
        self.api_key = api_key
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_tokens = max_tokens
        self.max_body_bytes = max_body_bytes
        self.prefill_chunk = prefill_chunk
        self.chat_template_source = chat_template
        self.chat_template: Optional[ChatTemplate] = None
        self.ready = False
        self.draining = False
        self.load_error: Optional[str] = None
        self.created = int(time.time())
        self.context = 0
        self.vocab = 0
        import llamas
        self.metrics = ServerMetrics(lambda: self.engine, llamas.memory_stats)
        self.dispatcher = _Dispatcher()

    # ---- model ------------------------------------------------------------------------------
    def attach(self, model) -> None:
        self.chat_template = (ChatTemplate(self.chat_template_source) if self.chat_template_source is not None
                              else ChatTemplate.for_model_path(model.path))
        self.model = model
        self.tokenizer = model.tokenizer
        self.context = model.config.n_positions
        self.vocab = model.config.vocab_size
        if self.model_name is None:
            self.model_name = os.path.basename(os.path.normpath(model.path)) if model.path else "llamas"
        self.engine = Engine(model, max_batch=self.max_batch, max_queue=self.max_queue,
                             prefill_chunk=self.prefill_chunk, on_finish=self.metrics.on_finish,
                             on_step=self.dispatcher.flush)
        self.ready = True

    def load_async(self, loader, what: str) -> threading.Thread:
        def run():
            try:
                self.attach(loader())
                log.info(json.dumps({"event": "model_loaded", "model": self.model_name, "source": what}))
            except Exception as e:  # /health reports it; requests get 503
                self.load_error = str(e)
                log.error(json.dumps({"event": "model_load_failed", "source": what, "error": str(e)}))
        t = threading.Thread(target=run, name="llamas-load", daemon=True)
        t.start()
        return t

    # ---- request guards ---------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def require_engine(self) -> Engine:
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        if not self.ready:
            if self.load_error:
                raise APIError(503, f"The model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(503, "The model is still loading.", code="model_loading", headers={"Retry-After": "1"})
        return self.engine

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise bad("'model' must be a string.", "model", "invalid_type")
        if name != self.model_name:
            raise bad(f"The model '{name[:100]}' does not exist; this server serves '{self.model_name}'.",
                      "model", "model_not_found")

    async def read_json(self, request: Request) -> dict:
        limit = self.max_body_bytes
        too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_big
            except ValueError:
                raise bad("Invalid Content-Length header.") from None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        return parse_json_body(bytes(body))


# ---- helpers -------------------------------------------------------------------------------------
def _json(data, status: int = 200, headers=None) -> Response:
    return Response(json.dumps(data, ensure_ascii=False, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


def _error(e: APIError) -> Response:
    return _json(e.body(), e.status, e.headers)


def _record(request: Request) -> dict:
    return request.scope.setdefault("llamas.log", {})


async def _tokenize(state: ServerState, text: str) -> List[int]:
    if len(text) > _THREAD_TOKENIZE_CHARS:
        # Off the event loop, and through encode_batch, which (unlike encode) releases the GIL:
        # a megabyte of prompt must not stall the other requests.
        return (await asyncio.to_thread(state.tokenizer.encode_batch, [text]))[0]
    return state.tokenizer.encode(text)


def _budget(state: ServerState, p: GenParams, n_prompt: int, param: str) -> int:
    """max_tokens for a prompt of n_prompt tokens; 400 when it cannot fit."""
    ctx = state.context
    if n_prompt >= ctx:
        raise bad(f"This model's maximum context length is {ctx} tokens, but the prompt has {n_prompt} tokens "
                  f"(it must be at most {ctx - 1} to leave room for at least one generated token).",
                  param, "context_length_exceeded")
    room = ctx - n_prompt
    cap = state.max_tokens
    if p.max_tokens is not None:
        if cap is not None and p.max_tokens > cap:
            raise bad(f"'max_tokens' is {p.max_tokens} but this server allows at most {cap}.", "max_tokens",
                      "invalid_value")
        if p.max_tokens > room:
            raise bad(f"This model's maximum context length is {ctx} tokens. However, you requested "
                      f"{n_prompt + p.max_tokens} tokens ({n_prompt} in the prompt, {p.max_tokens} for the "
                      f"completion). Reduce the prompt or 'max_tokens'.", "max_tokens", "context_length_exceeded")
        return p.max_tokens
    default = room if p.default_max_tokens is None else min(p.default_max_tokens, room)
    return min(default, cap) if cap is not None else default


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class _Choice:
    __slots__ = ("text", "token_ids", "logprobs", "finish_reason", "error", "completion_tokens", "offset")

    def __init__(self, want_logprobs: bool):
        self.text = ""
        self.token_ids: List[int] = []
        self.logprobs = [] if want_logprobs else None
        self.finish_reason = None
        self.error = None
        self.completion_tokens = 0
        self.offset = 0


# ---- generation ----------------------------------------------------------------------------------
async def _generate(state: ServerState, request: Request, kind: str, p: GenParams) -> Response:
    """Runs every (prompt, choice) through the engine; answers JSON or SSE."""
    engine = state.require_engine()
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    rec = _record(request)
    rec["id"] = rid
    budgets = [_budget(state, p, len(ids), "messages" if kind == "chat" else "prompt") for ids in p.prompt_ids]
    n_total = len(p.prompt_ids) * p.n
    if n_total > state.max_batch + state.max_queue:
        raise bad(f"This request asks for {n_total} sequences; this server runs at most "
                  f"{state.max_batch + state.max_queue} at once.", "n", "invalid_value")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    items = []
    seed = p.sampling["seed"]
    for pi, ids in enumerate(p.prompt_ids):
        for j in range(p.n):
            idx = pi * p.n + j
            s = dict(p.sampling)
            s["seed"] = None if seed is None else (seed + j) & ((1 << 63) - 1)
            try:
                options = SamplingOptions(logprobs=p.logprobs, **s)
            except LlamasError as e:
                raise bad(str(e)) from None
            req = EngineRequest(ids, budgets[pi], options, p.stop, request_id=f"{rid}-{idx}")
            push = state.dispatcher.push
            if p.stream:
                def listener(chunk, idx=idx):
                    push(loop, queue, (idx, chunk))
            else:
                def listener(chunk, idx=idx):
                    if chunk.finish_reason is not None:
                        push(loop, queue, (idx, chunk))
            items.append((req, True, listener))
    try:
        handles = engine.enqueue(items)
    except QueueFull as e:
        raise APIError(429, f"The server is busy: {e}. Retry later.", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except EngineClosed:
        raise APIError(503, "The server is shutting down.", code="shutting_down") from None
    prompt_tokens = sum(len(ids) for ids in p.prompt_ids)
    rec.update(prompt_tokens=prompt_tokens, n=n_total, stream=p.stream)
    choices = [_Choice(p.logprobs is not None) for _ in handles]

    def finish_record():
        rec["completion_tokens"] = sum(h._req.completion_tokens for h in handles)
        rec["finish_reason"] = [h._req.finish_reason for h in handles]
        st = handles[0].stats
        rec["queue_s"] = _round(st.queue_time)
        rec["ttft_s"] = _round(st.time_to_first_token)
        rec["e2e_s"] = _round(st.e2e_latency)

    if p.stream:
        def on_close():
            if not all(h.done for h in handles):
                rec["disconnected"] = True
            for h in handles:
                if not h.done:
                    h.cancel()
            finish_record()
        return _SSEResponse(_stream(state, kind, p, rid, created, handles, choices, queue, prompt_tokens),
                            on_close)

    # Non-streaming: wait for every choice, or for the client to go away.
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        remaining = len(handles)
        while remaining:
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                rec["disconnected"] = True
                return Response(status_code=499)
            remaining -= 1
    finally:
        disconnect.cancel()
        for h in handles:
            if not h.done:
                h.cancel()
        finish_record()
    results = [h.result(timeout=0) for h in handles]
    for r in results:
        if r.finish_reason == "error":
            raise APIError(500, f"Generation failed: {r.error}", code="engine_error")
        if r.finish_reason == "cancelled":
            raise APIError(503, "The request was cancelled by the server.", code="cancelled")
    tok = state.tokenizer
    out = []
    for i, r in enumerate(results):
        if kind == "chat":
            c = {"index": i, "message": {"role": "assistant", "content": r.text},
                 "logprobs": chat_logprobs(tok, r.logprobs) if r.logprobs is not None else None,
                 "finish_reason": r.finish_reason}
        else:
            c = {"index": i, "text": r.text,
                 "logprobs": completion_logprobs(tok, r.logprobs, 0) if r.logprobs is not None else None,
                 "finish_reason": r.finish_reason}
        out.append(c)
    completion_tokens = sum(r.completion_tokens for r in results)
    return _json({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                  "created": created, "model": state.model_name, "choices": out,
                  "usage": _usage(prompt_tokens, completion_tokens)})


def _round(v):
    return None if v is None else round(v, 6)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (done, client gone before or
    during the stream), so no sequence outlives its client."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _stream(state, kind, p, rid, created, handles, choices, queue, prompt_tokens):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    tok = state.tokenizer
    name = state.model_name

    def chunk(choice_list, usage=None):
        d = {"id": rid, "object": obj, "created": created, "model": name, "choices": choice_list}
        if p.include_usage:
            d["usage"] = usage
        return _sse(d)

    try:
        if kind == "chat":
            yield "".join(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(len(handles)))
        remaining = len(handles)
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            out = []
            for idx, c in batch:
                ch = choices[idx]
                if c.finish_reason is not None:
                    remaining -= 1
                    if c.finish_reason in ("error", "cancelled"):
                        msg = c.error or "the request was cancelled by the server"
                        out.append(_sse({"error": {"message": f"Generation failed: {msg}", "type": "server_error",
                                                   "param": None, "code": "engine_error"}}))
                        continue
                lp = None
                if ch.logprobs is not None and c.logprobs:
                    if kind == "chat":
                        lp = chat_logprobs(tok, c.logprobs)
                    else:
                        lp = completion_logprobs(tok, c.logprobs, ch.offset)
                        ch.offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
                if not c.text and lp is None and c.finish_reason is None:
                    continue
                if kind == "chat":
                    delta = {"content": c.text} if c.text else {}
                    out.append(chunk([{"index": idx, "delta": delta, "logprobs": lp,
                                       "finish_reason": c.finish_reason}]))
                else:
                    out.append(chunk([{"index": idx, "text": c.text, "logprobs": lp,
                                       "finish_reason": c.finish_reason}]))
            if out:
                yield "".join(out)
        if p.include_usage:
            completion_tokens = sum(h._req.completion_tokens for h in handles)
            d = {"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                 "usage": _usage(prompt_tokens, completion_tokens)}
            yield _sse(d)
        yield "data: [DONE]\n\n"
    finally:
        # Client gone (the response task is cancelled) or done: free every sequence still running.
        for h in handles:
            if not h.done:
                h.cancel()


# ---- the app -------------------------------------------------------------------------------------
class _Observe:
    """Outermost app wrapper: per-request metrics and JSON log line, and the error boundary (an
    unexpected exception becomes a 500 with OpenAI error JSON, never a crashed process)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rec = scope.setdefault("llamas.log", {})
        status = None

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as e:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if status is None:
                status = 500
                body = APIError(500, f"Internal server error: {type(e).__name__}", code="internal_error").body()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            code = status if status is not None else 499
            self.state.metrics.requests.labels(endpoint, str(code)).inc()
            if endpoint != "/metrics" and endpoint != "/health":
                record = {"event": "request", "id": rec.get("id"), "method": scope.get("method"), "path": path[:200],
                          "status": code, "duration_s": round(time.perf_counter() - t0, 6)}
                record.update({k: v for k, v in rec.items() if k != "id"})
                log_request(record)


def create_app(model, *, model_name: Optional[str] = None, api_key: Optional[str] = None, max_batch: int = 16,
               max_queue: int = 256, max_tokens: Optional[int] = None, max_body_bytes: int = 1 << 20,
               prefill_chunk: int = 128, dtype: str = "float32", chat_template: Optional[str] = None):
    """The OpenAI-compatible ASGI app.

    model: a loaded `llamas.Model`, a model folder, or a function returning a Model (the last two
    load in a background thread; /health answers 503 until the model is ready). api_key: require `Authorization: Bearer KEY` (not on /health
    and /metrics). max_batch: sequences in the running batch; max_queue: sequences waiting for a
    place (more: 429). max_tokens: the largest max_tokens a request may ask (default: the context).
    max_body_bytes: larger bodies get 413. chat_template: a jinja2 template overriding the model's.
    The app is `app`; its state (engine, metrics) is `app.state.llamas`.
    """
    from fastapi import FastAPI
    from contextlib import asynccontextmanager

    for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("max_body_bytes", max_body_bytes, 1),
                        ("prefill_chunk", prefill_chunk, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise LlamasError(f"[serve] {name} must be an integer >= {lo}, got {v!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise LlamasError(f"[serve] max_tokens must be a positive integer, got {max_tokens!r}")
    state = ServerState(model_name=model_name, api_key=api_key or None, max_batch=max_batch, max_queue=max_queue,
                        max_tokens=max_tokens, max_body_bytes=max_body_bytes, prefill_chunk=prefill_chunk,
                        chat_template=chat_template)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)

        def load():
            import llamas
            return llamas.load(path, dtype=dtype)
        state.load_async(load, path)
    elif callable(model):
        state.load_async(model, getattr(model, "__name__", "loader"))
    else:
        state.attach(model)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.draining = True
        if state.engine is not None:  # running requests have finished (uvicorn waits for them)
            await asyncio.to_thread(state.engine.shutdown, True, 30.0)

    app = FastAPI(title="llamas", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.llamas = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        _record(request).update(error=e.code or e.type, message=e.message[:300])
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        msgs = {404: f"No route {request.method} {request.url.path[:200]}.",
                405: f"Method {request.method} is not allowed on {request.url.path[:200]}."}
        err = APIError(e.status_code, msgs.get(e.status_code, str(e.detail)),
                       code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code),
                       headers=getattr(e, "headers", None))
        return _error(err)

    @app.get("/health")
    async def health():
        if state.draining:
            return _json({"status": "draining"}, 503)
        if state.load_error:
            return _json({"status": "error", "error": state.load_error}, 503)
        if not state.ready:
            return _json({"status": "loading"}, 503, {"Retry-After": "1"})
        return _json({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card():
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llamas",
                "max_model_len": state.context}

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_auth(request)
        state.require_engine()
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        state.check_auth(request)
        state.require_engine()
        if name != state.model_name:
            raise APIError(404, f"The model '{name[:100]}' does not exist.", "model", "model_not_found")
        return _json(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.check_auth(request)
        body = await state.read_json(request)
        state.require_engine()
        p = parse_completion(body, state.vocab, state.tokenizer is not None)
        state.check_model(body)
        p.prompt_ids = [await _tokenize(state, x) if isinstance(x, str) else x for x in p.prompts]
        for ids in p.prompt_ids:
            if not ids:
                raise bad("The prompt encodes to no tokens.", "prompt", "invalid_value")
        return await _generate(state, request, "completion", p)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state.check_auth(request)
        body = await state.read_json(request)
        state.require_engine()
        if state.tokenizer is None:
            raise bad("This model has no tokenizer, so it cannot chat.", "messages", "invalid_value")
        p, messages = parse_chat(body, state.vocab)
        state.check_model(body)
        text = state.chat_template.render(messages)
        ids = await _tokenize(state, text)
        if not ids:
            raise bad("The messages encode to no tokens.", "messages", "invalid_value")
        p.prompt_ids = [ids]
        return await _generate(state, request, "chat", p)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        state.check_auth(request)
        body = await state.read_json(request)
        state.require_engine()
        check_unknown(body, {"model", "prompt", "messages", "add_generation_prompt", "add_special_tokens"})
        state.check_model(body)
        if state.tokenizer is None:
            raise bad("This model has no tokenizer.", "prompt", "invalid_value")
        get_bool(body, "add_special_tokens", True)
        if ("prompt" in body) == ("messages" in body):
            raise bad("Give exactly one of 'prompt' or 'messages'.", "prompt", "missing_required_parameter")
        if "prompt" in body:
            text = get_str(body, "prompt")
            if text is None:
                raise bad("'prompt' must be a string.", "prompt", "invalid_type")
        else:
            messages = parse_messages(body["messages"])
            text = state.chat_template.render(messages, get_bool(body, "add_generation_prompt", True))
        ids = await _tokenize(state, text)
        return _json({"tokens": ids, "count": len(ids), "max_model_len": state.context})

    @app.post("/detokenize")
    async def detokenize(request: Request):
        state.check_auth(request)
        body = await state.read_json(request)
        state.require_engine()
        check_unknown(body, {"model", "tokens"})
        state.check_model(body)
        if state.tokenizer is None:
            raise bad("This model has no tokenizer.", "tokens", "invalid_value")
        if "tokens" not in body:
            raise bad("'tokens' is required.", "tokens", "missing_required_parameter")
        ids = check_token_ids(body["tokens"], state.vocab, "tokens")
        return _json({"prompt": state.tokenizer.decode(ids)})

    # Outermost user middleware (inside Starlette's error page middleware), keeping `app` a
    # FastAPI object so callers can still add routes or mount it.
    app.add_middleware(_Observe, state=state)
    return app
