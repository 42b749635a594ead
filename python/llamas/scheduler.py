"""The scheduler shared by `Model.generate`, `llamas.Engine` and the HTTP server.

`Scheduler` is single-threaded and synchronous: `add` queues requests, each `step` admits queued
requests (up to `max_batch` running), feeds every running sequence in ONE batched forward (prompt
chunks of at most `prefill_chunk` tokens for sequences still prefilling, one token for those
decoding), then handles each sampled token (end-of-text, stop strings through `TextStream`, length
limit, log-probabilities) and frees a sequence's KV memory the moment it finishes or is cancelled.

`Model.generate` drives a private `Scheduler` in the caller's thread; `llamas.engine.Engine` drives
one from a background thread.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from . import _C
from ._C import LlamasError
from .prefix_cache import BLOCK, PrefixCache
from .streaming import TextStream

# The logger keeps the name it had before the scheduler left engine.py, so log filters still match.
log = logging.getLogger("llamas.engine")


# ---- sampling parameters -------------------------------------------------------------------------
def _check_number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LlamasError(f"[generate] {name} must be a number, got {value!r}")
    value = float(value)
    bracket = "(" if low_open else "["
    if math.isnan(value) or value < low or value > high or (low_open and value == low):
        raise LlamasError(f"[generate] {name} must be in {bracket}{low}, {high}], got {value}")
    # The engine holds it as a float32: a positive value below float32's smallest (1e-320) would
    # reach it as the excluded bound 0.
    if low_open and as_float32(value) == low:
        raise LlamasError(f"[generate] {name} must be in {bracket}{low}, {high}], got {value} (0 as a float32)")
    return value


def as_float32(value: float) -> float:
    """value rounded to the float32 the native engine holds it as."""
    return struct.unpack("f", struct.pack("f", value))[0]


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


def check_prompt_logprobs(prompt_logprobs) -> None:
    if prompt_logprobs is not None and (isinstance(prompt_logprobs, bool) or not isinstance(prompt_logprobs, int)
                                        or not 0 <= prompt_logprobs <= 20):
        raise LlamasError(f"[generate] prompt_logprobs must be None or an integer in [0, 20], got {prompt_logprobs!r}")


def check_max_new_tokens(max_new_tokens, scoring: bool = False) -> None:
    """max_new_tokens >= 1, or >= 0 when the prompt is scored (0: only score it)."""
    low = 0 if scoring else 1
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < low:
        what = "a non-negative integer when scoring the prompt" if scoring else "a positive integer"
        raise LlamasError(f"[generate] max_new_tokens must be {what}, got {max_new_tokens!r}")


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
    # A request with prompt_logprobs: the prompt's tokens' log-probabilities, on the request's first
    # chunk (None for the first token, which has no context to be predicted from).
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None


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
    prompt_logprobs: Optional[List[Optional[TokenLogprob]]] = None
    cached_tokens: Optional[int] = None   # prompt tokens served by the prefix cache (None: no cache)


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
    `sink(chunk)` is called from the thread that runs the scheduler.

    prompt_logprobs: None, or n in [0, 20]: score the prompt too (each prompt token's
    log-probability given the tokens before it, and the n most likely tokens there), delivered on
    the request's first chunk. max_new_tokens may then be 0: the prompt is only scored."""

    def __init__(self, prompt_ids: List[int], max_new_tokens: int, options: SamplingOptions,
                 stop: Sequence[str] = (), sink: Optional[Callable[[Chunk], None]] = None,
                 request_id: Optional[str] = None, prompt_logprobs: Optional[int] = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.stop = list(stop)
        self.sink = sink
        self.prompt_logprobs = prompt_logprobs
        # Scores gathered while the prompt is fed; handed to the first chunk (then None again).
        self.prompt_scores: Optional[List[Optional[TokenLogprob]]] = None if prompt_logprobs is None else [None]
        self.cached_tokens: Optional[int] = None  # prompt tokens whose KV came from the prefix cache (if on)
        self.cancelled = False
        self.finished = False
        self.finish_reason: Optional[str] = None
        self.completion_tokens = 0
        self.stats = RequestStats(submitted=time.perf_counter())


class _Slot:
    """A running request: its native sequence and decoding state."""
    __slots__ = ("req", "seq", "fed", "next_token", "produced", "budget", "stream", "leader")

    def __init__(self, req: Request, seq, budget: int, stream: Optional[TextStream]):
        self.req = req
        self.seq = seq
        self.leader: Optional[_Slot] = None  # a running request with the same prompt, prefilling it for both
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
                 on_finish: Optional[Callable[[Request], None]] = None,
                 prefix_cache: Optional[PrefixCache] = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise LlamasError("[engine] max_batch and prefill_chunk must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens
        self.on_finish = on_finish
        self.prefix_cache = prefix_cache
        # Requests still prefilling, by prompt: a request with the same prompt (the choices of n > 1,
        # one context sampled several times) waits for that prefill and shares its full blocks.
        self._prefilling: dict = {}
        self.shared_prompt_tokens = 0  # prompt tokens taken from a sibling's blocks, in all
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
                if slot.leader is not None and not self._follow(slot):
                    continue  # its sibling is still computing the prompt they share
                if budget is not None and budget <= 0 and prefilling:
                    continue  # this step's prompt budget is spent; keep decoding the others
                n = min(self.prefill_chunk, len(prompt) - slot.fed)
                if budget is not None:
                    n = max(1, min(n, budget))
                    budget -= n
                prefilling = True
                end = slot.fed + n
                chunk = prompt[slot.fed:end]
                sample = end == len(prompt) and slot.budget > 0
                if slot.req.prompt_logprobs is None:
                    entries.append((slot.seq, chunk, sample))
                else:  # each position also scores the prompt's next token (none after the last)
                    targets = prompt[slot.fed + 1:end + 1] + ([-1] if end == len(prompt) else [])
                    entries.append((slot.seq, chunk, sample, targets, slot.req.prompt_logprobs))
                fed.append((slot, n))
            else:
                entries.append((slot.seq, [slot.next_token], True))
                fed.append((slot, 0))
        if not entries:
            return self.has_work()
        try:
            sampled = self.model._native.step(entries)
        except Exception as e:  # a failing forward fails the requests in it, not the engine
            log.exception("engine step failed")
            for slot, _ in fed:
                self._finish(slot, Chunk("", [], None, "error", error=str(e)))
            return self.has_work()
        now = time.perf_counter()
        for (slot, n), entry, token in zip(fed, entries, sampled):
            slot.fed += n
            if n and slot.fed == len(slot.req.prompt_ids):
                self._prefill_done(slot)
            if len(entry) == 5:
                slot.req.prompt_scores.extend(TokenLogprob(int(t), float(lp), [(int(i), float(v)) for i, v in top])
                                              for t, lp, top in slot.seq.scores)
            if entry[2]:
                self._on_token(slot, int(token), now)
            elif slot.budget == 0 and slot.fed == len(slot.req.prompt_ids):
                self._finish(slot, Chunk("", [], None, "length"))  # scored the prompt, generates nothing
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
            slot = _Slot(req, seq, budget, stream)
            if self.prefix_cache is not None:
                req.cached_tokens = 0
                if req.prompt_logprobs is None:  # a scored prompt's every position is computed
                    self._reuse_prefix(slot)
            self._find_leader(slot)
            self.running.append(slot)

    def _find_leader(self, slot: _Slot) -> None:
        """Pairs a request with a running one that is prefilling the same prompt (when they can share
        at least one full block), or makes it the one others with its prompt wait for."""
        prompt = slot.req.prompt_ids
        if len(prompt) <= BLOCK or slot.req.prompt_logprobs is not None:
            return
        key = tuple(prompt)
        leader = self._prefilling.get(key)
        if leader is not None and slot.fed == 0:
            slot.leader = leader
        elif slot.fed < len(prompt):
            self._prefilling[key] = slot

    def _follow(self, slot: _Slot) -> bool:
        """For a request waiting on a sibling: False while the sibling's prefill runs; then takes its
        full prompt blocks (or, if the sibling is gone, computes the prompt itself) and returns True."""
        leader, slot.leader = slot.leader, None
        prompt = slot.req.prompt_ids
        n_blocks = (len(prompt) - 1) // BLOCK  # never the block of the last token, whose logits it needs
        alive = leader in self.running
        if alive and leader.seq.length < n_blocks * BLOCK:
            slot.leader = leader
            return False
        if alive:
            try:
                slot.seq.adopt(leader.seq.share_blocks(0, n_blocks), prompt[:n_blocks * BLOCK])
            except Exception:  # compute the prompt instead
                log.exception("sharing a sibling's prompt blocks failed")
                return True
            slot.fed = n_blocks * BLOCK
            self.shared_prompt_tokens += slot.fed
            if slot.req.cached_tokens is not None:
                slot.req.cached_tokens += slot.fed
        return True

    def _prefill_done(self, slot: _Slot) -> None:
        key = tuple(slot.req.prompt_ids)
        if self._prefilling.get(key) is slot:
            del self._prefilling[key]
            for other in self.running:  # now, before this one's first token can end it and free the blocks
                if other.leader is slot:
                    self._follow(other)
        if self.prefix_cache is not None:
            self._cache_blocks(slot)  # the prompt is in: requests arriving from now on can share it

    def _reuse_prefix(self, slot: _Slot) -> None:
        """Starts a new sequence from the cached KV blocks of its prompt's longest cached prefix
        (whole blocks, and never the prompt's last token, whose logits the first draw needs)."""
        cache = self.prefix_cache
        if cache.kv_dtype != self.model.kv_dtype:  # the model's KV dtype was changed: those blocks cannot serve
            cache.clear()
            cache.kv_dtype = self.model.kv_dtype
        prompt = slot.req.prompt_ids
        refs = cache.lookup(prompt, (len(prompt) - 1) // BLOCK)
        if not refs:
            return
        n = len(refs) * BLOCK
        try:
            slot.seq.adopt(refs, prompt[:n])
        except Exception:  # a cache that no longer fits this model: compute the prompt instead
            log.exception("prefix cache: adopting %d blocks failed", len(refs))
            self.prefix_cache.clear()
            return
        slot.fed = n
        slot.req.cached_tokens = n

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

    def _cache_blocks(self, slot: _Slot) -> None:
        try:
            self.prefix_cache.insert(slot.seq)
        except Exception:
            log.exception("prefix cache: caching a sequence's blocks failed")

    def _finish(self, slot: _Slot, chunk: Chunk) -> None:
        if slot.fed < len(slot.req.prompt_ids) and self._prefilling:
            key = tuple(slot.req.prompt_ids)
            if self._prefilling.get(key) is slot:  # its followers compute the prompt themselves
                del self._prefilling[key]
        if self.prefix_cache is not None and chunk.finish_reason != "error":
            self._cache_blocks(slot)  # its full blocks (generated tokens' too) stay for the next turn
        slot.seq.release()  # KV memory goes back the moment a sequence ends (cached blocks stay)
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
        # The last chunk is out. An Engine's sink is its handle's method, and the handle holds the
        # request: dropping the sink breaks that cycle, so a finished request's chunks are freed
        # at once instead of waiting for the cyclic collector (at 16 streaming clients ~7,000
        # chunks of finished requests were waiting, and each collection walked them).
        req.sink = None
        if self.on_finish is not None:
            try:
                self.on_finish(req)
            except Exception:
                log.exception("on_finish hook failed")

    @staticmethod
    def _emit(req: Request, chunk: Chunk) -> None:
        if req.prompt_scores is not None:  # the request's first chunk carries the prompt's scores
            chunk.prompt_logprobs, req.prompt_scores = req.prompt_scores, None
        if req.sink is not None:
            try:
                req.sink(chunk)
            except Exception:
                log.exception("request sink failed")
