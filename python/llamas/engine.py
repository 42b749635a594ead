"""The scheduler shared by `Model.generate`, `llamas.Engine` and the HTTP server.

`Scheduler` is single-threaded and synchronous: `add` queues requests, each `step` admits queued
requests (up to `max_batch` running), feeds every running sequence in ONE batched forward (prompt
chunks of at most `prefill_chunk` tokens for sequences still prefilling, one token for those
decoding), then handles each sampled token (end-of-text, stop strings through `TextStream`, length
limit, log-probabilities) and frees a sequence's KV memory the moment it finishes or is cancelled.

`Model.generate` drives a private `Scheduler` in the caller's thread. `Engine` drives one from a
background thread, continuously, so requests submitted from any thread (or the server's event
loop) join and leave the running batch between steps.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from . import _C
from ._C import LlamasError
from .streaming import TextStream

log = logging.getLogger("llamas.engine")

Prompt = Union[str, Sequence[int]]


# ---- sampling parameters -------------------------------------------------------------------------
def _check_number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LlamasError(f"[generate] {name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise LlamasError(f"[generate] {name} must be in {bracket}{low}, {high}], got {value}")
    return value


class SamplingOptions:
    """Validated sampling parameters (shared by Model.generate, the CLI, Engine and the server)."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, seed=None, logit_bias=None, logprobs=None):
        self.temperature = _check_number("temperature", temperature, 0.0, 100.0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise LlamasError(f"[generate] top_k must be an integer >= 0, got {top_k!r}")
        self.top_k = top_k
        self.top_p = _check_number("top_p", top_p, 0.0, 1.0, low_open=True)
        self.min_p = _check_number("min_p", min_p, 0.0, 1.0)
        self.repetition_penalty = _check_number("repetition_penalty", repetition_penalty, 0.0, 100.0, low_open=True)
        self.presence_penalty = _check_number("presence_penalty", presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _check_number("frequency_penalty", frequency_penalty, -2.0, 2.0)
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LlamasError(f"[generate] seed must be a non-negative integer, got {seed!r}")
        self.seed = seed & ((1 << 64) - 1)
        bias = {}
        if logit_bias is not None:
            if not isinstance(logit_bias, dict):
                raise LlamasError("[generate] logit_bias must be a dict {token id: bias}")
            for token, value in logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise LlamasError(f"[generate] logit_bias keys must be token ids >= 0, got {token!r}")
                bias[token] = _check_number(f"logit_bias[{token}]", value, -100.0, 100.0)
        self.logit_bias = bias
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= 20):
            raise LlamasError(f"[generate] logprobs must be None or an integer in [0, 20], got {logprobs!r}")
        self.logprobs = logprobs

    def with_seed(self, seed: int) -> "SamplingOptions":
        other = object.__new__(SamplingOptions)
        other.__dict__.update(self.__dict__)
        other.seed = seed & ((1 << 64) - 1)
        return other


def normalise_stop(stop) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise LlamasError("[generate] stop must be a str or a list of str")
    return [s for s in stop if s]


# ---- what a request produces -------------------------------------------------------------------
@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the model's raw distribution, and the `top`
    most likely alternatives at that step as [(token id, logprob)]."""
    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """What one step added to a request: new safe text, the accepted token ids, their logprobs
    (when asked for) and, on the last chunk, finish_reason: "stop" (end-of-text or a stop
    string), "length", "cancelled" or "error"."""
    text: str
    token_ids: List[int]
    logprobs: Optional[List[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclass
class Completion:
    """The final output of a request."""
    id: str
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int          # tokens sampled, including an end-of-text or stop-completing one
    logprobs: Optional[List[TokenLogprob]]
    error: Optional[str] = None


@dataclass
class RequestStats:
    """Timings (seconds, time.perf_counter clock) of one request."""
    submitted: float = 0.0
    admitted: Optional[float] = None
    first_token: Optional[float] = None
    finished: Optional[float] = None
    token_times: List[float] = field(default_factory=list)

    @property
    def queue_time(self) -> Optional[float]:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def e2e_latency(self) -> Optional[float]:
        return None if self.finished is None else self.finished - self.submitted

    @property
    def inter_token_latencies(self) -> List[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


_ids = itertools.count(1)


class Request:
    """One sequence to generate: validated prompt ids, budget, sampling options, stop strings.
    `sink(chunk)` is called from the thread that runs the scheduler."""

    def __init__(self, prompt_ids: List[int], max_new_tokens: int, options: SamplingOptions,
                 stop: Sequence[str] = (), sink: Optional[Callable[[Chunk], None]] = None,
                 request_id: Optional[str] = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.stop = list(stop)
        self.sink = sink
        self.cancelled = False
        self.finished = False
        self.finish_reason: Optional[str] = None
        self.completion_tokens = 0
        self.stats = RequestStats(submitted=time.perf_counter())


class _Slot:
    """A running request: its native sequence and decoding state."""
    __slots__ = ("req", "seq", "fed", "next_token", "produced", "budget", "stream")

    def __init__(self, req: Request, seq, budget: int, stream: Optional[TextStream]):
        self.req = req
        self.seq = seq
        self.fed = 0              # prompt tokens already in the KV cache
        self.next_token = -1      # last accepted token, fed at the next decode step
        self.produced = 0         # accepted tokens
        self.budget = budget
        self.stream = stream


class Scheduler:
    """Admission, chunked prefill, batched steps, stop/EOS/length handling, detokenisation and
    release. Not thread-safe: one thread calls `add`, `step` and `abort_all` (Engine serialises)."""

    def __init__(self, model, max_batch: int = 16, prefill_chunk: int = 128,
                 max_prefill_tokens: Optional[int] = 512,
                 on_finish: Optional[Callable[[Request], None]] = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise LlamasError("[engine] max_batch and prefill_chunk must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens
        self.on_finish = on_finish
        self.waiting: collections.deque = collections.deque()
        self.running: List[_Slot] = []
        self._native_config = model.config.to_native()
        tok = model.tokenizer
        self._eos = tok.eos_token_id if tok is not None else None
        self._ctx = model.config.n_positions

    # ---- queue ------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one iteration ----------------------------------------------------------------------
    def step(self) -> bool:
        """Admits, runs one batched forward, handles its tokens. Returns has_work()."""
        self._reap_cancelled()
        self._admit()
        if not self.running:
            return self.has_work()
        entries, fed = [], []
        budget = self.max_prefill_tokens
        prefilling = False
        for slot in self.running:
            prompt = slot.req.prompt_ids
            if slot.fed < len(prompt):
                if budget is not None and budget <= 0 and prefilling:
                    continue  # this step's prompt budget is spent; keep decoding the others
                n = min(self.prefill_chunk, len(prompt) - slot.fed)
                if budget is not None:
                    n = max(1, min(n, budget))
                    budget -= n
                prefilling = True
                chunk = prompt[slot.fed:slot.fed + n]
                entries.append((slot.seq, chunk, slot.fed + n == len(prompt)))
                fed.append((slot, n))
            else:
                entries.append((slot.seq, [slot.next_token], True))
                fed.append((slot, 0))
        try:
            sampled = self.model._native.step(entries)
        except Exception as e:  # a failing forward fails the requests in it, not the engine
            log.exception("engine step failed")
            for slot, _ in fed:
                self._finish(slot, Chunk("", [], None, "error", error=str(e)))
            return self.has_work()
        now = time.perf_counter()
        for (slot, n), (_, _, sample), token in zip(fed, entries, sampled):
            slot.fed += n
            if sample:
                self._on_token(slot, int(token), now)
        return self.has_work()

    def abort_all(self, reason: str = "cancelled") -> None:
        """Ends every request now (running ones release their KV memory)."""
        for slot in list(self.running):
            self._finish(slot, Chunk("", [], None, reason))
        while self.waiting:
            self._finish_waiting(self.waiting.popleft(), reason)

    # ---- internals --------------------------------------------------------------------------
    def _reap_cancelled(self) -> None:
        for slot in [s for s in self.running if s.req.cancelled]:
            self._finish(slot, Chunk("", [], None, "cancelled"))
        if any(r.cancelled for r in self.waiting):
            keep = collections.deque()
            for r in self.waiting:
                if r.cancelled:
                    self._finish_waiting(r, "cancelled")
                else:
                    keep.append(r)
            self.waiting = keep

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.popleft()
            if req.cancelled:
                self._finish_waiting(req, "cancelled")
                continue
            o = req.options
            try:
                seq = _C.Sequence(self._native_config, o.temperature, o.top_k, o.top_p, o.min_p,
                                  o.repetition_penalty, o.presence_penalty, o.frequency_penalty, o.seed,
                                  o.logit_bias, -1 if o.logprobs is None else o.logprobs)
            except Exception as e:
                req.stats.admitted = time.perf_counter()
                self._finish_waiting(req, "error", str(e))
                continue
            tok = self.model.tokenizer
            stream = TextStream(tok, req.stop) if tok is not None else None
            budget = min(req.max_new_tokens, self._ctx - len(req.prompt_ids) + 1)
            req.stats.admitted = time.perf_counter()
            self.running.append(_Slot(req, seq, budget, stream))

    def _on_token(self, slot: _Slot, token: int, now: float) -> None:
        req = slot.req
        req.completion_tokens += 1
        st = req.stats
        if st.first_token is None:
            st.first_token = now
        st.token_times.append(now)
        lp = None
        if req.options.logprobs is not None:
            lp = [TokenLogprob(token, float(slot.seq.last_logprob),
                               [(int(i), float(p)) for i, p in slot.seq.last_top_logprobs])]
        stream = slot.stream
        if self._eos is not None and token == self._eos:
            self._finish(slot, Chunk(stream.finish() if stream else "", [], None, "stop"))
            return
        piece = stream.push(token) if stream is not None else ""
        if stream is not None and stream.stopped:
            self._finish(slot, Chunk(piece, [], None, "stop"))
            return
        slot.produced += 1
        if slot.produced >= slot.budget:
            tail = stream.finish() if stream is not None else ""
            self._finish(slot, Chunk(piece + tail, [token], lp, "length"))
            return
        slot.next_token = token
        self._emit(req, Chunk(piece, [token], lp))

    def _finish(self, slot: _Slot, chunk: Chunk) -> None:
        slot.seq.release()  # KV memory goes back the moment a sequence ends
        try:
            self.running.remove(slot)
        except ValueError:
            pass
        self._complete(slot.req, chunk)

    def _finish_waiting(self, req: Request, reason: str, error: Optional[str] = None) -> None:
        self._complete(req, Chunk("", [], None, reason, error=error))

    def _complete(self, req: Request, chunk: Chunk) -> None:
        req.finished = True
        req.finish_reason = chunk.finish_reason
        req.stats.finished = time.perf_counter()
        self._emit(req, chunk)
        if self.on_finish is not None:
            try:
                self.on_finish(req)
            except Exception:
                log.exception("on_finish hook failed")

    @staticmethod
    def _emit(req: Request, chunk: Chunk) -> None:
        if req.sink is not None:
            try:
                req.sink(chunk)
            except Exception:
                log.exception("request sink failed")


# ---- the threaded engine -----------------------------------------------------------------------
class EngineClosed(LlamasError):
    """submit() after shutdown() began."""


class QueueFull(LlamasError):
    """submit() while max_queue requests are already waiting."""


class RequestHandle:
    """A submitted request. Iterate it for streamed pieces (text pieces for a str prompt, token
    ids for an id prompt), call `.result()` for the final `Completion`, `.cancel()` to stop it
    (its KV memory is freed at the engine's next step). Thread-safe; one consumer at a time."""

    def __init__(self, engine: "Engine", req: Request, as_text: bool,
                 listener: Optional[Callable[[Chunk], None]] = None):
        self._engine = engine
        self._req = req
        self._as_text = as_text
        self._listener = listener
        self._cond = threading.Condition()
        self._chunks: List[Chunk] = []
        self._done = False

    # engine thread
    def _push(self, chunk: Chunk) -> None:
        with self._cond:
            self._chunks.append(chunk)
            if chunk.finish_reason is not None:
                self._done = True
            self._cond.notify_all()
        if self._listener is not None:
            self._listener(chunk)

    @property
    def id(self) -> str:
        return self._req.id

    @property
    def prompt_tokens(self) -> int:
        return len(self._req.prompt_ids)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def stats(self) -> RequestStats:
        return self._req.stats

    @property
    def finish_reason(self) -> Optional[str]:
        return self._req.finish_reason if self._done else None

    def cancel(self) -> None:
        self._engine._cancel(self._req)

    def chunks(self, timeout: Optional[float] = None) -> Iterator[Chunk]:
        """Yields each Chunk as the engine produces it (blocking)."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._chunks) > i, timeout):
                    raise TimeoutError(f"request {self.id}: no output within {timeout} s")
                new = self._chunks[i:]
            i += len(new)
            for c in new:
                yield c
                if c.finish_reason is not None:
                    return

    def __iter__(self) -> Iterator:
        for c in self.chunks():
            if c.error is not None:
                raise LlamasError(f"[engine] request {self.id} failed: {c.error}")
            if self._as_text:
                if c.text:
                    yield c.text
            else:
                yield from c.token_ids

    def result(self, timeout: Optional[float] = None) -> Completion:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id}: not finished within {timeout} s")
            chunks = list(self._chunks)
        ids, lps = [], [] if self._req.options.logprobs is not None else None
        for c in chunks:
            ids.extend(c.token_ids)
            if lps is not None and c.logprobs:
                lps.extend(c.logprobs)
        last = chunks[-1]
        return Completion(self.id, "".join(c.text for c in chunks), ids, last.finish_reason,
                          len(self._req.prompt_ids), self._req.completion_tokens, lps, last.error)


class Engine:
    """Continuous batching in-process: `submit` from any thread; a background thread runs batched
    steps over every running request and admits queued ones between steps.

        engine = llamas.Engine(model)
        h = engine.submit("Hello", max_new_tokens=20)
        for piece in h: print(piece, end="")
        print(engine.submit("Other", max_new_tokens=5).result().text)

    Listeners given to `enqueue` run in the engine thread as chunks appear; `on_step()` runs
    there after every step (the server uses it to wake its event loop once per step, not once per
    chunk). The thread starts on the first submit and exits when idle for `idle_exit` seconds (it starts
    again on the next submit), so an unused Engine holds no thread. `shutdown()` stops accepting
    and (by default) lets running requests finish.
    """

    def __init__(self, model, max_batch: int = 16, max_queue: Optional[int] = None, prefill_chunk: int = 128,
                 max_prefill_tokens: Optional[int] = 512, on_finish: Optional[Callable[[Request], None]] = None,
                 on_step: Optional[Callable[[], None]] = None, idle_exit: float = 1.0):
        self.model = model
        self.on_step = on_step
        self.max_queue = max_queue
        self.idle_exit = idle_exit
        self._sched = Scheduler(model, max_batch=max_batch, prefill_chunk=prefill_chunk,
                                max_prefill_tokens=max_prefill_tokens, on_finish=on_finish)
        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._cancel_all = False
        self._steps = 0

    # ---- state ------------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self._sched.max_batch

    @property
    def num_running(self) -> int:
        return self._sched.num_running

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + self._sched.num_waiting

    @property
    def steps(self) -> int:
        """Batched forward steps run so far."""
        return self._steps

    # ---- requests ---------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: Optional[int] = None,
                     stop=None, logit_bias=None, logprobs: Optional[int] = None,
                     request_id: Optional[str] = None) -> Tuple[Request, bool]:
        """Validates and encodes; returns (Request, prompt was text)."""
        options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                  frequency_penalty, seed, logit_bias, logprobs)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise LlamasError(f"[generate] max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        vocab = self.model.config.vocab_size
        bad = [t for t in options.logit_bias if t >= vocab]
        if bad:
            raise LlamasError(f"[generate] logit_bias token {bad[0]} is outside the vocabulary [0, {vocab})")
        stops = normalise_stop(stop)
        ids = self.model._encode_prompt(prompt)
        return Request(ids, max_new_tokens, options, stops, request_id=request_id), isinstance(prompt, str)

    def submit(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: Optional[int] = None,
               stop=None, logit_bias=None, logprobs: Optional[int] = None,
               request_id: Optional[str] = None) -> RequestHandle:
        """Queues one request (same parameters as Model.generate, plus logit_bias {id: bias}
        and logprobs: None, or n in [0, 20] for the chosen token's logprob and the top n)."""
        req, as_text = self.make_request(prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                                         repetition_penalty, presence_penalty, frequency_penalty, seed, stop,
                                         logit_bias, logprobs, request_id)
        return self.enqueue([(req, as_text, None)])[0]

    def enqueue(self, items) -> List[RequestHandle]:
        """Queues [(Request, as_text, listener or None)] all at once, or none: QueueFull when more
        than max_queue would wait for a place in the batch, EngineClosed after shutdown. `listener(chunk)` runs in the engine thread and must not block."""
        handles = []
        for req, as_text, listener in items:
            h = RequestHandle(self, req, as_text, listener)
            req.sink = h._push
            handles.append(h)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if self.max_queue is not None:
                # Requests that will find a free place in the batch at the next step do not queue.
                free = max(0, self.max_batch - self.num_running)
                if self.num_waiting + len(items) > self.max_queue + free:
                    raise QueueFull(f"the queue is full ({self.num_waiting} waiting, {self.num_running} running; "
                                    f"limits {self.max_queue} waiting, {self.max_batch} running)")
            now = time.perf_counter()
            for h in handles:
                h._req.stats.submitted = now
                self._inbox.append(h._req)
            self._ensure_thread()
            self._cond.notify_all()
        return handles

    def _cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cond:
            self._cond.notify_all()

    # ---- lifecycle --------------------------------------------------------------------------
    def shutdown(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stops accepting; with drain, running and queued requests finish, otherwise they are
        cancelled. Waits for the engine thread (up to timeout)."""
        with self._cond:
            self._closing = True
            if not drain:
                self._cancel_all = True  # the engine thread cancels everything at its next iteration
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        self.shutdown(drain=False)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=False)

    def _ensure_thread(self) -> None:  # under self._cond
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llamas-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        sched = self._sched
        try:
            while True:
                with self._cond:
                    while self._inbox:
                        sched.add(self._inbox.popleft())
                    if self._cancel_all:
                        for r in [slot.req for slot in sched.running] + list(sched.waiting):
                            r.cancelled = True
                    if not sched.has_work():
                        if self._closing:
                            self._thread = None
                            return
                        self._cond.wait(self.idle_exit)
                        while self._inbox:
                            sched.add(self._inbox.popleft())
                        if not sched.has_work():
                            self._thread = None  # idle: the next submit starts a new thread
                            return
                sched.step()  # the batched forward runs without the lock (and without the GIL)
                self._steps += 1
                if self.on_step is not None:
                    self.on_step()
        except BaseException:  # never leave requests hanging
            log.exception("engine thread failed")
            with self._cond:
                self._thread = None
                while self._inbox:
                    sched.add(self._inbox.popleft())
            sched.abort_all("error")
            if self.on_step is not None:
                self.on_step()
            raise
