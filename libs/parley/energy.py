"""Where speech energy stops: 10 ms frame energy against an adaptive floor.

Silero VAD is the judge of *whether* someone speaks, but its recurrent state
carries speech over: its probability falls below the silence threshold ~55-90 ms
after the last loud sample. Frame energy falls within one frame. Parley uses it
for one thing only: to start the ASR's decode of an utterance at the first quiet
30 ms (`dip_ms`) instead of waiting for Silero, and to let the turn detector accept
that decode as covering the pause Silero reports a little later (nothing loud
in between). Energy never decides a turn by itself: a dip inside a word (a stop
closure, "b" of "book") only buys an early partial transcript.

The threshold adapts to the microphone: a noise floor that follows the quietest
frames (down at once, up slowly) and a speech level that follows the loudest
(up at once, down slowly); a frame is quiet below `rel` of the way from the floor
to the level (in dB), and at least `min_db` above the floor (itself at least
`floor_min_db`). Dips count only after
speech was heard (`speech_db` over the floor), so a silent or steady-noise stream
never fires.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parley.errors import InvalidInput

SAMPLE_RATE = 16_000
FRAME = 160  # 10 ms


@dataclass(frozen=True, slots=True)
class EnergyOptions:
    #: Quiet this long (after speech) is a dip: the ASR decodes what it has.
    dip_ms: int = 30
    #: Quiet below this fraction of the way from the noise floor to the speech level (dB).
    rel: float = 0.4
    #: ...and at least this far above the floor ("quiet" is never below the noise).
    min_db: float = 6.0
    #: Speech is a frame this far above the floor (a dip needs speech before it).
    speech_db: float = 15.0
    #: The floor never goes below this: digital silence (-100 dB) would make a synthetic
    #: voice's fading tail (-75 dB) count as speech.
    floor_min_db: float = -70.0
    #: How fast the floor may rise (a noisier room) and the speech level fall.
    floor_rise_db_s: float = 5.0
    level_fall_db_s: float = 15.0

    def __post_init__(self) -> None:
        if self.dip_ms < 10 or not 0.0 < self.rel < 1.0 or self.min_db < 0 or self.speech_db <= 0:
            raise InvalidInput("energy options: need dip_ms >= 10, 0 < rel < 1, min_db >= 0")


class EnergyTracker:
    """Per-stream energy state: feed audio of any length; get dips and the quiet run."""

    def __init__(self, options: EnergyOptions | None = None) -> None:
        self.options = opts = options or EnergyOptions()
        self._rise = opts.floor_rise_db_s * FRAME / SAMPLE_RATE
        self._fall = opts.level_fall_db_s * FRAME / SAMPLE_RATE
        self._pending = np.zeros(0, np.float32)
        self.frames = 0  # 10 ms frames consumed
        self._floor: float | None = None
        self._level = -100.0
        self._armed = False  # speech since the last dip
        self._quiet_from: int | None = None  # first frame of the ongoing quiet run
        self._quiet_frames = 0

    @property
    def quiet_since(self) -> float | None:
        """Stream time (s) where the ongoing quiet run began; None if the last frame was
        loud (or no speech was ever heard)."""
        return None if self._quiet_from is None else self._quiet_from * FRAME / SAMPLE_RATE

    def quiet_before(self, pause_s: float, max_lag_s: float) -> float | None:
        """Where the ongoing quiet run began, if at most `max_lag_s` before a pause that
        Silero heard begin at `pause_s` (its lag, not a soft word it still heard as
        speech); None otherwise. The words before the pause end there."""
        quiet = self.quiet_since
        if quiet is None or quiet > pause_s + 1e-6 or pause_s - quiet > max_lag_s + 1e-6:
            return None
        return quiet

    def push(self, samples: np.ndarray) -> list[float]:
        """Consume audio; return the stream times (s) at which dips were confirmed."""
        buf = np.concatenate([self._pending, np.asarray(samples, np.float32)])
        n = len(buf) // FRAME
        self._pending = buf[n * FRAME :]
        if n == 0:
            return []
        x = buf[: n * FRAME].reshape(n, FRAME).astype(np.float64)
        energy_db = 10.0 * np.log10(np.mean(x * x, axis=1) + 1e-10)
        opts = self.options
        dips: list[float] = []
        for e in energy_db.tolist():
            floor = e if self._floor is None or e < self._floor else self._floor + self._rise
            floor = max(floor, opts.floor_min_db)
            self._floor = floor
            self._level = max(e, self._level - self._fall, floor)
            threshold = floor + max(opts.min_db, opts.rel * (self._level - floor))
            if e >= floor + opts.speech_db and e >= threshold:
                self._armed = True
            self.frames += 1
            if e < threshold and (self._armed or self._quiet_from is not None):
                if self._quiet_from is None:
                    self._quiet_from = self.frames - 1
                self._quiet_frames += 1
                if self._armed and self._quiet_frames * 10 >= opts.dip_ms:
                    dips.append(self.frames * FRAME / SAMPLE_RATE)
                    self._armed = False
            elif e >= threshold:
                self._quiet_from, self._quiet_frames = None, 0
        return dips


def quiet_covers(audio_end_s: float, pause_s: float, quiet_since: float | None,
                 max_lag_s: float) -> bool:  # fmt: skip
    """Does audio decoded up to `audio_end_s` hold all the speech before the pause that
    began at `pause_s` (Silero's silence start)?

    Yes if it reaches the pause; or if energy has been quiet without a break since
    `quiet_since`, at most `max_lag_s` before the pause (Silero's lag, not a soft
    word Silero still heard as speech), and the audio reaches that quiet start.
    """
    if audio_end_s >= pause_s - 1e-6:
        return True
    return (
        quiet_since is not None
        and quiet_since <= pause_s + 1e-6
        and pause_s - quiet_since <= max_lag_s + 1e-6
        and audio_end_s >= quiet_since - 1e-6
    )
