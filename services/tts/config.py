"""Typed options of the TTS service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TtsConfig(BaseModel):
    #: "hibari": neural en-US voice shipped in the hibari-tts wheel (onnxruntime, CPU or CUDA).
    backend: Literal["hibari"] = "hibari"
    voice: str = "heart"
    speed: float = Field(default=1.0, ge=0.5, le=2.0)
    #: onnxruntime threads per synthesis.
    threads: int = Field(default=1, ge=1, le=64)
    #: The first clause of a reply is cut early (at any punctuation after this many
    #: words) so its audio can start while the LLM is still writing.
    first_clause_min_words: int = Field(default=2, ge=1)
    #: Later clauses are cut at clause punctuation after this many words.
    clause_min_words: int = Field(default=5, ge=1)
    #: A clause with no punctuation is cut at a word boundary after this many words.
    clause_max_words: int = Field(default=16, ge=2)
    #: Longest text accepted per request (characters).
    max_text_chars: int = Field(default=4_000, ge=10)
