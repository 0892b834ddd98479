"""Conversions between Parley's in-process types and the shared wire messages (audio.proto)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from parley.audio import ASR_SAMPLE_RATE, float_to_pcm16, pcm16_to_float
from parley.errors import InvalidInput
from parley.v1 import audio_pb2
from parley.visemes import VISEMES, Phoneme, viseme_for

#: Longest phoneme symbol accepted from the wire.
MAX_PHONEME_CHARS = 16


def audio_to_proto(
    samples: np.ndarray, sample_rate: int, start_sample: int
) -> audio_pb2.AudioChunk:
    return audio_pb2.AudioChunk(
        pcm16=float_to_pcm16(samples),
        sample_rate=sample_rate,
        channels=1,
        start_sample=start_sample,
    )


def audio_from_proto(
    chunk: audio_pb2.AudioChunk, expected_rate: int = ASR_SAMPLE_RATE
) -> np.ndarray:
    """Validated mono float32 samples of a received chunk (InvalidInput when malformed)."""
    return pcm16_to_float(
        chunk.pcm16, chunk.sample_rate, chunk.channels, expected_rate=expected_rate
    )


def phonemes_to_proto(
    phonemes: Iterable[Phoneme], offset: int = 0
) -> list[audio_pb2.PhonemeTiming]:
    """Phoneme timings on the wire; `offset` moves them from clause to stream positions."""
    return [
        audio_pb2.PhonemeTiming(
            phoneme=p.phoneme,
            viseme=p.viseme,
            start_sample=offset + p.start_sample,
            num_samples=p.num_samples,
        )
        for p in phonemes
    ]


def phonemes_from_proto(timings: Iterable[audio_pb2.PhonemeTiming]) -> list[Phoneme]:
    """Received phoneme timings as Phonemes (positions kept); an empty viseme is derived
    from the phoneme symbol. InvalidInput for long symbols or unknown visemes."""
    out = []
    for i, t in enumerate(timings):
        if len(t.phoneme) > MAX_PHONEME_CHARS:
            raise InvalidInput(f"phoneme {i}: symbol longer than {MAX_PHONEME_CHARS} characters")
        viseme = t.viseme or viseme_for(t.phoneme)
        if viseme not in VISEMES:
            raise InvalidInput(
                f"phoneme {i} has unknown viseme {t.viseme!r}; expected one of {list(VISEMES)}"
            )
        out.append(Phoneme(t.phoneme, viseme, t.start_sample, t.num_samples))
    return out
