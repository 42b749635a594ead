"""Speculative decoding by n-gram lookup (prompt lookup decoding, vLLM's "ngram" method).

A request's next tokens are often a copy of earlier text: a quoted passage, code being edited, a
small model's loop. `NgramDrafter` finds the longest recent n-gram (n = NGRAM_MAX down to
NGRAM_MIN) that ends the text so far and occurred before, and proposes the tokens that followed
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

It pays where a step is bound by reading the weights (one sequence of GPT-2 124M reads 475 MB a
token, and 9 rows cost about what 1 does), and costs arithmetic where the batch already keeps the
cores busy: for a model whose weights fit in cache the scheduler drafts only while few sequences
run (`SPECULATE_MAX_BATCH`), for a larger one at any batch, up to STREAMING_MAX_DRAFT_ROWS draft
rows a step (124M, greedy, random weights: 8 sequences 1.54x, 16 sequences 1.60x), and each
sequence's draft length follows its acceptance (one more after a step that took every draft, up to
K; else one past the accepted count).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

# Longest and shortest n-gram looked up (vLLM's prompt_lookup_max / prompt_lookup_min).
NGRAM_MAX = 3
NGRAM_MIN = 1
# Most drafts per step a caller may ask for, and the running sequences above which none are made.
MAX_DRAFT_TOKENS = 32
SPECULATE_MAX_BATCH = 4
# A model with more weight bytes than this reads them from DRAM every step (this machine's L3 is
# 32 MiB), so a step's time hardly grows with its rows: drafts are made at any batch size, up to
# STREAMING_MAX_DRAFT_ROWS of them a step.
STREAMING_WEIGHT_BYTES = 64 << 20
STREAMING_MAX_DRAFT_ROWS = 16


def check_speculative_ngram(value, where: str) -> int:
    """The drafts-per-step setting: an int in [0, MAX_DRAFT_TOKENS] (0: off), else a clear error."""
    from ._C import LlamasError
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DRAFT_TOKENS:
        raise LlamasError(f"[{where}] speculative_ngram must be an integer in [0, {MAX_DRAFT_TOKENS}] (drafts per "
                          f"step; 0 turns speculation off), got {value!r}")
    return value


class NgramDrafter:
    """The text so far (prompt and accepted tokens) of one sequence and, for each n, where each
    n-gram was last followed by a token: lookup and update are O(1) per token."""
    __slots__ = ("tokens", "_follower")

    def __init__(self, prompt: Sequence[int]):
        self.tokens: List[int] = []
        self._follower: Dict[int, Dict[Tuple[int, ...], int]] = {n: {} for n in range(NGRAM_MIN, NGRAM_MAX + 1)}
        for t in prompt:
            self.append(t)

    def append(self, token: int) -> None:
        toks = self.tokens
        i = len(toks)
        for n, table in self._follower.items():
            if i >= n:
                table[tuple(toks[i - n:i])] = i  # the n-gram ending before position i is followed by token i
        toks.append(token)

    def drafts(self, limit: int) -> List[int]:
        """`limit` tokens: those that followed the latest earlier occurrence of the longest n-gram
        ending the text (continued as a loop where they reach its end); [] when none occurred."""
        toks = self.tokens
        if limit <= 0:
            return []
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(toks) <= n:
                continue
            at = self._follower[n].get(tuple(toks[-n:]))
            if at is not None:
                # The tokens after the earlier occurrence; where they run into the text's end (the
                # occurrence overlaps the last n tokens: a loop of period len - at), the loop goes on.
                out = toks[at:at + limit]
                while len(out) < limit:
                    out.append(out[len(out) - (len(toks) - at)])
                return out
        return []


def step_draft_rows(streams_weights: bool, running: int, max_drafts: int) -> Optional[int]:
    """The draft rows one step may add, or None when it makes no drafts: a model whose weights fit
    in cache drafts only while at most SPECULATE_MAX_BATCH sequences run (its step is then bound by
    arithmetic, and a draft is a row more of it); one whose weights stream from DRAM at any batch
    size, up to STREAMING_MAX_DRAFT_ROWS a step."""
    if streams_weights:
        return STREAMING_MAX_DRAFT_ROWS
    return running * max_drafts if running <= SPECULATE_MAX_BATCH else None


def can_speculate(req) -> bool:
    """Requests whose tokens the sampler can verify: not structured output (its state follows each
    token), logprobs (reported per drawn token), min_tokens or scored prompts."""
    o = req.options
    return (not o.constrained and o.logprobs is None and req.rules.min_tokens == 0 and req.prompt_logprobs is None)


class Speculation:
    """One sequence's speculative state: its drafter and how many drafts to ask for next. The
    draft length follows the acceptance: one more after a step that took every draft (up to
    max_drafts), else one past what was accepted. Each draft is a row of arithmetic: the bundled
    model (a step bound by arithmetic and per-op costs, not memory) decoded greedily 0.66-0.74x as
    fast at a fixed K of 4-8, and 1.00-1.24x as fast so (bench/speculative.py)."""
    __slots__ = ("drafter", "max_drafts", "draft_len", "misses", "pause")

    def __init__(self, prompt: Sequence[int], max_drafts: int):
        self.drafter = NgramDrafter(prompt)
        self.max_drafts = self.draft_len = max_drafts
        self.misses = 0  # verifying steps in a row that kept no draft
        self.pause = 0   # steps to decode without drafts before trying again

    def drafts(self, room: int) -> List[int]:
        if self.pause > 0:
            self.pause -= 1
            return []
        return self.drafter.drafts(min(self.draft_len, room))

    def verified(self, n_drafts: int, n_tokens: int) -> None:
        """A verifying step of n_drafts drafts produced n_tokens tokens (the accepted drafts and one
        more): the next draft length. After steps that kept nothing, drafting pauses for 1, 3, 7, ...
        up to 31 steps: text that does not repeat (a sampled story: 13-19% of drafts kept) then costs
        a verifying row now and then instead of every step."""
        self.draft_len = min(self.max_drafts, self.draft_len + 1) if n_tokens > n_drafts else n_tokens
        if n_tokens > 1:
            self.misses = 0
        else:
            self.misses += 1
            self.pause = min(2 ** self.misses - 1, 31)
