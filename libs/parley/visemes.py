"""Phoneme → viseme classes (the 15 Oculus/MPEG-4-style mouth shapes).

TTS backends label their phonemes with these; the renderer drives the mouth
from them. Keys are IPA characters as used by misaki/Kokoro-style G2P (hibari),
including its capital-letter diphthongs (A=eɪ, I=aɪ, O=oʊ, W=aʊ, Y=ɔɪ).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

VISEMES = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")

_GROUPS = {
    "PP": "pbm",
    "FF": "fv",
    "TH": "θð",
    "DD": "tdTɾ",
    "kk": "kgŋh",
    "CH": "ʃʒʧʤ",
    "SS": "sz",
    "nn": "nlɫ",
    "RR": "ɹrɚɝ",
    "aa": "ɑaæʌɐIAW",
    "E": "ɛeə",
    "ih": "ɪijᵊy",
    "oh": "ɔoOYɒ",
    "ou": "uʊwɯ",
}
PHONEME_TO_VISEME: dict[str, str] = {p: v for v, chars in _GROUPS.items() for p in chars}

#: Characters that carry no mouth shape of their own (stress, length marks).
MODIFIERS = frozenset("ˈˌːˑ")


def viseme_for(phoneme: str) -> str:
    """Viseme of a phoneme symbol; anything unknown (pauses, punctuation) is silence."""
    return PHONEME_TO_VISEME.get(phoneme, "sil")


@dataclass(frozen=True, slots=True)
class Phoneme:
    """A phoneme of synthesized speech and where it sits in the audio (in samples)."""

    phoneme: str
    viseme: str
    start_sample: int
    num_samples: int


def shift_phonemes(phonemes: Iterable[Phoneme], delta: int) -> list[Phoneme]:
    """The same phonemes `delta` samples later (e.g. from clause to stream positions)."""
    return [Phoneme(p.phoneme, p.viseme, p.start_sample + delta, p.num_samples) for p in phonemes]


def phonemes_from(phonemes: Iterable[Phoneme], offset: int) -> list[Phoneme]:
    """The phonemes of audio from sample `offset` on, relative to it; the one under way
    at `offset` keeps its remaining part (speech resumed mid-clause)."""
    out = []
    for p in phonemes:
        end = p.start_sample + p.num_samples
        if end <= offset:
            continue
        start = max(p.start_sample, offset)
        out.append(Phoneme(p.phoneme, p.viseme, start - offset, end - start))
    return out
