"""Parley's end-of-turn detector: Silero VAD, Smart Turn v3.2 on the audio, SmolLM2 on the words.

Frame-driven and plain Python (no asyncio, no gRPC), like the `Detector` protocol of
`loadtest/turn_cases.py`: push 16 kHz frames, get decisions; call
`update_transcript()` whenever the ASR has a new partial or final transcript.

How a turn ends
---------------

1. The VAD reports the speech stop after a short hangover (`vad_stop_ms`, 96 ms:
   three Silero windows).
2. Smart Turn v3.2 hears the turn's audio once per pause (45-100 ms on the shared
   2-core box), at Silero's first silent window rather than at the stop, so that
   its answer is in by the stop (`early_audio`). If it is very sure the turn is
   complete (P >= `fast_audio_p`) the turn ends once `min_silence_s` has passed:
   the transcript of the last words may not be out of the ASR yet.
3. Otherwise the detector waits for a *fresh* transcript (one whose audio reaches
   the silence, or the quiet energy just before it: the ASR decodes there),
   scores it with the semantic model (`services/turn/semantic.py`) and combines
   both: z = bias + w_audio * logit(P_audio) + w_text * logit(P_text).
   The silence the turn needs (counted from where the silence began) then adapts
   to P = sigmoid(z): `min_silence_s` (0.15 s) from `complete_p` up,
   `max_silence_s` (1.5 s: "I'd like to book... um...") at `incomplete_p` and
   below, log-linear in between. People pause for 0.1-0.3 s inside a turn after
   words both models call finished ("There is a temporary greeting, | which..."):
   answering at the stop cut them off at half their turns, and the combination,
   fitted on their pauses too, is less sure of either model.

The combination and thresholds are tuned on the train splits of both turn case
sets, piper's and people's; the text model's calibration on piper's
(`parley bench turns --set both --tune`; held-out figures in docs/benchmarks.md).
4. Whatever the models say, `silence_cap_s` of silence ends a turn (it never hangs),
   and a turn that goes on for `max_turn_s` is cut (a monologue); the talker's next
   words start a new turn at once.

A fresh transcript that is empty (Whisper heard noise, a cough) ends the "turn"
without a decision: there is nothing to answer. Backchannels ("mm-hm", "yeah",
"uh huh", "okay" alone) are complete turns while the avatar is silent, but while
it talks (`set_avatar_speaking(True)`) they are reported as BACKCHANNEL events and
never end a turn; so are a hum or "uh" alone over the avatar (`is_filler`: Whisper
tiny writes "mm-hmm" as "NMM" or "Hmm").

Model compute is accounted in stream time: with `account_compute` (offline
replays, faster than real time) a signal computed at stream time t is available
at t + its measured compute time, and decisions land no earlier. Live, the
clock advances while the model runs, so the default is off.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
from parley.energy import EnergyTracker, quiet_covers
from parley.errors import InvalidInput
from parley.vad import SAMPLE_RATE, SileroVadModel, VadOptions, VadStream

_BACKCHANNEL = re.compile(
    r"^(?:(?:mm+[ -]?h*m+|m+h+m+|hm+|uh[ -]?huh|uh[ -]?hum|um[ -]?hum|yeah|yep|yes|yup|ok(?:ay)?"
    r"|right|sure|i see|got it|cool|alright|all right|ah|oh|aha|uh[ -]?hu|m+)[ ,.!]*)+$"
)


#: A hum or a hesitation sound alone, as Whisper tiny writes them ("NMM", "Uh", "Hmm").
_HUM = r"(?:uh+|um+|er+|h?m+|n+m+|mhm+)"
_FILLER = re.compile(rf"^{_HUM}(?:[ ,.!?…]+{_HUM})*[ ,.!?…]*$")


def is_backchannel(text: str) -> bool:
    """ "Mm hmm.", "Yeah.", "Uh-huh.", "Okay." alone (or a few of them): listener feedback."""
    norm = " ".join(text.lower().replace("-", " ").split())
    return bool(norm) and len(norm) <= 24 and bool(_BACKCHANNEL.match(norm))


def is_filler(text: str) -> bool:
    """A hum or "uh" alone. Over the avatar it is feedback, like a backchannel; with the
    avatar silent it is not a turn of its own either (the user is thinking), so it is
    *not* a backchannel: the text model hears it as unfinished."""
    norm = " ".join(text.lower().replace("-", " ").split())
    return bool(norm) and len(norm) <= 24 and bool(_FILLER.match(norm))


class EventKind(Enum):
    SPEECH_START = 1
    SPEECH_END = 2
    END_OF_TURN = 3
    BACKCHANNEL = 4  # short listener feedback while the avatar talks: no turn, no barge-in
    #: The words of a pause are in and the turn may be over: a reply may be started
    #: on `text` now, to be spoken only if the turn ends without more speech.
    SPECULATE = 5
    #: The "turn" held no words (noise, a cough, a breath): dropped without a decision.
    NOT_SPEECH = 6


@dataclass(frozen=True, slots=True)
class DetectorEvent:
    kind: EventKind
    at_s: float  # stream time of the event (decisions: when the decision is made)
    probability: float = 0.0  # end-of-turn probability behind a decision
    reason: str = ""  # why a turn ended (see ParleyTurnDetector._decide)
    text: str = ""  # the transcript the decision saw


class AudioTurnModel(Protocol):
    def probability(self, audio: np.ndarray) -> float: ...


class TextTurnModel(Protocol):
    def score(self, text: str) -> Any:  # SemanticScore: .probability, .ms
        ...


@dataclass(frozen=True, slots=True)
class ParleyTurnConfig:
    #: Silence before the VAD reports a stop (Silero windows are 32 ms).
    vad_stop_ms: int = 96
    #: Smart Turn alone ends the turn (after `min_silence_s`) when this sure (None: never).
    fast_audio_p: float | None = 0.98
    #: Combined P at and above which no further silence is needed.
    complete_p: float = 0.7
    #: Combined P at and below which `max_silence_s` is needed.
    incomplete_p: float = 0.6
    #: Silence (from where it began) needed at `complete_p`: people pause for 0.1-0.3 s
    #: inside a turn after words both models call finished (`--set human`).
    min_silence_s: float = 0.15
    #: Silence needed at `incomplete_p` ("I'd like to book a flight to ...").
    max_silence_s: float = 1.5
    #: Without a fresh transcript this long after the stop, decide on the audio alone.
    transcript_wait_s: float = 0.8
    #: Hard cap: this much silence always ends a turn.
    silence_cap_s: float = 3.0
    #: A turn longer than this is ended while the user still talks (and a new one starts).
    max_turn_s: float = 30.0
    #: Logistic combination of the two models' log-odds.
    bias: float = -0.518
    w_audio: float = 0.111
    w_text: float = 0.434
    #: Backchannel-only transcripts count as complete turns with this P (avatar silent).
    backchannel_p: float = 0.9
    #: Audio before the turn's first speech that Smart Turn hears (pipecat: 0.5 s).
    pre_speech_s: float = 0.5
    #: A fresh transcript that is empty, or none with no words heard in the whole turn
    #: by `transcript_wait_s`, means noise: the turn is dropped without a decision.
    drop_empty: bool = True
    #: Offline replay: signals are available only after their measured compute time.
    account_compute: bool = False
    #: Raise SPECULATE for the words of each pause (see `speculate`).
    speculate: bool = True
    #: Smart Turn hears the turn at Silero's first silent window, not at the stop.
    early_audio: bool = True
    #: A transcript is fresh for a pause if its audio reaches the start of the quiet
    #: energy run that Silero's silence began at most this long after (0: only if it
    #: reaches Silero's silence). The ASR decodes at that quiet start (`asr.dip_ms`).
    quiet_lag_s: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.incomplete_p < self.complete_p <= 1.0:
            raise InvalidInput("need 0 <= incomplete_p < complete_p <= 1")
        if not 0.0 <= self.min_silence_s <= self.max_silence_s <= self.silence_cap_s:
            raise InvalidInput("need 0 <= min_silence_s <= max_silence_s <= silence_cap_s")
        if not 0.0 <= self.quiet_lag_s <= 0.5:
            raise InvalidInput("quiet_lag_s must be within [0, 0.5] s")
        if self.vad_stop_ms < 32 or self.max_turn_s <= 1.0:
            raise InvalidInput("vad_stop_ms must be >= 32 and max_turn_s > 1 s")

    def required_silence(self, p: float) -> float:
        """Silence (s, from where it began) a turn with end-of-turn probability p needs."""
        lo, hi = self.incomplete_p, self.complete_p
        if p >= hi:
            return self.min_silence_s
        if p <= lo:
            return self.max_silence_s
        # log-linear: every step up in confidence shortens the wait by the same factor
        frac = (p - lo) / (hi - lo)
        short = max(self.min_silence_s, 0.05)
        return float(short**frac * self.max_silence_s ** (1.0 - frac)) if frac < 1 else short


def logit(p: float) -> float:
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, z))))


@dataclass(slots=True)
class _Signal:
    value: float
    ready_s: float  # stream time the value is available
    text: str = ""


@dataclass(slots=True)
class StopRecord:
    """What the detector knew at one speech stop (for traces and offline analysis)."""

    silence_since: float  # where the silence began
    stop_at: float  # when the VAD reported it
    turn_start_s: float
    p_audio: float | None = None
    audio_ready_s: float | None = None
    text: str | None = None  # the fresh transcript, once it came
    p_text: float | None = None
    text_ready_s: float | None = None
    text_score: Any = None  # the semantic model's full score (features)


@dataclass(slots=True)
class _Turn:
    start_s: float  # first speech of the turn
    silence_since: float | None = None  # start of the current silence
    stop_at: float | None = None  # stream time of the VAD stop event
    audio: _Signal | None = None  # Smart Turn at this stop
    text: _Signal | None = None  # semantic score of a transcript fresh for this stop
    empty: bool = False  # the fresh transcript was empty
    heard: bool = False  # some non-empty transcript came during this turn
    record: StopRecord | None = None
    #: Smart Turn heard at Silero's first silent window, before the stop is confirmed:
    #: (where that silence began, the signal); used if the stop comes for that silence.
    early_audio: tuple[float, _Signal] | None = None


@dataclass(slots=True)
class _Transcript:
    text: str = ""
    audio_end_s: float | None = None
    at_s: float = 0.0
    score: _Signal | None = None
    raw: Any = None


@dataclass(slots=True)
class SpeculationTally:
    """Counts what speculation would have bought, from a detector's events.

    A SPECULATE is a *hit* when the turn then ends (END_OF_TURN) on the same words
    with no speech in between: a reply started at the SPECULATE would be spoken. It
    is a *miss* when the user speaks again, the words differ or the "turn" is dropped.
    `leads_s`: for hits, how long before the decision the reply could start.
    """

    started: int = 0
    hits: int = 0
    misses: int = 0
    leads_s: list[float] = field(default_factory=list)
    _open: DetectorEvent | None = None

    def observe(self, event: DetectorEvent) -> None:
        kind, pending = event.kind, self._open
        if kind is EventKind.SPECULATE:
            if pending is not None and pending.text == event.text:
                return
            if pending is not None:
                self.misses += 1
            self.started += 1
            self._open = event
        elif pending is None:
            return
        elif kind is EventKind.END_OF_TURN:
            if event.text == pending.text:
                self.hits += 1
                self.leads_s.append(max(0.0, event.at_s - pending.at_s))
            else:
                self.misses += 1
            self._open = None
        elif kind in (EventKind.SPEECH_START, EventKind.NOT_SPEECH, EventKind.BACKCHANNEL):
            self.misses += 1
            self._open = None

    def summary(self) -> dict[str, Any]:
        leads = sorted(self.leads_s)
        return {
            "started": self.started,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / self.started, 3) if self.started else None,
            "lead_p50_ms": round(1000 * float(np.median(leads)), 1) if leads else None,
        }


class ParleyTurnDetector:
    """Per-stream end-of-turn state. Not thread-safe: one stream, one caller."""

    def __init__(
        self,
        vad_model: SileroVadModel,
        *,
        smart_turn: AudioTurnModel | None = None,
        semantic: TextTurnModel | None = None,
        config: ParleyTurnConfig | None = None,
        timer: Callable[[], float] = time.perf_counter,
        keep_stops: int = 64,
    ) -> None:
        self.config = cfg = config or ParleyTurnConfig()
        self.vad: VadStream = VadStream(vad_model, VadOptions(min_silence_ms=cfg.vad_stop_ms))
        self.energy = EnergyTracker()
        #: (pause start, where the energy fell quiet before it) as seen when the pause
        #: began, as the ASR judges it at its own stop: a breath or click later in the
        #: pause must not undo a judgement the ASR will not revisit.
        self._pause_quiet: tuple[float, float | None] | None = None
        self.smart_turn = smart_turn
        self.semantic = semantic
        self._timer = timer
        self.position = 0  # samples received
        self._previous_s = 0.0  # stream time before the latest frame
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0  # stream sample of _buffer[0]
        self._buffered = 0
        self._turn: _Turn | None = None
        self._transcript = _Transcript()
        self.avatar_speaking = False
        #: The ASR still owes words for speech heard (set by the caller each frame): a
        #: turn without words is then late, not noise, and is not dropped.
        self.asr_pending = False
        self._speculated: str | None = None  # text of the latest SPECULATE this pause
        # bounded histories, for traces and offline analysis
        self.model_ms: deque[float] = deque(maxlen=8 * keep_stops)  # per model call
        self.events: deque[DetectorEvent] = deque(maxlen=8 * keep_stops)  # all emitted
        self.probability = 0.0  # latest end-of-turn probability (0 while the user speaks)
        self.stops: deque[StopRecord] = deque(maxlen=keep_stops)

    # -- inputs ---------------------------------------------------------------------------
    @property
    def now_s(self) -> float:
        return self.position / SAMPLE_RATE

    def set_avatar_speaking(self, speaking: bool) -> None:
        self.avatar_speaking = bool(speaking)

    def update_transcript(
        self, text: str, *, audio_end_s: float | None = None, at_s: float | None = None
    ) -> None:
        """The ASR's latest transcript of the current turn (finals so far + the partial).

        `audio_end_s`: stream time up to which the ASR had heard when it decoded this
        text; a transcript is fresh for a speech stop if it reaches the stop's
        silence. Without it, a transcript counts as fresh when it arrives after the
        stop. `at_s`: stream time it arrived (default: now).
        """
        if not isinstance(text, str):
            raise InvalidInput("transcript must be a string")
        at = self.now_s if at_s is None else float(at_s)
        tr = _Transcript(text.strip(), audio_end_s, at)
        self._transcript = tr
        turn = self._turn
        if turn is None and not tr.text:
            return
        if self.semantic is not None and tr.text:
            # Scored as it arrives (partials too): keeps the model's KV cache on the
            # growing text, so the score at the stop only reads the newest words.
            started = self._timer()
            score = self.semantic.score(tr.text)
            ms = float(getattr(score, "ms", (self._timer() - started) * 1000))
            self.model_ms.append(ms)
            tr.score = _Signal(float(score.probability), self._ready(at, ms), tr.text)
            tr.raw = score
        if turn is not None:
            turn.heard = turn.heard or bool(tr.text)
            if turn.stop_at is not None and turn.text is None and self._fresh(tr, turn):
                self._take_text(turn, tr)

    def speculate(
        self, text: str, *, audio_end_s: float | None = None, at_s: float | None = None
    ) -> list[DetectorEvent]:
        """SPECULATE if `text` holds the words up to the pause going on now.

        Called with each new transcript *before* `update_transcript` scores it, so a
        reply can start while the models decide: cheap, no model call. The pause
        counts from where the VAD first heard silence, before its stop is confirmed
        (the ASR may stop and decode sooner than the turn's VAD). Each text once;
        no SPECULATE for a backchannel while the avatar talks.
        """
        text = text.strip() if isinstance(text, str) else ""
        end = self.now_s if audio_end_s is None else audio_end_s
        event = self._speculation(text, end, self.now_s if at_s is None else at_s)
        if event is None:
            return []
        self.events.append(event)
        return [event]

    def _speculation(self, text: str, audio_end_s: float, at_s: float) -> DetectorEvent | None:
        turn = self._turn
        if not self.config.speculate or not text or turn is None or text == self._speculated:
            return None
        if self.avatar_speaking and (is_backchannel(text) or is_filler(text)):
            return None
        pause = turn.silence_since if turn.silence_since is not None else self.vad.pending_silence_s
        if pause is None or not self._covers(audio_end_s, pause):
            return None  # the words of speech still going on
        self._speculated = text
        return DetectorEvent(EventKind.SPECULATE, at_s, 0.0, "", text)

    def _take_text(self, turn: _Turn, tr: _Transcript) -> None:
        turn.empty = not tr.text
        turn.text = tr.score if tr.text else None
        if turn.record is not None and turn.text is not None:
            turn.record.text, turn.record.p_text = tr.text, turn.text.value
            turn.record.text_ready_s, turn.record.text_score = turn.text.ready_s, tr.raw

    def _fresh(self, tr: _Transcript, turn: _Turn) -> bool:
        assert turn.silence_since is not None and turn.stop_at is not None
        if tr.audio_end_s is not None:
            return self._covers(tr.audio_end_s, turn.silence_since)
        return tr.at_s >= turn.stop_at - 1e-6

    def _covers(self, audio_end_s: float, pause_s: float) -> bool:
        """Audio decoded up to `audio_end_s` holds every word before the pause."""
        quiet = self._quiet_before(pause_s)
        return quiet_covers(audio_end_s, pause_s, quiet, self.config.quiet_lag_s)

    def _quiet_before(self, pause_s: float) -> float | None:
        seen = self._pause_quiet
        if seen is None or abs(seen[0] - pause_s) > 1e-6:
            seen = self._pause_quiet = (pause_s, self.energy.quiet_since)
        return seen[1]

    def _ready(self, at_s: float, ms: float) -> float:
        return at_s + (ms / 1000.0 if self.config.account_compute else 0.0)

    # -- frames ---------------------------------------------------------------------------
    def push(self, frame: np.ndarray) -> list[float]:
        """Detector protocol: feed a frame, get the stream times of end-of-turn decisions."""
        return [e.at_s for e in self.push_events(frame) if e.kind is EventKind.END_OF_TURN]

    def push_events(self, frame: np.ndarray) -> list[DetectorEvent]:
        samples = np.asarray(frame)
        if samples.ndim != 1 or samples.dtype != np.float32:
            raise InvalidInput("audio frames must be 1-D float32 arrays (16 kHz mono)")
        if not np.isfinite(samples).all():
            raise InvalidInput("audio frame contains NaN or infinite samples")
        out: list[DetectorEvent] = []
        self._keep(samples)
        self._previous_s = self.now_s
        self.position += len(samples)
        now = self.now_s
        self.energy.push(samples)
        for ev in self.vad.push(samples):
            if ev.speaking:
                out.append(DetectorEvent(EventKind.SPEECH_START, ev.at_s))
                self._speculated = None
                if self._turn is None:
                    self._turn = _Turn(start_s=ev.at_s)
                else:
                    self._turn.silence_since = self._turn.stop_at = None
                    self._turn.audio = self._turn.text = self._turn.early_audio = None
                    self._turn.empty = False
                self.probability = 0.0
            elif self._turn is not None:
                out.append(DetectorEvent(EventKind.SPEECH_END, ev.at_s))
                self._on_stop(self._turn, ev.at_s, now)
        if self.vad.pending_silence_s is not None:
            self._quiet_before(self.vad.pending_silence_s)  # judged as the pause begins
        self._hear_early(now)
        tr = self._transcript
        if tr.audio_end_s is not None and self._turn is not None:
            # Words decoded where the energy fell quiet arrive before Silero hears the
            # pause: they are speculated on once it does.
            early = self._speculation(tr.text, tr.audio_end_s, now)
            if early is not None:
                out.append(early)
        turn = self._turn
        if turn is not None:
            decision = self._decide(turn, now)
            if decision is not None:
                out.append(decision)
        self.events.extend(out)
        return out

    def _keep(self, samples: np.ndarray) -> None:
        """Bounded audio history: Smart Turn hears at most the last 8 s."""
        self._buffer.append(samples)
        self._buffered += len(samples)
        limit = 12 * SAMPLE_RATE
        if self._buffered > limit:
            keep = np.concatenate(self._buffer)[-10 * SAMPLE_RATE :]
            self._buffer_start += self._buffered - len(keep)
            self._buffer, self._buffered = [keep], len(keep)

    def _audio_since(self, t_s: float) -> np.ndarray:
        audio = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.float32)
        self._buffer = [audio]
        first = max(0, round(t_s * SAMPLE_RATE) - self._buffer_start)
        return audio[first:]

    def _hear_turn(self, turn: _Turn, now: float) -> _Signal | None:
        """Smart Turn on the turn's audio so far (None without the model)."""
        if self.smart_turn is None:
            return None
        started = self._timer()
        p = float(
            self.smart_turn.probability(self._audio_since(turn.start_s - self.config.pre_speech_s))
        )
        ms = float(getattr(self.smart_turn, "last_ms", None) or (self._timer() - started) * 1000)
        self.model_ms.append(ms)
        return _Signal(p, self._ready(now, ms))

    def _hear_early(self, now: float) -> None:
        """Run Smart Turn at Silero's first silent window, not 64 ms later at the
        confirmed stop: the words are often scored by then (the ASR decodes where
        the energy fell quiet), and Smart Turn would be the last signal in."""
        turn, pause = self._turn, self.vad.pending_silence_s
        if not self.config.early_audio or turn is None or pause is None:
            return
        if turn.stop_at is not None or (turn.early_audio and turn.early_audio[0] == pause):
            return
        signal = self._hear_turn(turn, now)
        turn.early_audio = None if signal is None else (pause, signal)

    def _on_stop(self, turn: _Turn, silence_since: float, now: float) -> None:
        turn.silence_since, turn.stop_at = silence_since, now
        turn.audio = turn.text = None
        turn.empty = False
        turn.record = StopRecord(silence_since, now, turn.start_s)
        self.stops.append(turn.record)
        early, turn.early_audio = turn.early_audio, None
        if early is not None and abs(early[0] - silence_since) < 1e-6:
            turn.audio = early[1]  # heard when this silence began
        else:
            turn.audio = self._hear_turn(turn, now)
        if turn.audio is not None:
            turn.record.p_audio, turn.record.audio_ready_s = turn.audio.value, turn.audio.ready_s
        tr = self._transcript
        if tr.text and tr.score is not None and self._fresh(tr, turn):
            self._take_text(turn, tr)  # the transcript already covers this stop

    # -- the decision ---------------------------------------------------------------------
    def _combined(self, turn: _Turn) -> tuple[float, float] | None:
        """(P(end of turn), stream time it is known) from what is available, or None."""
        cfg = self.config
        text = turn.text
        if text is not None and is_backchannel(text.text):
            return max(cfg.backchannel_p, text.value), text.ready_s
        z, ready = cfg.bias, 0.0
        if turn.audio is not None:
            z += cfg.w_audio * logit(turn.audio.value)
            ready = turn.audio.ready_s
        if text is not None:
            z += cfg.w_text * logit(text.value)
            ready = max(ready, text.ready_s)
        elif self.semantic is not None:
            return None  # the words are what we wait for
        elif turn.audio is None:
            return None
        return sigmoid(z), ready

    def _decide(self, turn: _Turn, now: float) -> DetectorEvent | None:
        cfg = self.config
        if now - turn.start_s >= cfg.max_turn_s:
            return self._end(
                turn, now, self.probability, "max_turn", text=self._text_of(turn),
                restart=self.vad.speaking,
            )  # fmt: skip
        if turn.silence_since is None or turn.stop_at is None:
            return None
        silent = now - turn.silence_since
        if silent >= cfg.silence_cap_s:
            if not turn.heard and cfg.drop_empty and self.semantic is not None:
                # Still no words (the ASR owed some). Over the avatar: call it noise, so
                # its paused reply goes on. Otherwise end the turn: the caller's final
                # then says whether anything was said (a busy box can be that late).
                if self.avatar_speaking:
                    self._reset()
                    return DetectorEvent(EventKind.NOT_SPEECH, now)
            return self._end(turn, now, self.probability, "silence_cap", text=self._text_of(turn))
        audio = turn.audio
        # 2. fast path: the audio model alone, before the transcript exists
        if (
            audio is not None
            and cfg.fast_audio_p is not None
            and not self.avatar_speaking  # then the words must say it is no backchannel
            and turn.text is None
            and audio.value >= cfg.fast_audio_p
            and now >= audio.ready_s
            and silent + 1e-9 >= cfg.min_silence_s
        ):
            at = max(audio.ready_s, self._silence_met(turn, cfg.min_silence_s, now))
            return self._end(turn, at, audio.value, "fast_audio")
        # a fresh transcript: the words decide (or say "nothing was said")
        if turn.empty and cfg.drop_empty and now >= turn.stop_at:
            self._reset()
            return DetectorEvent(EventKind.NOT_SPEECH, now)
        text = turn.text
        if text is not None and now >= text.ready_s and self.avatar_speaking:
            # Feedback over the avatar: "mm-hm", or Whisper's rendering of a hum ("NMM").
            if is_backchannel(text.text) or is_filler(text.text):
                self._reset()
                return DetectorEvent(EventKind.BACKCHANNEL, text.ready_s, 0.0, "", text.text)
        combined = self._combined(turn)
        if (
            combined is None
            and self.semantic is not None
            and now - turn.stop_at >= cfg.transcript_wait_s
        ):
            if not turn.heard and cfg.drop_empty:
                if self.asr_pending:
                    return None  # the words are late (a busy box), not missing
                self._reset()  # the ASR heard no words in this "turn": noise, a cough
                return DetectorEvent(EventKind.NOT_SPEECH, now)
            # The ASR is late (or behind on a long utterance): the audio alone decides.
            if audio is not None and now >= audio.ready_s:
                combined = (audio.value, audio.ready_s)
            else:
                combined = (0.5, now)
        if combined is None:
            return None
        p, ready = combined
        if now < ready:
            return None
        self.probability = p
        need = cfg.required_silence(p)
        if silent + 1e-9 < need:
            return None
        reason = "confident" if p >= cfg.complete_p else "silence"
        at = max(ready, self._silence_met(turn, need, now))
        return self._end(turn, at, p, reason, text=text.text if text else "")

    @staticmethod
    def _text_of(turn: _Turn) -> str:
        return turn.text.text if turn.text is not None else ""

    def _silence_met(self, turn: _Turn, need: float, now: float) -> float:
        """When `need` s of silence were reached: on the frame grid, like the fixed-silence
        baselines (the models finish when they finish, between frames too)."""
        assert turn.silence_since is not None and turn.stop_at is not None
        t = max(turn.stop_at, turn.silence_since + need)
        return now if t > self._previous_s else t

    def _end(
        self,
        turn: _Turn,
        at: float,
        p: float,
        reason: str,
        *,
        text: str = "",
        restart: bool = False,
    ) -> DetectorEvent:
        self._reset()
        if restart:  # the monologue goes on: its next part is a new turn from now
            self._turn = _Turn(start_s=self.now_s)
        return DetectorEvent(EventKind.END_OF_TURN, at, p, reason, text)

    def _reset(self) -> None:
        self._turn = None
        self._speculated = None
        self._transcript = _Transcript()
        self.probability = 0.0


__all__ = [
    "DetectorEvent",
    "EventKind",
    "ParleyTurnConfig",
    "ParleyTurnDetector",
    "SpeculationTally",
    "is_backchannel",
    "is_filler",
    "logit",
    "sigmoid",
]
