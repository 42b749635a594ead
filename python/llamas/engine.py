"""`Engine`: continuous batching in-process, over the `Scheduler` of `llamas/scheduler.py`.

`Model.generate` drives a private `Scheduler` in the caller's thread. `Engine` drives one from a
background thread, continuously, so requests submitted from any thread (or the server's event
loop) join and leave the running batch between steps.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from ._C import LlamasError
from .prefix_cache import BLOCK, PrefixCache, cache_bytes
# The scheduler's names are re-exported: they lived here first, and model.py and callers import
# them from llamas.engine.
from .scheduler import (Chunk, Completion, Request, RequestStats, SamplingOptions, Scheduler,  # noqa: F401
                        StopRules, TokenLogprob, check_max_new_tokens, check_prompt_logprobs, make_stop_rules,
                        normalise_stop)

__all__ = ["Engine", "RequestHandle", "EngineClosed", "QueueFull", "Prompt", "Chunk", "Completion", "Request",
           "RequestStats", "SamplingOptions", "Scheduler", "TokenLogprob", "check_max_new_tokens",
           "check_prompt_logprobs", "normalise_stop", "StopRules", "make_stop_rules"]

log = logging.getLogger("llamas.engine")

Prompt = Union[str, Sequence[int]]


# ---- the threaded engine -----------------------------------------------------------------------
class EngineClosed(LlamasError):
    """submit() after shutdown() began."""


class QueueFull(LlamasError):
    """submit() while max_queue requests are already waiting."""


class RequestHandle:
    """A submitted request. Iterate it for streamed pieces (text pieces for a str prompt, token
    ids for an id prompt; leaving the loop early cancels it), call `.result()` for the final
    `Completion`, `.cancel()` to stop it (its KV memory is freed at the engine's next step).
    Thread-safe; one consumer at a time."""

    def __init__(self, engine: "Engine", req: Request, as_text: bool,
                 listener: Optional[Callable[[Chunk], None]] = None):
        self._engine = engine
        self._req = req
        self._as_text = as_text
        self._listener = listener
        self._cond = threading.Condition()
        self._chunks: List[Chunk] = []
        self._done = False
        self._waiters = 0         # threads blocked in chunks() or result(); changed under _cond
        self._async = False       # an event loop awaits this handle (set once, before it first waits)
        self._async_waiters: list = []  # (loop, future) to wake at the next chunk; under _cond

    # engine thread
    def _push(self, chunk: Chunk) -> None:
        # list.append is atomic, and a consumer counts itself in _waiters (under _cond) before it
        # tests for new chunks, so the lock and notify are only needed when someone waits: the
        # server's handles are read through their listener, and skipping the Condition saves
        # ~0.7 us of the engine thread per token.
        self._chunks.append(chunk)
        if chunk.finish_reason is not None:
            self._done = True
        if self._waiters:
            with self._cond:
                self._cond.notify_all()
        if self._async:
            with self._cond:
                woken, self._async_waiters = self._async_waiters, []
            for loop, fut in woken:
                loop.call_soon_threadsafe(_wake, fut)
        if self._listener is not None:
            self._listener(chunk)

    async def _next_chunks(self, i: int) -> list:
        """The chunks from index i on, waiting (without blocking the event loop) for at least one."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                self._async = True  # (before the check: a chunk pushed after it finds the waiter)
                if len(self._chunks) > i:
                    return self._chunks[i:]
                fut = loop.create_future()
                self._async_waiters.append((loop, fut))
            try:
                await fut
            finally:
                with self._cond:
                    if (loop, fut) in self._async_waiters:
                        self._async_waiters.remove((loop, fut))

    def _wait_for(self, predicate, timeout: Optional[float]) -> bool:  # under self._cond
        self._waiters += 1
        try:
            return self._cond.wait_for(predicate, timeout)
        finally:
            self._waiters -= 1

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
                if not self._wait_for(lambda: len(self._chunks) > i, timeout):
                    raise TimeoutError(f"request {self.id}: no output within {timeout} s")
                new = self._chunks[i:]
            i += len(new)
            for c in new:
                yield c
                if c.finish_reason is not None:
                    return

    def _pieces(self, c: Chunk) -> list:
        """What a chunk streams: its text (str prompt) or token ids; a failed request raises."""
        if c.error is not None:
            raise LlamasError(f"[engine] request {self.id} failed: {c.error}")
        if self._as_text:
            return [c.text] if c.text else []
        return c.token_ids

    def __iter__(self) -> Iterator:
        """The streamed pieces. Leaving the loop early (break, an exception, the iterator closed or
        dropped) cancels the request, as vLLM's generators do, so an abandoned stream frees its
        batch slot and KV memory at once instead of running to max_new_tokens; read `chunks()`
        to look at the output without that."""
        try:
            for c in self.chunks():
                yield from self._pieces(c)
        finally:
            if not self._done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator:
        """`async for piece in handle`: the streamed pieces without blocking the event loop (for
        services on asyncio); leaving the loop early cancels the request, as with `for`."""
        return self._pieces_async()

    async def _pieces_async(self) -> AsyncIterator:
        i = 0
        try:
            while True:
                new = await self._next_chunks(i)
                i += len(new)
                for c in new:
                    for piece in self._pieces(c):
                        yield piece
                    if c.finish_reason is not None:
                        return
        finally:
            if not self._done:
                self.cancel()

    async def aresult(self) -> Completion:
        """`await handle.aresult()`: result() without blocking the event loop. A task cancelled
        while it waits cancels the request."""
        try:
            i = 0
            while not self._done:
                i += len(await self._next_chunks(i))
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self.result(timeout=0)

    def result(self, timeout: Optional[float] = None) -> Completion:
        with self._cond:
            if not self._wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id}: not finished within {timeout} s")
            chunks = list(self._chunks)
        ids, lps = [], [] if self._req.options.logprobs is not None else None
        for c in chunks:
            ids.extend(c.token_ids)
            if lps is not None and c.logprobs:
                lps.extend(c.logprobs)
        last = chunks[-1]
        return Completion(self.id, "".join(c.text for c in chunks), ids, last.finish_reason,
                          len(self._req.prompt_ids), self._req.completion_tokens, lps, last.error,
                          chunks[0].prompt_logprobs, self._req.cached_tokens)


