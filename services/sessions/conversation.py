"""The conversation engine: one session's loop, every stage streaming.

    mic audio ─► ASR (partials; the whole utterance decoded as soon as speech stops)
              └► turn detector (VAD + Smart Turn + the words' end-of-turn probability)
                   ├─ SPECULATE ─► reply started on the pause's words, held back
                   └─ END_OF_TURN ─► reply released (same words) or started afresh
                        LLM tokens ─► clause chunker ─► TTS ─► paced audio out
                                                           └► avatar timeline ─► live video

Plain async Python (no gRPC, no Ray): the servicer, the demo and the benchmark
all drive this class.

Avatar (with `Engines.render`): each reply's audio is placed on the avatar's timeline,
which is session time (the avatar idles between replies), and every audio event carries
its place there (`pts_s`). While a stream shows video (`start_video`, see
`services/sessions/video.py`) frames are rendered live on that timeline on one render
thread; otherwise only the frame shown with each reply's first audio is rendered, to
time it. Either way that frame's time is the turn's `first_frame` milestone.

Speculation: when the words of a pause are in and may be the whole turn, the
reply starts at once (LLM and TTS run, nothing is sent). If the turn then ends on
the same words it is released and its first audio goes out immediately; if the
user speaks again or the words differ, it is dropped (its tokens counted as wasted).

Barge-in: user speech while the avatar talks *pauses* it at once (within a frame);
a backchannel ("mm-hm", "yeah") or a sound with no words (a cough) resumes it where
it stopped, anything else cancels it. Speech that goes on past `BACKCHANNEL_MAX_S`
cancels it too. A reply not yet speaking is cancelled outright and the user's words
carried into their next turn. The avatar's own audio never reaches the detector, so
it cannot interrupt itself (clients run echo cancellation on the microphone).
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
from parley.visemes import Phoneme, phonemes_from, shift_phonemes

from services.asr.engine import Activity, AsrEngine, Transcript
from services.llm.engine import ChatMessage, GenerationStats, LlmEngine
from services.render.default_avatar import AVATAR_ID
from services.render.engine import AvatarStream, RenderEngine
from services.sessions.trace import TurnTrace
from services.sessions.video import LiveVideo, LiveVideoConfig, init_render_thread, render_timed
from services.tts.engine import Speech, TtsEngine
from services.turn.detector import DetectorEvent, EventKind, ParleyTurnConfig
from services.turn.engine import TurnEngine

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
#: User speech over the avatar that lasts longer than this is no backchannel: the
#: paused reply is cancelled without waiting for the words ("mm-hm" takes ~0.3-0.6 s).
BACKCHANNEL_MAX_S = 1.0
#: A held speculative reply starts generating when the detector will wait at least
#: this much more silence before it decides.
SPECULATE_WAIT_S = 0.15
#: Live video holds its frame from the end of the user's speech until the reply's first
#: audio (at most this long): the render thread then takes no CPU from the stages that
#: decide the turn and prepare the reply (see services/sessions/video.py).
VIDEO_HOLD_MAX_S = 1.5


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
    #: Seconds on the avatar's timeline (that of the video's pts) where its first sample
    #: plays; None without an avatar.
    pts_s: float | None = None


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
    turn: TurnEngine = field(default_factory=TurnEngine)
    #: The avatar renderer; without one, conversations are voice only.
    render: RenderEngine | None = None
    #: Live video of the avatar (fps, size, encodings' settings), with a renderer.
    video: LiveVideoConfig = field(default_factory=LiveVideoConfig)

    def _all(self) -> list[AsrEngine | LlmEngine | TtsEngine | TurnEngine | RenderEngine]:
        engines: list[AsrEngine | LlmEngine | TtsEngine | TurnEngine | RenderEngine]
        engines = [self.asr, self.llm, self.tts, self.turn]
        return engines + ([self.render] if self.render is not None else [])

    async def start(self) -> None:
        await asyncio.gather(*(engine.start() for engine in self._all()))

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self._all()))


@dataclass(slots=True)
class SpeculationStats:
    """Per session: replies started before the end of turn, and what became of them."""

    started: int = 0
    hits: int = 0  # released: the turn ended on the same words
    misses: int = 0  # dropped: the user spoke on, or the final words differed
    wasted_tokens: int = 0  # generated by dropped speculations

    def as_dict(self) -> dict[str, float]:
        return {
            "started": self.started,
            "hits": self.hits,
            "misses": self.misses,
            "wasted_tokens": self.wasted_tokens,
            "hit_rate": self.hits / self.started if self.started else 0.0,
        }


@dataclass(slots=True)
class _Speculation:
    """A reply to a pause's words. Its prompt, the words included, is read at once
    (`prefill`, one thread, while the turn models score the words), so a reply to
    the same words starts with its first token. It generates as soon as the
    detector says it will wait for more silence (then it is ready when the wait
    ends), or when the turn ends on those words. Generating any earlier only slowed
    the models deciding the turn (2 cores; measured: +50-120 ms u2u p50,
    docs/benchmarks.md)."""

    text: str  # the words it answers
    trace: TurnTrace  # milestones while held back; adopted by the turn on a hit
    stats: GenerationStats
    release: asyncio.Event  # may speak
    generate: asyncio.Event  # may generate
    started_at: float
    task: asyncio.Task[None] | None = None
    prefill: asyncio.Task[int] | None = None


class Conversation:
    def __init__(
        self,
        engines: Engines,
        persona: str = DEFAULT_PERSONA,
        history_messages: int = HISTORY_MESSAGES,
        *,
        speculate: bool = True,
        turn_config: ParleyTurnConfig | None = None,
        avatar_id: str = AVATAR_ID,
    ) -> None:
        """A conversation with the avatar `avatar_id` (with a renderer: its profile is
        fetched here unless `engines.render.load(avatar_id)` has been awaited)."""
        if not 0 <= history_messages <= 200:
            raise InvalidInput("history_messages must be within [0, 200]")
        self.history_messages = history_messages
        if len(persona) > 4000:
            raise InvalidInput("persona prompt is too long (limit 4000 characters)")
        self.engines = engines
        self.speculate = speculate
        self.asr = engines.asr.stream()
        self.turn_config = turn_config
        self.turn_stream = engines.turn.stream(turn_config)
        self.persona = ChatMessage("system", persona or DEFAULT_PERSONA)
        self.history: list[ChatMessage] = []
        self.events: asyncio.Queue[ConversationEvent] = asyncio.Queue(maxsize=10_000)
        self.traces: list[TurnTrace] = []
        self.speculation = SpeculationStats()
        self.backchannels = 0  # heard while the avatar talked (it went on)
        self.turn = 0
        self.position = 0  # input samples received
        self.output_position = 0  # avatar samples sent
        self._finals: list[str] = []
        self._carry_text = ""  # user words of a reply cancelled before it spoke
        self._transcript_end: float | None = None  # stream time the latest transcript covers
        self._trace = TurnTrace(turn=1)
        self._reply: asyncio.Task[None] | None = None
        self._reply_speaking = False
        self._spec: _Speculation | None = None
        # Set while output may flow; cleared while user speech over the avatar is judged.
        self._output_open = asyncio.Event()
        self._output_open.set()
        self._paused_since: float | None = None  # wall clock of the pause's speech onset
        self._closed = False
        self._prefill: asyncio.Task[int] | None = None
        self._words_read: asyncio.Task[int] | None = None  # the user's words, read ahead
        # The avatar's video timeline is session time (it idles between replies), unlike
        # the audio output stream, which only holds what was said.
        self._started = clock.now()
        self.avatar: AvatarStream | None = None
        self._render_executor: ThreadPoolExecutor | None = None
        if engines.render is not None:
            v = engines.video
            self.avatar = engines.render.stream(
                avatar_id, width=v.width, height=v.height, fps=v.fps
            )
            # One thread renders this avatar (first frames and live video alike).
            self._render_executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="render",
                initializer=init_render_thread,
                initargs=(engines.render.config.threads, v.render_nice),
            )
        #: The live video a stream is showing (start_video), if any.
        self.video: LiveVideo | None = None
        self._video_hold_until = 0.0  # wall clock; see VIDEO_HOLD_MAX_S

    def continue_from(self, history: list[ChatMessage], turns: int) -> asyncio.Task[int]:
        """Go on from a conversation held elsewhere (another replica): its history (the
        prompt keeps the last `history_messages`) and turn count, read ahead at once."""
        if turns < 0:
            raise InvalidInput("turns must not be negative")
        keep = self.history_messages
        self.history = list(history[-keep:]) if keep else []
        self.turn = turns
        self._trace = TurnTrace(turn=turns + 1)
        self._read_ahead()  # the new history, even if the old one was read already
        assert self._prefill is not None
        return self._prefill

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

    # -- video ----------------------------------------------------------------------------
    def start_video(self, encoding: str = "jpeg") -> LiveVideo:
        """Start the avatar's live video (one at a time; `stop_video` ends it). Read its
        frames with `video.frames()`. InvalidInput without a renderer."""
        if self.avatar is None or self._render_executor is None:
            raise InvalidInput("this conversation has no avatar renderer: no video")
        if self._closed:
            raise InvalidInput("conversation has ended")
        if self.video is not None:
            raise InvalidInput("this conversation already streams video")
        self.video = LiveVideo(
            self.avatar,
            self._render_executor,
            self._started,
            encoding,
            self.engines.video,
            hold=self._video_holds,
        )
        self.video.start()
        return self.video

    def _video_holds(self) -> bool:
        """Whether live video should hold its frame now: a reply is being prepared."""
        return clock.now() < self._video_hold_until

    def stop_video(self) -> None:
        video, self.video = self.video, None
        if video is not None:
            video.stop()

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
        for transcript in self._drain_asr():
            # A reply may start on these words while the models score them.
            end = self._transcript_end
            speculated = await self.turn_stream.speculate(transcript, audio_end_s=end)
            for ev in speculated:
                self._on_turn_event(ev, clock.now())
            if not speculated and self.turn_stream.detector.vad.speaking:
                self._read_words_ahead(transcript)
            await self.turn_stream.update_transcript(transcript, audio_end_s=end)
        self.turn_stream.set_asr_pending(self.asr.words_pending)
        for ev in await self.turn_stream.push(samples):
            self._on_turn_event(ev, now - (self.position / SAMPLE_RATE - ev.at_s))
        self._generate_if_waiting()
        if (
            self._paused_since is not None
            and self.turn_stream.detector.vad.speaking
            and now - self._paused_since > BACKCHANNEL_MAX_S
        ):
            self._cancel_paused_reply()  # too long for "mm-hm": a real interruption

    def _drain_asr(self, turn: int | None = None) -> list[str]:
        """New transcripts of the turn so far (finals + latest partial), oldest first.

        `turn`: the turn they belong to, when it has already ended (its final).
        """
        texts = []
        while not self.asr.events.empty():
            ev = self.asr.events.get_nowait()
            if isinstance(ev, Activity):
                continue
            texts.append(self._on_transcript(ev, self._trace.turn if turn is None else turn))
        return texts

    def _on_transcript(self, ev: Transcript, turn: int) -> str:
        if ev.is_final:
            self._finals.append(ev.text)
            self._trace.asr_decode_s = ev.decode_s
        self._transcript_end = ev.audio_end_s
        text = " ".join([*self._finals, "" if ev.is_final else ev.text]).strip()
        self._emit(UserTranscriptEvent(text, ev.is_final, turn))
        return text

    def _on_turn_event(self, ev: DetectorEvent, at_wall: float) -> None:
        kind = ev.kind
        if kind is EventKind.SPEECH_START:
            self._video_hold_until = 0.0
            self._drop_speculation()
            if self._reply is not None and not self._reply.done():
                if self._reply_speaking and self._paused_since is None:
                    self._pause_reply(at_wall)
                elif not self._reply_speaking:
                    self._cancel_reply()  # nothing said yet: the user was not done
        elif kind is EventKind.SPEECH_END:
            self._video_hold_until = clock.now() + VIDEO_HOLD_MAX_S
            self._trace.speech_end = at_wall
        elif kind is EventKind.SPECULATE:
            if self.speculate and ev.text and not self.replying:
                self._drop_speculation()  # words of an earlier pause, since spoken on
                self._start_speculation(ev.text)
        elif kind in (EventKind.BACKCHANNEL, EventKind.NOT_SPEECH):
            self._video_hold_until = 0.0
            if kind is EventKind.BACKCHANNEL:
                self.backchannels += 1
                metrics.BACKCHANNELS.inc()
            self._drop_speculation()
            self._resume_reply()
            # Its words are no one's turn: they must not open the user's next one.
            self.asr.discard()
            self._finals, self._transcript_end = [], None
        elif kind is EventKind.END_OF_TURN:
            if self._paused_since is not None:
                self._cancel_paused_reply()  # the user took the turn
            elif self._reply is not None and not self._reply.done():
                # A turn cut at max_turn_s while the avatar answered the previous cut:
                # one reply at a time, to the newest words.
                self._reply.cancel()
            trace, self._trace = self._trace, TurnTrace(turn=self._trace.turn + 1)
            trace.end_of_turn = clock.now()  # after the model calls this frame waited for
            if not trace.speech_end:
                trace.speech_end = at_wall
            trace.end_of_turn_reason = ev.reason
            trace.extra["end_of_turn_p"] = ev.probability
            spec, self._spec = self._spec, None
            self._reply = asyncio.create_task(self._respond(trace, spec))
            self._reply.add_done_callback(_log_reply_failure)

    # -- speculation ----------------------------------------------------------------------
    def _read_words_ahead(self, text: str) -> None:
        """While the user talks, read the prompt up to their words so far, all but the
        last word (the next decode may still change it): a speculation at the pause then
        reads only the last words, and its reply is ready when the turn ends."""
        if not self.speculate or self.replying:
            return
        if self._words_read is not None and not self._words_read.done():
            return  # one at a time: never a queue on the LLM
        words = " ".join([self._carry_text, text]).split()[:-1]
        if len(words) < 2:
            return
        messages = [self.persona, *self.history, ChatMessage("user", " ".join(words))]
        self._words_read = asyncio.create_task(
            self.engines.llm.prefill_reply(messages, words_only=True)
        )
        self._words_read.add_done_callback(_log_prefill_failure)

    def _start_speculation(self, text: str) -> None:
        user_text = " ".join([self._carry_text, text]).strip()
        spec = _Speculation(
            user_text, TurnTrace(turn=self._trace.turn), GenerationStats(), asyncio.Event(),
            asyncio.Event(), clock.now(),
        )  # fmt: skip
        self.speculation.started += 1
        metrics.SPECULATIONS.labels("started").inc()
        messages = [self.persona, *self.history, ChatMessage("user", user_text)]
        spec.prefill = asyncio.create_task(self.engines.llm.prefill_reply(messages))
        spec.prefill.add_done_callback(_log_prefill_failure)
        spec.task = asyncio.create_task(self._speak_when_released(spec, messages))
        self._spec = spec

    async def _speak_when_released(self, spec: _Speculation, messages: list[ChatMessage]) -> None:
        await spec.generate.wait()
        await self._reply_to(spec.trace, spec.text, messages, spec.stats, spec.release)

    def _generate_if_waiting(self) -> None:
        """Let a held reply generate once the detector will wait out a pause."""
        spec, detector = self._spec, self.turn_stream.detector
        if spec is None or spec.generate.is_set() or not detector.probability:
            return
        if detector.config.required_silence(detector.probability) >= SPECULATE_WAIT_S:
            spec.generate.set()

    def _drop_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            self._count_miss(spec)

    def _count_miss(self, spec: _Speculation) -> None:
        assert spec.task is not None
        spec.task.cancel()
        if spec.prefill is not None:
            spec.prefill.cancel()  # if still queued behind another generation
        self.speculation.misses += 1
        self.speculation.wasted_tokens += spec.stats.completion_tokens
        metrics.SPECULATIONS.labels("missed").inc()

    # -- replies --------------------------------------------------------------------------
    def _pause_reply(self, speech_start_wall: float) -> None:
        """User speech over the avatar: silence it now; the words decide what follows."""
        self._output_open.clear()
        self._paused_since = speech_start_wall
        self._clear_avatar()
        trace = self.traces[-1] if self.traces else None
        if trace is not None:
            trace.interruption_stop_s = clock.now() - speech_start_wall
            trace.interrupted_at = clock.now()
            trace.extra["output_position_at_stop"] = self.output_position

    def _resume_reply(self) -> None:
        """It was a backchannel or a noise: go on from where the avatar stopped."""
        if self._paused_since is None:
            return
        self._paused_since = None
        if self.traces:
            trace = self.traces[-1]
            if trace.interrupted_at:  # how long the avatar held its breath
                trace.extra["paused_s"] = trace.extra.get("paused_s", 0.0) + (
                    clock.now() - trace.interrupted_at
                )
            trace.interruption_stop_s, trace.interrupted_at = 0.0, 0.0
            trace.extra.pop("output_position_at_stop", None)
            trace.extra["resumed"] = trace.extra.get("resumed", 0) + 1
        self._output_open.set()

    def _cancel_paused_reply(self) -> None:
        assert self._paused_since is not None
        trace = self.traces[-1] if self.traces else None
        if trace is not None:
            trace.interrupted = True
            metrics.INTERRUPTIONS.inc()
            metrics.INTERRUPTION_LATENCY.observe(trace.interruption_stop_s)
        self._paused_since = None
        if self._reply is not None:
            self._reply.cancel()
        self._output_open.set()

    def _cancel_reply(self) -> None:
        """The user speaks before the reply said anything: drop it, keep their words."""
        assert self._reply is not None
        self._reply.cancel()
        self._clear_avatar()

    def _clear_avatar(self) -> None:
        """Drop the avatar's queued speech from now on (its mouth glides to rest)."""
        if self.avatar is not None:
            self.avatar.clear(clock.now() - self._started)

    async def _respond(self, trace: TurnTrace, spec: _Speculation | None) -> None:
        try:
            await self._answer(trace, spec)
        except asyncio.CancelledError:
            if spec is not None and not spec.release.is_set():
                self._count_miss(spec)  # the user spoke on before it could be released
            raise

    async def _answer(self, trace: TurnTrace, spec: _Speculation | None) -> None:
        final = await self.asr.finalize()
        self._drain_asr(trace.turn)
        trace.asr_final = clock.now()
        if final is not None and not self._finals:
            self._finals.append(final.text)
        user_text = " ".join([self._carry_text, *self._finals]).strip()
        self._finals, self._carry_text, self._transcript_end = [], "", None
        if not user_text:
            if spec is not None:
                self._count_miss(spec)
            self._video_hold_until = 0.0
            return  # noise or breath: nothing to answer
        self.turn = trace.turn
        if spec is not None and _same_words(spec.text, user_text):
            self.speculation.hits += 1
            metrics.SPECULATIONS.labels("hit").inc()
            assert spec.task is not None
            spec.trace.turn, spec.trace.speech_end = trace.turn, trace.speech_end
            spec.trace.end_of_turn_reason = trace.end_of_turn_reason
            spec.trace.end_of_turn, spec.trace.asr_final = trace.end_of_turn, trace.asr_final
            spec.trace.asr_decode_s = trace.asr_decode_s
            spec.trace.extra.update(trace.extra, speculated=1.0,
                                    speculation_lead_s=trace.end_of_turn - spec.started_at)  # fmt: skip
            spec.generate.set()
            spec.release.set()
            await spec.task  # a barge-in cancels this task, and so the awaited reply
            return
        if spec is not None:
            self._count_miss(spec)
        messages = [self.persona, *self.history, ChatMessage("user", user_text)]
        await self._reply_to(trace, user_text, messages, GenerationStats(), None)

    async def _reply_to(
        self,
        trace: TurnTrace,
        user_text: str,
        messages: list[ChatMessage],
        stats: GenerationStats,
        release: asyncio.Event | None,
    ) -> None:
        """Generate and speak a reply; with `release`, hold every output until it is set."""
        trace.user_text = user_text
        spoken: list[str] = []
        try:
            await self._speak(trace, messages, spoken, stats, release)
        except asyncio.CancelledError:
            if release is not None and not release.is_set():
                raise  # a speculation dropped: it never was the turn's reply
            if not spoken:
                # Cancelled before saying anything: the user was not done; keep their words.
                self._carry_text = user_text
                with contextlib.suppress(ValueError):
                    self.traces.remove(trace)
                return
            raise
        finally:
            if release is None or release.is_set():
                self._reply_done(trace, user_text, spoken)

    def _reply_done(self, trace: TurnTrace, user_text: str, spoken: list[str]) -> None:
        self._reply_speaking = False
        self.turn_stream.set_avatar_speaking(False)
        if self._paused_since is not None:
            self._paused_since = None
            self._output_open.set()
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
        self,
        trace: TurnTrace,
        messages: list[ChatMessage],
        spoken: list[str],
        stats: GenerationStats,
        release: asyncio.Event | None,
    ) -> None:
        held: list[AvatarTextEvent] = []  # text of a speculation, until it is released

        async def tokens() -> AsyncIterator[str]:
            async for piece in self.engines.llm.generate(messages, stats=stats):
                if not trace.llm_first_token:
                    trace.llm_first_token = clock.now()
                event = AvatarTextEvent(piece, trace.turn)
                if release is not None and not release.is_set():
                    held.append(event)
                else:
                    self._emit(event)
                yield piece

        clock_start: float | None = None
        sent = 0.0  # seconds of this reply's audio sent
        avatar_offset: int | None = None  # avatar timeline sample - output stream sample
        first_frame: asyncio.Future[None] | None = None
        async for speech in self.engines.tts.stream(tokens()):
            if not trace.tts_first_audio:
                trace.tts_first_audio = clock.now()
            if release is not None and not release.is_set():
                await release.wait()
            if not spoken:  # the reply is the turn's now: it speaks
                self.traces.append(trace)
                for event in held:
                    self._emit(AvatarTextEvent(event.text, trace.turn))
                held.clear()
                self.turn_stream.set_avatar_speaking(True)
            if clock_start is not None and clock.now() > clock_start + sent:
                # The clause came after the audio before it had played out: the client's
                # buffer ran dry and it plays this from now. Pace and place it from now.
                underrun = clock.now() - (clock_start + sent)
                trace.extra["underrun_s"] = trace.extra.get("underrun_s", 0.0) + underrun
                clock_start += underrun
                if avatar_offset is not None:
                    avatar_offset = self._avatar_offset(speech.sample_rate)
            if self.avatar is not None and len(speech.samples):
                if avatar_offset is None:
                    avatar_offset = self._avatar_offset(speech.sample_rate)
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
                    self._video_hold_until = 0.0
                    trace.first_output = clock_start
                # Pace output like a real-time transport, keeping a small lead.
                delay = clock_start + sent - OUTPUT_LEAD_S - clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Checked after the pacing wait: user speech during it pauses this frame too.
                if not self._output_open.is_set():
                    paused = clock.now()
                    await self._output_open.wait()  # resumed (a backchannel), or cancelled
                    clock_start += clock.now() - paused
                    if self.avatar is not None:
                        # The rest of this clause goes on the avatar from now.
                        avatar_offset = self._avatar_offset(speech.sample_rate)
                        rest = Speech(
                            samples=speech.samples[frame.offset :],
                            sample_rate=speech.sample_rate,
                            phonemes=phonemes_from(speech.phonemes, frame.offset),
                            text=speech.text,
                        )
                        self._place_on_avatar(rest, self.output_position + avatar_offset)
                pts = None
                if avatar_offset is not None:
                    pts = (self.output_position + avatar_offset) / frame.sample_rate
                self._emit(frame._replace_turn(trace.turn, self.output_position, pts))
                self.output_position += len(frame.samples)
                sent += len(frame.samples) / frame.sample_rate
        # Let the last audio play out before the reply counts as done.
        if clock_start is not None:
            await asyncio.sleep(max(0.0, clock_start + sent - clock.now()))
        if first_frame is not None:
            await first_frame

    def _avatar_offset(self, sample_rate: int) -> int:
        """Avatar timeline sample minus output stream sample for speech placed now."""
        assert self.avatar is not None
        session_s = clock.now() - self._started
        self.avatar.advance_to(session_s)
        now = int(session_s * sample_rate)
        return max(now, self.avatar.next_sample) - self.output_position

    def _place_on_avatar(self, speech: Speech, start: int) -> None:
        assert self.avatar is not None
        phonemes = shift_phonemes(speech.phonemes, start)
        self.avatar.add_speech(speech.samples, speech.sample_rate, start, phonemes)

    def _render_first_frame(self, trace: TurnTrace, at_s: float) -> asyncio.Future[None]:
        """The frame shown with the reply's first audio, rendered; its time is a milestone
        (the live video's frame when a stream shows video, else rendered for it)."""
        assert self.avatar is not None and self._render_executor is not None
        if self.video is not None and self.video.running:
            return self.video.time_first_frame(trace, at_s)
        index = math.ceil(at_s * self.avatar.fps)
        return render_timed(self._render_executor, self.avatar, trace, index)

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
        if self._words_read is not None:
            self._words_read.cancel()
        self._drop_speculation()
        if self._reply is not None:
            self._reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply
        self.asr = self.engines.asr.stream()
        self.turn_stream = self.engines.turn.stream(self.turn_config)
        self.position = 0
        self._finals, self._carry_text, self._transcript_end = [], "", None
        self._paused_since = None
        self._output_open.set()
        self._trace = TurnTrace(turn=self._trace.turn)
        self._clear_avatar()
        while not self.events.empty():
            self.events.get_nowait()

    async def close(self) -> None:
        self._closed = True
        self.stop_video()
        for task in (self._prefill, self._words_read):
            if task is not None:
                task.cancel()
        self._drop_speculation()
        if self._reply is not None:
            self._reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply
        if self.avatar is not None:
            self.avatar.close()
        if self._render_executor is not None:
            self._render_executor.shutdown(wait=False, cancel_futures=True)


def _same_words(a: str, b: str) -> bool:
    """Whether two transcripts say the same (case and punctuation aside)."""

    def words(text: str) -> list[str]:
        return ["".join(c for c in w if c.isalnum() or c == "'") for w in text.lower().split()]

    return [w for w in words(a) if w] == [w for w in words(b) if w]


def _log_reply_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The session goes on (the next turn gets a new reply); the error is not lost.
        log.error("reply failed", exc_info=task.exception())


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

    def _replace_turn(self, turn: int, stream_start: int, pts_s: float | None) -> AvatarAudioEvent:
        phonemes = shift_phonemes(self.phonemes, stream_start - self.offset)
        return AvatarAudioEvent(self.samples, self.sample_rate, stream_start, phonemes, turn, pts_s)


def _frames(speech: Speech) -> list[_Frame]:
    """Cut a clause into output frames, each with the phonemes that start in it."""
    step = int(speech.sample_rate * OUTPUT_FRAME_S)
    out = []
    for i in range(0, len(speech.samples), step):
        ph = [p for p in speech.phonemes if i <= p.start_sample < i + step]
        out.append(_Frame(speech.samples[i : i + step], speech.sample_rate, i, ph))
    return out
