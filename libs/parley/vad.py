"""Silero VAD (ONNX) as a streaming voice-activity detector.

The ONNX model ships in the `silero-vad` wheel; we run it with onnxruntime
alone (importing the `silero_vad` package would import torch). Shared by the
ASR service (to gate decoding) and the turn service (speech start/end).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from parley.errors import ModelUnavailable

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per model call at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the v5+ model expects in front


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("the silero-vad package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise ModelUnavailable(f"Silero VAD model not found at {path}")
    return path


class SileroVadModel:
    """Loaded once per process; `stream()` gives per-stream state."""

    def __init__(self, path: Path | None = None) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path or bundled_model_path()), opts, providers=["CPUExecutionProvider"]
        )

    def stream(self) -> VadStream:
        return VadStream(self)


@dataclass(frozen=True, slots=True)
class VadOptions:
    """Hysteresis thresholds and timings of the speech state machine."""

    #: probability above which a window counts as speech
    threshold: float = 0.5
    #: probability below which a window counts as silence (between the two: no change)
    neg_threshold: float = 0.35
    #: speech needed before "speech started" (filters clicks and short noises)
    min_speech_ms: int = 64
    #: silence needed before "speech ended"
    min_silence_ms: int = 96


@dataclass(frozen=True, slots=True)
class VadEvent:
    speaking: bool
    #: stream time (s) where the speech began / where the silence began
    at_s: float


class VadStream:
    """Feed arbitrary-length 16 kHz float32 audio; get per-window probabilities and edges."""

    def __init__(self, model: SileroVadModel, options: VadOptions | None = None) -> None:
        self._model = model
        self.options = options or VadOptions()
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.samples_seen = 0  # samples consumed by the model
        self.speaking = False
        self.last_probability = 0.0
        self._run_start: int | None = None  # sample where the current candidate run began
        self._run_len = 0

    def probability(self, window: np.ndarray) -> float:
        x = np.concatenate([self._context, window])[None, :]
        out, self._state = self._model.session.run(
            None, {"input": x, "state": self._state, "sr": self._sr}
        )
        self._context = window[-CONTEXT:]
        return float(out[0][0])

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        """Process audio; return speech start/end events it caused (usually none)."""
        events: list[VadEvent] = []
        buf = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        n = len(buf) // WINDOW * WINDOW
        opts = self.options
        for i in range(0, n, WINDOW):
            p = self.probability(buf[i : i + WINDOW])
            self.last_probability = p
            start = self.samples_seen
            self.samples_seen += WINDOW
            is_flip = (p >= opts.threshold) if not self.speaking else (p < opts.neg_threshold)
            if is_flip:
                if self._run_start is None:
                    self._run_start = start
                self._run_len += WINDOW
                needed = opts.min_speech_ms if not self.speaking else opts.min_silence_ms
                if self._run_len * 1000 >= needed * SAMPLE_RATE:
                    self.speaking = not self.speaking
                    events.append(VadEvent(self.speaking, self._run_start / SAMPLE_RATE))
                    self._run_start, self._run_len = None, 0
            elif self.speaking or p < opts.neg_threshold:
                # a run is broken by a window clearly of the current state
                self._run_start, self._run_len = None, 0
        self._pending = buf[n:]
        return events

    @property
    def pending_silence_s(self) -> float | None:
        """While speaking: where a silence began that has not yet lasted `min_silence_ms`."""
        if self.speaking and self._run_start is not None:
            return self._run_start / SAMPLE_RATE
        return None

    @property
    def time_s(self) -> float:
        return self.samples_seen / SAMPLE_RATE
