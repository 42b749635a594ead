"""Generation for the OpenAI-compatible server: a completion or chat request runs every (prompt,
choice) through the engine and answers with JSON or server-sent events, formatted as OpenAI's."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Awaitable, Callable, List

from starlette.requests import Request
from starlette.responses import Response

from ._C import LlamasError
from .engine import EngineClosed, QueueFull
from .engine import Request as EngineRequest
from .engine import SamplingOptions, make_stop_rules
from .request import Chunk
from .server_choices import (TextOffsets, best_of_choices, chat_logprobs, completion_logprobs, echo_logprobs,
                             extend_logprobs, prompt_text)
from .server_protocol import APIError, GenParams, bad
from .server_sse import ChunkFormat, sse
from .server_tools import STRUCTURED_FIELD, calling, structured_kind, tool_calls, tool_events
from .server_state import ResponseInbox, ServerState, _json, _record, send_now


def _budget(state: ServerState, p: GenParams, n_prompt: int, param: str) -> int:
    """max_tokens for a prompt of n_prompt tokens; 400 when it cannot fit the context or the
    server's KV-cache budget (a request's prompt + max_tokens positions, see --kv-cache-mb)."""
    ctx = state.context
    kv = state.engine.kv_max_positions() if state.engine is not None else None
    if kv is not None and n_prompt >= kv + (p.max_tokens == 0):
        raise bad(f"The prompt has {n_prompt} tokens, but this server's KV-cache budget (--kv-cache-mb) holds at "
                  f"most {kv} positions a request, prompt and completion together.", param, "context_length_exceeded")
    if p.max_tokens == 0 and n_prompt <= ctx:  # only scores the prompt (echo with logprobs)
        return 0
    if n_prompt >= ctx:
        raise bad(f"This model's maximum context length is {ctx} tokens, but the prompt has {n_prompt} tokens "
                  f"(it must be at most {ctx - 1} to leave room for at least one generated token).",
                  param, "context_length_exceeded")
    room = ctx - n_prompt
    kv_room = room if kv is None else min(room, kv - n_prompt)
    cap = state.max_tokens
    if p.max_tokens is not None:
        if cap is not None and p.max_tokens > cap:
            raise bad(f"'max_tokens' is {p.max_tokens} but this server allows at most {cap}.", "max_tokens",
                      "invalid_value")
        if p.max_tokens > room:
            raise bad(f"This model's maximum context length is {ctx} tokens. However, you requested "
                      f"{n_prompt + p.max_tokens} tokens ({n_prompt} in the prompt, {p.max_tokens} for the "
                      f"completion). Reduce the prompt or 'max_tokens'.", "max_tokens", "context_length_exceeded")
        if p.max_tokens > kv_room:
            raise bad(f"'max_tokens' is {p.max_tokens}, but this server's KV-cache budget (--kv-cache-mb) holds at "
                      f"most {kv} positions a request: with this {n_prompt}-token prompt, at most {kv_room} for the "
                      "completion.", "max_tokens", "context_length_exceeded")
        return p.max_tokens
    default = kv_room if p.default_max_tokens is None else min(p.default_max_tokens, kv_room)
    return min(default, cap) if cap is not None else default


def _usage(prompt_tokens: int, completion_tokens: int, handles=None) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    cached = [h._req.cached_tokens for h in handles or () if h._req.cached_tokens is not None]
    if cached:  # the prefix cache is on: OpenAI's field for prompt caching
        usage["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    return usage


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


class _Coalescer:
    """A streamed choice's listener under `stream_interval` N > 1 (vLLM's and TensorRT-LLM's
    --stream-interval): in the engine thread it passes the chunk with the choice's first text on
    at once (the time to first token does not change), then holds chunks until they carry N
    tokens, and passes the last chunk (a finish, a cancellation, an error) at once with whatever
    it held. Each handed-on chunk is one event for the client, so the event loop wakes, formats
    and writes a socket once per N tokens instead of once per token."""
    __slots__ = ("_push", "_loop", "_inbox", "_idx", "_interval", "_held", "_tokens", "_started")

    def __init__(self, push, loop, inbox, idx: int, interval: int):
        self._push, self._loop, self._inbox, self._idx, self._interval = push, loop, inbox, idx, interval
        self._held: List[Chunk] = []
        self._tokens = 0        # tokens in the held chunks
        self._started = False   # some text went out

    def __call__(self, chunk: Chunk) -> None:
        self._held.append(chunk)
        self._tokens += len(chunk.token_ids)
        if self._started and chunk.finish_reason is None and self._tokens < self._interval:
            return
        held, self._held, self._tokens = self._held, [], 0
        merged = held[0] if len(held) == 1 else merge_chunks(held)
        if merged.text:
            self._started = True
        self._push(self._loop, self._inbox, (self._idx, merged))


def merge_chunks(chunks: List[Chunk]) -> Chunk:
    """One chunk saying what `chunks` (consecutive, of one request) say: their text and tokens in
    order, their logprobs (when asked for), the first one's prompt logprobs, the last one's end."""
    last = chunks[-1]
    lps = [c.logprobs for c in chunks if c.logprobs is not None]
    prompt = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None)
    return Chunk("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                 [lp for group in lps for lp in group] if lps else None, last.finish_reason, last.error, prompt)


# ---- generation ----------------------------------------------------------------------------------
async def _generate(state: ServerState, request: Request, kind: str, p: GenParams) -> Response:
    """Runs every (prompt, choice) through the engine; answers JSON or SSE."""
    engine = state.require_engine()
    # The client's X-Request-Id when it sent one (vLLM's way), else a fresh one; the response
    # carries it back in its own X-Request-Id header.
    base = request.scope.get("llamas.request_id") or uuid.uuid4().hex[:24]
    request.scope["llamas.request_id"] = base
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + base
    created = int(time.time())
    rec = _record(request)
    rec["id"] = rid
    structured = structured_kind(p)
    if structured is not None:
        rec["structured"] = structured
        state.metrics.structured.labels(structured).inc()
    if p.truncate_prompt_tokens is not None:  # the prompt's last N tokens (vLLM's left truncation)
        kv = engine.kv_max_positions()  # -1: what the context (and the server's KV budget) holds
        keep = (state.context if kv is None else min(state.context, kv)) if p.truncate_prompt_tokens == -1 \
            else p.truncate_prompt_tokens
        p.prompt_ids = [ids[-keep:] for ids in p.prompt_ids]
    budgets = [_budget(state, p, len(ids), "messages" if kind == "chat" else "prompt") for ids in p.prompt_ids]
    if p.min_tokens > min(budgets):
        raise bad(f"'min_tokens' ({p.min_tokens}) must not exceed the tokens this request may generate "
                  f"({min(budgets)}: 'max_tokens' or what the context leaves).", "min_tokens", "invalid_value")
    stops = make_stop_rules(p.stop, p.stop_token_ids, p.min_tokens, p.ignore_eos, p.include_stop_str_in_output,
                            skip_special_tokens=p.skip_special_tokens)
    if structured is not None:
        try:
            state.model.constraint_vocab()
        except LlamasError as e:
            field = STRUCTURED_FIELD[structured]
            raise bad(f"'{field}' is not available: {e}", field, "unsupported_value") from None
    per_prompt = max(p.n, p.best_of)  # sequences per prompt: best_of candidates, of which n are returned
    n_total = len(p.prompt_ids) * per_prompt
    if n_total > state.max_batch + state.max_queue:
        raise bad(f"This request asks for {n_total} sequences; this server runs at most "
                  f"{state.max_batch + state.max_queue} at once.", "n", "invalid_value")
    loop = asyncio.get_running_loop()
    inbox = ResponseInbox()
    items = []
    seed = p.sampling["seed"]
    for pi, ids in enumerate(p.prompt_ids):
        for j in range(per_prompt):
            idx = pi * per_prompt + j
            s = dict(p.sampling)
            s["seed"] = None if seed is None else (seed + j) & ((1 << 63) - 1)
            # best_of ranks the candidates by their tokens' log-probabilities
            logprobs = 0 if per_prompt > p.n and p.logprobs is None else p.logprobs
            try:
                options = SamplingOptions(logprobs=logprobs, **s)
            except LlamasError as e:
                raise bad(str(e)) from None
            req = EngineRequest(ids, budgets[pi], options, stops, request_id=f"{rid}-{idx}",
                                prompt_logprobs=p.logprobs if p.echo else None)
            push = state.dispatcher.push
            if p.stream and state.stream_interval > 1:
                listener = _Coalescer(push, loop, inbox, idx, state.stream_interval)
            elif p.stream:
                def listener(chunk, idx=idx):
                    push(loop, inbox, (idx, chunk))
            else:
                def listener(chunk, idx=idx):
                    if chunk.finish_reason is not None:
                        push(loop, inbox, (idx, chunk))
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
    # echo: each choice's text (and logprobs) starts with its prompt, as given or decoded from ids.
    echoes = None
    if p.echo:
        try:
            texts = [prompt_text(state.tokenizer, p, pi) for pi in range(len(p.prompt_ids))]
        except BaseException:  # the sequences are queued: nobody would read them
            for h in handles:
                h.cancel()
            raise
        # per returned choice (n a prompt; best_of's other candidates are dropped before choices are made)
        echoes = [texts[i // p.n] for i in range(len(p.prompt_ids) * p.n)]

    def finish_record():
        rec["completion_tokens"] = sum(h._req.completion_tokens for h in handles)
        # (a handle its client left is cancelled, though the engine thread may not have ended it yet)
        rec["finish_reason"] = [h._req.finish_reason or ("cancelled" if rec.get("disconnected") else None)
                                for h in handles]
        cached = sum(h._req.cached_tokens or 0 for h in handles)
        if cached:
            rec["cached_tokens"] = cached
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
        return _SSEResponse(lambda send: _stream(state, kind, p, rid, created, handles, choices, inbox, prompt_tokens,
                                                 send, echoes), on_close)

    # Non-streaming: wait for every choice, or for the client to go away.
    disconnect = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        remaining = len(handles)
        while remaining:
            take = asyncio.ensure_future(inbox.take())
            done, _ = await asyncio.wait({take, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if take not in done:
                take.cancel()
                rec["disconnected"] = True
                return Response(status_code=499)
            remaining -= len(take.result())
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
    completion_tokens = sum(r.completion_tokens for r in results)  # best_of: every candidate's
    if per_prompt > p.n:
        results = best_of_choices(results, per_prompt, p.n, keep_logprobs=p.logprobs is not None)
    tok = state.tokenizer
    out = []
    for i, r in enumerate(results):
        if kind == "chat":
            message, reason = {"role": "assistant", "content": r.text}, r.finish_reason
            calls = tool_calls(p, r.text, reason)
            if calls is not None:
                message, reason = {"role": "assistant", "content": None, "tool_calls": calls}, \
                    p.tools.finish_reason(reason)
            c = {"index": i, "message": message,
                 "logprobs": chat_logprobs(tok, r.logprobs) if r.logprobs is not None else None,
                 "finish_reason": reason}
        elif echoes is None:
            c = {"index": i, "text": r.text,
                 "logprobs": completion_logprobs(tok, r.logprobs, TextOffsets(0)) if r.logprobs is not None else None,
                 "finish_reason": r.finish_reason}
        else:
            lp = None
            if r.logprobs is not None:
                lp = echo_logprobs(tok, p.prompt_ids[i // p.n], r.prompt_logprobs)
                extend_logprobs(lp, completion_logprobs(tok, r.logprobs, TextOffsets(len(echoes[i]))))
            c = {"index": i, "text": echoes[i] + r.text, "logprobs": lp, "finish_reason": r.finish_reason}
        out.append(c)
    return _json({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                  "created": created, "model": state.model_name, "choices": out,
                  "usage": _usage(prompt_tokens, completion_tokens, handles)})


def _round(v):
    return None if v is None else round(v, 6)


async def _wait_disconnect(receive) -> None:
    """Returns when the ASGI `receive` reports the client gone (or the response complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _SSEResponse(Response):
    """Server-sent events, written straight to the ASGI `send`. `pump(send)` sends the body's
    events, the last with more_body False; `on_close` runs however the response ends (done, client
    gone before or during the stream, server shutdown), and also the moment the client
    disconnects, so no sequence outlives its client: the engine then ends the cancelled sequences
    and the pump returns.

    Not Starlette's StreamingResponse: per request it opens an anyio task group to watch for the
    disconnect (~10% of the event loop's time at 16 streaming clients, py-spy), and per event it
    resumes an async generator and re-checks the chunk's type. Here one plain task watches, and
    the pump awaits the engine's inbox and sends each step's events as one body message."""

    media_type = "text/event-stream"

    def __init__(self, pump: Callable[[Callable], Awaitable[None]], on_close: Callable[[], None]):
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._pump = pump
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        async def watch():
            await _wait_disconnect(receive)
            if not finished:
                self._on_close()

        finished = False
        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            # The body's events go to the server's own send when the app left it in the scope (no
            # middleware of this app can change a body; see server._App), past the chain's
            # wrappers, which only watch for the response start.
            await self._pump(scope.get("llamas.send") or send)  # ends the body
        finally:
            finished = True
            watcher.cancel()
            self._on_close()


async def _stream(state, kind, p, rid, created, handles, choices, inbox, prompt_tokens, send, echoes=None) -> None:
    """Sends a streamed response's events and ends its body: one body message per engine step (all
    of its choices' chunks); the last step's message also carries the usage chunk (when asked) and
    `[DONE]`, and ends the body. (As four messages, the end of each response cost four send()
    system calls, ~27 us each on loopback at 16 clients.) With one choice and no logprobs, a
    plain token's event is written by the delivery callback while this task waits (the inbox's
    direct writer): at 16 streaming clients the event loop's CPU per token went from 64-87 us to
    42-61 (alternating servers), without a future, a task step and a coroutine chain per token."""
    tok = state.tokenizer
    fmt = ChunkFormat(rid, kind, created, state.model_name, p.include_usage)

    async def emit(text: str, more_body: bool = True) -> None:
        await send({"type": "http.response.body", "body": text.encode(), "more_body": more_body})

    usage = _ChoiceUsage(p, choices) if p.continuous_usage else (lambda idx: None)
    if kind == "chat":
        await emit("".join(fmt.frame([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}], usage(i)) for i in range(len(handles))))
    if echoes is not None:
        # Each choice's prompt first. With logprobs its scores come with the choice's first chunk
        # (they exist once the prompt is fed), and _stream_events sends the prompt then.
        for i, ch in enumerate(choices):
            ch.offset = len(echoes[i])
        if p.logprobs is None:
            await emit("".join(fmt.text(i, echoes[i], None, usage(i)) for i in range(len(handles)) if echoes[i]))
    held = calling(p)  # a tool call is sent whole (tool_events)
    if len(handles) == 1 and choices[0].logprobs is None and not p.continuous_usage and not held:
        # One choice without logprobs (nearly every request): a token's event is written by the
        # engine's delivery callback itself while this task waits (see ResponseInbox).
        def direct(item) -> bool:
            idx, c = item
            if c.finish_reason is not None:
                return False
            if c.text:
                try:
                    body = fmt.text(idx, c.text, None).encode()
                    inbox.blocked = send_now(send, {"type": "http.response.body", "body": body, "more_body": True})
                except Exception:  # not written: this task sends it again and meets the error itself
                    inbox.direct = None
                    return False
            return True
        inbox.direct = direct
    try:
        await _stream_events(kind, p, tok, fmt, handles, choices, inbox, prompt_tokens, echoes, emit, usage)
    finally:
        inbox.direct = None  # the writer's closure holds the inbox: no cycle outlives the response


