"""Prometheus metrics shared by all stages (one registry per process).

Latency histograms use buckets fine enough to see the sub-second budget.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip

STAGE_LATENCY = Histogram(
    "parley_stage_latency_seconds",
    "Latency of one pipeline stage: time to first output (ttfb) or to completion",
    ["service", "measure"],
    buckets=LATENCY_BUCKETS,
)

TURN_LATENCY = Histogram(
    "parley_turn_latency_seconds",
    "Per turn: seconds from the end of user speech to each milestone",
    ["milestone"],
    buckets=LATENCY_BUCKETS,
)

INTERRUPTIONS = Counter(
    "parley_interruptions_total", "Avatar replies stopped by user speech (barge-in)"
)
INTERRUPTION_LATENCY = Histogram(
    "parley_interruption_stop_seconds",
    "Seconds from user speech onset (as detected) to avatar output stopping",
    buckets=LATENCY_BUCKETS,
)
BACKCHANNELS = Counter(
    "parley_backchannels_total", "Backchannels heard while the avatar talked (it went on)"
)
SPECULATIONS = Counter(
    "parley_speculations_total",
    "Replies started before the end of turn, by outcome (started, hit, missed)",
    ["outcome"],
)
INPUT_ERRORS = Counter(
    "parley_input_errors_total", "External inputs rejected as invalid", ["service"]
)
LLM_TOKENS = Counter("parley_llm_tokens_total", "Tokens processed by the LLM", ["kind"])

RENDER_FRAMES_DROPPED = Counter(
    "parley_render_frames_dropped_total",
    "Video frames skipped because rendering fell behind real time",
)
VIDEO_FRAMES_DROPPED_SLOW_CLIENT = Counter(
    "parley_video_frames_dropped_slow_client_total",
    "Live video frames not rendered because the client had not taken the frames before",
)
RENDER_FRAME_SECONDS = Histogram(
    "parley_render_frame_seconds",
    "Seconds to render one video frame (pose, deformation, rasterisation); its count"
    " is the number of frames rendered",
    buckets=LATENCY_BUCKETS,
)
