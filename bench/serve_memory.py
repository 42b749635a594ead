"""Where the server's memory goes under load: RSS, Python objects, the C++ allocator, glibc's heap.

    python bench/serve_memory.py --checkpoints 100,500,1000,1500,2000,4000 [--model DIR] [--trace]

Runs the OpenAI-compatible server in this process (uvicorn in a thread) with N streaming clients
(bench/sse_client.py) and, at each checkpoint (requests finished), prints the process's RSS, the
number of Python objects (and which types changed since the last checkpoint), the caching
allocator's bytes reserved, cached and peak in use (`llamas.memory_stats()`), and glibc's heap
(`mallinfo2`: arenas and mmapped blocks). `--trace` adds tracemalloc and the largest Python
allocation growths between checkpoints (slow). A leak grows at every checkpoint; a cache grows,
then stays flat.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import os
import sys
import threading
import time
import tracemalloc

from sse_client import StreamClient

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # the installed package, or else this checkout's python/ folder (with a built extension)
    import llamas
except ImportError:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    import llamas
from serve_load import PROMPTS, free_port  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]


def glibc_heap_mib():
    """(arena bytes, mmapped-block bytes) in MiB, or None off glibc."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return m.arena / 2**20, m.hblkhd / 2**20


async def run_requests(url: str, clients: int, count: int, max_tokens: int, offset: int) -> None:
    done = 0

    async def client(i: int) -> None:
        nonlocal done
        c = StreamClient(url)
        try:
            k = 0
            while done < count:
                body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                        "seed": offset + i * 100003 + k, "stream": True, "stream_options": {"include_usage": True}}
                await c.complete(body)
                done += 1
                k += 1
        finally:
            c.close()
    await asyncio.gather(*(client(i) for i in range(clients)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", default="100,500,1000,1500,2000",
                    help="requests finished at which to report (default 100,500,1000,1500,2000)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    ap.add_argument("--trace", action="store_true", help="tracemalloc: the largest Python allocation growths")
    args = ap.parse_args()
    checkpoints = sorted(int(x) for x in args.checkpoints.split(","))

    import uvicorn
    from llamas.server import create_app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(llamas.load(args.model), max_batch=16), host="127.0.0.1",
                                           port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    if args.trace:
        tracemalloc.start(10)
    done, last_types, last_snapshot = 0, None, None
    try:
        for cp in checkpoints:
            asyncio.run(run_requests(url, args.clients, cp - done, args.max_tokens, done))
            done = cp
            time.sleep(0.5)  # the server thread finishes closing the last responses
            gc.collect()
            types = collections.Counter(type(o).__name__ for o in gc.get_objects())
            st = llamas.memory_stats()
            heap = glibc_heap_mib()
            line = (f"{done} requests: RSS {rss_mib():.1f} MiB, {sum(types.values())} Python objects, allocator "
                    f"reserved {st['bytes_reserved'] / 2**20:.2f} MiB (cached {st['bytes_cached'] / 2**20:.2f}, "
                    f"peak in use {st['peak_bytes_in_use'] / 2**20:.2f})")
            if heap is not None:
                line += f", glibc arenas {heap[0]:.1f} MiB + mmapped {heap[1]:.1f} MiB"
            print(line, flush=True)
            if last_types is not None:
                changed = sorted(((k, types.get(k, 0) - last_types.get(k, 0)) for k in types | last_types
                                  if types.get(k, 0) != last_types.get(k, 0)), key=lambda kv: -abs(kv[1]))
                types_line = ", ".join(f"{k} {v:+d}" for k, v in changed[:8]) or "none"
                print(f"    object types changed: {types_line}")
            last_types = types
            if args.trace:
                snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                if last_snapshot is not None:
                    for stat in snapshot.compare_to(last_snapshot, "lineno")[:5]:
                        print(f"    {stat}")
                last_snapshot = snapshot
    finally:
        server.should_exit = True
        thread.join(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