class _ChoiceUsage:
    """usage(idx): a choice's usage so far, for stream_options.continuous_usage_stats (vLLM's: its
    prompt's tokens and the tokens it has sampled, counted by _stream_events as chunks arrive)."""

    def __init__(self, p: GenParams, choices: list):
        self._prompt = [len(p.prompt_ids[i // p.n]) for i in range(len(choices))]
        self._choices = choices

    def __call__(self, idx: int) -> dict:
        prompt, done = self._prompt[idx], self._choices[idx].completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _stream_events(kind, p, tok, fmt, handles, choices, inbox, prompt_tokens, echoes, emit,
                         usage=lambda idx: None) -> None:
    remaining = len(handles)
    held = {} if calling(p) else None  # tool calls' text so far
    out = []
    while remaining:
        out = []
        items = await inbox.take()
        await inbox.finish_blocked()
        for idx, c in items:
            ch = choices[idx]
            if echoes is not None and c.prompt_logprobs is not None and ch.logprobs is not None:
                lp = echo_logprobs(tok, p.prompt_ids[idx // p.n], c.prompt_logprobs)
                out.append(fmt.frame([{"index": idx, "text": echoes[idx], "logprobs": lp, "finish_reason": None}],
                                     usage(idx)))
            # sampled tokens so far (the last also counts a stop token that is not in the output)
            ch.completion_tokens = (handles[idx]._req.completion_tokens if c.finish_reason is not None
                                    else ch.completion_tokens + len(c.token_ids))
            if c.finish_reason is not None:
                remaining -= 1
                if c.finish_reason in ("error", "cancelled"):
                    msg = c.error or "the request was cancelled by the server"
                    out.append(sse({"error": {"message": f"Generation failed: {msg}", "type": "server_error",
                                              "param": None, "code": "engine_error"}}))
                    continue
            if held is not None:
                held[idx] = held.get(idx, "") + c.text
                if c.finish_reason is not None:
                    out.extend(tool_events(p, fmt, idx, held.pop(idx), c.finish_reason, usage(idx)))
                continue
            if ch.logprobs is None or not c.logprobs:
                if c.text or c.finish_reason is not None:
                    out.append(fmt.text(idx, c.text, c.finish_reason, usage(idx)))
                continue
            if kind == "chat":
                lp = chat_logprobs(tok, c.logprobs)
                delta = {"content": c.text} if c.text else {}
                out.append(fmt.frame([{"index": idx, "delta": delta, "logprobs": lp,
                                       "finish_reason": c.finish_reason}], usage(idx)))
            else:
                if not isinstance(ch.offset, TextOffsets):  # (it carries a split character over chunks)
                    ch.offset = TextOffsets(ch.offset)
                lp = completion_logprobs(tok, c.logprobs, ch.offset)
                out.append(fmt.frame([{"index": idx, "text": c.text, "logprobs": lp,
                                       "finish_reason": c.finish_reason}], usage(idx)))
        if remaining and out:
            await emit("".join(out))
    if p.include_usage:
        completion_tokens = sum(h._req.completion_tokens for h in handles)
        out.append(fmt.frame([], _usage(prompt_tokens, completion_tokens, handles)))
    out.append("data: [DONE]\n\n")
    await emit("".join(out), more_body=False)
