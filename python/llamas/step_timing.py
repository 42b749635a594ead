"""The engine thread's step counters (Scheduler.timing), exported on /metrics."""
from __future__ import annotations

from typing import Optional


class StepTiming:
    """Where a busy engine thread's time goes: in batched forwards (`forward_seconds`, the native
    step with the GIL released, and getting the GIL back after it) or between them
    (`host_seconds`: scheduling, detokenising, stop strings and handing chunks out in Python,
    counted only while requests keep the engine busy). `gil_wait_seconds`, part of the forward
    time, is the wait for the GIL once the native step is done: another thread (a server's event
    loop) held it. A host share that grows with the batch points at Python, not the kernels.
    `rows`: sequences fed over all `steps` (mean batch size = rows / steps). `draft_tokens` and
    `accepted_tokens`: speculative drafts fed and accepted (their ratio is the acceptance rate)."""
    __slots__ = ("steps", "rows", "forward_seconds", "gil_wait_seconds", "host_seconds", "last_end", "draft_tokens",
                 "accepted_tokens")

    def __init__(self):
        self.steps = 0
        self.rows = 0
        self.forward_seconds = 0.0
        self.gil_wait_seconds = 0.0  # of forward_seconds: waiting for the GIL after the native step
        self.host_seconds = 0.0
        self.last_end: Optional[float] = None  # end of the last forward while busy (None: idle since)
        self.draft_tokens = 0
        self.accepted_tokens = 0
