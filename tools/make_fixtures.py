#!/usr/bin/env python
"""Builds the small committed test fixtures in tests/fixtures/ (needs torch, transformers, tokenizers).

    python tools/make_fixtures.py            # writes tests/fixtures/
    python tools/make_fixtures.py --check    # rebuilds in a temp folder and compares to the committed files

What it makes:
  gpt2-tokenizer/   the real GPT-2 vocab.json + merges.txt + LICENSE, copied from /work/shared/data
  gpt2-tiny/        random GPT-2 (vocab 512, ctx 128, n_embd 64, 2 layers, 4 heads)
  gpt2-odd/         random GPT-2 (vocab 512, ctx 97, n_embd 72, 3 layers, 3 heads of 24)
  gpt2-scaled/      random GPT-2 (vocab 512, ctx 64, n_embd 48, 3 layers, 4 heads) with scores scaled by
                    1 / (layer + 1) instead of head_dim^-0.5 (scale_attn_weights false,
                    scale_attn_by_inverse_layer_idx true)
Each model folder holds config.json, model.safetensors (float32), tokenizer.json (a 512-token
byte-level BPE trained on a few Shakespeare plays), expected.npz (input_ids, logits, greedy_ids)
and expected.json (prompt texts, greedy text, EOS info), all computed with torch float32.

Everything is seeded, so a rerun reproduces the same tokenizer, weights and prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLAMAS_SHARED_DATA", "/work/shared/data"))
EOS = "<|endoftext|>"
VOCAB = 512
PROMPT_TOKENS = 13
NEW_TOKENS = 20
TRAIN_FILES = ["macbeth_gut.txt", "hamlet_gut.txt", "romeo_and_juliet_gut.txt"]
# Candidate prompt lines (first two that encode to exactly PROMPT_TOKENS tokens win; if fewer
# than two do, lines of the training plays are scanned in order).
CANDIDATE_PROMPTS = [
    "When shall we three meet again",   # Macbeth I.1 (13 tokens with the fixture tokenizer)
    "Alas, poor Yorick!",               # Hamlet V.1 (13 tokens)
]

MODELS = {
    # name: (GPT2Config kwargs, seed)
    "gpt2-tiny": (dict(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4), 1234),
    "gpt2-odd": (dict(vocab_size=VOCAB, n_positions=97, n_embd=72, n_layer=3, n_head=3), 4321),
    # Stanford CRFM's attention scaling (scores / (layer + 1)), here without the usual
    # head_dim^-0.5, so that ignoring either flag changes the logits.
    "gpt2-scaled": (dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=3, n_head=4, scale_attn_weights=False,
                         scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True), 2468),
}
INIT_STD = 0.35        # weight init std (GPT-2 uses 0.02, which gives near-uniform logits)
BIAS_NOISE = 0.1       # added to every 1-D parameter (biases, layernorm weights and biases)
MIN_MARGIN = 1e-2      # smallest top-1 minus top-2 logit gap allowed along the greedy paths


def train_tokenizer():
    import tokenizers

    files = [str(DATA / "shakespeare" / f) for f in TRAIN_FILES]
    bpe = tokenizers.ByteLevelBPETokenizer()
    # The trainer is deterministic for a fixed input; keep it single-threaded to be safe.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    bpe.train(files, vocab_size=VOCAB, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tok = bpe._tokenizer  # the underlying tokenizers.Tokenizer (what tokenizer.json round-trips)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def pick_prompts(tok) -> list[str]:
    chosen = [p for p in CANDIDATE_PROMPTS if len(tok.encode(p).ids) == PROMPT_TOKENS]
    if len(chosen) < 2:
        for f in TRAIN_FILES:
            for line in (DATA / "shakespeare" / f).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and line.isascii() and line not in chosen and len(tok.encode(line).ids) == PROMPT_TOKENS:
                    chosen.append(line)
                if len(chosen) >= 2:
                    break
            if len(chosen) >= 2:
                break
    assert len(chosen) >= 2, "no two prompts of the right length"
    return chosen[:2]


def build_model(cfg_kwargs: dict, seed: int, eos_id: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**cfg_kwargs, initializer_range=INIT_STD, bos_token_id=eos_id, eos_token_id=eos_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(BIAS_NOISE * torch.randn_like(p))
    return model


def greedy_reference(model, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy decoding by full recompute (no KV cache), independent of generate(). Also returns
    the smallest top-1 minus top-2 logit gap over the steps (a near tie would make the fixture
    fragile: a 1e-5 difference could flip the argmax)."""
    import torch

    ids = list(prompt)
    out, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids.append(nxt)
    return out, margin


