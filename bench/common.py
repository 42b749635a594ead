"""Helpers shared by the benchmark scripts: a tiny safetensors writer/reader and timing."""
from __future__ import annotations

import json
import os
import statistics
import struct
import time
from typing import Callable, Dict

import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
           np.dtype(np.int64): "I64"}
_NP = {v: k for k, v in _DTYPES.items()}


def write_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str] | None = None) -> None:
    """Writes `tensors` (name -> C-contiguous numpy array) as a safetensors file:
    8-byte little-endian header length, a JSON header padded with spaces to a multiple of 8,
    then the raw little-endian data in header order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    items = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _DTYPES:
            raise TypeError(f"{name}: unsupported dtype {arr.dtype}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        items.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in items:
            f.write(memoryview(arr.reshape(-1)).cast("B"))


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Memory-maps a safetensors file (F32/F16/I32/I64 only) into numpy arrays (read-only views)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = _NP[info["dtype"]]
        out[name] = mm[a:b].view(dt).reshape(info["shape"])
    return out


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
