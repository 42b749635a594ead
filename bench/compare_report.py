"""The markdown report bench/compare.py prints: machine limits, the GEMM table, the GPT-2 table and
the targets, from the measurements it collected (a types.SimpleNamespace, see compare.main)."""
from __future__ import annotations

import os
import time
from statistics import median

import numpy as np
import torch

from common import md_table
from quiet_box import other_load_now


def mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_report(ctx) -> None:
    print(f"## llamas benchmark ({'quick' if ctx.quick else 'full'} run, {ctx.threads} threads)\n")
    print(f"CPU: {ctx.info['cpu']} ({', '.join(ctx.info['cpu_features'])}), llamas kernel variant "
          f"{ctx.info['kernel_variant']}, torch {torch.__version__}, numpy {np.__version__}. "
          f"Model: {'random-weight GPT-2 124M' if ctx.random_model else ctx.path}; prompt {ctx.prompt_len} random "
          f"token ids, {ctx.decode_tokens} greedy decode steps after it, and {ctx.decode_tokens} after a 1-token prompt.\n")

    print("### a. Machine limits\n")
    print(md_table(["quantity", "value"], [
        ["memory read bandwidth, numpy add.reduce over 1 GiB f32 (1 thread)", f"{ctx.limits['bw_numpy']:.1f} GB/s"],
        [f"memory read bandwidth, torch sum over 1 GiB f32 ({ctx.threads} threads)", f"{ctx.limits['bw_torch']:.1f} GB/s"],
        ["bandwidth used for bounds: the best of those and of "
         f"{ctx.limits.get('bw_samples', 0)} two-sum samples taken between decode rounds", f"{ctx.limits['bw']:.1f} GB/s"],
        ["numpy sgemm 2048x2048x2048", f"{ctx.limits['sgemm_square']:.1f} GFLOP/s"],
        ["peak sgemm (best numpy seen)", f"{ctx.peak_gemm:.1f} GFLOP/s"],
        ["CPU cores used by other processes meanwhile", f"{ctx.limits['other_load']:.2f}"],
    ]))
    print()

    print("### b. GEMM (float32, C = A @ B, MxKxN)\n")
    rows = []
    gemm_ok = True
    for (m, k, n), g_l, g_p, g_n, err, _ in ctx.gemm:
        ratio = g_l / g_n if g_n == g_n and g_n > 0 else float("nan")
        ratio_p = g_p / g_n if g_n == g_n and g_n > 0 else float("nan")
        gemm_ok &= ratio >= 1.0
        rows.append([f"{m}x{k}x{n}", f"{g_l:.1f}", f"{g_p:.1f}", f"{g_n:.1f}", f"{ratio:.2f}x", f"{ratio_p:.2f}x",
                     f"{err:.1e}"])
    print(md_table(["shape", "llamas matmul GFLOP/s", "llamas prepacked B", "numpy GFLOP/s", "ratio",
                    "prepacked ratio", "rel err"], rows))
    print(f"\nMedian of {ctx.gemm_rounds} rounds x {ctx.gemm_reps} reps per engine, each engine's block after a 0.3 s pause "
          f"(OpenBLAS workers spin ~0.1 s after a call) and a warm-up call (fewer reps for the 50257 shape); "
          f"other processes used {ctx.gemm_load:.2f} CPU cores meanwhile.\n")

    print("### c. GPT-2 124M (batch 1)\n")
    eager = ctx.model_rows.get(("PyTorch eager", "float32"))
    nan = float("nan")
    rows = []
    for (eng, dt), r in ctx.model_rows.items():
        rp = r["prefill"] / eager["prefill"] if eager else nan
        rd = r["decode"] / eager["decode"] if eager else nan
        short = r.get("decode_short", nan)
        rs = short / eager.get("decode_short", nan) if eager else nan
        rows.append([eng, dt, f"{r['prefill']:.1f}", f"{short:.2f}", f"{rs:.2f}x",
                     f"{100 * r.get('bound_frac_short', nan):.0f}%", f"{r['decode']:.2f}", f"{r['decode_mean']:.2f}",
                     f"{rp:.2f}x", f"{rd:.2f}x", f"{100 * r.get('bound_frac', nan):.0f}%", f"{r['other_load']:.2f}"])
    long_ctx = f"513-{ctx.prompt_len + ctx.decode_tokens}"
    short_ctx = f"2-{1 + ctx.decode_tokens}"
    print(md_table(["engine", "dtype", "prefill-512 tok/s", f"decode tok/s, context {short_ctx}", "vs eager",
                    "% of bound", f"decode tok/s, context {long_ctx}", "(mean)", "prefill vs eager",
                    "decode vs eager", "% of bound", "other CPU load"], rows))
    print("\nprefill: best of the timed 512-token prompts; decode tok/s: 1 / median single-step time over "
          f"{ctx.decode_tokens} steps after a 1-token prompt (context {short_ctx}, as llama-bench's tg128 decodes "
          f"from an empty cache) and after the 512-token prompt (context {long_ctx}); \"mean\": steps / "
          "total decode time (transformers: (t(generate N) - t(generate 1)) based). \"other CPU load\": cores "
          "used by other processes during that row's measurements.")
    print("\n\"eager\" is the plain PyTorch GPT-2 (torch.cat KV cache, SDPA, F.linear lm_head); \"tuned\" adds a "
          "preallocated KV cache, matmul attention for decode and a pre-transposed lm_head (same logits). "
          "transformers: GPT2LMHeadModel.generate(do_sample=False, min_new_tokens=N), decode steps timed by a "
          "LogitsProcessor; its prefill is one forward pass with logits_to_keep=1.")
    bpt = ctx.extra["bpt"]
    print("\n% of bound: each decode run's tokens/s x weight bytes per token, over the better of two "
          "two-thread torch sums over 1 GiB taken right before and right after that run (this box's memory "
          "switches between a slow and a fast mode within seconds), the median over runs.")
    print("\nBandwidth bound at the best rate seen in the run: weight bytes per decoded token "
          + ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in bpt.items()) + " (llamas reports weight_bytes "
          + ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in ctx.extra["llamas_weight_bytes"].items())
          + f"); at {ctx.limits['bw']:.1f} GB/s: "
          + ", ".join(f"{d} {ctx.limits['bw'] * 1e9 / b:.1f} tok/s" for d, b in bpt.items()) + ". (KV-cache reads, ~"
          f"{2 * ctx.extra['cfg']['n_layer'] * (ctx.prompt_len + ctx.decode_tokens / 2) * ctx.extra['cfg']['n_embd'] * 4 / 1e6:.0f} MB/token "
          "at fp32 on average here, are not counted.)\n")

    print("### Targets\n")
    l32 = ctx.model_rows.get(("llamas", "float32"))
    l16 = ctx.model_rows.get(("llamas", "bfloat16"))
    t_rows = []
    worst_gemm = min((g_l / g_n for _, g_l, _, g_n, _, _ in ctx.gemm if g_n > 0), default=nan)
    t_rows.append(["GEMM >= 1.0x numpy (every shape)", f"worst {worst_gemm:.2f}x", mark(gemm_ok)])
    worst_p = min((g_p / g_n for _, _, g_p, g_n, _, _ in ctx.gemm if g_n > 0), default=nan)
    t_rows.append(["(info) prepacked-B GEMM >= 1.0x numpy", f"worst {worst_p:.2f}x", mark(worst_p >= 1.0)])
    l16c = ctx.model_rows.get(("llamas", "bfloat16, bf16 compute"))
    l8 = ctx.model_rows.get(("llamas", "int8"))
    l8c = ctx.model_rows.get(("llamas", "int8, int8 compute"))
    eager16 = ctx.model_rows.get(("PyTorch eager", "bfloat16"))
    tuned = ctx.model_rows.get(("PyTorch eager, tuned", "float32"))

    def at_least(label, ours, base, key, need=1.2):
        """A target row `ours[key] >= need x base[key]`, when both were measured."""
        if ours and base:
            x = ours[key] / base[key]
            t_rows.append([label, f"{x:.2f}x", mark(x >= need)])

    at_least(f"fp32 decode >= 1.2x PyTorch eager (context {long_ctx})", l32, eager, "decode")
    at_least(f"fp32 decode >= 1.2x PyTorch eager (context {short_ctx})", l32, eager, "decode_short")
    if l32:
        # The bound counts weight bytes only: at context 2-129 the KV cache adds ~1% to a token's
        # reads (float32 124M: 74 KB a position), at 513-640 ~9% more (~42 MB).
        x = l32["bound_frac_short"]
        t_rows.append([f"fp32 decode >= 90% of bandwidth bound (context {short_ctx}: the bound's weights-only reads)",
                       f"{100 * x:.0f}%", mark(x >= 0.9)])
        x = l32["bound_frac"]
        t_rows.append([f"fp32 decode >= 90% of bandwidth bound (context {long_ctx}: + KV reads the bound leaves out)",
                       f"{100 * x:.0f}%", mark(x >= 0.9)])
        x = l32["decode_short"] / l32["bound"]
        t_rows.append([f"(info) the same at context {short_ctx}, against the best rate seen in the whole run",
                       f"{100 * x:.0f}%", mark(x >= 0.9)])
    pairs = l32.get("prefill_pairs") if l32 else None   # (compare.py measures them with the float32 row)
    if pairs and pairs["llamas"] and pairs["eager"]:
        # Judged on prefills alternated one by one (the sections above run minutes apart on a box
        # that drifts +-20%), medians as the numbers are; best-of beside it.
        x = median(pairs["eager"]) / median(pairs["llamas"])
        best = min(pairs["eager"]) / min(pairs["llamas"])
        each = ", ".join(f"{e / l_:.2f}x" for l_, e in zip(pairs["llamas"], pairs["eager"]))
        t_rows.append([f"fp32 prefill >= 1.2x PyTorch eager ({len(pairs['llamas'])} prefills each, alternated: "
                       "median)", f"{x:.2f}x (best-of {best:.2f}x; pair by pair: {each})", mark(x >= 1.2)])
        at_least("(info) the same from the sections' best-of prefills above", l32, eager, "prefill")
    if l16 and l32:
        x = l16["decode"] / l32["decode"]
        each = [a / b for a, b in zip(l32["round_steps"], l16["round_steps"])]
        rounds = f" (round by round: {', '.join(f'{r:.2f}x' for r in each)})" if len(each) > 1 else ""
        t_rows.append([f"bf16 decode >= 1.8x llamas fp32 decode (context {long_ctx})", f"{x:.2f}x{rounds}",
                       mark(x >= 1.8)])
        if "alternated_ratio" in l16:
            x = l16["alternated_ratio"]
            t_rows.append([f"(info) the same with their steps alternated one by one (context {long_ctx})",
                           f"{x:.2f}x", mark(x >= 1.8)])
        x = l16["decode_short"] / l32["decode_short"]
        t_rows.append([f"(info) bf16 decode >= 1.8x llamas fp32 decode (context {short_ctx})", f"{x:.2f}x",
                       mark(x >= 1.8)])
    at_least("bf16 prefill >= 1.2x PyTorch eager", l16, eager, "prefill")
    at_least("bf16-compute prefill >= 1.2x PyTorch eager", l16c, eager, "prefill")
    at_least("(info) bf16-compute prefill >= 1.2x PyTorch eager bfloat16", l16c, eager16, "prefill")
    at_least("(info) bf16-compute decode >= 1.2x PyTorch eager bfloat16", l16c, eager16, "decode")
    at_least("(info) int8 decode >= 1.5x llamas bf16 decode", l8, l16, "decode", need=1.5)
    at_least("(info) int8-compute prefill >= 1.2x llamas bf16-compute prefill", l8c, l16c, "prefill")
    # The same targets against the stronger eager baseline, for information.
    at_least("(info) fp32 decode >= 1.2x tuned PyTorch eager", l32, tuned, "decode")
    at_least("(info) fp32 prefill >= 1.2x tuned PyTorch eager", l32, tuned, "prefill")
    print(md_table(["target", "measured", "status"], t_rows))
    print()

    print("### Checks and notes\n")
    for n_ in ctx.notes:
        print(f"- {n_}")
    busy_after = other_load_now()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    print(f"\n(total wall time {time.perf_counter() - ctx.t_start:.0f} s; CPU cores used by other processes: "
          f"{ctx.busy_before:.1f} at start, {busy_after:.1f} at end; load average {' '.join(load)})")

