"""The one audio frame type, and conversions at the edges (WAV files, PCM16 bytes).

Internally audio is float32 mono in [-1, 1]. Services take PCM16 over the wire
and validate it with `pcm16_to_float`; files are read with `read_audio`, which
accepts any common rate/channel layout and resamples with soxr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from parley.errors import InvalidInput

ASR_SAMPLE_RATE = 16_000
#: Frame the conversation loop is fed with: 20 ms at 16 kHz, as a live microphone would.
FRAME_MS = 20
#: Longest single chunk a service accepts (bounds memory per message).
MAX_CHUNK_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A piece of mono float32 audio with its place in its stream."""

    samples: np.ndarray  # float32, shape (n,)
    sample_rate: int
    start_sample: int = 0

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def start_s(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def end_s(self) -> float:
        return (self.start_sample + len(self.samples)) / self.sample_rate


def pcm16_to_float(
    data: bytes, sample_rate: int, channels: int, *, expected_rate: int = ASR_SAMPLE_RATE
) -> np.ndarray:
    """Validate wire PCM16 and return mono float32 samples.

    Raises InvalidInput with a message the caller can act on.
    """
    if channels != 1:
        raise InvalidInput(f"audio must be mono (channels=1), got channels={channels}")
    if sample_rate != expected_rate:
        raise InvalidInput(f"audio must be {expected_rate} Hz PCM16, got sample_rate={sample_rate}")
    if len(data) % 2:
        raise InvalidInput(f"PCM16 audio needs an even number of bytes, got {len(data)}")
    if len(data) > MAX_CHUNK_SECONDS * expected_rate * 2:
        raise InvalidInput(
            f"audio chunk of {len(data) / 2 / expected_rate:.1f} s is too long;"
            f" send at most {MAX_CHUNK_SECONDS:.0f} s per message"
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32)


def read_audio(path: str | Path, sample_rate: int = ASR_SAMPLE_RATE) -> np.ndarray:
    """Read a WAV/FLAC/OGG file of any rate and channel count as mono float32 at `sample_rate`."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise InvalidInput(f"cannot read audio file {path}: {exc}") from exc
    if data.shape[0] == 0:
        raise InvalidInput(f"audio file {path} holds no samples")
    mono = data.mean(axis=1)
    return resample(mono, int(rate), sample_rate)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")


def frames(samples: np.ndarray, sample_rate: int, frame_ms: int = FRAME_MS) -> list[AudioFrame]:
    """Cut a signal into consecutive frames (the last one may be shorter)."""
    step = sample_rate * frame_ms // 1000
    return [AudioFrame(samples[i : i + step], sample_rate, i) for i in range(0, len(samples), step)]
