"""The choices' contents for the OpenAI-compatible server: OpenAI's logprobs formats (legacy
completions, echoed prompts, chat) and best_of's ranking of candidates."""
from __future__ import annotations

import codecs

from .server_protocol import GenParams


def best_of_choices(results: list, per_prompt: int, n: int, keep_logprobs: bool) -> list:
    """The n best of each prompt's per_prompt candidates, best first: by mean log-probability per
    generated token (OpenAI's ranking; a candidate that generated nothing ranks last), ties to the
    earlier candidate."""
    def mean_logprob(r) -> float:
        lps = r.logprobs or []
        return sum(t.logprob for t in lps) / len(lps) if lps else float("-inf")

    chosen = []
    for first in range(0, len(results), per_prompt):
        group = results[first:first + per_prompt]
        order = sorted(range(len(group)), key=lambda i: (-mean_logprob(group[i]), i))
        chosen += [group[i] for i in order[:n]]
    if not keep_logprobs:
        for r in chosen:
            r.logprobs = None
    return chosen


def token_piece(tokenizer, token_id: int) -> tuple:
    """(token string, its bytes) for logprobs. A token holding part of a UTF-8 character (byte-level
    BPE splits them) is written as OpenAI writes it, "bytes:\\xe2\\x80", so two such tokens stay
    two keys of top_logprobs (both decoded to U+FFFD before), and its bytes are its own (chat's
    `bytes` gave U+FFFD's three bytes for each half of "é", where it exists to rebuild it)."""
    if tokenizer is None:
        return str(token_id), str(token_id).encode()
    table = tokenizer.piece_bytes()
    raw = table[token_id] if table is not None and token_id < len(table) else \
        tokenizer.decode([token_id]).encode("utf-8")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class TextOffsets:
    """Each token's text_offset: the character of the text at which its first byte's character
    starts, counted through a UTF-8 decoder as the text itself is decoded (a token that splits a
    character counted as one character of its own, so offsets ran past the end of the text)."""
    __slots__ = ("chars", "_decoder")

    def __init__(self, start: int = 0):
        self.chars = start
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, raw: bytes) -> int:
        at = self.chars
        self.chars += len(self._decoder.decode(raw))
        return at


def completion_logprobs(tokenizer, lps, offsets: TextOffsets) -> dict:
    """OpenAI legacy completions logprobs: tokens, token_logprobs, top_logprobs (the top n and the
    sampled token, as OpenAI's "logprobs + 1" and vLLM's), text_offset (from `offsets`, which
    carries on over a stream's chunks)."""
    tokens, token_lps, tops, text_offsets = [], [], [], []
    for lp in lps:
        s, raw = token_piece(tokenizer, lp.token_id)
        tokens.append(s)
        token_lps.append(lp.logprob)
        top = {}
        for tid, v in lp.top:
            top.setdefault(token_piece(tokenizer, tid)[0], v)
        top.setdefault(s, lp.logprob)
        tops.append(top)
        text_offsets.append(offsets.take(raw))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": text_offsets}


def prompt_text(tokenizer, p: GenParams, prompt_index: int) -> str:
    prompt = p.prompts[prompt_index]
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(p.prompt_ids[prompt_index]) if tokenizer is not None else ""


def echo_logprobs(tokenizer, ids, scores) -> dict:
    """The prompt's part of an echoed completion's logprobs: one entry per prompt token, the first
    with null logprob and top_logprobs (nothing precedes it), offsets from the start of the text."""
    offsets = TextOffsets(0)
    first, raw = token_piece(tokenizer, ids[0])
    at = offsets.take(raw)
    lp = completion_logprobs(tokenizer, (scores or [None])[1:], offsets)
    lp["tokens"].insert(0, first)
    lp["token_logprobs"].insert(0, None)
    lp["top_logprobs"].insert(0, None)
    lp["text_offset"].insert(0, at)
    return lp


def extend_logprobs(lp: dict, more: dict) -> None:
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        lp[key].extend(more[key])


def chat_logprobs(tokenizer, lps) -> dict:
    def entry(tid, v):
        s, raw = token_piece(tokenizer, tid)
        return {"token": s, "logprob": v, "bytes": list(raw)}
    content = []
    for lp in lps:
        e = entry(lp.token_id, lp.logprob)
        e["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(e)
    return {"content": content}
