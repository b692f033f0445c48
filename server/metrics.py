"""``GET /metrics``: Prometheus counters read from each engine at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from server.registry import ModelRegistry, ServedModel

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name, help text, EngineStats field)
COUNTERS = (
    ("ggufserve_requests_finished", "Generations run to completion.", "requests_finished"),
    (
        "ggufserve_requests_cancelled",
        "Generations stopped early by the client.",
        "requests_cancelled",
    ),
    ("ggufserve_prompt_tokens", "Prompt tokens received.", "prompt_tokens"),
    (
        "ggufserve_prompt_tokens_reused",
        "Prompt tokens served from the KV cache.",
        "prompt_tokens_reused",
    ),
    ("ggufserve_generated_tokens", "Completion tokens generated.", "generated_tokens"),
    ("ggufserve_image_encodes", "Images encoded by the vision projector.", "image_encodes"),
    ("ggufserve_image_cache_hits", "Images served from the embedding cache.", "image_cache_hits"),
)
# (metric name, help text, key of LlamaEngine.load())
GAUGES = (
    ("ggufserve_requests_running", "Generations decoding on a sequence.", "running"),
    ("ggufserve_requests_waiting", "Generations waiting for a free sequence.", "waiting"),
    ("ggufserve_kv_tokens", "KV cache cells held by the sequences' caches.", "kv_tokens"),
    ("ggufserve_kv_size", "KV cache cells in all (n_ctx, shared by the sequences).", "n_ctx"),
)
# (metric name, help text, EngineStats field)
HISTOGRAMS = (
    ("ggufserve_queue_seconds", "Time from submission to a free sequence.", "queue_seconds"),
    (
        "ggufserve_time_to_first_token_seconds",
        "Time from submission to the first token.",
        "ttft_seconds",
    ),
)


class EngineCollector(Collector):
    """Reads the counters of every loaded model's engine when scraped."""

    def __init__(self, models: ModelRegistry):
        self._models = models

    def collect(self) -> Iterator[Metric]:
        loaded = [m for m in self._models.models() if m.engine is not None]
        for name, text, field in COUNTERS:
            family = CounterMetricFamily(name, text, labels=["model"])
            for served in loaded:
                assert served.engine is not None
                family.add_metric([served.id], getattr(served.engine.stats, field))
            yield family
        depth = GaugeMetricFamily(
            "ggufserve_queue_depth", "Requests running or waiting.", labels=["model"]
        )
        for served in loaded:
            assert served.engine is not None
            depth.add_metric([served.id], served.engine.queue_depth())
        yield depth
        yield from self._load(loaded)
        yield from self._latencies(loaded)

    @staticmethod
    def _load(loaded: list[ServedModel]) -> Iterator[Metric]:
        for name, text, key in GAUGES:
            family = GaugeMetricFamily(name, text, labels=["model"])
            for served in loaded:
                assert served.engine is not None
                family.add_metric([served.id], served.engine.load()[key])
            yield family

    @staticmethod
    def _latencies(loaded: list[ServedModel]) -> Iterator[Metric]:
        for name, text, field in HISTOGRAMS:
            family = HistogramMetricFamily(name, text, labels=["model"])
            for served in loaded:
                assert served.engine is not None
                histogram = getattr(served.engine.stats, field)
                family.add_metric([served.id], histogram.cumulative(), histogram.total)
            yield family


def metrics_registry(models: ModelRegistry) -> CollectorRegistry:
    """A registry of this app's own (no process-global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(models))
    return registry


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
