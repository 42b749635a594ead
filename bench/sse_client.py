"""A minimal HTTP/1.1 client for streamed completions, for the load test (bench/serve_load.py).

The load generator shares this 2-core machine with the server, so its CPU per token is taken
from the server's forward pass. httpx (with httpcore, h11 and anyio under it) spent ~275 us of
CPU per streamed token at 16 clients; this client, an asyncio Protocol that parses the chunked
body and the server-sent events itself, spends ~60 us (both measured from /proc at 16 clients,
bundled model), and still checks every event:
each `data:` line must be a JSON chunk of the expected shape (or `[DONE]` last), a choice must
carry a finish_reason, and the token count comes from the usage chunk the server sends.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Optional
from urllib.parse import urlsplit


class StreamError(Exception):
    """A response that is not a valid stream of completion chunks."""


class StreamResult:
    __slots__ = ("first", "last", "tokens")

    def __init__(self):
        self.first: Optional[float] = None   # perf_counter time of the first choice chunk
        self.last: Optional[float] = None    # ... and of the last
        self.tokens = 0                      # completion_tokens of the usage chunk


def check_event(event: bytes, res: StreamResult, now: float, state: dict) -> None:
    """Validates one server-sent event of a streamed completion and records what it says."""
    if not event.startswith(b"data: "):
        raise StreamError(f"not a data event: {event[:80]!r}")
    if state["done"]:
        raise StreamError("an event after data: [DONE]")
    payload = event[6:]
    if payload == b"[DONE]":
        if not state["finished"] or not state["usage"]:
            raise StreamError("data: [DONE] before a finish_reason and the usage chunk")
        state["done"] = True
        return
    try:
        d = json.loads(payload)
    except ValueError:
        raise StreamError(f"an event that is not JSON: {payload[:80]!r}") from None
    if "error" in d:
        raise StreamError(str(d["error"].get("message")))
    if d.get("object") != "text_completion" or not isinstance(d.get("id"), str):
        raise StreamError(f"not a completion chunk: {payload[:80]!r}")
    choices = d["choices"]
    if not choices:  # the usage chunk
        tokens = d["usage"]["completion_tokens"]
        if not isinstance(tokens, int) or tokens < 0 or state["usage"]:
            raise StreamError(f"a bad or second usage chunk: {payload[:80]!r}")
        res.tokens = tokens
        state["usage"] = True
        return
    (choice,) = choices
    reason = choice["finish_reason"]
    if choice["index"] != 0 or not isinstance(choice["text"], str) or reason not in (None, "stop", "length"):
        raise StreamError(f"a bad choice: {payload[:80]!r}")
    if state["finished"]:
        raise StreamError("a choice chunk after its finish_reason")
    if reason is not None:
        state["finished"] = True
    if res.first is None:
        res.first = now
    res.last = now


class _Response(asyncio.Protocol):
    """Parses one connection's responses: status line and headers, then a chunked or
    Content-Length body; a streamed body's events go through check_event."""

    def __init__(self):
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self._pending: Optional[asyncio.Future] = None

    # ---- asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)
        self._fail(StreamError(f"connection closed{f': {exc}' if exc else ''}"))

    def data_received(self, data: bytes):
        if self._pending is None:
            self._fail(StreamError("data without a request"))
            return
        self._buf += data
        try:
            self._parse(time.perf_counter())
        except StreamError as e:
            self._fail(e)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            self._fail(StreamError(f"malformed response ({type(e).__name__}: {e})"))

    # ---- one request
    def start(self, request: bytes) -> asyncio.Future:
        self._pending = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._status: Optional[int] = None
        self._chunked = False
        self._remaining = 0          # body bytes still due (Content-Length), or in the current chunk
        self._body = b""             # a non-streamed body, or the de-chunked part not yet split into events
        self._events = b""
        self._result = StreamResult()
        self._state = {"finished": False, "usage": False, "done": False}
        self.transport.write(request)
        return self._pending

    def _fail(self, e: Exception) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(e)
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        if self._status != 200:
            raise StreamError(f"HTTP {self._status}: {self._body[:100].decode(errors='replace')}")
        if self._events.strip():
            raise StreamError("the stream ended inside an event")
        if not self._state["done"]:
            raise StreamError("the stream ended without data: [DONE]")
        fut, self._pending = self._pending, None
        fut.set_result(self._result)

    def _parse(self, now: float) -> None:
        if self._status is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buf = self._buf[:end].decode("latin-1").split("\r\n"), self._buf[end + 4:]
            self._status = int(head[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            self._remaining = -1 if self._chunked else int(headers.get("content-length", "0"))
        if not self._chunked:
            take = self._buf[:self._remaining]
            self._body += take
            self._buf = self._buf[len(take):]
            self._remaining -= len(take)
            if self._remaining == 0:
                self._finish()
            return
        while True:
            if self._remaining < 0:  # expecting a chunk-size line
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(self._buf[:eol].split(b";")[0], 16)
                if size == 0:  # the last chunk (no trailers from this server)
                    if len(self._buf) < eol + 4:
                        return
                    if self._buf[eol + 2:eol + 4] != b"\r\n":
                        raise StreamError("trailers after the last chunk")
                    self._buf = self._buf[eol + 4:]
                    if self._status == 200:
                        self._events_received(now)
                    self._finish()
                    return
                self._buf = self._buf[eol + 2:]
                self._remaining = size
            if len(self._buf) < self._remaining + 2:
                return
            if self._buf[self._remaining:self._remaining + 2] != b"\r\n":
                raise StreamError("a chunk not followed by CRLF")
            if self._status == 200:
                self._events += self._buf[:self._remaining]
            else:
                self._body += self._buf[:self._remaining]
            self._buf = self._buf[self._remaining + 2:]
            self._remaining = -1
            if self._status == 200:
                self._events_received(now)

    def _events_received(self, now: float) -> None:
        *events, self._events = self._events.split(b"\n\n")
        for ev in events:
            check_event(ev, self._result, now, self._state)


class StreamClient:
    """One keep-alive connection that posts streamed completions, one at a time."""

    def __init__(self, url: str, api_key: Optional[str] = None):
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"the load client speaks plain http:// only, got {url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/") + "/v1/completions"
        self._head = (f"POST {self.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                      + (f"Authorization: Bearer {api_key}\r\n" if api_key else ""))
        self._conn: Optional[_Response] = None

    async def complete(self, body: dict) -> StreamResult:
        """Posts one streamed completion; returns its timings and token count, or raises
        StreamError (or OSError) when the response is not a valid stream."""
        if self._conn is None or self._conn.closed.done():
            _, self._conn = await asyncio.get_running_loop().create_connection(_Response, self.host, self.port)
        data = json.dumps(body).encode()
        request = f"{self._head}Content-Length: {len(data)}\r\n\r\n".encode() + data
        try:
            return await self._conn.start(request)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
