"""Smart Turn v3.2: an audio-only end-of-turn model (ONNX, 8.7 MB, BSD-2-Clause, by Daily).

The model listens to the last 8 s of the user's audio and returns the probability
that the user has finished their turn. It hears intonation and rhythm, not words,
so it complements the transcript-level completeness score of the turn engine.

The ONNX file ships inside the `pipecat-ai` wheel, which is installed without its
dependencies (`pip install --no-deps pipecat-ai==1.14.0`): we only read the file
and never import pipecat. Input contract (learned from pipecat's
`local_smart_turn_v3.py`): 16 kHz mono, the last 8 s (zero-padded at the front),
waveform normalised to zero mean and unit variance, then Whisper's 80-bin log-mel
spectrogram (25 ms Hann window, 10 ms hop) of 800 frames; output is the
probability (already through a sigmoid) that the turn is complete.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from parley.errors import InvalidInput, ModelUnavailable

SAMPLE_RATE = 16_000
WINDOW_S = 8
WINDOW = WINDOW_S * SAMPLE_RATE  # samples the model hears
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 80
N_FRAMES = WINDOW // HOP  # 800
_MODEL_IN_WHEEL = Path("audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx")


def bundled_model_path() -> Path:
    """The model file inside the installed `pipecat-ai` wheel (found without importing it)."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "Smart Turn v3.2 needs the pipecat-ai wheel for its model file: "
            "pip install --no-deps pipecat-ai==1.14.0 (or give the .onnx path)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _MODEL_IN_WHEEL
    if not path.is_file():
        raise ModelUnavailable(
            f"Smart Turn v3.2 model not found at {path}; pipecat-ai==1.14.0 ships it"
        )
    return path


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3.0)
    log = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log, linear)


@functools.cache
def mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters on the Slaney mel scale, area-normalised."""
    bin_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges_hz = _mel_to_hz(
        np.linspace(0.0, float(_hz_to_mel(np.array(SAMPLE_RATE / 2))), N_MELS + 2)
    )
    lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lo) / (mid - lo)
    falling = (hi - bin_hz[None, :]) / (hi - mid)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (hi - lo)  # equal area per filter
    return filters


@functools.cache
def _hann() -> np.ndarray:
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)  # periodic Hann


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of `audio`, zero-padded at the front to exactly 8 s (float32)."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise InvalidInput(f"Smart Turn expects mono audio (1-D), got shape {x.shape}")
    if len(x) >= WINDOW:
        return x[-WINDOW:]
    return np.concatenate([np.zeros(WINDOW - len(x), np.float32), x])


def log_mel_features(window: np.ndarray) -> np.ndarray:
    """Whisper-style log-mel features (N_MELS, N_FRAMES) of an 8 s, 16 kHz window."""
    x = np.asarray(window, dtype=np.float32)
    if x.shape != (WINDOW,):
        raise InvalidInput(f"Smart Turn features need {WINDOW} samples, got shape {x.shape}")
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)  # waveform normalisation (float32)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")  # centred frames
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:N_FRAMES]
    power = np.abs(np.fft.rfft(frames * _hann(), axis=-1)) ** 2  # (N_FRAMES, bins)
    log_mel = np.log10(np.maximum(mel_filterbank() @ power.T, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)  # 80 dB dynamic range
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


class SmartTurnModel:
    """Loaded once per process; thread-compatible (one call at a time per instance)."""

    def __init__(self, path: str = "") -> None:
        import onnxruntime as ort

        model = Path(path) if path else bundled_model_path()
        if not model.is_file():
            raise ModelUnavailable(f"Smart Turn model file not found: {model}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]  # fmt: skip
        try:
            self._session = ort.InferenceSession(str(model), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelUnavailable(f"cannot load Smart Turn model {model}: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [N_MELS, N_FRAMES]:
            raise ModelUnavailable(
                f"{model} is not a Smart Turn v3 model (expects one (batch, {N_MELS}, "
                f"{N_FRAMES}) input)"
            )
        self._input = inputs[0].name
        self.path = model

    def probability(self, audio: np.ndarray) -> float:
        """P(turn complete) given the user's audio so far (16 kHz float32 mono; last 8 s used).

        Blocking (~a few ms on CPU); call it from a worker thread in async code.
        """
        window = last_window(audio)
        if not np.isfinite(window).all():
            raise InvalidInput("Smart Turn audio contains NaN or infinite samples")
        features = log_mel_features(window)[None]
        (out,) = self._session.run(None, {self._input: features})
        return float(np.clip(np.asarray(out).reshape(-1)[0], 0.0, 1.0))

    def warm_up(self) -> None:
        t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
        self.probability((0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))


__all__ = ["SAMPLE_RATE", "SmartTurnModel", "bundled_model_path", "log_mel_features"]
