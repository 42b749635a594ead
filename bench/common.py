"""Helpers shared by the benchmark scripts: safetensors I/O (the package's) and timing."""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Dict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from llamas import safetensors_io  # noqa: E402


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str] | None = None) -> None:
    safetensors_io.write_safetensors(path, tensors, metadata)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Memory-maps a safetensors file into numpy arrays (read-only views)."""
    return safetensors_io.read_safetensors(path)[0]


def timeit(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Runs fn warmup times, then returns the wall times (s) of `reps` further runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def md_table(headers, rows) -> str:
    """A markdown table from a header list and rows of already-formatted cells."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def file_size(path: str) -> int:
    return os.path.getsize(path)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