def _wake(fut) -> None:
    if not fut.done():
        fut.set_result(None)


def check_kv_cache_mb(kv_cache_mb, op: str) -> None:
    """kv_cache_mb must be None (no limit) or a number of MiB in (0, 2^40)."""
    if kv_cache_mb is not None and (isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, (int, float))
                                    or not 0 < kv_cache_mb < 2 ** 40):
        raise LlamasError(f"[{op}] kv_cache_mb must be a number of MiB in (0, 2^40), got {kv_cache_mb!r}")


def kv_blocks_per_sequence(model) -> int:
    """KV blocks one sequence fills at the model's full context."""
    return -(-model.config.n_positions // BLOCK)


def kv_budget_blocks(model, kv_cache_mb, op: str) -> Optional[int]:
    """kv_cache_mb (MiB, or None: no limit) as whole KV blocks of this model, checked."""
    check_kv_cache_mb(kv_cache_mb, op)
    if kv_cache_mb is None:
        return None
    blocks = int(kv_cache_mb * 2 ** 20) // model.kv_block_bytes
    if blocks < 1:
        raise LlamasError(f"[{op}] kv_cache_mb={kv_cache_mb} is less than one KV-cache block of this model "
                          f"({model.kv_block_bytes / 2**20:.2f} MiB: 16 positions of every layer's keys and values)")
    return blocks


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
    and (by default) lets running requests finish. speculative_ngram=K drafts up to K tokens a step
    by n-gram lookup (llamas.speculative; 0: off): the same tokens, greedy or sampled from a seed,
    in fewer steps where the text repeats itself. kv_cache_mb (None: no limit) caps the KV cache that
    running requests may fill, in MiB: each is admitted with room for its whole length reserved, so
    memory never outgrows the budget mid-generation; requests that do not fit yet wait in the queue,
    and one that could never fit is refused at submit.
    """

    def __init__(self, model, max_batch: int = 16, max_queue: Optional[int] = None, prefill_chunk: int = 128,
                 max_prefill_tokens: Optional[int] = 512, on_finish: Optional[Callable[[Request], None]] = None,
                 on_step: Optional[Callable[[], None]] = None, idle_exit: float = 1.0,
                 prefix_cache_mb: float = 0.0, speculative_ngram: int = 0, kv_cache_mb: Optional[float] = None):
        self.model = model
        if model.tokenizer is not None:
            model.tokenizer.piece_bytes()  # streams then decode by table lookup (see Tokenizer.piece_bytes)
        self.on_step = on_step
        self.max_queue = max_queue
        self.idle_exit = idle_exit
        # Prefix caching (off at 0): finished sequences' full KV blocks, up to this many MiB, for
        # requests that start with the same tokens (see prefix_cache.py).
        max_bytes = cache_bytes(prefix_cache_mb, "engine")
        self.prefix_cache = PrefixCache(max_bytes, kv_dtype=model.kv_dtype) if prefix_cache_mb > 0 else None
        self._sched = Scheduler(model, max_batch=max_batch, prefill_chunk=prefill_chunk,
                                max_prefill_tokens=max_prefill_tokens, on_finish=on_finish,
                                prefix_cache=self.prefix_cache, speculative_ngram=speculative_ngram,
                                kv_budget_blocks=kv_budget_blocks(model, kv_cache_mb, "engine"))
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
    def kv_budget_bytes(self) -> Optional[int]:
        """The KV-cache budget of running requests in bytes (whole blocks), or None: no limit."""
        blocks = self._sched.kv_budget_blocks
        return None if blocks is None else blocks * self.model.kv_block_bytes

    @property
    def kv_reserved_bytes(self) -> int:
        """Bytes of KV cache reserved by the running requests (each for its whole length)."""
        return self._sched.kv_reserved_blocks * self.model.kv_block_bytes

    def kv_max_positions(self) -> Optional[int]:
        """The most positions (prompt + max_new_tokens, and any speculative drafts) one request may
        have under the KV budget, or None when it is only the model's context."""
        blocks = self._sched.kv_budget_blocks
        if blocks is None or blocks * BLOCK >= self.model.config.n_positions:
            return None
        return blocks * BLOCK - self._sched.speculative_ngram

    @property
    def steps(self) -> int:
        """Batched forward steps run so far."""
        return self._steps

    @property
    def timing(self):
        """The engine thread's time in forwards and between them (step_timing.StepTiming)."""
        return self._sched.timing

    # ---- requests ---------------------------------------------------------------------------
    def make_request(self, prompt: Prompt, max_new_tokens: int = 128, temperature: Optional[float] = None,
                     top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                     repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                     frequency_penalty: Optional[float] = None, seed: Optional[int] = None,
                     stop=None, logit_bias=None, logprobs: Optional[int] = None,
                     request_id: Optional[str] = None, prompt_logprobs: Optional[int] = None,
                     stop_token_ids=None, min_tokens: int = 0, ignore_eos: bool = False,
                     include_stop_str_in_output: bool = False, json_object: bool = False,
                     choices=None, json_schema=None, regex=None, grammar=None,
                     skip_special_tokens: bool = False) -> Tuple[Request, bool]:
        """Validates and encodes; returns (Request, prompt was text). A sampling parameter left None
        takes the model's generation_config.json value, else greedy / off, as in Model.generate."""
        v = self.model.sampling_values(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                       frequency_penalty=frequency_penalty)
        options = SamplingOptions(v["temperature"], v["top_k"], v["top_p"], v["min_p"], v["repetition_penalty"],
                                  v["presence_penalty"], v["frequency_penalty"], seed, logit_bias, logprobs,
                                  json_object, choices, json_schema, regex, grammar)
        if options.constrained:
            self.model.constraint_vocab()  # refused here for a model whose tokenizer cannot do it
        check_prompt_logprobs(prompt_logprobs)
        check_max_new_tokens(max_new_tokens, scoring=prompt_logprobs is not None)
        vocab = self.model.config.vocab_size
        bad = [t for t in options.logit_bias if t >= vocab]
        if bad:
            raise LlamasError(f"[generate] logit_bias token {bad[0]} is outside the vocabulary [0, {vocab})")
        stops = make_stop_rules(stop, stop_token_ids, min_tokens, ignore_eos, include_stop_str_in_output,
                                vocab, max_new_tokens, skip_special_tokens=skip_special_tokens)
        ids = self.model._encode_prompt(prompt)
        return (Request(ids, max_new_tokens, options, stops, request_id=request_id, prompt_logprobs=prompt_logprobs),
                isinstance(prompt, str))

    def submit(self, prompt: Prompt, max_new_tokens: int = 128, temperature: Optional[float] = None,
               top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
               repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
               frequency_penalty: Optional[float] = None, seed: Optional[int] = None,
               stop=None, logit_bias=None, logprobs: Optional[int] = None,
               request_id: Optional[str] = None, prompt_logprobs: Optional[int] = None,
               stop_token_ids=None, min_tokens: int = 0, ignore_eos: bool = False,
               include_stop_str_in_output: bool = False, json_object: bool = False,
               choices=None, json_schema=None, regex=None, grammar=None,
               skip_special_tokens: bool = False) -> RequestHandle:
        """Queues one request (same parameters as Model.generate, plus logit_bias {id: bias},
        logprobs: None, or n in [0, 20] for the chosen token's logprob and the top n, and
        prompt_logprobs: None, or n in [0, 20] to also score the prompt's tokens (the result's
        `prompt_logprobs`; max_new_tokens may then be 0)."""
        req, as_text = self.make_request(prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                                         repetition_penalty, presence_penalty, frequency_penalty, seed, stop,
                                         logit_bias, logprobs, request_id, prompt_logprobs, stop_token_ids,
                                         min_tokens, ignore_eos, include_stop_str_in_output, json_object, choices,
                                         json_schema, regex, grammar, skip_special_tokens)
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
            budget = self._sched.kv_budget_blocks
            for req, _, _ in items:
                need = self._sched.kv_blocks_needed(req) if budget is not None else 0
                if budget is not None and need > budget:
                    room = self.kv_max_positions()
                    if len(req.prompt_ids) >= room + (req.max_new_tokens == 0):
                        raise LlamasError(f"[engine] the prompt has {len(req.prompt_ids)} tokens, but kv_cache_mb holds "
                                          f"{budget} KV-cache blocks: at most {room} positions a request, prompt and "
                                          "generated tokens together")
                    raise LlamasError(
                        f"[engine] the request needs {need} KV-cache blocks ({need * self.model.kv_block_bytes / 2**20:.1f} "
                        f"MiB for {len(req.prompt_ids)} prompt + {req.max_new_tokens} new positions) but kv_cache_mb "
                        f"holds {budget} ({budget * self.model.kv_block_bytes / 2**20:.1f} MiB); lower max_new_tokens "
                        f"to at most {room - len(req.prompt_ids)} or raise kv_cache_mb")
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
        if thread is threading.current_thread():
            return  # called from a callback (on_finish, a listener): the thread stops after this step
        if thread is not None:
            thread.join(timeout)
        if self.prefix_cache is not None and (thread is None or not thread.is_alive()):
            self.prefix_cache.clear()  # its blocks go back to the allocator

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
                        sched.timing.last_end = None  # waiting for requests is not host time
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
        except BaseException as e:  # never leave requests hanging; each says why it ended
            log.exception("engine thread failed")
            with self._cond:
                self._thread = None
                while self._inbox:
                    sched.add(self._inbox.popleft())
            sched.abort_all("error", f"the engine thread failed: {type(e).__name__}: {e}")
            if self.on_step is not None:
                self.on_step()
            if not isinstance(e, Exception):
                raise  # (SystemExit, KeyboardInterrupt: not ours to swallow; an error is logged above, once)
