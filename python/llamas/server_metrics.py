"""Prometheus metrics for one server app (its own CollectorRegistry, so several apps in one process
do not clash) and the per-request JSON log line."""
from __future__ import annotations

import json
import logging
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

log = logging.getLogger("llamas.server")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine_fn: Callable[[], Optional[object]], memory_stats: Callable[[], dict]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llamas_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llamas_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llamas_generation_tokens", "Tokens generated", registry=r)
        self.sequences = Counter("llamas_sequences_finished", "Generated sequences by finish reason",
                                 ["finish_reason"], registry=r)
        self.ttft = Histogram("llamas_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("llamas_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("llamas_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("llamas_request_queue_time_seconds", "Time waiting before admission to the batch",
                               buckets=_LATENCY, registry=r)

        def engine_attr(name):
            def read():
                e = engine_fn()
                return getattr(e, name) if e is not None else 0
            return read

        Gauge("llamas_requests_running", "Sequences in the running batch", registry=r).set_function(
            engine_attr("num_running"))
        Gauge("llamas_requests_waiting", "Sequences queued for admission", registry=r).set_function(
            engine_attr("num_waiting"))
        Gauge("llamas_kv_cache_blocks_in_use", "KV-cache blocks (16 positions each) in use in this process",
              registry=r).set_function(lambda: memory_stats()["kv_cache_blocks_in_use"])
        Gauge("llamas_allocator_bytes_in_use", "Caching allocator: bytes handed out", registry=r).set_function(
            lambda: memory_stats()["bytes_in_use"])
        Gauge("llamas_allocator_peak_bytes", "Caching allocator: peak bytes in use", registry=r).set_function(
            lambda: memory_stats()["peak_bytes_in_use"])

    def on_finish(self, req) -> None:
        """Engine hook (engine thread): one finished sequence."""
        st = req.stats
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(req.completion_tokens)
        self.sequences.labels(req.finish_reason or "unknown").inc()
        if st.queue_time is not None:
            self.queue.observe(st.queue_time)
        if st.time_to_first_token is not None:
            self.ttft.observe(st.time_to_first_token)
        for d in st.inter_token_latencies:
            self.itl.observe(d)
        if st.e2e_latency is not None:
            self.e2e.observe(st.e2e_latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def log_request(record: dict) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps(record, separators=(",", ":"), default=str))
