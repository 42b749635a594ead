"""Training-step benchmark: llamas against a PyTorch eager GPT-2 (the same model, loss and AdamW),
at the same thread count, each engine in its own process so peak RSS is its own.

    python bench/train_compare.py [--shapes 4x64,8x128] [--steps 3] [--threads 2] [--config 124M]

Prints tokens/s per engine and shape, the ratio, model FLOP utilisation (6 N + attention FLOPs
per token) against the measured GEMM peak (the best of torch.matmul and llamas.ops.matmul on
2048x2048x2048 float32 at this thread count), and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    "124M": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "small": dict(n_embd=256, n_layer=6, n_head=8, n_positions=256, vocab_size=4096),
}


def model_flops_per_token(cfg: dict, T: int) -> float:
    C, L, V, P = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["n_positions"]
    n_params = V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
    # 6 FLOPs per parameter per token (forward + backward), plus causal attention's QK^T and PV
    # (forward 2 x 2 x T/2 x C per layer on average, backward twice that).
    return 6 * (n_params - P * C) + 6 * L * T * C


def run_torch(cfg: dict, B: int, T: int, steps: int) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg["n_embd"]
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            Bs, Ts, C = x.shape
            H = cfg["n_head"]
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(Bs, Ts, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(Bs, Ts, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg["n_embd"]
            self.wte, self.wpe = nn.Embedding(cfg["vocab_size"], C), nn.Embedding(cfg["n_positions"], C)
            self.h = nn.ModuleList(Block() for _ in range(cfg["n_layer"]))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    torch.manual_seed(0)
    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times": times}


def run_llamas(cfg: dict, B: int, T: int, steps: int) -> dict:
    import numpy as np
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import llamas
    model = llamas.create(llamas.GPT2Config(**cfg), seed=0)
    trainer = llamas.Trainer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg["vocab_size"], (B, T))
    y = rng.integers(0, cfg["vocab_size"], (B, T))
    trainer.step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(x, y)
        times.append(time.perf_counter() - t0)
    return {"times": times}


def gemm_peak(threads: int) -> dict:
    """Best GFLOP/s of a 2048^3 float32 matmul over 12 tries, for torch and for llamas (this
    machine's speed drifts ±30% between seconds, so few tries under-read the peak)."""
    import numpy as np
    import torch
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import llamas
    torch.set_num_threads(threads)
    llamas.set_num_threads(threads)
    a, b = np.random.rand(2048, 2048).astype(np.float32), np.random.rand(2048, 2048).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    peaks = {}
    for name, fn in (("torch", lambda: ta @ tb), ("llamas", lambda: llamas.ops.matmul(a, b))):
        best = 0.0
        for _ in range(12):
            t0 = time.perf_counter()
            fn()
            best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9)
        peaks[name] = best
    return peaks


def child(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    cfg = CONFIGS[args.config]
    if args.engine == "torch":
        import torch
        torch.set_num_threads(args.threads)
        out = run_torch(cfg, args.B, args.T, args.steps)
    else:
        os.environ["LLAMAS_NUM_THREADS"] = str(args.threads)
        out = run_llamas(cfg, args.B, args.T, args.steps)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x64,8x128", help="comma-separated BxT (default 4x64,8x128)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per engine and shape (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default="124M", choices=list(CONFIGS))
    p.add_argument("--engine", choices=["torch", "llamas"], help=argparse.SUPPRESS)
    p.add_argument("--B", type=int, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:
        child(args)
        return
    cfg = CONFIGS[args.config]
    peaks = gemm_peak(args.threads)
    peak = max(peaks.values())
    print(f"GEMM peak (2048^3 float32, {args.threads} threads): torch {peaks['torch']:.1f}, llamas "
          f"{peaks['llamas']:.1f} GFLOP/s; MFU below is against the higher")
    print(f"\n| shape | engine | s/step (mean of {args.steps}) | tokens/s | vs PyTorch | MFU vs GEMM peak | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.lower().split("x"))
        results = {}
        for engine in ("torch", "llamas"):
            cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--B", str(B), "--T", str(T),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--config", args.config]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{engine} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[engine] = json.loads(line[0][7:])
        base = None
        for engine in ("torch", "llamas"):
            if engine not in results:
                continue
            r = results[engine]
            mean = sum(r["times"]) / len(r["times"])
            tok_s = B * T / mean
            base = base or (tok_s if engine == "torch" else None)
            ratio = f"{tok_s / base:.2f}x" if base else "-"
            mfu = model_flops_per_token(cfg, T) * tok_s / (peak * 1e9)
            name = "PyTorch eager" if engine == "torch" else "llamas"
            print(f"| {B}x{T} | {name} | {mean:.3f} | {tok_s:.1f} | {ratio} | {100 * mfu:.0f}% | {r['peak_rss_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
