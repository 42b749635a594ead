"""The choices' contents for the OpenAI-compatible server: OpenAI's logprobs formats (legacy
completions, echoed prompts, chat) and best_of's ranking of candidates."""
from __future__ import annotations

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


def completion_logprobs(tokenizer, lps, offset0: int) -> dict:
    """OpenAI legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset
    (offsets into the generated text)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = offset0
    for lp in lps:
        s = tokenizer.decode([lp.token_id]) if tokenizer is not None else str(lp.token_id)
        tokens.append(s)
        token_lps.append(lp.logprob)
        top = {}
        for tid, v in lp.top:
            key = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
            top.setdefault(key, v)
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_text(tokenizer, p: GenParams, prompt_index: int) -> str:
    prompt = p.prompts[prompt_index]
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(p.prompt_ids[prompt_index]) if tokenizer is not None else ""


def echo_logprobs(tokenizer, ids, scores) -> dict:
    """The prompt's part of an echoed completion's logprobs: one entry per prompt token, the first
    with null logprob and top_logprobs (nothing precedes it), offsets from the start of the text."""
    lp = completion_logprobs(tokenizer, (scores or [None])[1:], 0)
    first = tokenizer.decode([ids[0]]) if tokenizer is not None else str(ids[0])
    lp["tokens"].insert(0, first)
    lp["token_logprobs"].insert(0, None)
    lp["top_logprobs"].insert(0, None)
    lp["text_offset"] = [o + len(first) for o in lp["text_offset"]]
    lp["text_offset"].insert(0, 0)
    return lp


def extend_logprobs(lp: dict, more: dict) -> None:
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        lp[key].extend(more[key])


def chat_logprobs(tokenizer, lps) -> dict:
    def entry(tid, v):
        s = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
    content = []
    for lp in lps:
        e = entry(lp.token_id, lp.logprob)
        e["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        content.append(e)
    return {"content": content}
