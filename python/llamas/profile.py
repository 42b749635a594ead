"""Per-op profiling: time and call count per op kind, like torch.profiler's table."""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import _C


class Profile:
    def __init__(self) -> None:
        self.entries: list[tuple[str, int, float]] = []

    def table(self) -> str:
        total = sum(e[2] for e in self.entries) or 1e-12
        lines = [f"{'op':<22}{'calls':>8}{'total ms':>12}{'mean us':>12}{'share':>8}"]
        for name, calls, seconds in sorted(self.entries, key=lambda e: -e[2]):
            lines.append(f"{name:<22}{calls:>8}{seconds * 1e3:>12.2f}{seconds / calls * 1e6:>12.1f}"
                         f"{seconds / total:>8.1%}")
        return "\n".join(lines)


@contextlib.contextmanager
def profile() -> Iterator[Profile]:
    """Collects per-op time while the block runs:

        with llamas.profile() as prof:
            model.generate("Hello", max_new_tokens=16)
        print(prof.table())
    """
    result = Profile()
    _C.profiler_reset()
    _C.profiler_enable(True)
    try:
        yield result
    finally:
        _C.profiler_enable(False)
        result.entries = [tuple(e) for e in _C.profiler_entries()]
