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
import logging
import time
from typing import Callable, List, Optional

from . import _C
from ._C import LlamasError
from .prefix_cache import BLOCK, PrefixCache
# The request types lived here first; callers import them from llamas.scheduler and llamas.engine.
from .request import (Chunk, Completion, Request, RequestStats, SamplingOptions, StopRules, TokenLogprob,  # noqa: F401
                      as_float32, check_max_new_tokens, check_prompt_logprobs, make_stop_rules, normalise_stop)
from .speculative import DraftPlanner, Speculation, can_speculate, check_speculative_ngram
from .step_timing import StepTiming  # noqa: F401  (scheduler.StepTiming, as before)
from .streaming import TextStream

__all__ = ["Scheduler", "Chunk", "Completion", "Request", "RequestStats", "SamplingOptions", "TokenLogprob",
           "StopRules", "as_float32", "check_max_new_tokens", "check_prompt_logprobs", "make_stop_rules",
           "normalise_stop"]

# The logger keeps the name it had before the scheduler left engine.py, so log filters still match.
log = logging.getLogger("llamas.engine")


class _Slot:
    """A running request: its native sequence and decoding state."""
    __slots__ = ("req", "seq", "fed", "next_token", "produced", "budget", "stream", "leader", "stop_ids", "spec",
                 "kv_blocks")

    def __init__(self, req: Request, seq, budget: int, stream: Optional[TextStream], stop_ids: frozenset):
        self.req = req
        self.seq = seq
        self.leader: Optional[_Slot] = None  # a running request with the same prompt, prefilling it for both
        self.fed = 0              # prompt tokens already in the KV cache
        self.next_token = -1      # last accepted token, fed at the next decode step
        self.produced = 0         # accepted tokens
        self.budget = budget
        self.stream = stream
        self.stop_ids = stop_ids  # tokens that end it (end-of-text unless ignore_eos, stop token ids)
        self.spec: Optional[Speculation] = None  # the request's n-gram drafts (speculative_ngram)
        self.kv_blocks = 0        # KV blocks reserved for it under the scheduler's kv_budget_blocks


