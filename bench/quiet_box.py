"""How busy the rest of the machine is: the CPU cores other processes use while a benchmark runs.

On this project's 2-core box another tenant's process, or a spinning thread pool left over from
the previous engine, steals a core from a multi-threaded measurement; the benchmarks report the
load they saw and wait for it to pass.
"""
from __future__ import annotations

import os
import time
from typing import Callable


def wait_for_quiet(max_wait_s: float, log: Callable[[str], None]) -> float:
    """Waits up to max_wait_s for other processes to use under 0.2 cores; returns the load seen last."""
    if max_wait_s <= 0:
        return 0.0
    deadline = time.perf_counter() + max_wait_s
    load = other_load_now(0.5)
    while load > 0.2 and time.perf_counter() < deadline:
        load = other_load_now(1.0)
    if load > 0.2:
        log(f"other processes still use {load:.1f} CPU cores after waiting {max_wait_s:.0f} s; measuring anyway")
    return load


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]               # minus idle and iowait; no guest
    with open("/proc/self/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return busy, int(parts[11]) + int(parts[12])                 # utime + stime


class OtherLoad:
    """CPU cores used by OTHER processes while a measurement ran (a busy box makes every
    multi-threaded number here unreliable, spin-waiting thread pools most)."""

    def __init__(self):
        try:
            self.hz = os.sysconf("SC_CLK_TCK")
            self.t0, (self.b0, self.o0) = time.perf_counter(), _cpu_ticks()
        except (OSError, ValueError, IndexError):
            self.hz = None

    def stop(self) -> float:
        if self.hz is None:
            return float("nan")
        b1, o1 = _cpu_ticks()
        dt = time.perf_counter() - self.t0
        return max(0.0, ((b1 - self.b0) - (o1 - self.o0)) / self.hz / max(dt, 1e-9))


def other_load_now(seconds: float = 1.0) -> float:
    m = OtherLoad()
    time.sleep(seconds)
    return m.stop()