def hf_generate(model, prompt: list[int]) -> list[int]:
    import torch
    from transformers import GenerationConfig

    # eos_token_id=None: generate must run all NEW_TOKENS steps and must not mask EOS (as
    # min_new_tokens would), so the ids are the plain argmax chain.
    gen = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                           bos_token_id=None)
    x = torch.tensor([prompt])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
    return y[0, len(prompt):].tolist()


def degenerate(ids: list[int]) -> bool:
    """A continuation that is one token repeated or a short loop (period <= 2) over its second half."""
    if len(set(ids)) < 6:
        return True
    tail = ids[len(ids) // 2:]
    return any(all(tail[i] == tail[i + p] for i in range(len(tail) - p)) for p in (1, 2))


def make_model_folder(folder: Path, name: str, tok, prompts: list[str]) -> None:
    import torch

    cfg_kwargs, seed = MODELS[name]
    eos_id = tok.token_to_id(EOS)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg_kwargs, seed, eos_id)
    # generation_config.json is not needed by llamas; keep the folder lean.
    model.save_pretrained(folder, safe_serialization=True)
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    tok.save(str(folder / "tokenizer.json"))

    encoded = [tok.encode(p).ids for p in prompts]
    input_ids = np.array(encoded, dtype=np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids)).logits.float().numpy()

    greedy, margins = [], []
    for ids in encoded:
        ref, margin = greedy_reference(model, ids)
        gen = hf_generate(model, ids)
        assert gen == ref, f"{name}: generate() {gen} != full-recompute greedy {ref}"
        greedy.append(ref)
        margins.append(margin)
    if min(margins) < MIN_MARGIN:
        raise SystemExit(f"{name}: greedy top-1/top-2 gap {min(margins):.2g} < {MIN_MARGIN}; change the seed")
    for g in greedy:
        if degenerate(g):
            raise SystemExit(f"{name}: degenerate greedy continuation {g}; change the seed or INIT_STD")

    first_eos = [g.index(eos_id) if eos_id in g else -1 for g in greedy]
    until_eos = greedy[0][:first_eos[0]] if first_eos[0] >= 0 else greedy[0]
    spread = logits.max(-1) - logits.min(-1)
    np.savez_compressed(folder / "expected.npz", input_ids=input_ids, logits=logits.astype(np.float32),
                        greedy_ids=np.array(greedy, dtype=np.int64))
    meta = {
        "prompt_text": prompts[0],
        "prompt_texts": prompts,
        "greedy_text": tok.decode(until_eos, skip_special_tokens=False),
        "greedy_texts_full": [tok.decode(g, skip_special_tokens=False) for g in greedy],
        "eos_token_id": eos_id,
        "first_eos_index": first_eos,
        "max_new_tokens": NEW_TOKENS,
        "seed": seed,
        "init_std": INIT_STD,
        "bias_noise": BIAS_NOISE,
        "greedy_min_margin": margins,
        "logit_abs_max": float(np.abs(logits).max()),
        "logit_spread_mean": float(spread.mean()),
        "made_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                      "tokenizers": __import__("tokenizers").__version__},
    }
    (folder / "expected.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{name}: logits |max| {meta['logit_abs_max']:.2f}, mean spread {meta['logit_spread_mean']:.2f}, "
          f"first EOS {first_eos}")
    for p, g in zip(prompts, greedy):
        print(f"  {p!r} -> {g}\n     {tok.decode(g)!r}")


def make_all(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    gt = out / "gpt2-tokenizer"
    gt.mkdir(exist_ok=True)
    for f in ("vocab.json", "merges.txt", "LICENSE"):
        shutil.copyfile(DATA / "gpt2-tokenizer" / f, gt / f)
    tok = train_tokenizer()
    prompts = pick_prompts(tok)
    print("prompts:", prompts, "eos id:", tok.token_to_id(EOS))
    for name in MODELS:
        make_model_folder(out / name, name, tok, prompts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    ap.add_argument("--check", action="store_true", help="rebuild in a temp folder and compare with --out")
    args = ap.parse_args()
    if not args.check:
        make_all(args.out)
        total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
        print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make_all(Path(tmp))
        bad = []
        for p in sorted(Path(tmp).rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(tmp)
            q = args.out / rel
            if p.suffix == ".npz":
                a, b = np.load(p), np.load(q) if q.exists() else None
                same = b is not None and all(np.array_equal(a[k], b[k]) for k in a.files)
            else:
                same = q.exists() and p.read_bytes() == q.read_bytes()
            if not same:
                bad.append(str(rel))
        print("differs:" if bad else "fixtures reproduce exactly", *bad)
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
