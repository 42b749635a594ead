"""Creates a GPT-2 model folder with RANDOM weights (no torch needed).

    python bench/make_random_gpt2.py --out /tmp/gpt2-random [--size 124M] [--seed 0]

Writes config.json, model.safetensors (Hugging Face GPT2LMHeadModel names, Conv1D (in, out)
layout, float32, lm_head tied to transformer.wte so not stored) and the GPT-2 tokenizer files
(vocab.json, merges.txt) copied from /work/shared/data/gpt2-tokenizer. Weights are
normal(0, 0.02); biases zero-mean small noise; layer norms weight 1, bias 0 (plus a little noise
so that mistakes in their handling show up in comparisons).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_safetensors  # noqa: E402

SIZES = {
    # name: (n_embd, n_layer, n_head)
    "124M": (768, 12, 12),
    "355M": (1024, 24, 16),
    "774M": (1280, 36, 20),
    "1558M": (1600, 48, 25),
    "tiny": (64, 2, 4),
}
TOKENIZER_DIR = "/work/shared/data/gpt2-tokenizer"


def make_weights(n_embd: int, n_layer: int, vocab: int, n_positions: int, seed: int = 0,
                 std: float = 0.02) -> dict:
    rng = np.random.default_rng(seed)
    c, f = n_embd, 4 * n_embd

    def normal(*shape, s=std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    def ln(prefix, out):
        out[prefix + ".weight"] = (1.0 + normal(c, s=0.02)).astype(np.float32)
        out[prefix + ".bias"] = normal(c, s=0.02)

    w: dict = {}
    w["transformer.wte.weight"] = normal(vocab, c)
    w["transformer.wpe.weight"] = normal(n_positions, c, s=0.01)
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        ln(p + "ln_1", w)
        w[p + "attn.c_attn.weight"] = normal(c, 3 * c)
        w[p + "attn.c_attn.bias"] = normal(3 * c)
        w[p + "attn.c_proj.weight"] = normal(c, c, s=std / np.sqrt(2 * n_layer))
        w[p + "attn.c_proj.bias"] = normal(c)
        ln(p + "ln_2", w)
        w[p + "mlp.c_fc.weight"] = normal(c, f)
        w[p + "mlp.c_fc.bias"] = normal(f)
        w[p + "mlp.c_proj.weight"] = normal(f, c, s=std / np.sqrt(2 * n_layer))
        w[p + "mlp.c_proj.bias"] = normal(c)
    ln("transformer.ln_f", w)
    return w


def make_config(n_embd: int, n_layer: int, n_head: int, vocab: int, n_positions: int) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab,
        "n_positions": n_positions,
        "n_ctx": n_positions,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def make_model(out: str, size: str = "124M", seed: int = 0, vocab: int = 50257, n_positions: int = 1024) -> str:
    if size not in SIZES:
        raise SystemExit(f"unknown --size {size!r}; choose from {', '.join(SIZES)}")
    n_embd, n_layer, n_head = SIZES[size]
    os.makedirs(out, exist_ok=True)
    weights = make_weights(n_embd, n_layer, vocab, n_positions, seed)
    write_safetensors(os.path.join(out, "model.safetensors"), weights, metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(make_config(n_embd, n_layer, n_head, vocab, n_positions), fh, indent=2)
    for name in ("vocab.json", "merges.txt"):
        src = os.path.join(TOKENIZER_DIR, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, name))
        else:
            print(f"warning: {src} not found; the folder has no tokenizer", file=sys.stderr)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--size", default="124M", choices=list(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    make_model(args.out, args.size, args.seed)
    print(f"wrote random GPT-2 {args.size} to {args.out}")


if __name__ == "__main__":
    main()
