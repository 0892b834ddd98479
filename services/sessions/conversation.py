"""The conversation engine: one session's loop, every stage streaming.

    mic audio ─► ASR (partials; final decoded as soon as speech stops)
              └► turn detector (VAD + transcript completeness) ─► end of turn
                   └► LLM tokens ─► clause chunker ─► TTS ─► paced audio out
                                                            └► avatar (first frame of each reply)

Plain async Python (no gRPC, no Ray): the servicer, the demo and the benchmark
all drive this class. Barge-in: user speech while a reply is pending or playing
cancels it (LLM, TTS and playback) at once; the avatar's own audio never reaches
the detector, so it cannot interrupt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from parley import clock, metrics
from parley.errors import InvalidInput
from parley.vad import SAMPLE_RATE
from parley.visemes import Phoneme, shift_phonemes

from services.asr.engine import Activity, AsrEngine, Transcript
from services.llm.engine import ChatMessage, GenerationStats, LlmEngine
from services.render.engine import AvatarStream, RenderEngine
from services.sessions.trace import TurnTrace
from services.tts.engine import Speech, TtsEngine
from services.turn.config import TurnConfig
from services.turn.engine import TurnDetector, TurnEventKind

log = logging.getLogger(__name__)

DEFAULT_PERSONA = (
    "You are Ava, a cheerful English-speaking guide on a video call. Reply in English"
    " with one short, helpful sentence. Never apologise or say you are an AI."
)
#: Earlier messages kept in the prompt (besides the persona): a sliding window. The
#: prompt is read ahead while the user talks, so shifting it each turn costs no
#: latency; small models (the embedded 135M one) drift into repeating their own
#: earlier answers when they see more. A larger model can take more (`history_messages`).
HISTORY_MESSAGES = 4
OUTPUT_FRAME_S = 0.02
#: How far audio is sent ahead of real time (the client's jitter buffer).
OUTPUT_LEAD_S = 0.04


@dataclass(frozen=True, slots=True)
class UserTranscriptEvent:
    text: str
    is_final: bool
    turn: int


@dataclass(frozen=True, slots=True)
class AvatarTextEvent:
    text: str
    turn: int


@dataclass(frozen=True, slots=True)
class AvatarAudioEvent:
    samples: np.ndarray
    sample_rate: int
    start_sample: int  # position in the avatar's output stream
    phonemes: list[Phoneme]
    turn: int


@dataclass(frozen=True, slots=True)
class TurnDoneEvent:
    trace: TurnTrace


ConversationEvent = UserTranscriptEvent | AvatarTextEvent | AvatarAudioEvent | TurnDoneEvent


@dataclass(slots=True)
class Engines:
    """The per-process engines a conversation uses (shared by all sessions)."""

    asr: AsrEngine
    llm: LlmEngine
    tts: TtsEngine
    turn: TurnConfig = field(default_factory=TurnConfig)
    #: The avatar renderer; without one, conversations are voice only.
    render: RenderEngine | None = None

    async def start(self) -> None:
        starts = [self.asr.start(), self.llm.start(), self.tts.start()]
        if self.render is not None:
            starts.append(self.render.start())
        await asyncio.gather(*starts)

    async def close(self) -> None:
        closes = [self.asr.close(), self.llm.close(), self.tts.close()]
        if self.render is not None:
            closes.append(self.render.close())
        await asyncio.gather(*closes)


class Conversation:
    def __init__(
        self,
        engines: Engines,
        persona: str = DEFAULT_PERSONA,
        history_messages: int = HISTORY_MESSAGES,
    ) -> None:
        if not 0 <= history_messages <= 200:
            raise InvalidInput("history_messages must be within [0, 200]")
        self.history_messages = history_messages
        if len(persona) > 4000:
            raise InvalidInput("persona prompt is too long (limit 4000 characters)")
        self.engines = engines
        self.asr = engines.asr.stream()
        self.turn_detector = TurnDetector(engines.asr.vad_model, engines.turn)
        self.persona = ChatMessage("system", persona or DEFAULT_PERSONA)
        self.history: list[ChatMessage] = []
        self.events: asyncio.Queue[ConversationEvent] = asyncio.Queue(maxsize=10_000)
        self.traces: list[TurnTrace] = []
        self.turn = 0
        self.position = 0  # input samples received
        self.output_position = 0  # avatar samples sent
        self._finals: list[str] = []
        self._carry_text = ""  # user words of a reply cancelled before it spoke
        self._trace = TurnTrace(turn=1)
        self._reply: asyncio.Task[None] | None = None
        self._reply_speaking = False
        self._closed = False
        self._prefill: asyncio.Task[int] | None = None
        # The avatar's video timeline is session time (it idles between replies), unlike
        # the audio output stream, which only holds what was said.
        self._started = clock.now()
        self.avatar: AvatarStream | None = engines.render.stream() if engines.render else None
        self._render_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="render") if self.avatar else None
        )

    def prepare(self) -> asyncio.Task[int]:
        """Start reading the persona into the LLM's prefix cache, in the background.

        Called when the session is created, so the first turn only pays for the
        user's words (the persona alone is ~0.4 s of prompt reading on 2 cores).
        """
        if self._prefill is None:
            self._read_ahead()
        assert self._prefill is not None
        return self._prefill

    def _read_ahead(self) -> None:
        """Have the LLM read the next turn's prompt (persona + history) in the background.

        Runs while the user is talking, so the next reply only reads their new words.
        """
        self._prefill = asyncio.create_task(self.engines.llm.prefill([self.persona, *self.history]))
        self._prefill.add_done_callback(_log_prefill_failure)

    # -- input ----------------------------------------------------------------------------
    async def push_audio(self, samples: np.ndarray) -> None:
        """Feed microphone audio (16 kHz mono float32), in real time."""
        if self._closed:
            raise InvalidInput("conversation has ended")
        if samples.dtype != np.float32 or samples.ndim != 1:
            raise InvalidInput("audio must be a 1-D float32 array")
        if not np.isfinite(samples).all():
            raise InvalidInput("audio contains NaN or infinite samples")
        now = clock.now()
        self.position += len(samples)
        self.asr.push(samples)
        self._drain_asr()
        for ev in self.turn_detector.push(samples):
            at_wall = now - (self.position / SAMPLE_RATE - ev.at_s)
            if ev.kind is TurnEventKind.SPEECH_START:
                if self._reply is not None and not self._reply.done():
                    self._barge_in(at_wall)
            elif ev.kind is TurnEventKind.SPEECH_END:
                self._trace.speech_end = at_wall
            elif ev.kind is TurnEventKind.END_OF_TURN:
                trace, self._trace = self._trace, TurnTrace(turn=self._trace.turn + 1)
                trace.end_of_turn = now
                if not trace.speech_end:
                    trace.speech_end = at_wall
                self._reply = asyncio.create_task(self._respond(trace))

    def _drain_asr(self) -> None:
        while not self.asr.events.empty():
            ev = self.asr.events.get_nowait()
            if isinstance(ev, Activity):
                continue
            self._on_transcript(ev)

    def _on_transcript(self, ev: Transcript) -> None:
        if ev.is_final:
            self._finals.append(ev.text)
            self._trace.asr_decode_s = ev.decode_s
        text = " ".join([*self._finals, "" if ev.is_final else ev.text]).strip()
        self.turn_detector.update_transcript(text)
        self._emit(UserTranscriptEvent(text, ev.is_final, self._trace.turn))

    # -- replies --------------------------------------------------------------------------
    def _barge_in(self, speech_start_wall: float) -> None:
        assert self._reply is not None
        self._reply.cancel()
        trace = self.traces[-1] if self.traces and self._reply_speaking else None
        stop = clock.now() - speech_start_wall
        if self._reply_speaking:
            metrics.INTERRUPTIONS.inc()
            metrics.INTERRUPTION_LATENCY.observe(stop)
        if self.avatar is not None:
            self.avatar.clear(clock.now() - self._started)
        if trace is not None:
            trace.interrupted = True
            trace.interruption_stop_s = stop
            trace.interrupted_at = clock.now()
            trace.extra["output_position_at_stop"] = self.output_position

    async def _respond(self, trace: TurnTrace) -> None:
        final = await self.asr.finalize()
        self._drain_asr()
        trace.asr_final = clock.now()
        if final is not None and not self._finals:
            self._finals.append(final.text)
        user_text = " ".join([self._carry_text, *self._finals]).strip()
        self._finals, self._carry_text = [], ""
        self.turn_detector.update_transcript("")
        if not user_text:
            return  # noise or breath: nothing to answer
        self.turn = trace.turn
        trace.user_text = user_text
        self.traces.append(trace)
        messages = [self.persona, *self.history, ChatMessage("user", user_text)]
        spoken: list[str] = []
        try:
            await self._speak(trace, messages, spoken)
        except asyncio.CancelledError:
            if not spoken:
                # Cancelled before saying anything: the user was not done; keep their words.
                self._carry_text = user_text
                self.traces.remove(trace)
                return
            raise
        finally:
            self._reply_speaking = False
            if spoken:
                trace.reply_text = " ".join(spoken)
                self.history += [
                    ChatMessage("user", user_text),
                    ChatMessage("assistant", trace.reply_text),
                ]
                keep = self.history_messages
                self.history = self.history[-keep:] if keep else []
                if not self._closed:
                    self._read_ahead()
                trace.observe()
                self._emit(TurnDoneEvent(trace))

    async def _speak(
        self, trace: TurnTrace, messages: list[ChatMessage], spoken: list[str]
    ) -> None:
        stats = GenerationStats()

        async def tokens() -> AsyncIterator[str]:
            async for piece in self.engines.llm.generate(messages, stats=stats):
                if not trace.llm_first_token:
                    trace.llm_first_token = clock.now()
                self._emit(AvatarTextEvent(piece, trace.turn))
                yield piece

        clock_start: float | None = None
        sent = 0.0  # seconds of this reply's audio sent
        avatar_offset: int | None = None  # avatar timeline sample - output stream sample
        first_frame: asyncio.Future[None] | None = None
        async for speech in self.engines.tts.stream(tokens()):
            if not trace.tts_first_audio:
                trace.tts_first_audio = clock.now()
            if self.avatar is not None and len(speech.samples):
                if avatar_offset is None:
                    session_s = clock.now() - self._started
                    self.avatar.advance_to(session_s)
                    now = int(session_s * speech.sample_rate)
                    avatar_offset = max(now, self.avatar.next_sample) - self.output_position
                    first_frame = self._render_first_frame(
                        trace, (self.output_position + avatar_offset) / speech.sample_rate
                    )
                self._place_on_avatar(speech, self.output_position + avatar_offset)
            trace.llm_prompt_tokens, trace.llm_cached_tokens = (
                stats.prompt_tokens,
                stats.cached_tokens,
            )
            self._reply_speaking = True
            spoken.append(speech.text)
            for frame in _frames(speech):
                if clock_start is None:
                    clock_start = clock.now()
                    trace.first_output = clock_start
                # Pace output like a real-time transport, keeping a small lead.
                delay = clock_start + sent - OUTPUT_LEAD_S - clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._emit(frame._replace_turn(trace.turn, self.output_position))
                self.output_position += len(frame.samples)
                sent += len(frame.samples) / frame.sample_rate
        # Let the last audio play out before the reply counts as done.
        if clock_start is not None:
            await asyncio.sleep(max(0.0, clock_start + sent - clock.now()))
        if first_frame is not None:
            await first_frame

    def _place_on_avatar(self, speech: Speech, start: int) -> None:
        assert self.avatar is not None
        phonemes = shift_phonemes(speech.phonemes, start)
        self.avatar.add_speech(speech.samples, speech.sample_rate, start, phonemes)

    def _render_first_frame(self, trace: TurnTrace, at_s: float) -> asyncio.Future[None]:
        """Render the frame shown with the reply's first audio; its time is a milestone."""
        assert self.avatar is not None
        avatar = self.avatar
        index = math.ceil(at_s * avatar.fps)

        def render() -> None:
            avatar.render_frame(index)
            trace.first_frame = clock.now()

        return asyncio.get_running_loop().run_in_executor(self._render_executor, render)

    def _emit(self, event: ConversationEvent) -> None:
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:
            # A consumer that stopped reading must not stall the loop; drop the oldest.
            with contextlib.suppress(asyncio.QueueEmpty):
                self.events.get_nowait()
            self.events.put_nowait(event)

    @property
    def replying(self) -> bool:
        return self._reply is not None and not self._reply.done()

    async def wait_idle(self) -> None:
        """Wait until the reply in progress (if any) has finished or was cancelled."""
        while self._reply is not None and not self._reply.done():
            # asyncio.wait: a cancelled reply ends the wait, a cancelled waiter propagates.
            await asyncio.wait({self._reply})

    async def drop_stream(self) -> None:
        """The client's stream went away without closing: stop talking, forget unfinished input.

        The session stays usable; a new stream starts from a clean input state.
        """
        if self._reply is not None:
            self._reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply
        self.asr = self.engines.asr.stream()
        self.turn_detector = TurnDetector(self.engines.asr.vad_model, self.engines.turn)
        self.position = 0
        self._finals, self._carry_text = [], ""
        self._trace = TurnTrace(turn=self._trace.turn)
        if self.avatar is not None:
            self.avatar.clear(clock.now() - self._started)
        while not self.events.empty():
            self.events.get_nowait()

    async def close(self) -> None:
        self._closed = True
        if self._prefill is not None:
            self._prefill.cancel()
        if self._reply is not None:
            self._reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply
        if self.avatar is not None:
            self.avatar.close()
        if self._render_executor is not None:
            self._render_executor.shutdown(wait=False, cancel_futures=True)


def _log_prefill_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Not fatal: the next reply then reads the whole prompt itself.
        log.warning("prompt read-ahead failed: %s", task.exception())


@dataclass(frozen=True, slots=True)
class _Frame:
    samples: np.ndarray
    sample_rate: int
    offset: int
    phonemes: list[Phoneme]

    def _replace_turn(self, turn: int, stream_start: int) -> AvatarAudioEvent:
        phonemes = shift_phonemes(self.phonemes, stream_start - self.offset)
        return AvatarAudioEvent(self.samples, self.sample_rate, stream_start, phonemes, turn)


def _frames(speech: Speech) -> list[_Frame]:
    """Cut a clause into output frames, each with the phonemes that start in it."""
    step = int(speech.sample_rate * OUTPUT_FRAME_S)
    out = []
    for i in range(0, len(speech.samples), step):
        ph = [p for p in speech.phonemes if i <= p.start_sample < i + step]
        out.append(_Frame(speech.samples[i : i + step], speech.sample_rate, i, ph))
    return out
