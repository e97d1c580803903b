"""Prometheus metrics with vLLM's names, so existing Grafana boards and autoscalers read treadle unchanged.

Latency histograms are observed here, from the timing of the stream each handler consumes. Everything the
engine already counts (queue sizes, KV usage, token and finish counters, prefix-cache lookups, preemptions) is
read from `engine.stats()` at scrape time by a collector, so nothing is counted twice.

Every family is exported as `treadle:<name>` and again as `vllm:<name>`. The alias costs nothing per request:
it renames the `treadle:` families while a scrape is being written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from treadle.engine.outputs import EngineStats, RequestOutput

PREFIX = "treadle:"
ALIAS_PREFIX = "vllm:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets reach down to 1 ms because a small model on a GPU decodes a token in a few milliseconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time from request arrival to the first "
                               "generated token.", labels, registry=None, buckets=_TTFT_BUCKETS)
        self._itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between two consecutive outputs of a "
                              "request that carry new tokens.", labels, registry=None, buckets=_ITL_BUCKETS)
        self._e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Time from request arrival to its last "
                              "token.", labels, registry=None, buckets=_E2E_BUCKETS)
        engine = _EngineStatsCollector(stats, model_name)
        own: list[Collector] = [self._ttft, self._itl, self._e2e, engine]
        for collector in own:
            self.registry.register(collector)
        self.registry.register(_AliasCollector(own))
        self.ttft = self._ttft.labels(model_name)
        self.itl = self._itl.labels(model_name)
        self.e2e = self._e2e.labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)


class RequestTimer:
    """Observes one engine request's latencies from the outputs as the server receives them."""

    __slots__ = ("_metrics", "_arrival", "_last")

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if any(c.token_ids for c in out.outputs):
            if self._last is None:
                self._metrics.ttft.observe(now - self._arrival)
            else:
                self._metrics.itl.observe(now - self._last)
            self._last = now
        if out.finished:
            self._metrics.e2e.observe(now - self._arrival)


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            fam.add_metric([self._model], value)
            return fam

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            fam = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            fam.add_metric([self._model], value)
            return fam

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (0 to 1).", s.kv_usage)
        yield counter("prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("num_preemptions", "Sequences preempted (recomputed later) for lack of KV space.",
                      s.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("parallel_forks", "Blocks forked into parallel paths (Multiverse).", s.parallel_forks)
        yield counter("parallel_merges", "Parallel blocks merged back, conclusion prefilled over every path.",
                      s.parallel_merges)
        yield gauge("parallel_paths_running", "Live parallel path sequences.", s.parallel_branches)
        yield counter("parallel_generation_tokens", "Tokens of finished parallel documents, every path counted.",
                      s.parallel_tokens)
        yield counter("parallel_depth_tokens", "Positions used by finished parallel documents.", s.parallel_depth)
        yield gauge("parallelism", "Parallelism achieved: parallel_generation_tokens / parallel_depth_tokens.",
                    s.parallel_tokens / s.parallel_depth if s.parallel_depth else 0.0)
        yield counter("ape_context_hits", "Request contexts found in the APE context cache.", s.ape_context_hits)
        yield counter("ape_context_misses", "Request contexts that had to be encoded.", s.ape_context_misses)
        yield counter("ape_context_evictions", "Cached contexts whose KV was dropped to make room.",
                      s.ape_context_evictions)
        yield counter("ape_context_prefill_tokens", "Tokens computed to encode contexts.", s.ape_encoded_tokens)
        yield gauge("ape_cached_contexts", "Contexts whose KV is in the pool.", s.ape_cached_contexts)
        yield gauge("ape_cached_context_tokens", "Tokens of the contexts whose KV is in the pool.",
                    s.ape_cached_context_tokens)
        finished = CounterMetricFamily(PREFIX + "request_success", "Finished requests by finish reason.",
                                       labels=["model_name", "finished_reason"])
        for reason in sorted(set(s.finished_by_reason) | {"stop", "length", "abort"}):
            finished.add_metric([self._model, reason], s.finished_by_reason.get(reason, 0))
        yield finished


class _AliasCollector(Collector):
    """Re-exports the `treadle:` families under `vllm:` at scrape time."""

    def __init__(self, sources: list[Collector]):
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self._sources:
            for fam in source.collect():
                alias = Metric(ALIAS_PREFIX + fam.name.removeprefix(PREFIX), fam.documentation, fam.type, fam.unit)
                alias.samples = [s._replace(name=ALIAS_PREFIX + s.name.removeprefix(PREFIX)) for s in fam.samples]
                yield alias
