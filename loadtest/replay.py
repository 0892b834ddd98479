"""Replays recorded utterances into a conversation, paced like a live microphone.

Frame k (20 ms) is pushed when its last sample would have been spoken, so the
wall-clock time of any sample is known: `utterance_start + sample / rate`.
That gives the true end of the user's speech, from which each turn is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import jiwer
import numpy as np
from parley import clock
from parley.audio import ASR_SAMPLE_RATE, FRAME_MS
from whisper_normalizer.english import EnglishTextNormalizer

from loadtest.corpus import Utterance, speech_bounds
from services.sessions.conversation import (
    AvatarAudioEvent,
    Conversation,
    TurnDoneEvent,
    UserTranscriptEvent,
)
from services.sessions.trace import MILESTONES, TurnTrace

FRAME = ASR_SAMPLE_RATE * FRAME_MS // 1000
LEAD_SILENCE_S = 0.4
REPLY_TIMEOUT_S = 30.0
#: The VAD may place a speech end this much before the true (energy) end and still
#: mean the end of the utterance (a soft final syllable).
CUT_IN_TOLERANCE_S = 0.3


@dataclass(slots=True)
class TurnResult:
    index: int
    audio: str
    reference: str
    hypothesis: str = ""
    reply: str = ""
    true_speech_end: float = 0.0
    trace: TurnTrace | None = None
    wer: float | None = None
    #: replies to part of this utterance, started before it ended (false cut-ins)
    cut_ins: list[TurnTrace] = field(default_factory=list)

    def latencies(self) -> dict[str, float | None]:
        if self.trace is None:
            return dict.fromkeys(("speech_end_detected", *MILESTONES))
        lat = self.trace.latencies(self.true_speech_end)
        return {"speech_end_detected": self.trace.speech_end - self.true_speech_end, **lat}

    @property
    def u2u_s(self) -> float | None:
        return self.latencies()["first_output"]

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "audio": self.audio,
            "reference": self.reference,
            "hypothesis": self.hypothesis,
            "reply": self.reply,
            "wer": self.wer,
            "u2u_s": self.u2u_s,
            "latency_s": self.latencies(),
            "interrupted": bool(self.trace and self.trace.interrupted),
            "false_cut_ins": [t.user_text for t in self.cut_ins],
            "llm_prompt_tokens": self.trace.llm_prompt_tokens if self.trace else None,
            "llm_cached_tokens": self.trace.llm_cached_tokens if self.trace else None,
        }


@dataclass(slots=True)
class Recording:
    """Both voices on one wall-clock timeline, for the demo's WAV."""

    start: float
    user: list[tuple[float, np.ndarray]] = field(default_factory=list)  # 16 kHz
    #: avatar audio as it left the conversation (avatar rate, phonemes for the video)
    avatar: list[tuple[float, AvatarAudioEvent]] = field(default_factory=list)
    avatar_rate: int = 24_000


