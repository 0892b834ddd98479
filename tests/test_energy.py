"""The energy tracker that starts the ASR's decode where the words end."""

from __future__ import annotations

import numpy as np
import pytest
from parley.energy import EnergyOptions, EnergyTracker, quiet_covers
from parley.errors import InvalidInput

SR = 16_000


def burst(seconds: float, db: float, rng: np.random.Generator) -> np.ndarray:
    """A voiced-like burst: a 150 Hz buzz with harmonics, at `db` dBFS RMS."""
    t = np.arange(round(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * 150 * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
    x = x * (1 + 0.3 * np.sin(2 * np.pi * 4 * t))  # syllable-rate wobble
    return (x * 10 ** (db / 20) / np.sqrt(np.mean(x**2))).astype(np.float32)


def noise(seconds: float, db: float, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(round(seconds * SR))
    return (x * 10 ** (db / 20)).astype(np.float32)


def feed(tracker: EnergyTracker, audio: np.ndarray, chunk: int) -> list[float]:
    return [t for i in range(0, len(audio), chunk) for t in tracker.push(audio[i : i + chunk])]


@pytest.mark.parametrize("floor_db", [None, -60.0, -45.0])
def test_dips_fire_just_after_each_burst_ends(floor_db: float | None) -> None:
    """A dip ~`dip_ms` after the speech stops, at any noise floor; none inside a burst."""
    rng = np.random.default_rng(1)
    ends, parts, pos = [], [], 0.0
    for seconds, gap in [(0.8, 0.5), (1.3, 0.25), (0.4, 1.0)]:
        parts += [burst(seconds, -20.0, rng), np.zeros(round(gap * SR), np.float32)]
        ends.append(pos + seconds)
        pos += seconds + gap
    audio = np.concatenate([np.zeros(SR // 2, np.float32), *parts])
    ends = [e + 0.5 for e in ends]
    if floor_db is not None:
        audio = audio + noise(len(audio) / SR, floor_db, rng)
    dips = feed(EnergyTracker(), audio, 320)
    assert len(dips) == len(ends), dips
    for dip, end in zip(dips, ends, strict=True):
        assert end + 0.02 <= dip <= end + 0.05, (dip, end)


def test_silence_and_steady_noise_never_dip() -> None:
    rng = np.random.default_rng(2)
    for audio in (np.zeros(3 * SR, np.float32), noise(3.0, -40.0, rng), noise(3.0, -12.0, rng)):
        tracker = EnergyTracker()
        assert feed(tracker, audio, 320) == []
        assert tracker.quiet_since is None


def test_chunking_does_not_change_the_answer() -> None:
    rng = np.random.default_rng(3)
    audio = np.concatenate(
        [noise(0.3, -55, rng), burst(0.7, -15, rng), noise(0.4, -55, rng), burst(0.5, -25, rng),
         noise(0.6, -55, rng)]
    )  # fmt: skip
    whole = EnergyTracker()
    reference = whole.push(audio)
    for chunk in (1, 97, 160, 320, 4000):
        tracker = EnergyTracker()
        assert feed(tracker, audio, chunk) == reference
        assert tracker.quiet_since == whole.quiet_since
    assert len(reference) == 2


def test_quiet_since_follows_the_ongoing_quiet_run() -> None:
    rng = np.random.default_rng(4)
    tracker = EnergyTracker()
    tracker.push(np.zeros(SR // 2, np.float32))
    assert tracker.quiet_since is None  # no speech yet: nothing to be quiet after
    tracker.push(burst(0.6, -20, rng))
    assert tracker.quiet_since is None
    tracker.push(np.zeros(SR // 5, np.float32))
    quiet = tracker.quiet_since
    assert quiet is not None and abs(quiet - 1.1) <= 0.011
    # Silero's pause 60 ms later: the words end at the quiet; 200 ms later (a soft word
    # Silero still heard) or before the quiet began: not known
    assert tracker.quiet_before(quiet + 0.06, 0.15) == quiet
    assert tracker.quiet_before(quiet + 0.2, 0.15) is None
    assert tracker.quiet_before(quiet - 0.01, 0.15) is None
    tracker.push(burst(0.1, -20, rng))  # speech again: the run is broken
    assert tracker.quiet_since is None


def test_quiet_covers() -> None:
    # audio up to the pause always covers it
    assert quiet_covers(2.0, 2.0, None, 0.15)
    # decoded at the quiet start + 30 ms, Silero's silence 60 ms later: covered
    assert quiet_covers(1.93, 1.96, 1.90, 0.15)
    # ...but not when the quiet began too long before Silero's silence (a soft word)
    assert not quiet_covers(1.93, 2.20, 1.90, 0.15)
    # ...nor when the audio stops before the quiet began, or energy is loud again
    assert not quiet_covers(1.85, 1.96, 1.90, 0.15)
    assert not quiet_covers(1.93, 1.96, None, 0.15)
    # ...nor with the lag off
    assert not quiet_covers(1.93, 1.96, 1.90, 0.0)


def test_bad_options() -> None:
    for kwargs in ({"dip_ms": 5}, {"rel": 0.0}, {"rel": 1.5}, {"min_db": -1.0}, {"speech_db": 0}):
        with pytest.raises(InvalidInput):
            EnergyOptions(**kwargs)
