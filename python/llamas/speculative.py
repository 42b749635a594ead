"""Speculative decoding by n-gram lookup (prompt lookup decoding, vLLM's "ngram" method).

A request's next tokens are often a copy of earlier text: a quoted passage, code being edited, a
small model's loop. `NgramDrafter` finds the longest recent n-gram (n = 3 down to 1; vLLM's
prompt_lookup_max / prompt_lookup_min) that ends the text so far and occurred before, and proposes the tokens that followed
that earlier occurrence as drafts. The scheduler feeds the last token and the drafts as one chunk,
and the sampler verifies them against that step's logits (Sampler::verify, `Sequence.verified`):
greedy keeps the drafts up to the first that is not the argmax and adds the argmax there (or the
token after the last draft); sampling draws each position's token with the one uniform that
decoding it alone would take, and keeps the drafts up to the first that draw does not pick (a draft
is so kept with its probability under the request's distribution: speculative sampling with a
point-mass draft, coupled to plain sampling). The rejected drafts' KV positions are dropped
(`Sequence.truncate`). A chunk's rows give bit-identical logits to the same tokens decoded one at a
time (see the README's design paragraph), so the output, greedy or sampled from a seed, is exactly
what decoding one token at a time gives.

Whether drafts pay depends on what a row costs, which the engine measures as it runs (`StepCost`:
a decode step's time against its rows), and on how often a sequence's drafts are right (each
`Speculation`'s acceptance rate, learnt from its verifications). Before each step `plan_drafts`
gives the drafts to the sequences and positions most likely kept, as many as raise the step's
expected tokens per second: one sequence of GPT-2 124M reads 475 MB of weights a step whatever
its rows, so it takes every likely draft; the bundled model, whose weights sit in cache, pays
~0.3 of a one-row step per extra row, so it drafts only where its drafts are usually right, and
not for text that does not repeat or in a busy server's 16-sequence steps, except for one probe
draft in 33 steps that keeps the acceptance rates learning (DraftPlanner.add_drafts).
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple

# Most drafts per step a caller may ask for.
MAX_DRAFT_TOKENS = 32
# Rows a planned step may reach: the step cost is learnt up to here.
MAX_STEP_ROWS = 64
# A model with more weight bytes than this reads them from DRAM every step (this machine's L3 is
# 32 MiB), so a row more costs little: the cost model's guess for rows it has not timed yet, as a
# share of a step's time per extra row, is STREAMING_ROW_COST for those, CACHED_ROW_COST for
# models that fit in cache (bundled model, one sequence: 2 rows 1.30-1.38x a 1-row step, 4 rows
# 1.7-1.95x, 8 rows 2.0-2.15x; GPT-2 124M: 16 rows ~1.3x).
STREAMING_WEIGHT_BYTES = 64 << 20
STREAMING_ROW_COST = 0.02
CACHED_ROW_COST = 0.3
# The least a row can cost: its multiply-adds (2 flops a matrix weight) at this many flop/s a
# thread (float32 FMA peak of an AVX-512 core at ~3 GHz, ~96 GFLOP/s; bfloat16 compute x2, int8
# x4). Rows timed at step sizes measured minutes apart can look free or cheaper than that (this box
# drifts by +-30%: bundled model, 16 sequences, t(16) 4.1 ms and t(18) 3.0 ms), and a planner that
# believed it drafted 0.6 rows a step at 22% kept: 0.81-0.97x the tok/s without drafts.
PEAK_FLOPS_PER_THREAD = 100e9
# A draft is worth a row only if it is at least this likely to be kept.
MIN_DRAFT_GAIN = 0.02
# A sequence's acceptance rate: its kept and judged drafts, each verification weighted
# ACCEPTANCE_DECAY times the next (n-gram drafts come in runs: a quoted passage, then new text),
# plus PRIOR_DRAFTS judged at the rate of all sequences' drafts (`AcceptancePrior`). A step that
# could have drafted for a sequence but did not multiplies its counts by IDLE_DECAY, so its rate
# drifts back to the common one. After PROBE_AFTER steps in a row without drafts, the scheduler
# gives one draft to the sequence idle longest (a probe), so that the rates keep learning while
# drafts do not pay: one row more in 33 steps.
ACCEPTANCE_DECAY = 0.7
IDLE_DECAY = 0.85
PRIOR_DRAFTS = 2.0
PROBE_AFTER = 32


def check_speculative_ngram(value, where: str) -> int:
    """The drafts-per-step setting: an int in [0, MAX_DRAFT_TOKENS] (0: off), else a clear error."""
    from ._C import LlamasError
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DRAFT_TOKENS:
        raise LlamasError(f"[{where}] speculative_ngram must be an integer in [0, {MAX_DRAFT_TOKENS}] (drafts per "
                          f"step; 0 turns speculation off), got {value!r}")
    return value


class NgramDrafter:
    """The text so far (prompt and accepted tokens) of one sequence and, for n = 1, 2, 3, where each
    n-gram was last followed by a token: lookup and update are O(1) per token. An n-gram's key is
    its ids packed into one int (21 bits each), not a tuple: every speculating sequence updates the
    tables on every token, and tuple keys cost a 16-sequence batch ~3% of its steps. (Ids past 2^21
    could share a key: that would only make a draft that verification rejects.)"""
    __slots__ = ("tokens", "_f1", "_f2", "_f3")

    def __init__(self, prompt: Sequence[int]):
        self.tokens: List[int] = []
        self._f1: Dict[int, int] = {}
        self._f2: Dict[int, int] = {}
        self._f3: Dict[int, int] = {}
        for t in prompt:
            self.append(t)

    def append(self, token: int) -> None:
        toks = self.tokens
        i = len(toks)
        if i:  # the n-grams ending before position i are followed by token i
            a = toks[-1]
            self._f1[a] = i
            if i >= 2:
                ab = (toks[-2] << 21) | a
                self._f2[ab] = i
                if i >= 3:
                    self._f3[(toks[-3] << 42) | ab] = i
        toks.append(token)

    def drafts(self, limit: int) -> List[int]:
        """`limit` tokens: those that followed the latest earlier occurrence of the longest n-gram
        ending the text (continued as a loop where they reach its end); [] when none occurred."""
        toks = self.tokens
        n = len(toks)
        if limit <= 0 or n < 2:
            return []
        a = toks[-1]
        ab = (toks[-2] << 21) | a
        at = self._f3.get((toks[-3] << 42) | ab) if n > 3 else None
        if at is None:
            at = self._f2.get(ab) if n > 2 else None
            if at is None:
                at = self._f1.get(a)
        if at is None:
            return []
        # The tokens after the earlier occurrence; where they run into the text's end (the
        # occurrence overlaps the last tokens: a loop of period n - at), the loop goes on.
        out = toks[at:at + limit]
        while len(out) < limit:
            out.append(out[len(out) - (n - at)])
        return out


class StepCost:
    """A decode step's time against the rows it feeds, learnt from the steps the engine runs (a
    step's time: from its start to the next step's start, its forward and the host work on its
    tokens). It is kept as speed x shape: `shape[R]`, the relative cost of R rows, moves slowly
    (each step of R rows weighs 1/20), and `speed` follows every step (1/4), so the box's drift
    (+-30% over minutes here) moves every estimate together. Comparing raw means per row count
    compared a fresh t(16) with a t(18) timed minutes before (4.1 against 3.0 ms) and made rows look
    free. A row count not timed yet is estimated from its nearest timed neighbours, linearly
    between them, past the largest by the slope of the two largest, or by `row_cost` (a share of
    a step's time per extra row) where fewer than two are timed. `min_row_seconds`: the floor on
    what an extra row costs (see PEAK_FLOPS_PER_THREAD), which `with_rows` applies."""
    __slots__ = ("row_cost", "min_row_seconds", "speed", "_shape", "_timed")

    def __init__(self, row_cost: float, min_row_seconds: float = 0.0):
        self.row_cost = row_cost
        self.min_row_seconds = min_row_seconds
        self.speed: Optional[float] = None  # seconds per unit of shape
        self._shape: List[Optional[float]] = [None] * (MAX_STEP_ROWS + 1)
        self._timed: List[int] = []  # the row counts timed, ascending

    def observe(self, rows: int, seconds: float) -> None:
        if not (0 < rows <= MAX_STEP_ROWS and seconds > 0.0):
            return
        shape = self._shape
        if self.speed is None:
            self.speed = seconds
        if shape[rows] is None:
            bisect.insort(self._timed, rows)
            shape[rows] = seconds / self.speed
            return
        self.speed += 0.25 * (seconds / shape[rows] - self.speed)
        shape[rows] += 0.05 * (seconds / self.speed - shape[rows])

    def estimate(self, rows: int) -> Optional[float]:
        """Seconds for a step of `rows` rows; None before any step was timed."""
        shape = self._shape
        if self.speed is None:
            return None
        if 0 < rows <= MAX_STEP_ROWS and shape[rows] is not None:
            return self.speed * shape[rows]
        timed = self._timed
        i = bisect.bisect_left(timed, rows)  # timed[i - 1] < rows < timed[i]
        if 0 < i < len(timed):
            below, above = timed[i - 1], timed[i]
            return self.speed * (shape[below] + (shape[above] - shape[below]) * (rows - below) / (above - below))
        near = timed[i - 1] if i else timed[0]
        slope = self.row_cost * shape[near]
        if i >= 2:  # past the largest timed count: the slope of the two largest
            prev = timed[i - 2]
            slope = max(0.0, (shape[near] - shape[prev]) / (near - prev))
        return max(self.speed * (shape[near] + slope * (rows - near)), 1e-9)


def with_rows(cost: StepCost, base_rows: int, base: float, extra: int) -> float:
    """Estimated seconds for a step of base_rows rows (base seconds) with `extra` rows more: never
    less than base plus the floor on their cost."""
    return base + max(cost.estimate(base_rows + extra) - base, extra * cost.min_row_seconds)


def worth_planning(cost: StepCost, base_rows: int, best_rate: float) -> bool:
    """Whether a step of base_rows rows could gain from drafts at all: its likeliest first draft
    (best_rate) adds at least 0.8 of the tokens per second a row more costs. (Python's planning
    costs 5-20 us a step, which one sequence of the bundled model decodes in ~400; a sampled story's
    drafts, kept 15-20% of the time, fail this before any planning.)"""
    base = cost.estimate(base_rows)
    return base is not None and best_rate * base >= 0.8 * base_rows * (with_rows(cost, base_rows, base, 1) - base)


def plan_drafts(cost: StepCost, base_rows: int, offers: Sequence[Tuple[float, int]]) -> List[int]:
    """How many drafts each offer gets in a step of base_rows rows without them. An offer is
    (acceptance rate a, drafts available); its i-th draft is kept with probability a^i (all before
    it kept), which is the tokens it adds. The most likely drafts over all offers go first, and the
    step takes as many as maximise expected tokens over estimated time (none if no step was timed).
    (DraftPlanner.add_drafts asks worth_planning first, so most steps never get here.)"""
    counts = [0] * len(offers)
    base = cost.estimate(base_rows)
    if base is None or not offers or base_rows >= MAX_STEP_ROWS:
        return counts
    gains = []
    for i, (rate, available) in enumerate(offers):
        g = 1.0
        for _ in range(available):
            g *= rate
            if g < MIN_DRAFT_GAIN:
                break
            gains.append((g, i))
    gains.sort(key=lambda x: -x[0])
    del gains[max(0, MAX_STEP_ROWS - base_rows):]
    tokens, best, take = float(base_rows), base_rows / base, 0
    for x, (g, _) in enumerate(gains, 1):
        tokens += g
        value = tokens / with_rows(cost, base_rows, base, x)
        if value > best:
            best, take = value, x
    for _, i in gains[:take]:
        counts[i] += 1
    return counts


def row_seconds_floor(model) -> float:
    """The least time a row of a step can take: the model's matrix weights' multiply-adds at the
    threads' FMA peak (PEAK_FLOPS_PER_THREAD)."""
    from ._C import get_num_threads
    c = model.config
    weights = c.num_parameters() - c.n_positions * c.n_embd  # (position embeddings: no product)
    speedup = {"bfloat16": 2, "int8": 4}.get(getattr(model, "compute_dtype", "float32"), 1)
    return 2.0 * weights / (PEAK_FLOPS_PER_THREAD * speedup * get_num_threads())


class DraftPlanner:
    """A scheduler's speculation state: what its steps cost (`step_cost`), how often all its
    sequences' drafts are kept (`acceptance`), and when a probe is due."""
    __slots__ = ("step_cost", "acceptance", "_steps_without_drafts", "_timed_step")

    def __init__(self, model):
        streams = getattr(model, "weight_bytes", 0) > STREAMING_WEIGHT_BYTES
        self.step_cost = StepCost(STREAMING_ROW_COST if streams else CACHED_ROW_COST, row_seconds_floor(model))
        self.acceptance = AcceptancePrior()
        self._steps_without_drafts = 0  # speculating steps in a row that made none
        self._timed_step = None  # (start, rows) of the last decode-only step, timed when the next starts

    def step_started(self, start: float, entries: list, prefilling: bool, busy: bool) -> None:
        """A step of these entries starts now: the last one, if it decoded only and the engine has
        been busy since, took until now."""
        if busy and self._timed_step is not None:
            self.step_cost.observe(self._timed_step[1], start - self._timed_step[0])
        self._timed_step = None if prefilling else (start, sum(len(e[1]) for e in entries))

    def add_drafts(self, entries: list, spec_slots: list, offer) -> int:
        """Gives drafts to the entries (each one row now) of the speculating slots (entry index,
        slot) that plan_drafts picks; `offer(slot)` gives a slot's drafts. After PROBE_AFTER steps in
        a row without a draft, the slot idle longest that has drafts gets one: a probe, so that the
        acceptance rates keep learning. One probe row in PROBE_AFTER + 1 steps whatever the batch:
        probing each sequence that often cost the bundled model's 16-sequence steps ~5% (its 17th
        row takes a tile pass of its own: +20% a step). Returns the drafts given."""
        cost, rows = self.step_cost, len(entries)
        rates = [slot.spec.rate for _, slot in spec_slots]
        given = 0
        if worth_planning(cost, rows, max(rates)):
            offers = [(i, slot, offer(slot), rate) for (i, slot), rate in zip(spec_slots, rates)]
            offers = [o for o in offers if o[2]]
            counts = plan_drafts(cost, rows, [(rate, len(d)) for _, _, d, rate in offers])
            for (i, slot, drafts, _), n in zip(offers, counts):
                if n:
                    entries[i] = (slot.seq, [slot.next_token] + drafts[:n], True, True)
                    given += n
                else:
                    slot.spec.idle()
        else:  # no draft could pay
            for _, slot in spec_slots:
                slot.spec.idle()
        self._steps_without_drafts = 0 if given else self._steps_without_drafts + 1
        if self._steps_without_drafts > PROBE_AFTER:
            for i, slot in sorted(spec_slots, key=lambda s: -s[1].spec.idle_steps):
                drafts = offer(slot)
                if drafts:
                    entries[i] = (slot.seq, [slot.next_token, drafts[0]], True, True)
                    given, self._steps_without_drafts = 1, 0
                    break
        return given


def can_speculate(req) -> bool:
    """Requests whose tokens the sampler can verify: not structured output (its state follows each
    token), logprobs (reported per drawn token), min_tokens or scored prompts."""
    o = req.options
    return (not o.constrained and o.logprobs is None and req.rules.min_tokens == 0 and req.prompt_logprobs is None)


class AcceptancePrior:
    """The rate at which all of a scheduler's sequences' drafts were kept (decayed by 0.99 a
    verification): where a sequence's own record starts from and drifts back to."""
    __slots__ = ("kept", "tried")

    def __init__(self):
        self.kept, self.tried = 1.0, 2.0  # one half, until drafts are judged

    @property
    def rate(self) -> float:
        return self.kept / self.tried

    def add(self, kept: int, tried: int) -> None:
        self.kept = self.kept * 0.99 + kept
        self.tried = self.tried * 0.99 + tried


class Speculation:
    """One sequence's speculative state: its drafter and its drafts' acceptance rate (see
    ACCEPTANCE_DECAY), which plan_drafts weighs against the step cost."""
    __slots__ = ("drafter", "max_drafts", "prior", "kept", "tried", "idle_steps")

    def __init__(self, prompt: Sequence[int], max_drafts: int, prior: AcceptancePrior):
        self.drafter = NgramDrafter(prompt)
        self.max_drafts = max_drafts
        self.prior = prior
        self.kept = 0.0   # drafts kept, decayed
        self.tried = 0.0  # drafts judged (kept, or the first one rejected), decayed
        self.idle_steps = 0  # steps since its last verification that gave it no drafts

    @property
    def rate(self) -> float:
        return (self.kept + PRIOR_DRAFTS * self.prior.rate) / (self.tried + PRIOR_DRAFTS)

    def offer(self, room: int) -> List[int]:
        """Up to max_drafts (and room) drafts the drafter has for the next step."""
        return self.drafter.drafts(min(self.max_drafts, room))

    def idle(self) -> None:
        """A step had drafts for this sequence and gave it none."""
        self.kept *= IDLE_DECAY
        self.tried *= IDLE_DECAY
        self.idle_steps += 1

    def verified(self, n_drafts: int, n_tokens: int) -> None:
        """A verifying step of n_drafts drafts produced n_tokens tokens (the kept drafts and one
        more): n_tokens - 1 drafts kept, and one more judged if that was not all of them."""
        kept = n_tokens - 1
        tried = kept + (1 if kept < n_drafts else 0)
        self.kept = self.kept * ACCEPTANCE_DECAY + kept
        self.tried = self.tried * ACCEPTANCE_DECAY + tried
        self.prior.add(kept, tried)
        self.idle_steps = 0
