"""Perplexity of a model on a plain text (`llamas eval --file`), through the inference path.

The text's tokens are scored in windows of `seq` tokens that start every `stride` tokens (the
sliding-window recipe of Hugging Face's perplexity guide and llama.cpp's llama-perplexity): each
token after the first is counted once, in the first window that predicts it, so with stride < seq
every counted token past the first window has at least seq - stride tokens of context. Windows are
scored by `Model.score` (the engine's batched forward over the paged KV cache), so the weights'
and the KV cache's dtypes both show in the result: that is how bfloat16 is checked against float32.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

from ._C import LlamasError


def windows(n_tokens: int, seq: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first counted position) of each window; positions begin+1..end-1 are predicted
    inside [begin, end), and those from `first counted` on are counted."""
    if seq < 2 or not 1 <= stride <= seq:
        raise LlamasError(f"[eval] need seq >= 2 and 1 <= stride <= seq, got seq {seq}, stride {stride}")
    out, covered, begin = [], 1, 0
    while covered < n_tokens:
        end = min(begin + seq, n_tokens)
        out.append((begin, end, max(covered, begin + 1)))
        covered = end
        begin += stride
    return out


def text_perplexity(model, ids: Sequence[int], seq: int, stride: int, batch: int = 8,
                    progress: Callable[[int, int, float], None] = lambda done, total, nll: None) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity of ids under model."""
    if len(ids) < 2:
        raise LlamasError(f"[eval] the text has {len(ids)} token(s); at least 2 are needed to predict one")
    spans = windows(len(ids), seq, stride)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch):
        group = spans[i:i + batch]
        scores = model.score([list(ids[b:e]) for b, e, _ in group])
        for (b, e, first), window_scores in zip(group, scores):
            for pos in range(first, e):
                total -= window_scores[pos - b].logprob
                count += 1
        progress(min(i + batch, len(spans)), len(spans), total / count)
    nll = total / count
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count, "windows": len(spans)}
