"""What structured output costs per decode step: the sampler's time (masking included) with each
kind of constraint against none, on one model, in one run.

    python bench/structured_output.py [--model DIR] [--seeds 3] [--tokens 40]

Without --model it builds GPT-2 124M with random weights and GPT-2's real vocabulary in a
temporary folder (bench/make_random_gpt2.py): the mask's cost grows with the vocabulary (50,257
tokens), and the bundled model's is 4,096. Every case generates `--tokens` tokens for each seed at
temperature 1 from the same prompt; the table gives the sampler's milliseconds per step from
`llamas.profile()` ("sample"), the whole step's (every op the profile times), and the sampler's share of it. Random weights
wander, so the cases do not emit the same number of tokens (a constraint that closes ends early).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # the installed package, or else this checkout's python/ folder (with a built extension)
    import llamas
except ImportError:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import llamas
from llamas.grammar import JSON_GRAMMAR

PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
CASES = [
    ("none", {}),
    ("JSON mode", {"json_object": True}),
    ("JSON Schema (person)", {"json_schema": PERSON}),
    ("JSON Schema, patterns", {"json_schema": {"type": "object", "required": ["zip", "city"], "properties": {
        "zip": {"type": "string", "pattern": r"\d{5}"}, "city": {"type": "string", "pattern": "[A-Z][a-z]{2,12}"}}}}),
    ("regex [A-Z]{3}-\\d{4}", {"regex": r"[A-Z]{3}-\d{4}"}),
    ("regex (\\w+ ){3,8}\\w+\\.", {"regex": r"(\w+ ){3,8}\w+\."}),
    ("grammar: JSON", {"grammar": JSON_GRAMMAR}),
    ("choice of 3", {"choices": [" yes", " no", " maybe"]}),
]


def op_times(prof) -> dict:
    """{op name: (calls, total ms)} from a llamas.profile() (Profile.by_op gives seconds)."""
    return {name: (calls, seconds * 1e3) for name, calls, seconds in prof.by_op()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GPT-2 model folder (default: random GPT-2 124M, built once here)")
    ap.add_argument("--seeds", type=int, default=3, help="generations per case (default 3)")
    ap.add_argument("--tokens", type=int, default=40, help="tokens per generation (default 40)")
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    args = ap.parse_args()
    if args.seeds < 1 or args.tokens < 1:
        ap.error("--seeds and --tokens must be at least 1")
    if args.threads is not None:
        llamas.set_num_threads(args.threads)
    folder = args.model
    if folder is None:
        folder = os.path.join(tempfile.gettempdir(), "llamas-bench-gpt2-124m")
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            print(f"building random GPT-2 124M in {folder} ...", file=sys.stderr)
            subprocess.run([sys.executable, os.path.join(HERE, "make_random_gpt2.py"), "--out", folder], check=True)
    model = llamas.load(folder)
    model.generate("warm up", max_new_tokens=4)
    print(f"model {folder}: vocabulary {model.config.vocab_size}, {llamas.get_num_threads()} threads, "
          f"{args.seeds} x {args.tokens} tokens per case, temperature 1")
    print("| constraint | steps | sampler ms/step | step ms | sampler share |")
    print("|---|---|---|---|---|")
    for name, kwargs in CASES:
        steps = sample_ms = total_ms = 0.0
        for seed in range(args.seeds):
            with llamas.profile() as prof:
                model.generate("Answer:", max_new_tokens=args.tokens, temperature=1.0, seed=seed, **kwargs)
            ops = op_times(prof)
            calls, ms = ops.get("sample", (0, 0.0))
            steps += calls
            sample_ms += ms
            total_ms += sum(ms for _, ms in ops.values())
        if steps:
            per_step = total_ms / steps
            print(f"| {name} | {int(steps)} | {sample_ms / steps:.3f} | {per_step:.2f} | "
                  f"{100 * sample_ms / max(total_ms, 1e-9):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
