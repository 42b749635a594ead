"""Time to first token with and without the prefix cache, for requests that share a long prefix.

    PYTHONPATH=python python bench/prefix_cache.py [--model DIR] [--prefix-tokens 448] [--requests 12]

Each request is one shared prefix (a system prompt, or a context scored with several
continuations) plus a few tokens of its own, submitted one after another to an `Engine` with
`prefix_cache_mb` 0 (off) and 64, alternating. Prints TTFT (median, min) for each and the ratio,
and checks that both engines return the same tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import llamas  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--prefix-tokens", type=int, default=448, help="tokens of the shared prefix (default 448)")
    ap.add_argument("--own-tokens", type=int, default=8, help="tokens of each request's own (default 8)")
    ap.add_argument("--requests", type=int, default=12, help="requests per engine (default 12)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    args = ap.parse_args()
    llamas.set_num_threads(args.threads)
    model = llamas.load(args.model)
    vocab, ctx = model.config.vocab_size, model.config.n_positions
    if args.prefix_tokens + args.own_tokens + args.max_tokens > ctx:
        ap.error(f"prefix + own + max tokens must fit the context ({ctx})")
    prefix = [(7919 * i + 13) % vocab for i in range(args.prefix_tokens)]
    prompts = [prefix + [(31 * r + 17 * j + 5) % vocab for j in range(args.own_tokens)] for r in range(args.requests)]
    ttft = {0: [], 64: []}
    tokens = {0: [], 64: []}
    engines = {mb: llamas.Engine(model, prefix_cache_mb=mb) for mb in ttft}
    try:
        for i, p in enumerate(prompts):
            for mb in (0, 64) if i % 2 == 0 else (64, 0):
                h = engines[mb].submit(p, max_new_tokens=args.max_tokens)
                r = h.result(timeout=600)
                tokens[mb].append(r.token_ids)
                if i > 0:  # the first request fills the cache
                    ttft[mb].append(h.stats.time_to_first_token)
    finally:
        for e in engines.values():
            e.shutdown(drain=False)
    assert tokens[0] == tokens[64], "the prefix cache changed the output"
    print(f"{model!r}\n{args.requests} requests of {args.prefix_tokens} shared + {args.own_tokens} own prompt "
          f"tokens, {args.max_tokens} generated, {args.threads} threads; the first request (filling the cache) "
          "left out\n")
    print("| prefix cache | TTFT median ms | TTFT min ms |")
    print("|---|---|---|")
    for mb, label in ((0, "off"), (64, "64 MiB")):
        print(f"| {label} | {statistics.median(ttft[mb]) * 1e3:.1f} | {min(ttft[mb]) * 1e3:.1f} |")
    print(f"\nTTFT off / on: {statistics.median(ttft[0]) / statistics.median(ttft[64]):.1f}x (medians); "
          "outputs identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
