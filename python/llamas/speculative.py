"""Speculative decoding by n-gram lookup (prompt lookup decoding, vLLM's "ngram" method).

A greedy request's next tokens are often a copy of earlier text: a quoted passage, code being
edited, a small model's loop. `NgramDrafter` finds the longest recent n-gram (n = `max_n` down to
`min_n`) that ends the text so far and occurred before, and proposes the tokens that followed that
earlier occurrence as drafts. The scheduler feeds the last token and the drafts as one chunk; the
step returns the greedy token after each of them (`Sequence.row_argmax`), every draft up to the
first mismatch is accepted, the mismatch's correct token (or, if all matched, the token after the
last draft) comes with them, and the rejected drafts' KV positions are dropped
(`Sequence.truncate`). A prompt's rows and a decode step's rows give bit-identical logits (see the
README's design paragraph), so the accepted tokens are exactly those greedy decoding gives one at a
time: speculation changes the speed, never the output.

It pays where a step is bound by reading the weights (one sequence of GPT-2 124M reads 475 MB a
token, and 9 rows cost about what 1 does), and costs arithmetic where the batch already keeps the
cores busy: the scheduler drafts only while few sequences run (`SPECULATE_MAX_BATCH`), and each
sequence's draft length follows its acceptance (one more after a step that took every draft, up to
K; else one past the accepted count).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

# Longest and shortest n-gram looked up (vLLM's prompt_lookup_max / prompt_lookup_min).
NGRAM_MAX = 3
NGRAM_MIN = 1
# Most drafts per step a caller may ask for, and the running sequences above which none are made.
MAX_DRAFT_TOKENS = 32
SPECULATE_MAX_BATCH = 4


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


def can_speculate(req) -> bool:
    """Greedy requests whose next token is the plain argmax of the logits: no penalties, biases,
    structure, min_tokens or log-probabilities (those change or report per-token choices)."""
    o = req.options
    greedy = o.temperature == 0 or o.top_k == 1
    return (greedy and o.repetition_penalty == 1 and o.presence_penalty == 0 and o.frequency_penalty == 0
            and not o.logit_bias and not o.constrained and o.logprobs is None and req.rules.min_tokens == 0
            and req.prompt_logprobs is None)


class Speculation:
    """One sequence's speculative state: its drafter and how many drafts to ask for next. The
    draft length follows the acceptance: one more after a step that took every draft (up to
    max_drafts), else one past what was accepted. Each draft is a row of arithmetic: the bundled
    model (a step bound by arithmetic and per-op costs, not memory) decoded greedily 0.66-0.74x as
    fast at a fixed K of 4-8, and 1.00-1.24x as fast so (bench/speculative.py)."""
    __slots__ = ("drafter", "max_drafts", "draft_len")

    def __init__(self, prompt: Sequence[int], max_drafts: int):
        self.drafter = NgramDrafter(prompt)
        self.max_drafts = self.draft_len = max_drafts

    def drafts(self, room: int) -> List[int]:
        return self.drafter.drafts(min(self.draft_len, room))

    def verified(self, drafts: Sequence[int], row_argmax: Sequence[int], sampled: int) -> List[int]:
        """The tokens a verifying step produced (accepted_tokens), adapting the next draft length."""
        tokens = accepted_tokens(drafts, row_argmax, sampled)
        self.draft_len = min(self.max_drafts, self.draft_len + 1) if len(tokens) > len(drafts) else len(tokens)
        return tokens


def accepted_tokens(drafts: Sequence[int], row_argmax: Sequence[int], sampled: int) -> List[int]:
    """The tokens a verifying step produces: the drafts greedy decoding agrees with, up to the first
    it does not, then greedy's own token there (or, if all agreed, the one sampled after the last)."""
    out = []
    for draft, greedy in zip(drafts, row_argmax):
        if draft != greedy:
            out.append(int(greedy))
            return out
        out.append(int(draft))
    out.append(int(sampled))
    return out
