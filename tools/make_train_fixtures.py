#!/usr/bin/env python
"""Builds the committed training fixtures in tests/fixtures/train-odd/ (needs torch, transformers, safetensors).

    python tools/make_train_fixtures.py            # writes tests/fixtures/train-odd/
    python tools/make_train_fixtures.py --check    # rebuilds in a temp folder and compares to the committed files

What it makes (all float32, computed with torch on the CPU, one thread):
  model/                     random GPT-2 (vocab 512, ctx 64, n_embd 72, 2 layers, 3 heads of 24, tied
                             lm_head, default init std 0.02, seed 1234): config.json + model.safetensors
  batches.npz                int32 `inputs`, `targets` of shape (10, 3, 17), independent uniform ids in
                             [0, 512) from a torch.Generator seeded 99 (inputs drawn first, then targets)
  grads0.safetensors         d loss / d parameter at the initial weights on batch 0, one tensor per
                             parameter under the names of model.safetensors (the tied wte gradient holds
                             the embedding + lm_head contributions); metadata "loss0" = the step-0 loss
  final_weights.safetensors  parameters after the 10 plain AdamW steps (same names)
  expected.json              hyper-parameters, losses, grad norms, schedule lrs, per-tensor checksums

Loss: logits = model(inputs[k]).logits (B, T, V); mean cross-entropy over all B*T tokens against
targets[k]. Each step: zero grads, loss, backward, clip_grad_norm_(1.0) (pre-clip norm recorded),
AdamW step (lr 3e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on p.dim() >= 2 else 0, foreach=False).
Three runs from the same initial weights: plain, gradient accumulation over micro-batches [2, 1]
(each micro loss scaled by its token share), and a warmup (3 steps) + cosine (to 10% at step 10) lr schedule.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = "train-odd"

SEED = 1234
BATCH_SEED = 99
MODEL_CONFIG = dict(vocab_size=512, n_positions=64, n_embd=72, n_layer=2, n_head=3, n_inner=None,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                    tie_word_embeddings=True, layer_norm_epsilon=1e-5, initializer_range=0.02,
                    # ids inside the 512-token vocab (the GPT-2 default 50256 is not); unused by the fixture
                    bos_token_id=0, eos_token_id=0)
STEPS, B, T = 10, 3, 17
MICRO_BATCHES = [2, 1]
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
WARMUP, DECAY_STEPS, LR_FLOOR = 3, 10, 3e-4
RTOL = 1e-6

README = f"""# train-odd: training fixtures

Made by `python tools/make_train_fixtures.py` (check with `python tools/make_train_fixtures.py --check`,
which rebuilds into a temp folder and compares with these files, numbers within {RTOL:g} relative).
torch float32 on the CPU, `torch.set_num_threads(1)`, `torch.manual_seed({SEED})` before building the model.

- `model/`: random-weight `transformers.GPT2LMHeadModel` (vocab 512, n_positions 64, n_embd 72,
  2 layers, 3 heads, gelu_new, tied lm_head, default init with initializer_range 0.02, eager attention,
  no dropout), saved with `save_pretrained(safe_serialization=True)`. `lm_head.weight` is not in
  model.safetensors: it is `transformer.wte.weight`.
- `batches.npz`: int32 `inputs`, `targets`, shape (10, 3, 17) = (steps, B, T), independent uniform ids in
  [0, 512) from `torch.Generator().manual_seed({BATCH_SEED})` (`torch.randint` for inputs, then for targets).
  Targets are NOT shifted inputs.
- Loss: `F.cross_entropy(model(inputs[k]).logits.reshape(-1, 512), targets[k].reshape(-1))`, the mean
  over all B*T = 51 tokens.
- `grads0.safetensors`: gradients of the step-0 loss (initial weights, batch 0), named like
  model.safetensors; the `transformer.wte.weight` gradient includes the lm_head contribution.
  Metadata `loss0` holds the loss as text.
- Optimiser: `torch.optim.AdamW(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)`, weight decay 0.1 for
  parameters with `dim() >= 2` (wte, wpe, all Conv1D weights) and 0 for the rest (biases, layernorms).
  Step k: zero grads, loss on batch k, backward, `clip_grad_norm_(params, 1.0)`, `optimizer.step()`.
  `adamw_losses[k]` is the loss before step k's update, `adamw_grad_norms[k]` the pre-clip total norm.
