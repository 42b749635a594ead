"""The machine-limits and GEMM sections of bench/compare.py: read bandwidth, numpy's sgemm, and
llamas' GEMM (per-call packing and prepacked B) against numpy's at GPT-2's shapes."""
from __future__ import annotations

import gc
import time
from typing import Callable

import numpy as np
import torch

import llamas
from common import median, rel_err, timeit


# ================================================================================================
# a. machine limits
# ================================================================================================
def read_rate(reduce: Callable[[], object], nbytes: int) -> float:
    """GB/s of one call of reduce(), which reads nbytes."""
    t0 = time.perf_counter()
    reduce()
    return nbytes / (time.perf_counter() - t0) / 1e9


def machine_limits(quick: bool, log: Callable[[str], None]) -> dict:
    """Read bandwidth (numpy one thread, torch all threads) and a square sgemm's GFLOP/s."""
    log("machine limits")
    n = (1 << 30) // 4                     # 1 GiB of float32
    reps = 3 if quick else 6
    buf = np.ones(n, dtype=np.float32)     # touched, so no page faults in the timing
    np_rates, th_rates = [], []
    tbuf = torch.from_numpy(buf)
    for _ in range(reps):                  # interleave to share the noise
        np_rates.append(read_rate(buf.sum, buf.nbytes))  # (numpy: np.add.reduce, one thread)
        th_rates.append(read_rate(tbuf.sum, buf.nbytes))
    bw_np, bw_th = max(np_rates), max(th_rates)
    del tbuf, buf
    gc.collect()

    # peak sgemm: a square 2048^3 numpy GEMM
    s = 2048
    a = np.random.default_rng(1).standard_normal((s, s), dtype=np.float32)
    b = np.random.default_rng(2).standard_normal((s, s), dtype=np.float32)
    best = min(timeit(lambda: a @ b, 2 if quick else 4))
    sq = 2 * s ** 3 / best / 1e9
    return {"bw_numpy": bw_np, "bw_torch": bw_th, "bw": max(bw_np, bw_th), "sgemm_square": sq}


# ================================================================================================
# b. GEMM
# ================================================================================================
def gemm_table(shapes: list, reps_per_round: int, rounds: int, settle: Callable[..., None],
               note: Callable[[str], None], log: Callable[[str], None]) -> list:
    """Rows ((m, k, n), llamas matmul GFLOP/s, llamas prepacked-B GFLOP/s, numpy GFLOP/s, rel err,
    numpy's best GFLOP/s) at each shape; settle(quick=...) runs between engine blocks."""
    log("GEMM")
    rows = []
    rng = np.random.default_rng(0)
    for (m, k, n) in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ref = a @ b
        try:
            out = llamas.ops.matmul(a, b)
            err = rel_err(out, ref)
            if out.shape != ref.shape or not err < 1e-4:
                note(f"GEMM {m}x{k}x{n}: llamas result differs from numpy (shape {out.shape}, rel err {err:.2e})")
        except Exception as e:  # noqa: BLE001
            note(f"GEMM {m}x{k}x{n}: llamas.ops.matmul raised {type(e).__name__}: {e}")
            rows.append(((m, k, n), float("nan"), float("nan"), float("nan"), float("nan"), float("nan")))
            continue
        packed = llamas.ops.pack(b)
        if not np.array_equal(llamas.ops.linear(a, packed), out):
            note(f"GEMM {m}x{k}x{n}: prepacked result differs from llamas.ops.matmul")
        flops = 2.0 * m * k * n
        big = flops > 5e9
        reps = max(2, reps_per_round // 2) if big else reps_per_round
        inner = 1 if flops > 1e8 else max(1, int(1e8 / flops))     # tiny shapes: loop inside the timer
        f_l = lambda: [llamas.ops.matmul(a, b) for _ in range(inner)]
        f_p = lambda: [llamas.ops.linear(a, packed) for _ in range(inner)]
        f_n = lambda: [a @ b for _ in range(inner)]
        tl, tp, tn = [], [], []
        # Each engine runs a block of reps after settle(): OpenBLAS's workers spin for ~0.1 s
        # after a call, so a llamas call right after a numpy one ran on one core (interleaving
        # call by call measured llamas at 0.55-0.6x where blocks give 0.85-0.9x). Rounds
        # alternate the engines so that drift hits all of them.
        for _ in range(rounds):
            for f, times in ((f_n, tn), (f_l, tl), (f_p, tp)):
                settle(quick=True)
                # after a warm-up call: the pool wakes, B is touched
                times.extend(t / inner for t in timeit(f, reps))
        g_l, g_p, g_n = (flops / median(t) / 1e9 for t in (tl, tp, tn))
        rows.append(((m, k, n), g_l, g_p, g_n, err, flops / min(tn) / 1e9))
        settle()
    return rows
