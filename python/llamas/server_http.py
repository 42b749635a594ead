"""Connection limits uvicorn leaves to the application, for `llamas serve`.

uvicorn's httptools protocol starts no clock before a request's head has arrived and buffers a
head of any size: 900 connections that never sent a byte stayed open, a client sending a header
byte every 0.5 s stayed for good, and one unfinished 64 MB header was held in memory. The body has
its own limits (`--max-body-bytes`, a 30 s arrival timeout, server_state.py); this adds the
head's: HEAD_TIMEOUT_S to arrive (408, or a plain close when nothing came) and MAX_HEAD_BYTES
(431). It also ends, during a graceful stop, connections whose client has stopped reading the
end of a finished response: closing one waits for its unsent bytes, so uvicorn waited forever.
"""
from __future__ import annotations

import asyncio
import json
import logging

from . import server_state

HEAD_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 * 1024   # request line + headers (nginx allows 32 KiB by default, Node 16 KiB)

log = logging.getLogger("llamas.server")


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_protocol():
    """uvicorn's httptools protocol with a clock and a size limit on each request's head."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._start_head()

        def _start_head(self) -> None:
            # The next bytes on this connection are a request's head: count them, start its clock.
            self._in_head, self._head_bytes, self._tail = True, 0, b""
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)

        def _end_head(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc) -> None:
            self._end_head()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                seen = self._tail + data
                if b"\r\n\r\n" in seen:  # (the parser's on_headers_complete ends it too)
                    self._in_head = False
                else:
                    self._head_bytes += len(data)
                    self._tail = seen[-3:]
                    if self._head_bytes > MAX_HEAD_BYTES:
                        self._refuse(431, "Request Header Fields Too Large",
                                     f"The request line and headers exceed {MAX_HEAD_BYTES} bytes.",
                                     "headers_too_large")
                        return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._end_head()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._start_head()  # (a running response re-arms the clock: see _head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A response is still going out: the next head's time starts after it.
                self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)
                return
            if self._head_bytes == 0:
                self.transport.close()  # connected, never sent anything: nothing to answer
                return
            self._refuse(408, "Request Timeout", f"The request line and headers did not arrive within "
                         f"{HEAD_TIMEOUT_S:g} s.", "request_timeout")

        def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
            log.warning("%s from %s: %s", status, self.client, message)
            self._end_head()
            self.transport.write(_refusal(status, reason, message, code))
            self.transport.close()

    return GuardedHttpToolsProtocol


async def abort_stalled_connections(server_state_) -> None:
    """Runs while a graceful stop waits for connections to close: a connection whose write buffer
    has not shrunk for WRITE_TIMEOUT_S (its client stopped reading the end of a response; closing
    it waits for those bytes) is aborted. Cancel it when the stop is over."""
    loop = asyncio.get_running_loop()
    progress: dict = {}  # connection -> (unsent bytes, since when)
    while True:
        await asyncio.sleep(1.0)
        now = loop.time()
        for conn in list(server_state_.connections):
            transport = getattr(conn, "transport", None)
            unsent = transport.get_write_buffer_size() if transport is not None else 0
            if not unsent:
                progress.pop(conn, None)
                continue
            seen = progress.get(conn)
            if seen is None or seen[0] != unsent:
                progress[conn] = (unsent, now)
            elif now - seen[1] >= server_state.WRITE_TIMEOUT_S:
                log.warning("stopping: %s has not read the last %d bytes of its response for %g s; "
                            "connection aborted", getattr(conn, "client", "a client"), unsent,
                            server_state.WRITE_TIMEOUT_S)
                transport.abort()
                progress.pop(conn, None)