- `final_weights.safetensors`: the parameters after the 10 plain steps; `final_weights_checksum` in
  expected.json is the float64 sum of each of them.
- `accum_*`: the same 10 steps from the same initial weights with gradient accumulation over micro-batches
  of rows [0:2] and [2:3]; each micro-batch mean loss is scaled by b_i*T/(B*T) before its backward, the
  recorded loss is the sum of the scaled micro losses.
- `schedule_*`: the same 10 plain steps with lr(s) = peak*(s+1)/3 for s < 3, else
  floor + 0.5*(peak-floor)*(1+cos(pi*(s-3)/7)), peak 3e-3, floor 3e-4 (`schedule_lrs[s]` is the lr of step s).
"""


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR_FLOOR + 0.5 * (LR - LR_FLOOR) * (1 + math.cos(math.pi * (step - WARMUP) / (DECAY_STEPS - WARMUP)))


def load_model(folder: Path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype="float32").eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def loss_fn(model, inputs, targets):
    import torch.nn.functional as F

    logits = model(inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(model_dir: Path, inputs, targets, *, micro=None, schedule=False):
    """10 AdamW steps from the saved initial weights. Returns (losses, grad_norms, lrs, params)."""
    import torch

    model = load_model(model_dir)
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, foreach=False)
    losses, norms, lrs = [], [], []
    for k in range(STEPS):
        lr = lr_at(k) if schedule else LR
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        if micro is None:
            loss = loss_fn(model, inputs[k], targets[k])
            loss.backward()
            total = float(loss)
        else:
            total, start = 0.0, 0
            for b in micro:
                part = loss_fn(model, inputs[k, start:start + b], targets[k, start:start + b]) * (b * T / (B * T))
                part.backward()
                total += float(part)
                start += b
            assert start == B
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(total)
        norms.append(float(norm))
        lrs.append(lr)
    return losses, norms, lrs, {n: p.detach().clone() for n, p in params.items()}


def make_all(out: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"

    torch.manual_seed(SEED)
    config = GPT2Config(**MODEL_CONFIG, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(model_dir, safe_serialization=True)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        saved_names = sorted(f.keys())
    param_names = sorted(n for n, _ in model.named_parameters())
    assert saved_names == param_names, (saved_names, param_names)

    gen = torch.Generator().manual_seed(BATCH_SEED)
    inputs = torch.randint(0, MODEL_CONFIG["vocab_size"], (STEPS, B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, MODEL_CONFIG["vocab_size"], (STEPS, B, T), generator=gen, dtype=torch.int64)
    np.savez_compressed(out / "batches.npz", inputs=inputs.numpy().astype(np.int32),
                        targets=targets.numpy().astype(np.int32))

    # Step-0 gradients, from the model as reloaded from disk (what the engine will load).
    model = load_model(model_dir)
    loss0 = loss_fn(model, inputs[0], targets[0])
    loss0.backward()
    grads = {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()}
    loss0 = float(loss0.detach())
    save_file(grads, out / "grads0.safetensors", metadata={"format": "pt", "loss0": repr(loss0)})

    losses, norms, _, final = train(model_dir, inputs, targets)
    save_file({n: t.contiguous() for n, t in final.items()}, out / "final_weights.safetensors")
    acc_losses, acc_norms, _, acc_final = train(model_dir, inputs, targets, micro=MICRO_BATCHES)
    sch_losses, sch_norms, sch_lrs, sch_final = train(model_dir, inputs, targets, schedule=True)

    def checksum(ts):
        return {n: float(ts[n].double().sum()) for n in sorted(ts)}

    cfg = {k: v for k, v in MODEL_CONFIG.items()}
    expected = {
        "config": {
            "model": cfg, "attn_implementation": "eager", "seed": SEED, "batch_seed": BATCH_SEED,
            "steps": STEPS, "batch_size": B, "seq_len": T, "micro_batches": MICRO_BATCHES,
            "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
            "weight_decay_rule": "weight_decay for p.dim() >= 2, 0.0 otherwise", "clip_grad_norm": CLIP,
            "schedule": {"warmup_steps": WARMUP, "decay_steps": DECAY_STEPS, "peak_lr": LR, "floor_lr": LR_FLOOR,
                         "formula": "peak*(s+1)/warmup if s < warmup else "
                                    "floor + 0.5*(peak-floor)*(1+cos(pi*(s-warmup)/(decay_steps-warmup)))"},
            "loss": "mean cross-entropy over all B*T tokens of logits vs targets (targets not shifted)",
        },
        "param_names": param_names,
        "loss0": loss0,
        "adamw_losses": losses,
        "adamw_grad_norms": norms,
        "accum_losses": acc_losses,
        "accum_grad_norms": acc_norms,
        "schedule_lrs": sch_lrs,
        "schedule_losses": sch_losses,
        "schedule_grad_norms": sch_norms,
        "final_weights_checksum": checksum(final),
        "accum_final_weights_checksum": checksum(acc_final),
        "schedule_final_weights_checksum": checksum(sch_final),
        "made_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")

    print(f"loss0 {loss0:.6f}")
    print("adamw   ", " ".join(f"{x:.5f}" for x in losses))
    print("norms   ", " ".join(f"{x:.4f}" for x in norms))
    print("accum   ", " ".join(f"{x:.5f}" for x in acc_losses))
    print("schedule", " ".join(f"{x:.5f}" for x in sch_losses))
    print("max |accum - plain| loss", max(abs(a - b) for a, b in zip(acc_losses, losses)))


# ----------------------------------------------------------------------------------------------- check

def _close_numbers(a, b, path: str, bad: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            bad.append(f"{path}: keys differ")
            return
        for k in a:
            _close_numbers(a[k], b[k], f"{path}.{k}", bad)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            bad.append(f"{path}: lengths differ")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _close_numbers(x, y, f"{path}[{i}]", bad)
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if not math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12):
            bad.append(f"{path}: {a!r} vs {b!r}")
    elif a != b:
        bad.append(f"{path}: {a!r} vs {b!r}")


def _close_tensors(p: Path, q: Path, bad: list) -> None:
    """Each tensor within RTOL of the committed one, relative to the tensor's largest magnitude."""
    from safetensors.numpy import load_file

    a, b = load_file(p), load_file(q)
    if set(a) != set(b):
        bad.append(f"{p.name}: tensor names differ")
        return
    for n in a:
        if a[n].shape != b[n].shape or a[n].dtype != b[n].dtype:
            bad.append(f"{p.name}:{n}: shape/dtype differ")
            continue
        scale = float(np.abs(b[n]).max())
        err = float(np.abs(a[n].astype(np.float64) - b[n].astype(np.float64)).max())
        if err > RTOL * scale:
            bad.append(f"{p.name}:{n}: max diff {err:.3g} (scale {scale:.3g})")


