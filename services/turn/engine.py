"""Turn detection: when has the user finished speaking?

A fixed silence timeout is either rude (cuts people off mid-thought) or slow. The
silence needed here adapts to how complete the latest transcript reads: short
after a finished sentence, long after "and", "um" or a trailing "to". The
completeness model is deliberately simple (punctuation and function words from
Whisper's output); the trained end-of-turn model replaces it behind the same API.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
from parley.vad import SAMPLE_RATE, SileroVadModel, VadStream

from services.turn.config import TurnConfig

# Words after which a sentence cannot end.
_CONTINUATION = frozenset(
    """a an the and or but so because if then that which who to of in on at for with from by
    as like um uh er erm hmm my your our their his her its i i'm we you they is are was were
    be been very really just also about into than when while where what how why""".split()
)
_FILLER_ENDING = re.compile(r"(\.\.\.|…|,|-|—)\s*$")


class TurnEventKind(Enum):
    SPEECH_START = 1
    SPEECH_END = 2
    END_OF_TURN = 3


@dataclass(frozen=True, slots=True)
class TurnEvent:
    kind: TurnEventKind
    at_s: float  # stream time the event refers to
    probability: float = 0.0  # end-of-turn probability


def completeness(text: str) -> float:
    """Probability-like score that `text` is a finished turn."""
    text = text.strip()
    if not text:
        return 0.0
    if _FILLER_ENDING.search(text):
        return 0.1
    last = re.sub(r"[^\w']", "", text.split()[-1].lower())
    if last in _CONTINUATION:
        return 0.15
    if text[-1] in ".?!":
        return 0.9
    return 0.5


class TurnDetector:
    """Per-stream state. Feed audio and transcripts; read the events it returns."""

    def __init__(self, vad_model: SileroVadModel, config: TurnConfig | None = None) -> None:
        self.config = config or TurnConfig()
        self.vad: VadStream = vad_model.stream()
        self.transcript = ""
        self.in_turn = False
        self.turn_start_s = 0.0
        self._silence_since: float | None = None
        self.position = 0

    def update_transcript(self, text: str) -> None:
        self.transcript = text

    def required_silence_s(self) -> float:
        p = completeness(self.transcript)
        lo, hi = self.config.min_silence_s, self.config.max_silence_s
        if p >= 0.85:
            return lo
        return hi - (hi - lo) * p

    def push(self, samples: np.ndarray) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        self.position += len(samples)
        for ev in self.vad.push(samples):
            if ev.speaking:
                self._silence_since = None
                if not self.in_turn:
                    self.in_turn, self.turn_start_s = True, ev.at_s
                events.append(TurnEvent(TurnEventKind.SPEECH_START, ev.at_s))
            else:
                self._silence_since = ev.at_s
                events.append(TurnEvent(TurnEventKind.SPEECH_END, ev.at_s))
        now_s = self.position / SAMPLE_RATE
        if self.in_turn:
            p = completeness(self.transcript)
            silent = self._silence_since is not None and (
                now_s - self._silence_since >= self.required_silence_s()
            )
            too_long = now_s - self.turn_start_s >= self.config.max_turn_s
            if silent or too_long:
                at = self._silence_since if self._silence_since is not None else now_s
                events.append(TurnEvent(TurnEventKind.END_OF_TURN, at, p))
                self.in_turn = False
                self.transcript = ""
                if too_long and self.vad.speaking:
                    # The user talks on: a new turn starts right away.
                    self.in_turn, self.turn_start_s = True, now_s
        return events
