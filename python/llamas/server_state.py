"""Per-app state of the OpenAI-compatible server (`app.state.llamas`): the model and its engine,
request guards (auth, readiness, model name, body size), the engine-to-event-loop dispatcher, and
the small response helpers the routes and generation share."""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import os
import threading
import time
from typing import Callable, Optional

from starlette.requests import Request
from starlette.responses import Response

from .engine import Engine, kv_blocks_per_sequence
from .server_chat import ChatTemplate
from .server_metrics import ServerMetrics, json_line
from .server_protocol import OPENAI_SAMPLING_DEFAULTS, APIError, bad, check_text, parse_json_body

log = logging.getLogger("llamas.server")


def auto_kv_cache_mb(model, max_batch: int) -> Optional[float]:
    """The server's default KV-cache budget: None (no limit) when max_batch sequences at the full
    context fit in half of the memory the weights leave; otherwise that half, so that a large
    --max-batch or a long-context model queues requests instead of running the machine out of
    memory mid-generation."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no default limit
        return None
    per_sequence = kv_blocks_per_sequence(model) * model.kv_block_bytes
    room = max(physical - model.weight_bytes, 0) // 2
    if max_batch * per_sequence <= room:
        return None
    return max(room, per_sequence) / 2 ** 20


# Seconds a request body may take to arrive (1 MiB by default: ~0.1 s on a slow link).
BODY_TIMEOUT_S = 30.0


class ClientGone(Exception):
    """The client went away before its request body arrived: nothing to answer (logged as 499)."""


# Seconds a response write may wait for the client to read. A write waits only when the client
# has left megabytes unread (the socket's buffers are full); one that stopped reading held its
# sequences, the memory of its unsent events (~20 MB for a stream of n=64), and a SIGTERM's
# graceful stop, for as long as it kept the connection open.
WRITE_TIMEOUT_S = 30.0

# Set in a request's task when llamas ended its response early on purpose (a client that stopped
# reading, a forced stop): uvicorn's "returned without completing response" then says nothing new.
RESPONSE_CUT: contextvars.ContextVar[bool] = contextvars.ContextVar("llamas_response_cut", default=False)


class ClientStalled(Exception):
    """The client stopped reading: a response write waited WRITE_TIMEOUT_S."""


def deadline_send(send: Callable) -> Callable:
    """The ASGI `send` with WRITE_TIMEOUT_S on the writes that flow control holds back. A write
    that does not wait (nearly all) costs one coroutine frame more and no timer."""
    async def timed(message):
        coro = send(message)
        try:
            fut = coro.send(None)
        except StopIteration:
            return
        try:
            await asyncio.wait_for(_resume(coro, fut), WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ClientStalled() from None
    return timed


class _Dispatcher:
    """Hands chunks from the engine thread to event-loop inboxes with one loop wake-up per engine
    step (call_soon_threadsafe writes to a pipe; once per chunk costs more than the chunk)."""

    def __init__(self):
        self._pending: dict = {}   # loop -> [(ResponseInbox, item)]; touched by the engine thread only

    def push(self, loop, inbox, item) -> None:
        items = self._pending.get(loop)
        if items is None:
            items = self._pending[loop] = []
        items.append((inbox, item))

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
    for inbox, item in items:
        inbox.put(item)


class ResponseInbox:
    """What the engine produced for one HTTP response, delivered on the event loop. Lighter than
    asyncio.Queue (one waiter, no size limit, `take` returns everything at once): it is touched
    once per token, 16 times per engine step at 16 clients.

    A streamed response may also install a `direct` writer: while its task waits here with nothing
    queued, `put` hands the item to the writer instead of waking the task, so a plain token's event
    goes out from the delivery callback itself (no future, task step or coroutine chain per token).
    The writer returns False for items the task must handle (a finish, logprobs); those, and
    everything after them, queue as before, so events keep their order. A write the transport
    holds back (flow control) is left in `blocked` for the task to finish before anything else."""
    __slots__ = ("_items", "_waiter", "direct", "blocked")

    def __init__(self):
        self._items: list = []
        self._waiter: Optional[asyncio.Future] = None
        self.direct: Optional[Callable] = None
        self.blocked: Optional[tuple] = None   # (send coroutine, the future it waits on)

    def put(self, item) -> None:
        waiter = self._waiter
        idle = waiter is not None and not waiter.done() and not self._items and self.blocked is None
        if idle and self.direct is not None and self.direct(item):
            if self.blocked is not None:
                waiter.set_result(None)  # the task finishes the held-back write
            return
        self._items.append(item)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list:
        """Waits for at least one item (or a held-back write); returns all that arrived, oldest
        first (possibly none after a held-back write, which the caller finishes first)."""
        while not self._items and self.blocked is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    async def finish_blocked(self) -> None:
        """Completes a write the direct writer started and the transport held back."""
        if self.blocked is None:
            return
        coro, fut = self.blocked
        self.blocked = None
        await _resume(coro, fut)


def send_now(send: Callable, message: dict) -> Optional[tuple]:
    """Starts the ASGI `send(message)` outside any task. Returns None once it has completed (an
    HTTP server's send only waits when flow control holds the connection's writes back), else
    (coroutine, future) for `_resume` to finish in a task."""
    coro = send(message)
    try:
        fut = coro.send(None)
    except StopIteration:
        return None
    return coro, fut


async def _resume(coro, fut) -> None:
    """Drives a coroutine that send_now started to its end: waits on what it waits on, resumes it."""
    while True:
        try:
            if fut is None:  # a bare yield: one turn of the loop
                await asyncio.sleep(0)
            else:
                # What a Task does with a future its coroutine yields: clear the flag the
                # coroutine's await set (awaiting a future that has it raises), then wait for it.
                fut._asyncio_future_blocking = False
                await fut
        except BaseException as e:  # cancelled while waiting: the coroutine decides
            try:
                fut = coro.throw(e)
            except StopIteration:
                return
            continue
        try:
            fut = coro.send(None)
        except StopIteration:
            return


class ServerState:
    """Everything one app needs; `app.state.llamas`."""

    def __init__(self, *, model_name: Optional[str], api_key: Optional[str], max_batch: int,
                 max_queue: int, max_tokens: Optional[int], max_body_bytes: int, prefill_chunk: int,
                 chat_template: Optional[str], prefix_cache_mb: float = 0.0, speculative_ngram: int = 0,
                 stream_interval: int = 1, kv_cache_mb: Optional[float] = None, generation_config: str = "auto"):
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
        self.prefix_cache_mb = prefix_cache_mb
        self.kv_cache_mb = kv_cache_mb    # None: auto_kv_cache_mb at attach
        self.speculative_ngram = speculative_ngram
        self.stream_interval = stream_interval  # tokens per streamed event (after the first)
        self.chat_template_source = chat_template
        self.generation_config = generation_config  # "auto" or "none" (create_app checks it)
        self.sampling_defaults = dict(OPENAI_SAMPLING_DEFAULTS)  # (the model's, once attached, with "auto")
        self.chat_template: Optional[ChatTemplate] = None
        self.ready = False
        self.draining = False
        self.forced_stop = False          # a second Ctrl-C: stop without draining
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
        if self.generation_config == "auto":
            self.sampling_defaults = {k: model.generation_config.get(k, v) for k, v in OPENAI_SAMPLING_DEFAULTS.items()}
        self.context = model.config.n_positions
        self.vocab = model.config.vocab_size
        if self.model_name is None:
            self.model_name = os.path.basename(os.path.normpath(model.path)) if model.path else "llamas"
        kv_mb = self.kv_cache_mb if self.kv_cache_mb is not None else auto_kv_cache_mb(model, self.max_batch)
        self.engine = Engine(model, max_batch=self.max_batch, max_queue=self.max_queue,
                             prefill_chunk=self.prefill_chunk, on_finish=self.metrics.on_finish,
                             on_step=self.dispatcher.flush, prefix_cache_mb=self.prefix_cache_mb,
                             speculative_ngram=self.speculative_ngram, kv_cache_mb=kv_mb)
        if self.engine.kv_budget_bytes is not None:
            per_sequence = kv_blocks_per_sequence(model) * model.kv_block_bytes
            log.info(json_line({"event": "kv_cache_budget", "bytes": self.engine.kv_budget_bytes,
                                 "full_context_sequences": self.engine.kv_budget_bytes // per_sequence,
                                 "max_batch": self.max_batch}))
        self.metrics.describe_model(self.model_name, model)
        self.ready = True

    def load_async(self, loader, what: str) -> threading.Thread:
        def run():
            try:
                self.attach(loader())
                log.info(json_line({"event": "model_loaded", "model": self.model_name, "source": what}))
            except Exception as e:  # /health reports it; requests get 503
                self.load_error = str(e)
                log.error(json_line({"event": "model_load_failed", "source": what, "error": str(e)}))
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
        check_text(name, "model")
        if name != self.model_name:
            raise bad(f"The model '{name[:100]}' does not exist; this server serves '{self.model_name}'.",
                      "model", "model_not_found")

    async def accept(self, request: Request) -> dict:
        """The checks every POST endpoint starts with, in order: auth (401), body size and JSON
        (413/400), a ready engine (503); returns the body."""
        self.check_auth(request)
        body = await self.read_json(request)
        self.require_engine()
        return body

    async def read_json(self, request: Request) -> dict:
        limit = self.max_body_bytes
        too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # (read as JSON it would be garbage, or worse, parse)
            raise APIError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed.",
                           code="unsupported_content_encoding")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_big
            except ValueError:
                raise bad("Invalid Content-Length header.") from None
        body = bytearray()
        # ASGI receive() directly, so that a body that stops arriving can be given up on: after
        # BODY_TIMEOUT_S (408), or at once when SIGTERM drains the server (503), whose graceful
        # stop would otherwise wait for that client forever. (receive() survives being waited on
        # in slices: a message is taken only when it is returned.)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUT_S
        pending: Optional[asyncio.Future] = None
        more = True
        while more:
            if pending is None:
                pending = asyncio.ensure_future(request.receive())
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            if not done:
                if self.draining or loop.time() > deadline:
                    pending.cancel()
                    if self.draining:
                        raise APIError(503, "The server is shutting down.", code="shutting_down")
                    raise APIError(408, f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
                                   code="request_timeout")
                continue
            message, pending = pending.result(), None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_big
            more = message.get("more_body", False)
        return parse_json_body(bytes(body))


# ---- helpers -------------------------------------------------------------------------------------
def _json(data, status: int = 200, headers=None) -> Response:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate echoed from the request (a key, a name): escape it
        body = json.dumps(data, separators=(",", ":")).encode("ascii")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(e: APIError) -> Response:
    return _json(e.body(), e.status, e.headers)


def _record(request: Request) -> dict:
    return request.scope.setdefault("llamas.log", {})