def check(committed: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        make_all(Path(tmp))
        bad: list[str] = []
        new_files = {p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file()}
        old_files = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file()}
        bad += [f"{r}: missing in {committed}" for r in sorted(new_files - old_files)]
        bad += [f"{r}: not made by the script" for r in sorted(old_files - new_files)]
        for rel in sorted(new_files & old_files):
            p, q = Path(tmp) / rel, committed / rel
            if p.suffix == ".npz":
                a, b = np.load(p), np.load(q)
                if sorted(a.files) != sorted(b.files) or not all(
                        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a.files):
                    bad.append(str(rel))
            elif p.suffix == ".safetensors":
                _close_tensors(p, q, bad)
            elif p.suffix == ".json":
                ja, jb = json.loads(p.read_text()), json.loads(q.read_text())
                for j in (ja, jb):  # library versions may differ without the numbers changing
                    j.pop("made_with", None)
                    j.pop("transformers_version", None)
                _close_numbers(ja, jb, str(rel), bad)
            elif p.read_bytes() != q.read_bytes():
                bad.append(str(rel))
        print("differs:" if bad else f"fixtures reproduce (within {RTOL:g} relative)", *bad, sep="\n  ")
        return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / FIXTURE)
    ap.add_argument("--check", action="store_true", help="rebuild in a temp folder and compare with --out")
    args = ap.parse_args()
    if args.check:
        return check(args.out)
    make_all(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