_NORMALIZER = EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalisation (numbers, spelling, contractions, punctuation).

    The standard for English ASR scoring: "ten meters" and "10 meters" match.
    """
    return " ".join(_NORMALIZER(text.lower().replace("-", " ")).split())


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    ref = normalize(reference)
    if not ref:
        return None
    return float(jiwer.wer(ref, normalize(hypothesis) or "<empty>"))


async def _push_paced(conv: Conversation, audio: np.ndarray, rec: Recording | None) -> float:
    """Push audio in real time; returns the wall time of its first sample."""
    start = clock.now()
    for k in range(0, len(audio), FRAME):
        frame = audio[k : k + FRAME]
        due = start + (k + len(frame)) / ASR_SAMPLE_RATE
        delay = due - clock.now()
        if delay > 0:
            await asyncio.sleep(delay)
        await conv.push_audio(frame)
        if rec is not None:
            rec.user.append((start + k / ASR_SAMPLE_RATE, frame))
    return start


async def replay(
    conv: Conversation,
    utterances: list[Utterance],
    *,
    record: bool = False,
    on_turn: Callable[[TurnResult], None] | None = None,
) -> tuple[list[TurnResult], Recording | None]:
    """One turn per utterance: speak it, then stay silent until the avatar has answered."""
    rec = Recording(clock.now(), avatar_rate=conv.engines.tts.sample_rate) if record else None
    done: asyncio.Queue[TurnTrace] = asyncio.Queue()
    last_final = [""]

    async def consume() -> None:
        while True:
            ev = await conv.events.get()
            if isinstance(ev, TurnDoneEvent):
                done.put_nowait(ev.trace)
            elif isinstance(ev, UserTranscriptEvent) and ev.is_final:
                last_final[0] = ev.text
            elif isinstance(ev, AvatarAudioEvent) and rec is not None:
                rec.avatar.append((clock.now(), ev))

    consumer = asyncio.create_task(consume())
    silence = np.zeros(FRAME, np.float32)
    results: list[TurnResult] = []
    try:
        for i, utt in enumerate(utterances):
            result = TurnResult(i, utt.path.name, utt.text)
            lead = np.zeros(int(LEAD_SILENCE_S * ASR_SAMPLE_RATE), np.float32)
            _, end = speech_bounds(utt.audio)
            start = await _push_paced(conv, np.concatenate([lead, utt.audio]), rec)
            result.true_speech_end = start + (len(lead) + end) / ASR_SAMPLE_RATE
            deadline = clock.now() + REPLY_TIMEOUT_S
            trace: TurnTrace | None = None
            while clock.now() < deadline:
                with contextlib.suppress(asyncio.QueueEmpty):
                    got = done.get_nowait()
                    # The answer is the reply to speech that ended with the utterance; a
                    # reply to speech that stopped earlier cut the user off mid-utterance.
                    if got.speech_end >= result.true_speech_end - CUT_IN_TOLERANCE_S:
                        trace = got
                    else:
                        result.cut_ins.append(got)
                if trace is not None:
                    break
                await _push_paced(conv, silence, rec)
            result.trace = trace
            if trace is not None:
                result.hypothesis, result.reply = trace.user_text, trace.reply_text
            result.wer = word_error_rate(utt.text, result.hypothesis)
            results.append(result)
            if on_turn is not None:
                on_turn(result)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    return results, rec


@dataclass(slots=True)
class BargeInResult:
    #: the avatar was talking when the user cut in (otherwise the trial does not count)
    avatar_was_talking: bool = False
    interrupted: bool = False
    #: true onset of the user's speech (by energy) → the reply cancelled, no more audio out
    onset_to_stop_s: float | None = None
    #: detected speech start (as the VAD placed it) → cancelled
    detected_to_stop_s: float | None = None
    #: avatar audio frames of the interrupted turn sent after the cancel (must be 0)
    frames_after_stop: int = 0


@dataclass(slots=True)
class BackchannelResult:
    #: the avatar was talking when the user said the backchannel (otherwise not counted)
    avatar_was_talking: bool = False
    #: the backchannel was recognised: the avatar paused and went on with the same reply
    resumed: bool = False
    #: the reply was cancelled as if the user had taken the turn (a failure)
    interrupted: bool = False
    #: how long the avatar was silent for it (true onset → audio again)
    paused_s: float | None = None


async def _ask_and_listen(
    conv: Conversation,
    question: np.ndarray,
    talk_s: float,
    audio_events: list[AvatarAudioEvent],
    done: list[TurnTrace],
) -> int | None:
    """Ask, wait for the avatar to talk `talk_s`; its turn number if it still talks."""
    lead = np.zeros(int(LEAD_SILENCE_S * ASR_SAMPLE_RATE), np.float32)
    await _push_paced(conv, np.concatenate([lead, question]), None)
    if not await _silence_until(conv, lambda: bool(audio_events), REPLY_TIMEOUT_S):
        return None
    turn = audio_events[0].turn
    talk_until = clock.now() + talk_s
    await _silence_until(conv, lambda: clock.now() >= talk_until or bool(done), talk_s + 1)
    if not conv.replying or done:
        await conv.wait_idle()
        return None
    return turn


async def _silence_until(conv: Conversation, condition: Callable[[], bool], limit_s: float) -> bool:
    deadline = clock.now() + limit_s
    silence = np.zeros(FRAME, np.float32)
    while not condition():
        if clock.now() > deadline:
            return False
        await _push_paced(conv, silence, None)
    return True


def _collector(
    conv: Conversation, audio_events: list[AvatarAudioEvent], done: list[TurnTrace]
) -> asyncio.Task[None]:
    async def consume() -> None:
        while True:
            ev = await conv.events.get()
            if isinstance(ev, AvatarAudioEvent):
                audio_events.append(ev)
            elif isinstance(ev, TurnDoneEvent):
                done.append(ev.trace)

    return asyncio.create_task(consume())


async def backchannel_trial(
    conv: Conversation, question: np.ndarray, backchannel: np.ndarray, talk_s: float = 1.0
) -> BackchannelResult:
    """Ask for a long answer, let the avatar talk, say "mm-hm": it must go on with the reply."""
    result = BackchannelResult()
    audio_events: list[AvatarAudioEvent] = []
    done: list[TurnTrace] = []
    consumer = _collector(conv, audio_events, done)
    try:
        turn = await _ask_and_listen(conv, question, talk_s, audio_events, done)
        if turn is None:
            return result
        result.avatar_was_talking = True
        heard = conv.backchannels
        onset, _ = speech_bounds(backchannel)
        start = await _push_paced(conv, backchannel, None)
        true_onset = start + onset / ASR_SAMPLE_RATE
        sent_before = len(audio_events)
        await _silence_until(
            conv, lambda: len(audio_events) > sent_before or bool(done), REPLY_TIMEOUT_S
        )
        resumed_at = clock.now()  # the first avatar audio after the backchannel (±1 frame)
        await conv.wait_idle()
        trace = next((t for t in done if t.turn == turn), None)
        result.interrupted = trace is not None and trace.interrupted
        result.resumed = conv.backchannels > heard and not result.interrupted
        if result.resumed and trace is not None and "paused_s" in trace.extra:
            result.paused_s = resumed_at - true_onset
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    return result


async def barge_in_trial(
    conv: Conversation, question: np.ndarray, interruption: np.ndarray, talk_s: float = 1.0
) -> BargeInResult:
    """Ask for a long answer, let the avatar talk `talk_s`, then cut in with `interruption`.

    The conversation is left idle (the reply to the interruption played out).
    """
    result = BargeInResult()
    audio_events: list[AvatarAudioEvent] = []
    done: list[TurnTrace] = []
    consumer = _collector(conv, audio_events, done)
    try:
        turn = await _ask_and_listen(conv, question, talk_s, audio_events, done)
        result.avatar_was_talking = turn is not None
        if turn is None:
            return result
        onset, _ = speech_bounds(interruption)
        start = await _push_paced(conv, interruption, None)
        true_onset = start + onset / ASR_SAMPLE_RATE
        await _silence_until(conv, lambda: any(t.turn == turn for t in done), REPLY_TIMEOUT_S)
        trace = next((t for t in done if t.turn == turn), None)
        if trace is not None and trace.interrupted:
            result.interrupted = True
            result.onset_to_stop_s = trace.interrupted_at - true_onset
            result.detected_to_stop_s = trace.interruption_stop_s
            stop_position = trace.extra["output_position_at_stop"]
            result.frames_after_stop = sum(
                1 for ev in audio_events if ev.turn == turn and ev.start_sample >= stop_position
            )
        # Let the answer to the interruption play out so the next trial starts idle.
        await _silence_until(conv, lambda: any(t.turn > turn for t in done), REPLY_TIMEOUT_S)
        await conv.wait_idle()
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    return result
