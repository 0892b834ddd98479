"""Prometheus metrics shared by all stages.

Each metric is recorded into this process's prometheus_client registry (what the tests
and an embedding process read) and, in a Ray Serve replica after `export_to_ray()`,
through Ray's metrics API as well: Ray's per-node metrics agent is what Prometheus
scrapes on a Ray cluster (the Helm chart's PodMonitor, port 8080), and it exports a
metric `parley_x` as `ray_parley_x` (histograms with `_bucket`/`_sum`/`_count`,
counters with `_total`). The Helm chart's dashboard and alerts use those names
(`exported_name`).

Latency histograms use buckets fine enough to see the sub-second budget.
"""

from __future__ import annotations

import threading
from typing import Any

import prometheus_client

#: Ray's metrics agent puts this before every application metric's name.
RAY_PREFIX = "ray_"

LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip

_ALL: list[Metric] = []
_export_lock = threading.Lock()
_exporting = False


class Metric:
    """One metric, recorded in prometheus_client and, once exported, in Ray."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.prom: Any = None
        self._ray: Any = None  # the ray.util.metrics twin, after export_to_ray()
        _ALL.append(self)

    def labels(self, *values: str) -> _Labelled:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        return _Labelled(self, values)

    def _tags(self, values: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labelnames, values, strict=True))

    def exported_samples(self) -> dict[str, set[str]]:
        """Sample names Prometheus sees from Ray's agent -> their labels."""
        raise NotImplementedError

    def _make_ray(self) -> Any:
        raise NotImplementedError


class Counter(Metric):
    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError("counter names end in _total")
        super().__init__(name, documentation, labelnames)
        self.prom = prometheus_client.Counter(name, documentation, labelnames)

    def inc(self, amount: float = 1.0) -> None:
        self._inc((), amount)

    def _inc(self, values: tuple[str, ...], amount: float) -> None:
        # prometheus_client raises on a negative amount; Ray's counter also on 0 (a
        # generation cancelled before its first token counts 0 tokens).
        (self.prom.labels(*values) if values else self.prom).inc(amount)
        if self._ray is not None and amount > 0:
            self._ray.inc(amount, tags=self._tags(values))

    def exported_samples(self) -> dict[str, set[str]]:
        return {RAY_PREFIX + self.name: set(self.labelnames)}

    def _make_ray(self) -> Any:
        from ray.util import metrics as ray_metrics

        base = self.name.removesuffix("_total")  # Ray adds _total to counters
        return ray_metrics.Counter(base, self.documentation, tag_keys=self.labelnames)


class Histogram(Metric):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.buckets = buckets
        self.prom = prometheus_client.Histogram(name, documentation, labelnames, buckets=buckets)

    def observe(self, value: float) -> None:
        self._observe((), value)

    def _observe(self, values: tuple[str, ...], value: float) -> None:
        (self.prom.labels(*values) if values else self.prom).observe(value)
        if self._ray is not None:
            self._ray.observe(value, tags=self._tags(values))

    def exported_samples(self) -> dict[str, set[str]]:
        name, labels = RAY_PREFIX + self.name, set(self.labelnames)
        return {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels}

    def _make_ray(self) -> Any:
        from ray.util import metrics as ray_metrics

        return ray_metrics.Histogram(
            self.name, self.documentation, boundaries=list(self.buckets), tag_keys=self.labelnames
        )


class _Labelled:
    """A metric with its label values (what `labels()` returns)."""

    __slots__ = ("_metric", "_values")

    def __init__(self, metric: Metric, values: tuple[str, ...]) -> None:
        self._metric, self._values = metric, values

    def inc(self, amount: float = 1.0) -> None:
        assert isinstance(self._metric, Counter)
        self._metric._inc(self._values, amount)

    def observe(self, value: float) -> None:
        assert isinstance(self._metric, Histogram)
        self._metric._observe(self._values, value)


def export_to_ray() -> None:
    """Record every metric through Ray's metrics API too, from now on (call once in each
    Ray Serve replica; later calls do nothing)."""
    global _exporting
    with _export_lock:
        if _exporting:
            return
        for metric in _ALL:
            metric._ray = metric._make_ray()
        _exporting = True


def all_metrics() -> list[Metric]:
    return list(_ALL)


STAGE_LATENCY = Histogram(
    "parley_stage_latency_seconds",
    "Latency of one pipeline stage: time to first output (ttfb) or to completion",
    ("service", "measure"),
)

TURN_LATENCY = Histogram(
    "parley_turn_latency_seconds",
    "Per turn: seconds from the end of user speech to each milestone",
    ("milestone",),
)

INTERRUPTIONS = Counter(
    "parley_interruptions_total", "Avatar replies stopped by user speech (barge-in)"
)
INTERRUPTION_LATENCY = Histogram(
    "parley_interruption_stop_seconds",
    "Seconds from user speech onset (as detected) to avatar output stopping",
)
BACKCHANNELS = Counter(
    "parley_backchannels_total", "Backchannels heard while the avatar talked (it went on)"
)
SPECULATIONS = Counter(
    "parley_speculations_total",
    "Replies started before the end of turn, by outcome (started, hit, missed)",
    ("outcome",),
)
INPUT_ERRORS = Counter(
    "parley_input_errors_total", "External inputs rejected as invalid", ("service",)
)
LLM_TOKENS = Counter("parley_llm_tokens_total", "Tokens processed by the LLM", ("kind",))

RENDER_FRAMES_DROPPED = Counter(
    "parley_render_frames_dropped_total",
    "Video frames skipped because rendering fell behind real time or failed",
)
VIDEO_FRAMES_DROPPED_SLOW_CLIENT = Counter(
    "parley_video_frames_dropped_slow_client_total",
    "Live video frames not rendered because the client had not taken the frames before",
)
RENDER_FRAME_SECONDS = Histogram(
    "parley_render_frame_seconds",
    "Seconds to render one video frame (deformation, rasterisation); its count"
    " is the number of frames rendered",
)
