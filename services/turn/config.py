"""Typed options of the turn detector."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TurnConfig(BaseModel):
    #: Silence that ends a turn whose transcript reads as a complete thought.
    min_silence_s: float = Field(default=0.2, ge=0.05, le=5.0)
    #: Silence that ends a turn mid-sentence ("I'd like to book… um… a flight to").
    max_silence_s: float = Field(default=0.9, ge=0.1, le=10.0)
    #: A user who never stops is cut off (their turn ends) after this long.
    max_turn_s: float = Field(default=60.0, ge=1.0)
