"""Per-op profiling: time and call count per op kind and per layer type, like torch.profiler's
tables (op kinds such as `gemm` or `attention`; layer types such as `attn.qkv`, `mlp.fc` or
`lm_head`, the model regions an op ran in)."""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Tuple

from . import _C

OTHER = "(outside the model)"


def _rows(entries, key) -> List[Tuple[str, int, float]]:
    agg: Dict[str, List] = {}
    for op, region, calls, seconds in entries:
        row = agg.setdefault(key(op, region), [0, 0.0])
        row[0] += calls
        row[1] += seconds
    return sorted(((name, c, s) for name, (c, s) in agg.items()), key=lambda r: -r[2])


class Profile:
    """What `llamas.profile()` collected: `entries` as (op kind, layer type, calls, seconds)."""

    def __init__(self) -> None:
        self.entries: List[Tuple[str, str, int, float]] = []

    def by_op(self) -> List[Tuple[str, int, float]]:
        """(op kind, calls, seconds), slowest first."""
        return _rows(self.entries, lambda op, region: op)

    def by_layer(self) -> List[Tuple[str, int, float]]:
        """(layer type, op calls in it, seconds), slowest first; ops run outside a model's layers
        (e.g. `llamas.ops.matmul`) count under "(outside the model)"."""
        return _rows(self.entries, lambda op, region: region or OTHER)

    def table(self) -> str:
        """Two tables: per op kind (calls, total, mean, share), then per layer type."""
        total = sum(e[3] for e in self.entries) or 1e-12
        lines = [f"{'op':<22}{'calls':>8}{'total ms':>12}{'mean us':>12}{'share':>8}"]
        for name, calls, seconds in self.by_op():
            lines.append(f"{name:<22}{calls:>8}{seconds * 1e3:>12.2f}{seconds / calls * 1e6:>12.1f}"
                         f"{seconds / total:>8.1%}")
        lines.append("")
        lines.append(f"{'layer type':<22}{'op calls':>8}{'total ms':>12}{'mean us':>12}{'share':>8}  ops")
        ops_in: Dict[str, set] = {}
        for op, region, _calls, _seconds in self.entries:
            ops_in.setdefault(region or OTHER, set()).add(op)
        for name, calls, seconds in self.by_layer():
            lines.append(f"{name:<22}{calls:>8}{seconds * 1e3:>12.2f}{seconds / calls * 1e6:>12.1f}"
                         f"{seconds / total:>8.1%}  {', '.join(sorted(ops_in[name]))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


_lock = threading.Lock()
_depth = 0  # profile() blocks open now (nested, or in several threads): on while any is


def _snapshot() -> Dict[Tuple[str, str], Tuple[int, float]]:
    return {(op, region): (calls, seconds) for op, region, calls, seconds in _C.profiler_entries()}


@contextlib.contextmanager
def profile(enabled: bool = True) -> Iterator[Profile]:
    """Collects per-op time while the block runs:

        with llamas.profile() as prof:
            model.generate("Hello", max_new_tokens=16)
        print(prof.table())          # per op kind, then per layer type (attn.qkv, mlp.fc, ...)

    Off (outside the block) it costs one relaxed atomic load per op and per layer region.
    `enabled=False` (as torch.profiler's) collects nothing and yields an empty Profile, so a caller
    can profile on a flag without a second code path. The counts are the process's: ops that other
    threads run meanwhile are in them too. Blocks nest (and overlap across threads): each gets what
    ran while it was open (an inner block used to wipe the outer one's counts and stop it).
    """
    global _depth
    result = Profile()
    if not enabled:
        yield result
        return
    with _lock:
        if _depth == 0:
            _C.profiler_reset()
            _C.profiler_enable(True)
        _depth += 1
        before = _snapshot()
    try:
        yield result
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _C.profiler_enable(False)
            after = _snapshot()
        for key, (calls, seconds) in after.items():
            calls0, seconds0 = before.get(key, (0, 0.0))
            if calls > calls0:
                result.entries.append((key[0], key[1], calls - calls0, seconds - seconds0))
