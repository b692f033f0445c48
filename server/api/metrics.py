"""``GET /metrics``: Prometheus counters read from each loaded engine and from the model
registry (loads, unloads, memory) at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

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

from ggufserve.engine.llama import LlamaEngine
from ggufserve.models.registry import ModelRegistry

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
    (
        "ggufserve_spec_drafted_tokens",
        "Draft tokens decoded for verification (speculative decoding).",
        "spec_drafted_tokens",
    ),
    (
        "ggufserve_spec_accepted_tokens",
        "Draft tokens kept because the sampler drew them (speculative decoding).",
        "spec_accepted_tokens",
    ),
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


def _counter(field: str, engine: LlamaEngine) -> tuple[Any, ...]:
    return (getattr(engine.stats, field),)


def _gauge(key: str, engine: LlamaEngine) -> tuple[Any, ...]:
    return (engine.load()[key],)


def _histogram(field: str, engine: LlamaEngine) -> tuple[Any, ...]:
    histogram = getattr(engine.stats, field)
    return (histogram.cumulative(), histogram.total)


class EngineCollector(Collector):
    """Reads the counters of every loaded model's engine when scraped."""

    def __init__(self, models: ModelRegistry):
        self._models = models

    def collect(self) -> Iterator[Metric]:
        loaded = [(m.id, m.parts) for m in self._models.loaded()]
        engines = [(model_id, parts.engine) for model_id, parts in loaded if parts is not None]

        def per_model(family: Any, value: Callable[[LlamaEngine], tuple[Any, ...]]) -> Metric:
            for model_id, engine in engines:
                family.add_metric([model_id], *value(engine))
            return family

        label = ["model"]
        for name, text, field in COUNTERS:
            yield per_model(
                CounterMetricFamily(name, text, labels=label),
                partial(_counter, field),
            )
        yield per_model(
            GaugeMetricFamily(
                "ggufserve_queue_depth", "Requests running or waiting.", labels=label
            ),
            lambda e: (e.queue_depth(),),
        )
        for name, text, key in GAUGES:
            yield per_model(GaugeMetricFamily(name, text, labels=label), partial(_gauge, key))
        for name, text, field in HISTOGRAMS:
            yield per_model(
                HistogramMetricFamily(name, text, labels=label),
                partial(_histogram, field),
            )
        yield per_model(
            HistogramMetricFamily(
                "ggufserve_step_seconds", "Duration of the scheduler's steps.", labels=label
            ),
            lambda e: (e.step_clock.durations.cumulative(), e.step_clock.durations.total),
        )
        yield per_model(
            GaugeMetricFamily(
                "ggufserve_step_age_seconds",
                "How long the scheduler's current step has run (0 between steps); /health "
                "turns 503 past --max-step-time.",
                labels=label,
            ),
            lambda e: (e.step_clock.age_s(),),
        )


class LifecycleCollector(Collector):
    """Loaded models, their estimated memory, and load / unload counts."""

    def __init__(self, models: ModelRegistry):
        self._models = models

    def collect(self) -> Iterator[Metric]:
        loaded = self._models.loaded()
        with self._models.lock:
            stats = dict(self._models.stats)
        yield GaugeMetricFamily("ggufserve_models_loaded", "Models loaded now.", value=len(loaded))
        memory = GaugeMetricFamily(
            "ggufserve_model_memory_bytes",
            "Estimated memory of each loaded model (GGUF + mmproj + KV cache).",
            labels=["model"],
        )
        for served in loaded:
            memory.add_metric([served.id], served.memory_bytes or 0)
        yield memory
        yield CounterMetricFamily(
            "ggufserve_model_loads", "Models loaded.", value=stats.get("loads", 0)
        )
        yield CounterMetricFamily(
            "ggufserve_model_load_failures",
            "Model loads that failed.",
            value=stats.get("load_failures", 0),
        )
        unloads = CounterMetricFamily(
            "ggufserve_model_unloads",
            "Models unloaded, by reason (keep_alive, memory, shutdown).",
            labels=["reason"],
        )
        for reason in ("keep_alive", "memory", "shutdown"):
            unloads.add_metric([reason], stats.get(f"unloads_{reason}", 0))
        yield unloads


def metrics_registry(models: ModelRegistry) -> CollectorRegistry:
    """A registry of this app's own (no process-global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(models))
    registry.register(LifecycleCollector(models))
    return registry


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
