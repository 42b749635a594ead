"""An OpenAI-compatible HTTP server over `llamas.Engine` (continuous batching).

    from llamas.server import create_app
    app = create_app(llamas.load("DIR"))            # an ASGI app: uvicorn, or mount it in yours
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize, GET /metrics. `llamas serve` runs it from the command line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import List, Optional, Sequence

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from ._C import LlamasError
from .prefix_cache import cache_bytes
from .server_generation import _generate
from .server_metrics import CONTENT_TYPE_LATEST, log_request
from .server_chat import RENDER_FIELDS, parse_chat, parse_messages, parse_render_options
from .server_protocol import APIError, bad, check_token_ids, check_unknown, get_bool, get_str, parse_completion
from .engine import check_kv_cache_mb
from .server_state import (RESPONSE_CUT, WRITE_TIMEOUT_S, ClientGone, ClientStalled, ServerState, _error, _json,
                           _record, deadline_send)
from .speculative import check_speculative_ngram

log = logging.getLogger("llamas.server")

ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
             "/tokenizer_info", "/metrics", "/version")
OPEN_PATHS = ("/health", "/metrics", "/version")  # answered without the API key
MAX_REQUEST_ID = 128                      # characters of a client's X-Request-Id
_THREAD_TOKENIZE_CHARS = 4096             # longer texts (and id lists) are (de)tokenised off the event loop


async def _tokenize(state: ServerState, text: str) -> List[int]:
    if len(text) > _THREAD_TOKENIZE_CHARS:
        # Off the event loop, and through encode_batch, which (unlike encode) releases the GIL:
        # a megabyte of prompt must not stall the other requests.
        return (await asyncio.to_thread(state.tokenizer.encode_batch, [text]))[0]
    return state.tokenizer.encode(text)


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
        client_id = _client_request_id(scope)

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                rid = scope.get("llamas.request_id") or client_id
                if isinstance(rid, str):  # echoed back, as vLLM's --enable-request-id-headers does
                    message = dict(message, headers=[*message.get("headers", ()), (b"x-request-id", rid.encode())])
            await send(message)

        try:
            if client_id is False:
                e = bad(f"The X-Request-Id header must be 1-{MAX_REQUEST_ID} visible ASCII characters.",
                        "X-Request-Id", "invalid_value")
                rec.update(error=e.code, message=e.message)
                await send_wrapper({"type": "http.response.start", "status": e.status,
                                    "headers": [(b"content-type", b"application/json")]})
                await send_wrapper({"type": "http.response.body", "body": json.dumps(e.body()).encode()})
                return
            if client_id is not None:
                scope["llamas.request_id"] = client_id
            await self.app(scope, receive, deadline_send(send_wrapper))
        except ClientStalled:
            # Its sequences are cancelled (the response's on_close); uvicorn closes the connection.
            rec["stalled"] = True
            RESPONSE_CUT.set(True)
            log.warning("client stopped reading for %g s: response ended, connection closed", WRITE_TIMEOUT_S)
        except asyncio.CancelledError:
            # A forced stop (a second Ctrl-C) cancels the requests still running: ending them here
            # is what the cancellation asks, without uvicorn's traceback for each.
            if not self.state.draining:
                raise
            rec["cancelled"] = True
            RESPONSE_CUT.set(True)
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
            root = scope.get("root_path", "")
            route = path[len(root):] if root and path.startswith(root) else path  # (mounted under a prefix)
            endpoint = route if route in ENDPOINTS else ("/v1/models" if route.startswith("/v1/models/") else "other")
            code = status if status is not None else 499
            self.state.metrics.requests.labels(endpoint, str(code)).inc()
            if endpoint != "/metrics" and endpoint != "/health":
                rid = rec.get("id") or (client_id if isinstance(client_id, str) else None)
                record = {"event": "request", "id": rid, "method": scope.get("method"), "path": path[:200],
                          "status": code, "duration_s": round(time.perf_counter() - t0, 6)}
                record.update({k: v for k, v in rec.items() if k != "id"})
                log_request(record)


def _client_request_id(scope):
    """The request's X-Request-Id header: its value, None without one, False when it is not 1-128
    visible ASCII characters (it becomes part of the response's id and header)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID and all(0x21 <= c <= 0x7E for c in value):
                return value.decode("ascii")
            return False
    return None


def _app_class():
    from fastapi import FastAPI

    class _App(FastAPI):
        """FastAPI that leaves the server's own ASGI `send` in the scope for streamed bodies
        (`llamas.send`), when this app has no middleware but its own _Observe: nothing of the app
        can then change a body, and each event skips five coroutine layers that only watch for the
        response start (about a tenth of the event loop's work per streamed token)."""

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and len(self.user_middleware) == 1:
                scope["llamas.send"] = deadline_send(send)
            elif scope["type"] == "lifespan":
                receive = _shutdown_when_cancelled(receive, self.state.llamas)
            await super().__call__(scope, receive, send)
    return _App


def _shutdown_when_cancelled(receive, state: ServerState):
    """A forced stop (a second Ctrl-C) ends uvicorn without the lifespan's shutdown message, and
    asyncio then cancels the lifespan task waiting for it: Starlette reported that as a failed
    shutdown with a CancelledError traceback. The cancellation means what the message would have:
    the lifespan gets its shutdown, forced (the engine stops without draining)."""
    async def wrapped():
        try:
            return await receive()
        except asyncio.CancelledError:
            state.forced_stop = True
            return {"type": "lifespan.shutdown"}
    return wrapped


# Fields that compile a schema, regex or grammar: a request that has one is parsed in a worker
# thread, so that compiling (up to ~0.6 s for a schema of 60 enums of 4,000 values, ~0.15 s for
# a regex at its work limit) does not hold the event loop and every stream on it.
STRUCTURED_FIELDS = frozenset({"guided_json", "guided_regex", "guided_grammar", "structured_outputs",
                               "response_format", "tools"})


async def _parse(parse, body: dict, *args):
    if STRUCTURED_FIELDS.isdisjoint(body):
        return parse(body, *args)
    return await asyncio.to_thread(parse, body, *args)


def create_app(model, *, model_name: Optional[str] = None, api_key: Optional[str] = None, max_batch: int = 16,
               max_queue: int = 256, max_tokens: Optional[int] = None, max_body_bytes: int = 1 << 20,
               prefill_chunk: int = 128, dtype: str = "float32", kv_dtype: Optional[str] = None,
               compute_dtype: str = "float32",
               chat_template: Optional[str] = None, prefix_cache_mb: float = 0.0,
               cors_origins: Optional[Sequence[str]] = None, speculative_ngram: int = 0,
               stream_interval: int = 1, kv_cache_mb: Optional[float] = None, generation_config: str = "auto"):
    """The OpenAI-compatible ASGI app.

    model: a loaded `llamas.Model`, a model folder, or a function returning a Model (the last two
    load in a background thread; /health answers 503 until the model is ready). api_key: require `Authorization: Bearer KEY` (not on /health
    and /metrics). max_batch: sequences in the running batch; max_queue: sequences waiting for a
    place (more: 429). max_tokens: the largest max_tokens a request may ask (default: the context).
    max_body_bytes: larger bodies get 413. dtype, kv_dtype, compute_dtype: as llamas.load's, when
    model is a folder. chat_template: a jinja2 template overriding the model's. prefix_cache_mb: keep up to
    this many MiB of finished requests' KV blocks for requests that start the same way (0: off).
    cors_origins: browser origins allowed to call the API (CORS; "*" for any; default none).
    speculative_ngram: draft up to this many tokens a step by n-gram lookup (llamas.speculative;
    the same tokens, greedy or sampled from a seed, in fewer steps where text repeats; 0: off).
    stream_interval: a streamed choice sends its first text at once, then one event per this many
    tokens (vLLM's --stream-interval; fewer event-loop wake-ups and socket writes at high
    concurrency; 1: an event per token). kv_cache_mb: the KV cache running requests may fill, in
    MiB; each request is admitted with room for its prompt + max_tokens reserved, others wait in
    the queue, and a request that could never fit gets a 400 (default: no limit when max_batch
    sequences at the full context fit in half of the memory the weights leave, else that half).
    generation_config: "auto" (default): a sampling field a request leaves out takes the model's
    generation_config.json value (temperature, top_k, top_p, repetition_penalty; vLLM's
    --generation-config auto), else OpenAI's default; "none": OpenAI's defaults (temperature 1).
    The app is `app`; its state (engine, metrics) is `app.state.llamas`.
    """
    from contextlib import asynccontextmanager
    _App = _app_class()

    for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("max_body_bytes", max_body_bytes, 1),
                        ("prefill_chunk", prefill_chunk, 1), ("stream_interval", stream_interval, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise LlamasError(f"[serve] {name} must be an integer >= {lo}, got {v!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise LlamasError(f"[serve] max_tokens must be a positive integer, got {max_tokens!r}")
    if cors_origins is not None and (isinstance(cors_origins, str) or not all(
            isinstance(o, str) and o for o in cors_origins)):
        raise LlamasError(f"[serve] cors_origins must be a list of origins (e.g. ['http://localhost:3000'] or "
                          f"['*']), got {cors_origins!r}")
    if isinstance(model, (str, os.PathLike)):  # checked now, not when the background load fails
        from .model import check_dtypes
        check_dtypes(dtype, kv_dtype, compute_dtype, "serve")
    if generation_config not in ("auto", "none"):
        raise LlamasError(f"[serve] generation_config must be 'auto' or 'none', got {generation_config!r}")
    cache_bytes(prefix_cache_mb, "serve")  # checked now: a model loading in the background makes the Engine later
    check_kv_cache_mb(kv_cache_mb, "serve")
    check_speculative_ngram(speculative_ngram, "serve")
    state = ServerState(model_name=model_name, api_key=api_key or None, max_batch=max_batch, max_queue=max_queue,
                        max_tokens=max_tokens, max_body_bytes=max_body_bytes, prefill_chunk=prefill_chunk,
                        chat_template=chat_template, prefix_cache_mb=prefix_cache_mb,
                        speculative_ngram=speculative_ngram, stream_interval=stream_interval, kv_cache_mb=kv_cache_mb,
                        generation_config=generation_config)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)

        def load():
            import llamas
            return llamas.load(path, dtype=dtype, kv_dtype=kv_dtype, compute_dtype=compute_dtype)
        state.load_async(load, path)
    elif callable(model):
        state.load_async(model, getattr(model, "__name__", "loader"))
    else:
        state.attach(model)

    @asynccontextmanager
    async def lifespan(app):
        if state.draining:  # started again after a shutdown (a test client per test): serve again
            state.draining = state.forced_stop = False
            if state.model is not None:
                state.attach(state.model)  # (a new engine: the last one was shut down)
        yield
        state.draining = True
        if state.engine is None:
            return
        if state.forced_stop:  # running requests are being cancelled: nothing to wait for
            state.engine.shutdown(drain=False, timeout=10.0)
        else:  # running requests have finished (uvicorn waits for them)
            await asyncio.to_thread(state.engine.shutdown, True, 30.0)

    app = _App(title="llamas", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.llamas = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        _record(request).update(error=e.code or e.type, message=e.message[:300])
        return _error(e)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        _record(request).update(disconnected=True)
        return Response(status_code=499)  # (nobody reads it: the status is for the log and metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        msgs = {404: f"No route {request.method} {request.url.path[:200]}.",
                405: f"Method {request.method} is not allowed on {request.url.path[:200]}."}
        err = APIError(e.status_code, msgs.get(e.status_code, str(e.detail)),
                       code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code),
                       headers=getattr(e, "headers", None))
        return _error(err)

    @app.api_route("/version", methods=["GET", "HEAD"])
    async def version():
        from . import __version__
        return _json({"version": __version__})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.draining:
            return _json({"status": "draining"}, 503)
        if state.load_error:
            return _json({"status": "error", "error": state.load_error}, 503)
        if not state.ready:
            return _json({"status": "loading"}, 503, {"Retry-After": "1"})
        return _json({"status": "ok", "model": state.model_name})

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card():
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llamas",
                "max_model_len": state.context}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request):
        state.check_auth(request)
        state.require_engine()
        return _json({"object": "list", "data": [model_card()]})

    @app.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def model_info(name: str, request: Request):
        state.check_auth(request)
        state.require_engine()
        if name != state.model_name:
            raise APIError(404, f"The model '{name[:100]}' does not exist.", "model", "model_not_found")
        return _json(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await state.accept(request)
        p = await _parse(parse_completion, body, state.vocab, state.tokenizer is not None, state.sampling_defaults)
        state.check_model(body)
        p.prompt_ids = [await _tokenize(state, x) if isinstance(x, str) else x for x in p.prompts]
        for ids in p.prompt_ids:
            if not ids:
                raise bad("The prompt encodes to no tokens.", "prompt", "invalid_value")
        return await _generate(state, request, "completion", p)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await state.accept(request)
        if state.tokenizer is None:
            raise bad("This model has no tokenizer, so it cannot chat.", "messages", "invalid_value")
        p, messages, render = await _parse(parse_chat, body, state.vocab, state.sampling_defaults)
        state.check_model(body)
        text = state.chat_template.render(messages, tools=p.tools.tools if p.tools is not None else None, **render)
        ids = await _tokenize(state, text)
        if not ids:
            raise bad("The messages encode to no tokens.", "messages", "invalid_value")
        p.prompt_ids = [ids]
        return await _generate(state, request, "chat", p)

    @app.api_route("/tokenizer_info", methods=["GET", "HEAD"])
    async def tokenizer_info(request: Request):
        # vLLM's endpoint: lm-evaluation-harness's remote tokenizer (tokenizer_backend=remote, or
        # auto) reads it, then tokenizes through /tokenize and /detokenize.
        state.check_auth(request)
        state.require_engine()
        tok = state.tokenizer
        if tok is None:
            raise APIError(404, "This model has no tokenizer.", code="not_found")
        eos = tok.id_to_token(tok.eos_token_id) if tok.eos_token_id is not None else None
        template = state.chat_template
        return _json({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                      "bos_token": template.bos_token or eos, "pad_token": None, "unk_token": None,
                      "chat_template": None if template.is_plain else template.source,
                      "model_max_length": state.context, "vocab_size": state.vocab, "add_bos_token": False})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await state.accept(request)
        check_unknown(body, {"model", "prompt", "messages", "add_special_tokens"} | RENDER_FIELDS)
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
            text = state.chat_template.render(messages, **parse_render_options(body, messages))
        ids = await _tokenize(state, text)
        return _json({"tokens": ids, "count": len(ids), "max_model_len": state.context})

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await state.accept(request)
        check_unknown(body, {"model", "tokens"})
        state.check_model(body)
        if state.tokenizer is None:
            raise bad("This model has no tokenizer.", "tokens", "invalid_value")
        if "tokens" not in body:
            raise bad("'tokens' is required.", "tokens", "missing_required_parameter")
        ids = check_token_ids(body["tokens"], state.vocab, "tokens")
        if len(ids) > _THREAD_TOKENIZE_CHARS:  # (614k ids: 0.23 s the event loop would not answer anyone)
            return _json({"prompt": await asyncio.to_thread(state.tokenizer.decode, ids)})
        return _json({"prompt": state.tokenizer.decode(ids)})

    if cors_origins:
        # Preflights are answered here, before any route checks the API key (a browser sends its
        # OPTIONS without credentials). This middleware wraps every response's start, so streamed
        # bodies then go through the chain's send instead of the direct one.
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    # Outermost user middleware (inside Starlette's error page middleware), keeping `app` a
    # FastAPI object so callers can still add routes or mount it.
    app.add_middleware(_Observe, state=state)
    return app
