#!/usr/bin/env python
"""Builds tests/fixtures/torch-bin/ (needs torch and transformers): PyTorch checkpoints written by
torch.save itself, for the torch-free reader behind `llamas convert`.

    python tools/make_torch_fixtures.py

What it makes:
  gpt2-tiny.bin     the gpt2-tiny fixture's GPT2LMHeadModel state_dict() (zip format), with what older
                    transformers checkpoints also hold: each layer's causal-mask buffers
                    (attn.bias, attn.masked_bias) and lm_head.weight sharing wte's storage
  mixed.bin         small tensors of every dtype the reader maps (float32, float16, bfloat16, int64,
                    int32, uint8, bool), a transposed view, a slice at an offset, an empty tensor
  mixed-legacy.bin  the same, in the pre-1.6 (non-zip) format
  mixed.npz         their values as numpy arrays (bfloat16 as uint16 bit patterns)
  evil.bin          a zip checkpoint whose pickle names os.system (the reader must refuse it)
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "torch-bin"


def mixed_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    return {
        "f32": torch.randn(3, 7, generator=g),
        "f16": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "i64": torch.arange(-3, 8),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "slice": base[2:, 1:4],
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    model = GPT2LMHeadModel.from_pretrained(ROOT / "tests" / "fixtures" / "gpt2-tiny")
    sd = model.state_dict()  # an OrderedDict with a _metadata attribute, as real checkpoints pickle it
    n_pos = model.config.n_positions
    for i in range(model.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(
            1, 1, n_pos, n_pos)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # one storage, as a tied model saves it
    torch.save(sd, OUT / "gpt2-tiny.bin")

    mixed = mixed_tensors()
    torch.save(mixed, OUT / "mixed.bin")
    torch.save(mixed, OUT / "mixed-legacy.bin", _use_new_zipfile_serialization=False)
    np.savez(OUT / "mixed.npz", **{k: as_numpy(v) for k, v in mixed.items()})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with zipfile.ZipFile(OUT / "evil.bin", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        z.writestr("evil/version", "3\n")
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
