"""Prometheus metrics for one server app (its own CollectorRegistry, so several apps in one process
do not clash) and the per-request JSON log line."""
from __future__ import annotations

import bisect
import json
import logging
import math
import threading
import time
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

log = logging.getLogger("llamas.server")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class BatchHistogram:
    """A Prometheus histogram fed a whole sequence's values at once, exposed exactly as
    prometheus_client's Histogram (buckets, count, sum, created). For the inter-token latency,
    one value per generated token: Histogram.observe takes ~1.2 us per value in the engine thread
    (two locks and a linear scan of the buckets); this takes one bisect per value and one lock
    per sequence."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry):
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(float(b) for b in buckets)
        if self._bounds[-1] != math.inf:
            self._bounds.append(math.inf)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._created = time.time()
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self._bounds, self._counts
        total = 0.0
        with self._lock:
            for v in values:
                counts[bisect.bisect_left(bounds, v)] += 1  # the first bucket with v <= its bound
                total += v
            self._sum += total

    def describe(self):
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, n in zip(self._bounds, counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        family = HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)
        if getattr(prometheus_metrics, "_use_created", True):  # as Histogram: off with PROMETHEUS_DISABLE_CREATED_SERIES
            family.samples.append(Sample(self._name + "_created", {}, self._created))
        yield family


class EngineTimingCollector:
    """The engine thread's step counters (step_timing.StepTiming), read when /metrics is scraped:
    steps, sequences fed, and seconds in forwards and between them. rate(host) / rate(forward)
    is the Python share of a busy engine; rate(sequences) / rate(steps) the mean batch."""

    def __init__(self, engine_fn: Callable[[], Optional[object]]):
        self._engine_fn = engine_fn

    def describe(self):
        return []  # collected only when scraped (the engine may not exist yet)

    def collect(self):
        engine = self._engine_fn()
        t = engine.timing if engine is not None else None
        values = (("llamas_engine_steps", "Batched forward steps run", t.steps if t else 0),
                  ("llamas_engine_step_sequences", "Sequences fed to those steps, in all (mean batch = this / steps)",
                   t.rows if t else 0),
                  ("llamas_engine_forward_seconds", "Seconds the engine thread spent in batched forwards",
                   t.forward_seconds if t else 0.0),
                  ("llamas_engine_gil_wait_seconds", "Of the forward seconds: waiting to take the GIL back after "
                   "the native step (the event loop held it)", t.gil_wait_seconds if t else 0.0),
                  ("llamas_engine_host_seconds", "Seconds the busy engine thread spent between forwards (Python: "
                   "scheduling, detokenising, handing out tokens)", t.host_seconds if t else 0.0),
                  ("llamas_spec_decode_draft_tokens", "Speculative draft tokens fed to verifying steps "
                   "(--speculative-ngram)", t.draft_tokens if t else 0),
                  ("llamas_spec_decode_accepted_tokens", "Of the draft tokens: those the sampler kept "
                   "(acceptance rate = this / draft tokens)", t.accepted_tokens if t else 0))
        for name, doc, value in values:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine_fn: Callable[[], Optional[object]], memory_stats: Callable[[], dict]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llamas_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llamas_prompt_tokens", "Prompt tokens processed (of sequences admitted to "
                                     "the batch)", registry=r)
        self.generation_tokens = Counter("llamas_generation_tokens", "Tokens generated", registry=r)
        self.sequences = Counter("llamas_sequences_finished", "Generated sequences by finish reason",
                                 ["finish_reason"], registry=r)
        self.ttft = Histogram("llamas_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = BatchHistogram("llamas_inter_token_latency_seconds",
                                  "Time between consecutive tokens of a sequence", _ITL, r)
        self.e2e = Histogram("llamas_e2e_request_latency_seconds", "Time from arrival to the last token "
                             "(sequences that finished, not cancelled or failed ones)",
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("llamas_request_queue_time_seconds", "Time waiting before admission to the batch",
                               buckets=_LATENCY, registry=r)
        self.model_info = Info("llamas_model", "The served model and the precisions it computes in (set once "
                               "it has loaded)", registry=r)
        self.structured = Counter("llamas_structured_output_requests",
                                  "Generation requests held to a structure, by kind (json_object, json_schema, "
                                  "regex, grammar, choice, tool_call)", ["kind"], registry=r)

        def engine_attr(name):
            def read():
                e = engine_fn()
                return getattr(e, name) if e is not None else 0
            return read

        r.register(EngineTimingCollector(engine_fn))
        Gauge("llamas_requests_running", "Sequences in the running batch", registry=r).set_function(
            engine_attr("num_running"))
        Gauge("llamas_requests_waiting", "Sequences queued for admission", registry=r).set_function(
            engine_attr("num_waiting"))
        Gauge("llamas_kv_cache_blocks_in_use", "KV-cache blocks (16 positions each) in use in this process",
              registry=r).set_function(lambda: memory_stats()["kv_cache_blocks_in_use"])
        Gauge("llamas_kv_cache_bytes_in_use", "Bytes of those KV-cache blocks (bfloat16 caches hold half, int8 ones about a quarter)",
              registry=r).set_function(lambda: memory_stats()["kv_cache_bytes_in_use"])
        Gauge("llamas_kv_cache_budget_bytes", "KV cache running requests may reserve (--kv-cache-mb; 0: no limit)",
              registry=r).set_function(lambda: (engine_attr("kv_budget_bytes")() or 0))
        Gauge("llamas_kv_cache_reserved_bytes", "KV cache reserved by running requests, each for its prompt + "
              "max_tokens (what admission counts against the budget)", registry=r).set_function(
            engine_attr("kv_reserved_bytes"))
        Gauge("llamas_allocator_bytes_in_use", "Caching allocator: bytes handed out", registry=r).set_function(
            lambda: memory_stats()["bytes_in_use"])
        Gauge("llamas_allocator_peak_bytes", "Caching allocator: peak bytes in use", registry=r).set_function(
            lambda: memory_stats()["peak_bytes_in_use"])
        Gauge("llamas_allocator_bytes_reserved", "Caching allocator: bytes held from the system (in use + cached)",
              registry=r).set_function(lambda: memory_stats()["bytes_reserved"])
        def cache_attr(name):
            def read():
                e = engine_fn()
                cache = e.prefix_cache if e is not None else None
                return getattr(cache, name) if cache is not None else 0
            return read

        Gauge("llamas_prefix_cache_blocks", "KV blocks held by the prefix cache (--prefix-cache-mb)",
              registry=r).set_function(cache_attr("blocks"))
        Gauge("llamas_prefix_cache_bytes", "Bytes of those blocks", registry=r).set_function(cache_attr("bytes"))
        Gauge("llamas_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache, in all",
              registry=r).set_function(cache_attr("hit_tokens"))
        Gauge("llamas_prefix_cache_queried_tokens", "Prompt tokens of the requests that looked in the prefix cache",
              registry=r).set_function(cache_attr("queried_tokens"))
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds (Linux /proc): the
        # RSS a leak would grow, beside the allocator's own view of it.
        ProcessCollector(registry=r)

    def describe_model(self, name: str, model) -> None:
        """llamas_model_info{...} 1: which model, its weight, KV-cache and compute dtypes, and the
        kernels running it (an operator's first question when two servers' numbers differ)."""
        from . import _C, __version__
        self.model_info.info({"model": name, "dtype": model.dtype, "kv_dtype": model.kv_dtype,
                              "compute_dtype": model.compute_dtype, "kernel_variant": _C.kernel_variant(),
                              "bf16_dot_native": str(bool(_C.bf16_dot_native())).lower(),
                              "i8_dot_native": str(bool(_C.i8_dot_native())).lower(), "version": __version__})

    def on_finish(self, req) -> None:
        """Engine hook (engine thread): one finished sequence."""
        st = req.stats
        admitted = st.queue_time is not None  # (one cancelled in the queue had no prompt processed)
        if admitted:
            self.prompt_tokens.inc(len(req.prompt_ids))
            self.queue.observe(st.queue_time)
        self.generation_tokens.inc(req.completion_tokens)
        self.sequences.labels(req.finish_reason or "unknown").inc()
        if st.time_to_first_token is not None:
            self.ttft.observe(st.time_to_first_token)
        self.itl.observe_many(st.inter_token_latencies)
        # End-to-end latency is a served request's: a cancelled or failed one's is its client's
        # patience (a request cancelled in the queue would pull the percentiles down).
        if st.e2e_latency is not None and req.finish_reason not in ("cancelled", "error"):
            self.e2e.observe(st.e2e_latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def json_line(record: dict) -> str:
    """A log line: compact JSON (the request lines and the server's events)."""
    return json.dumps(record, separators=(",", ":"), default=str)


def log_request(record: dict) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json_line(record))
