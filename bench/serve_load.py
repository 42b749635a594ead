"""Load test for `llamas serve`: N concurrent streaming clients for S seconds.

    python bench/serve_load.py --clients 1,16 --duration 8 --rounds 5 [--model DIR]

Starts a server on a free 127.0.0.1 port (unless --url is given), runs each client count in turn
against it, and prints requests/s, output tokens/s, time to first token and time per output token
(p50, p99), errors, and the server's RSS before and after. With several client counts it also
prints each count's output tokens/s relative to the first; --rounds repeats the counts in turn
(1, 16, 1, 16, ...) and prints each round's ratio, since this box drifts over minutes. Traffic
goes to the given or started local server only, and every loop is bounded by --duration. The
clients are bench/sse_client.py's (a plain http:// asyncio client that checks every streamed
event), not httpx, and run on uvloop: on this 2-core machine the load generator's CPU per token
is taken from the server (16 clients: 57-61 us per token on asyncio's loop, 48-50 on uvloop; 2-4%
more output tokens/s). Against a llamas server it also prints the engine thread's account of a
step from /metrics: sequences per step, forward time (of which waiting for the GIL) and host time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx

from common import median
from sse_client import StreamClient, StreamError

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # the installed package, or else this checkout's python/ folder (with a built extension)
    import llamas  # noqa: F401
    _SOURCE_TREE = None
except ImportError:
    _SOURCE_TREE = os.path.join(HERE, "..", "python")
    sys.path.insert(0, _SOURCE_TREE)
    import llamas  # noqa: F401
from llamas.dtypes import COMPUTE_DTYPES, KV_DTYPES, WEIGHT_DTYPES  # noqa: E402
from llamas.speculative import MAX_DRAFT_TOKENS  # noqa: E402
REQUEST_TIMEOUT_S = 120   # a stalled server shows as an error, not a hung benchmark
PROMPTS = ["When shall we three meet again", "Now is the winter of our discontent", "Friends, Romans, countrymen",
           "To be, or not to be, that is the question", "O Romeo, Romeo, wherefore art thou", "Alas, poor Yorick"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int | None, field: str = "VmRSS") -> float | None:
    """A process's resident memory from /proc/PID/status: VmRSS (all), RssAnon (its own memory: a
    leak shows here) or RssFile (mapped files: the checkpoint's pages still mapped)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client: StreamClient, body: dict, stats: dict) -> None:
    """One streaming request; every event is checked (sse_client.check_event)."""
    t0 = time.perf_counter()
    try:
        res = await asyncio.wait_for(client.complete(body), REQUEST_TIMEOUT_S)
    except (StreamError, OSError, asyncio.TimeoutError) as e:
        stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
        return
    stats["requests"] += 1
    stats["tokens"] += res.tokens
    stats["ttft"].append(res.first - t0)
    if res.tokens > 1:
        stats["tpot"].append((res.last - res.first) / (res.tokens - 1))


async def run_clients(url: str, clients: int, duration: float, max_tokens: int, api_key: str | None,
                      prefix: str = "", temperature: float = 0.8) -> dict:
    stats = {"requests": 0, "tokens": 0, "ttft": [], "tpot": [], "errors": []}
    deadline = time.perf_counter() + duration

    async def client(i: int):
        c = StreamClient(url, api_key)  # one keep-alive connection per client
        try:
            k = 0
            while time.perf_counter() < deadline:
                # Plain sampling from the whole vocabulary, whatever the model's generation_config
                # says (the server would take its top-k and penalty for fields left out).
                body = {"prompt": prefix + PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": temperature, "top_k": 0, "repetition_penalty": 1.0, "seed": i * 100003 + k,
                        "stream": True, "stream_options": {"include_usage": True}}
                await one_request(c, body, stats)
                k += 1
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    stats["elapsed"] = time.perf_counter() - t0
    return stats


def merge_stats(a: dict, b: dict) -> dict:
    """One client count's results over two rounds: counts and times add up, samples pool."""
    out = dict(b)  # rss: the latest
    for key in ("requests", "tokens", "elapsed", "client_cpu", "ttft", "tpot", "errors"):
        out[key] = a[key] + b[key]
    out["engine"] = None if a["engine"] is None or b["engine"] is None else \
        {k: a["engine"][k] + b["engine"][k] for k in a["engine"]}
    out["server_cpu"] = None if a["server_cpu"] is None or b["server_cpu"] is None else a["server_cpu"] + b["server_cpu"]
    return out


def run_loop(coro):
    """Runs the clients on uvloop when installed (the server's own dependency; LLAMAS_LOAD_LOOP=asyncio
    for the standard loop): the load generator's CPU per token is taken from the server here."""
    if os.environ.get("LLAMAS_LOAD_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


ENGINE_COUNTERS = ("llamas_engine_steps_total", "llamas_engine_step_sequences_total",
                   "llamas_engine_forward_seconds_total", "llamas_engine_gil_wait_seconds_total",
                   "llamas_engine_host_seconds_total")


def engine_counters(url: str, api_key: str | None) -> dict | None:
    """The server's engine step counters from /metrics (None if it has none: another server)."""
    try:
        r = httpx.get(url + "/metrics", timeout=10, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    except httpx.TransportError:
        return None
    found = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name in ENGINE_COUNTERS:
            found[name] = float(value)
    return found if len(found) == len(ENGINE_COUNTERS) else None


def engine_split(before: dict | None, after: dict | None) -> dict | None:
    """Steps, sequences per step and forward / host milliseconds per step between two scrapes."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    steps = d["llamas_engine_steps_total"]
    return None if steps <= 0 else {"steps": steps, "rows": d["llamas_engine_step_sequences_total"],
                                    "forward": d["llamas_engine_forward_seconds_total"],
                                    "gil": d["llamas_engine_gil_wait_seconds_total"],
                                    "host": d["llamas_engine_host_seconds_total"]}


def per_token(cpu_s: float | None, tokens: int) -> str:
    return "n/a" if cpu_s is None or not tokens else f"{cpu_s / tokens * 1e6:.0f}"


def start_server(args) -> tuple:
    port = free_port()
    cmd = [sys.executable, "-m", "llamas", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.kv_dtype:
        cmd += ["--kv-dtype", args.kv_dtype]
    if args.compute_dtype:
        cmd += ["--compute-dtype", args.compute_dtype]
    if args.prefix_cache_mb:
        cmd += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
    if args.speculative_ngram:
        cmd += ["--speculative-ngram", str(args.speculative_ngram)]
    if args.stream_interval != 1:
        cmd += ["--stream-interval", str(args.stream_interval)]
    env = dict(os.environ)
    if _SOURCE_TREE:  # llamas came from this checkout's python/ folder: the server must too
        env["PYTHONPATH"] = os.pathsep.join([_SOURCE_TREE, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready in 60 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="16", help="concurrent clients; a comma list runs each in turn (e.g. 1,16)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per client count and round (default 10)")
    ap.add_argument("--model", default=None, help="model folder for the server it starts (default: the bundled one)")
    ap.add_argument("--random-model", default=None, metavar="PRESET",
                    help="serve a random-weight model of this llamas.PRESETS shape (e.g. shakespeare, the bundled "
                         "model's shape) with the gpt2-tiny fixture's tokenizer (vocab 512), made in a temp folder")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the client counts this many times in turn (1,16,1,16,...): the table pools the "
                         "rounds, and each round's ratio to the first count is printed with their median")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--max-batch", type=int, default=16, help="--max-batch of the server it starts (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="--threads of the server it starts")
    ap.add_argument("--dtype", default=None, choices=WEIGHT_DTYPES,
                    help="--dtype of the server it starts (weights; default float32)")
    ap.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                    help="--kv-dtype of the server it starts (KV cache; default: the weights' dtype)")
    ap.add_argument("--compute-dtype", default=None, choices=COMPUTE_DTYPES,
                    help="--compute-dtype of the server it starts (matrix-product activations; bfloat16 needs "
                         "--dtype bfloat16 or int8)")
    ap.add_argument("--prefix-cache-mb", type=float, default=0.0,
                    help="--prefix-cache-mb of the server it starts (default 0: off)")
    ap.add_argument("--speculative-ngram", type=int, default=0, metavar="K",
                    help="--speculative-ngram of the server it starts (default 0: off)")
    ap.add_argument("--stream-interval", type=int, default=1, metavar="N",
                    help="--stream-interval of the server it starts: one event per N tokens after the first "
                         "(default 1)")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="the requests' temperature (default 0.8; each request has its own seed)")
    ap.add_argument("--shared-prefix-words", type=int, default=0, metavar="N",
                    help="start every prompt with the same N words (a shared system prompt; 0: none)")
    ap.add_argument("--url", default=None, help="use this running server instead of starting one")
    ap.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of load at the highest client count before measuring (default 3)")
    ap.add_argument("--settle", type=float, default=45.0,
                    help="after --warmup, up to this many more seconds of load until the server's RSS stops "
                         "growing (default 45; 0 measures right after --warmup)")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if any(c < 1 for c in counts) or args.duration <= 0:
        ap.error("--clients must be positive integers and --duration > 0")
    if args.rounds < 1 or args.stream_interval < 1:
        ap.error("--rounds and --stream-interval must be >= 1")
    if args.warmup < 0 or args.settle < 0:
        ap.error("--warmup and --settle must be >= 0")
    if args.shared_prefix_words < 0 or args.prefix_cache_mb < 0:
        ap.error("--shared-prefix-words and --prefix-cache-mb must be >= 0")
    if not 0 <= args.speculative_ngram <= MAX_DRAFT_TOKENS or not 0 <= args.temperature <= 2:
        ap.error(f"--speculative-ngram must be in [0, {MAX_DRAFT_TOKENS}] and --temperature in [0, 2]")
    words = " ".join(PROMPTS).split()
    prefix = " ".join(words[i % len(words)] for i in range(args.shared_prefix_words))
    prefix = prefix + "\n" if prefix else ""
    if args.url and not args.url.startswith("http://"):
        ap.error("--url must be http:// (the load client speaks plain HTTP/1.1)")

    tmp = None
    if args.random_model:
        import tempfile
        import llamas
        tmp = tempfile.TemporaryDirectory()
        tok = llamas.load(os.path.join(HERE, "..", "tests", "fixtures", "gpt2-tiny")).tokenizer
        cfg = dict(llamas.PRESETS[args.random_model], vocab_size=tok.vocab_size)
        args.model = os.path.join(tmp.name, args.random_model)
        llamas.create(cfg, seed=0, tokenizer=tok).save(args.model)
        print(f"random-weight model: {cfg}")
    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args)
        pid = proc.pid
    try:
        # Warm-up at the highest concurrency, so that the server's memory reaches its working size
        # before the RSS baseline is taken: at least --warmup seconds, then 3-second rounds until
        # two rounds in a row grow the RSS by under 0.25% each (at most --settle seconds). The
        # llamas allocator holds its size from the first seconds, but the pages under it fill in
        # later (a KV block is touched as far as its sequences have reached), as do the Python and
        # C heaps (bundled model: +4 MB over ~35 s at 16 clients, then flat over 1,000 requests).
        # A leak never settles: it runs the whole --settle and still shows below.
        run_loop(run_clients(url, max(counts), args.warmup, args.max_tokens, args.api_key, prefix, args.temperature))
        warmed = args.warmup
        rss_before = rss_mib(pid)
        quiet = 0
        while rss_before is not None and warmed < args.warmup + args.settle and quiet < 2:
            run_loop(run_clients(url, max(counts), 3.0, args.max_tokens, args.api_key, prefix, args.temperature))
            warmed += 3.0
            rss_now = rss_mib(pid)
            quiet = quiet + 1 if rss_now is not None and rss_now < rss_before * 1.0025 else 0
            rss_before = rss_now
        print(f"warm-up: {warmed:g} s at {max(counts)} clients")
        anon_before, file_before = rss_mib(pid, "RssAnon"), rss_mib(pid, "RssFile")
        total_requests = 0
        merged = {n: None for n in counts}
        per_round = []  # [{count: output tok/s}] per round
        for _ in range(args.rounds):
            rates = {}
            for n in counts:
                # CPU seconds per output token (server process; this load generator) do not depend
                # on how much of the box other tenants take, unlike tokens/s.
                engine0 = engine_counters(url, args.api_key)
                cpu0, client0 = cpu_seconds(pid), time.process_time()
                s = run_loop(run_clients(url, n, args.duration, args.max_tokens, args.api_key, prefix, args.temperature))
                cpu1 = cpu_seconds(pid)
                s["engine"] = engine_split(engine0, engine_counters(url, args.api_key))
                s["server_cpu"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                s["client_cpu"] = time.process_time() - client0
                total_requests += s["requests"]
                s["rss"] = rss_mib(pid)
                rates[n] = s["tokens"] / s["elapsed"]
                merged[n] = s if merged[n] is None else merge_stats(merged[n], s)
            per_round.append(rates)
        rows = [(n, merged[n]) for n in counts]
        rss_after = rss_mib(pid)
        anon_after, file_after = rss_mib(pid, "RssAnon"), rss_mib(pid, "RssFile")
    finally:
        if tmp is not None:
            tmp.cleanup()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    base = rows[0][1]["tokens"] / rows[0][1]["elapsed"]
    print(f"max_tokens={args.max_tokens}, {args.duration:g} s per client count and round ({args.rounds} "
          f"round{'s' if args.rounds > 1 else ''}), streaming completions, "
          f"temperature {args.temperature:g}"
          + (f", speculative_ngram {args.speculative_ngram}" if args.speculative_ngram else "")
          + (f", stream_interval {args.stream_interval}" if args.stream_interval != 1 else "")
          + (f", a shared prefix of {args.shared_prefix_words} words" if prefix else "")
          + (f", prefix cache {args.prefix_cache_mb:g} MiB" if args.prefix_cache_mb else ""))
    print("| clients | requests | req/s | output tok/s | vs first | TTFT p50 ms | TTFT p99 ms | "
          "TPOT p50 ms | TPOT p99 ms | errors | server CPU us/token | client CPU us/token | RSS after MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, s in rows:
        tps = s["tokens"] / s["elapsed"]
        print(f"| {n} | {s['requests']} | {s['requests'] / s['elapsed']:.1f} | {tps:.0f} | {f'{tps / base:.2f}x' if base else 'n/a'} | "
              f"{percentile(s['ttft'], .5) * 1e3:.1f} | {percentile(s['ttft'], .99) * 1e3:.1f} | "
              f"{percentile(s['tpot'], .5) * 1e3:.2f} | {percentile(s['tpot'], .99) * 1e3:.2f} | "
              f"{len(s['errors'])} | {per_token(s.get('server_cpu'), s['tokens'])} | "
              f"{per_token(s['client_cpu'], s['tokens'])} | {s['rss'] if s['rss'] is not None else float('nan'):.1f} |")
    if args.rounds > 1 and len(counts) > 1 and all(r[counts[0]] > 0 for r in per_round):
        # The box drifts by +-20% over minutes: each round's ratio compares two runs a few seconds
        # apart, and their median is the figure to quote.
        for n in counts[1:]:
            ratios = [r[n] / r[counts[0]] for r in per_round]
            each = ", ".join(f"{x:.2f}x" for x in ratios)
            print(f"{n} clients vs {counts[0]}, round by round: {each}; median {median(ratios):.2f}x")
    if all(s.get("engine") for _, s in rows):
        # The engine thread's own account (/metrics): a busy step is its forward (native, GIL
        # released) plus the host time between forwards (Python, holding the GIL).
        print("engine thread: " + "; ".join(
            f"{n} clients {e['rows'] / e['steps']:.1f} sequences a step, forward {e['forward'] / e['steps'] * 1e3:.2f} ms"
            f" (of which GIL wait {e['gil'] / e['steps'] * 1e3:.2f}) + host {e['host'] / e['steps'] * 1e3:.2f} ms a step"
            for n, s in rows for e in [s["engine"]]))
    errors = [e for _, s in rows for e in s["errors"]]
    for e in sorted(set(errors))[:5]:
        print(f"  error: {e}")
    if rss_before is not None and rss_after is not None:
        print(f"server RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after {total_requests} requests "
              f"({(rss_after / rss_before - 1) * 100:+.1f}%)")
    if None not in (anon_before, anon_after, file_before, file_after):
        print(f"  of which anonymous (the server's own memory): {anon_before:.1f} -> {anon_after:.1f} MiB "
              f"({(anon_after / anon_before - 1) * 100:+.1f}%); mapped files: {file_before:.1f} -> {file_after:.1f} MiB")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