class Scheduler:
    """Admission, chunked prefill, batched steps, stop/EOS/length handling, detokenisation and
    release. Not thread-safe: one thread calls `add`, `step` and `abort_all` (Engine serialises).
    speculative_ngram=K (0: off) drafts up to K tokens a step by n-gram lookup (llamas.speculative):
    requests get the same tokens (greedy, or sampled from a seed), in fewer steps where the text
    repeats itself.

    kv_budget_blocks (None: no limit) caps the KV-cache blocks that running requests may hold: each
    is admitted only with room reserved for its whole length (prompt + max_new_tokens + drafts,
    within the context), so a batch never outgrows its memory mid-generation; a request that does
    not fit waits at the head of the queue until running ones finish (llama.cpp's slots, not vLLM's
    preemption), and one that could never fit is refused."""

    def __init__(self, model, max_batch: int = 16, prefill_chunk: int = 128,
                 max_prefill_tokens: Optional[int] = 512,
                 on_finish: Optional[Callable[[Request], None]] = None,
                 prefix_cache: Optional[PrefixCache] = None, speculative_ngram: int = 0,
                 kv_budget_blocks: Optional[int] = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise LlamasError("[engine] max_batch and prefill_chunk must be >= 1")
        self.speculative_ngram = check_speculative_ngram(speculative_ngram, "engine")
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
        self.timing = StepTiming()
        self.log_errors = True  # a failed step is logged (Model.generate, which raises it, turns this off)
        if kv_budget_blocks is not None and kv_budget_blocks < 1:
            raise LlamasError(f"[engine] kv_budget_blocks must be >= 1, got {kv_budget_blocks}")
        self.kv_budget_blocks = kv_budget_blocks
        self.kv_reserved_blocks = 0  # held by running requests' reservations
        # Which drafts a step takes, from its measured costs and the drafts' acceptance.
        self.planner = DraftPlanner(model) if self.speculative_ngram else None

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

    def kv_blocks_needed(self, req: Request) -> int:
        """The KV blocks a request may fill: its prompt, max_new_tokens and the drafts a step may
        write past them, within the model's context."""
        positions = min(self._ctx, len(req.prompt_ids) + req.max_new_tokens + self.speculative_ngram)
        return -(-positions // BLOCK)

    # ---- one iteration ----------------------------------------------------------------------
    def step(self) -> bool:
        """Admits, runs one batched forward, handles its tokens. Returns has_work()."""
        self._reap_cancelled()
        self._admit()
        if not self.running:
            return self.has_work()
        entries, fed = [], []
        timing = self.timing
        offers = []  # (entry index, slot) of decoding sequences that speculate
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
                if slot.spec is not None:
                    offers.append((len(entries), slot))
                entries.append((slot.seq, [slot.next_token], True))
                fed.append((slot, 0))
        if not entries:
            return self.has_work()
        if offers and not prefilling:  # (a step with prompt rows is not what the cost model times)
            timing.draft_tokens += self.planner.add_drafts(entries, offers, self._offer)
        start = time.perf_counter()
        busy = timing.last_end is not None
        if busy:
            timing.host_seconds += start - timing.last_end
        if self.planner is not None:
            self.planner.step_started(start, entries, prefilling, busy)
        try:
            sampled = self.model._native.step(entries)
        except Exception as e:  # a failing forward fails the requests in it, not the engine
            timing.last_end = None
            if self.log_errors:  # (an error of ours says what it is; anything else gets its traceback)
                if isinstance(e, LlamasError):
                    log.error("engine step failed: %s", e)
                else:
                    log.exception("engine step failed")
            for slot, _ in fed:
                self._finish(slot, Chunk("", [], None, "error", error=str(e)))
            return self.has_work()
        now = time.perf_counter()
        timing.steps += 1
        timing.rows += len(entries)
        timing.forward_seconds += now - start
        timing.gil_wait_seconds += max(0.0, now - start - _C.last_step_seconds())
        timing.last_end = now
        for (slot, n), entry, token in zip(fed, entries, sampled):
            slot.fed += n
            if n and slot.fed == len(slot.req.prompt_ids):
                self._prefill_done(slot)
            if len(entry) == 5:
                slot.req.prompt_scores.extend(TokenLogprob(int(t), float(lp), [(int(i), float(v)) for i, v in top])
                                              for t, lp, top in slot.seq.scores)
            if len(entry) == 4:  # a speculative step: the drafts the sampler kept, then the token after them
                tokens = slot.seq.verified
                slot.spec.verified(len(entry[1]) - 1, len(tokens))
                timing.accepted_tokens += len(tokens) - 1
                slot.seq.truncate(slot.seq.length - (len(entry[1]) - len(tokens)))  # rejected drafts' positions
                for t in tokens:
                    if not self._on_token(slot, t, now):
                        break
            elif entry[2]:
                self._on_token(slot, int(token), now)
            elif slot.budget == 0 and slot.fed == len(slot.req.prompt_ids):
                self._finish(slot, Chunk("", [], None, "length"))  # scored the prompt, generates nothing
        return self.has_work()

    def abort_all(self, reason: str = "cancelled", error: Optional[str] = None) -> None:
        """Ends every request now (running ones release their KV memory); `error` says why."""
        for slot in list(self.running):
            self._finish(slot, Chunk("", [], None, reason, error=error))
        while self.waiting:
            self._finish_waiting(self.waiting.popleft(), reason, error)

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
            kv_blocks = self.kv_blocks_needed(req)
            if self.kv_budget_blocks is not None:
                if kv_blocks > self.kv_budget_blocks:  # (Engine.enqueue refuses these first)
                    req.stats.admitted = time.perf_counter()
                    self._finish_waiting(req, "error", f"the request needs {kv_blocks} KV-cache blocks, more than "
                                                       f"the budget of {self.kv_budget_blocks}")
                    continue
                if self.kv_reserved_blocks + kv_blocks > self.kv_budget_blocks:
                    self.waiting.appendleft(req)  # first in line once running requests free their room
                    break
            o, rules = req.options, req.rules
            stop_ids = set(rules.token_ids)
            if self._eos is not None and not rules.ignore_eos:
                stop_ids.add(self._eos)
            try:
                seq = _C.Sequence(self._native_config, o.temperature, o.top_k, o.top_p, o.min_p,
                                  o.repetition_penalty, o.presence_penalty, o.frequency_penalty, o.seed,
                                  o.logit_bias, -1 if o.logprobs is None else o.logprobs, rules.min_tokens,
                                  sorted(stop_ids) if rules.min_tokens else [],
                                  self.model.constraint_vocab() if o.constrained else None,
                                  o.json_object, [c.encode() for c in o.choices] if o.choices else [], o.recogniser)
            except Exception as e:
                req.stats.admitted = time.perf_counter()
                self._finish_waiting(req, "error", str(e))
                continue
            tok = self.model.tokenizer
            stream = TextStream(tok, rules.strings, rules.include_stop_str_in_output,
                                rules.skip_special_tokens) if tok is not None else None
            budget = min(req.max_new_tokens, self._ctx - len(req.prompt_ids) + 1)
            req.stats.admitted = time.perf_counter()
            slot = _Slot(req, seq, budget, stream, frozenset(stop_ids))
            slot.kv_blocks = kv_blocks
            self.kv_reserved_blocks += kv_blocks
            if self.speculative_ngram and can_speculate(req):
                slot.spec = Speculation(req.prompt_ids, self.speculative_ngram, self.planner.acceptance)
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
        if alive and self._adopt(slot, lambda: leader.seq.share_blocks(0, n_blocks), "a sibling's prompt blocks"):
            self.shared_prompt_tokens += slot.fed
        return True  # (if the sibling is gone or sharing failed, it computes the prompt itself)

    def _adopt(self, slot: _Slot, blocks, what: str) -> bool:
        """Starts slot's fresh sequence from shared full blocks (`blocks()` gives their refs): its
        prompt is fed up to them, and they count as cached. False (logged) if that failed."""
        try:
            refs = blocks()
            slot.seq.adopt(refs, slot.req.prompt_ids[:len(refs) * BLOCK])
        except Exception:
            log.exception("adopting %s failed; computing the prompt instead", what)
            return False
        slot.fed = len(refs) * BLOCK
        if slot.req.cached_tokens is not None:
            slot.req.cached_tokens += slot.fed
        return True

    def _prefill_done(self, slot: _Slot) -> None:
        if self._prefilling and self._prefilling.get(key := tuple(slot.req.prompt_ids)) is slot:
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
        if refs and not self._adopt(slot, lambda: refs, "prefix-cache blocks"):
            cache.clear()  # a cache that no longer fits this model

    def _offer(self, slot: _Slot) -> list:
        """The drafts a decoding slot could verify next step: never past its token budget or the context."""
        return slot.spec.offer(min(slot.budget - slot.produced - 1, self._ctx - slot.seq.length - 1))

    def _on_token(self, slot: _Slot, token: int, now: float) -> bool:
        """Hands one generated token on; False when it ended the request."""
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
        # The token that ends a choice (end-of-text, a stop token, the one completing a stop string)
        # is not in its text or token ids, but was sampled and is counted in completion_tokens: its
        # logprob comes with the last chunk, as vLLM's logprobs keep it.
        if token in slot.stop_ids:  # (never drawn before min_tokens: the sampler holds them back)
            self._finish(slot, Chunk(stream.finish() if stream else "", [], lp, "stop"))
            return False
        piece = stream.push(token, slot.produced + 1 >= req.rules.min_tokens) if stream is not None else ""
        if stream is not None and stream.stopped:
            self._finish(slot, Chunk(piece, [], lp, "stop"))
            return False
        slot.produced += 1
        if slot.produced >= slot.budget:
            tail = stream.finish() if stream is not None else ""
            self._finish(slot, Chunk(piece + tail, [token], lp, "length"))
            return False
        slot.next_token = token
        if slot.spec is not None:
            slot.spec.drafter.append(token)
        self._emit(req, Chunk(piece, [token], lp))
        return True

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
            self.kv_reserved_blocks -= slot.kv_blocks
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
