"""ASR engine: VAD-gated streaming recognition over an utterance decoder.

While the user speaks, the growing utterance is re-decoded every
`partial_interval_s` (partials). When the VAD hears the speech stop, the whole
utterance is decoded at once (or sooner: at the first 30 ms of quiet energy, see
`parley.energy`; Silero hears the silence ~60 ms after the words end), so that by
the time the turn detector decides the user is done, the final transcript is
usually already there: `finalize()` then costs nothing. Utterances end on
`finalize()`, after `endpoint_silence_s`, or at `max_utterance_s` (long
monologues are transcribed in pieces).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from parley import clock, metrics
from parley.energy import EnergyOptions, EnergyTracker
from parley.vad import SAMPLE_RATE, SileroVadModel, VadOptions, VadStream

from services.asr.config import AsrConfig


@dataclass(frozen=True, slots=True)
class Decoded:
    text: str
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0


class AsrBackend(Protocol):
    name: str

    def warm_up(self) -> None: ...

    def decode(self, audio: np.ndarray) -> Decoded:
        """Transcribe one utterance of 16 kHz float32 audio (blocking)."""
        ...


@dataclass(slots=True)
class Transcript:
    text: str
    is_final: bool
    utterance: int
    audio_start_s: float
    audio_end_s: float
    #: wall-clock seconds the decode behind this transcript took
    decode_s: float = 0.0


@dataclass(slots=True)
class Activity:
    speaking: bool
    at_s: float


AsrEvent = Transcript | Activity


def make_backend(config: AsrConfig) -> AsrBackend:
    if config.backend == "pocketsphinx":
        from services.asr.backends.pocketsphinx import PocketSphinxBackend

        return PocketSphinxBackend(config)
    from services.asr.backends.whisper import WhisperBackend

    return WhisperBackend(config)


class AsrEngine:
    """One per process: the model, the VAD model and one decode thread, shared by all streams."""

    def __init__(
        self,
        config: AsrConfig | None = None,
        backend: AsrBackend | None = None,
        *,
        workers: int = 1,
    ):
        self.config = config or AsrConfig()
        self.backend = backend or make_backend(self.config)
        # A stage replica behind the backend records its own metrics (not twice).
        self._own_metrics = not getattr(self.backend, "remote", False)
        self.vad_model = SileroVadModel()
        # One decode at a time for a model in this process: it already uses every core
        # it is given. More `workers` for a remote backend, whose calls mostly wait.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asr")

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.backend.warm_up)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def decode(self, audio: np.ndarray) -> tuple[Decoded, float]:
        started = clock.now()
        decoded = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.backend.decode, audio
        )
        elapsed = clock.now() - started
        if self._own_metrics:
            metrics.STAGE_LATENCY.labels("asr", "decode").observe(elapsed)
        if decoded.no_speech_prob > self.config.no_speech_threshold:
            decoded = Decoded("", decoded.no_speech_prob, decoded.avg_logprob)
        return decoded, elapsed

    def stream(self) -> AsrStream:
        return AsrStream(self)


@dataclass(slots=True)
class _Utterance:
    number: int
    start_sample: int  # stream position of the first buffered sample
    chunks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    speaking: bool = True
    last_speech_end: int | None = None  # stream sample where the latest silence began
    quiet_from: int | None = None  # stream sample where energy fell quiet for that silence
    decoded_upto: int = 0  # utterance samples covered by the newest finished decode
    decoded_text: str = ""
    decoded_s: float = 0.0
    decode_started_at: int = 0  # utterance samples when the running decode started
    decoding: asyncio.Task[None] | None = None
    discarded: bool = False  # forgotten (a backchannel, a cough): its final goes nowhere

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, np.float32)


class AsrStream:
    """Recognition state of one audio stream (one session's microphone)."""

    def __init__(self, engine: AsrEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.vad = VadStream(
            engine.vad_model, VadOptions(min_silence_ms=self.config.stop_decode_ms)
        )
        self.energy = (
            EnergyTracker(EnergyOptions(dip_ms=self.config.dip_ms)) if self.config.dip_ms else None
        )
        self.events: asyncio.Queue[AsrEvent] = asyncio.Queue()
        self.position = 0  # samples received
        self._preroll: list[np.ndarray] = []
        self._preroll_samples = 0
        self._utterance: _Utterance | None = None
        self._pending_final: asyncio.Future[Transcript | None] | None = None
        self._final_of: _Utterance | None = None  # the utterance of _pending_final
        self._count = 0

    # -- input ----------------------------------------------------------------------------
    def push(self, samples: np.ndarray) -> None:
        """Feed 16 kHz float32 mono audio (any length). Never blocks on decoding."""
        cfg = self.config
        utt = self._utterance
        if utt is not None:
            utt.chunks.append(samples)
            utt.samples += len(samples)
        else:
            self._keep_preroll(samples)
        self.position += len(samples)
        dips = self.energy.push(samples) if self.energy is not None else []
        for ev in self.vad.push(samples):
            self.events.put_nowait(Activity(ev.speaking, ev.at_s))
            if ev.speaking:
                self._on_speech_start()
            elif self._utterance is not None:
                self._on_speech_stop(self._utterance, ev.at_s)
        utt = self._utterance
        if utt is None:
            return
        if dips and utt.speaking:
            self._start_decode()  # the words may have ended: Silero will say so in ~60 ms
        if (
            utt.speaking
            and utt.samples - utt.decode_started_at >= cfg.partial_interval_s * SAMPLE_RATE
        ):
            self._start_decode()
        silent_for = (
            (self.position - utt.last_speech_end) / SAMPLE_RATE
            if not utt.speaking and utt.last_speech_end is not None
            else 0.0
        )
        if silent_for >= cfg.endpoint_silence_s or utt.samples >= cfg.max_utterance_s * SAMPLE_RATE:
            self._final_of = self._detach()
            self._pending_final = asyncio.ensure_future(self._complete(self._final_of))

    def _on_speech_stop(self, utt: _Utterance, silence_s: float) -> None:
        utt.speaking = False
        utt.last_speech_end = int(silence_s * SAMPLE_RATE)
        # Energy fell quiet a little before Silero's silence (its lag): the words end there.
        quiet = (
            self.energy.quiet_before(silence_s, self.config.quiet_lag_s) if self.energy else None
        )
        utt.quiet_from = None if quiet is None else round(quiet * SAMPLE_RATE)
        end = self._speech_end(utt)
        running = utt.decoding is not None and not utt.decoding.done()
        if utt.decoded_upto >= end or (running and utt.decode_started_at >= end):
            return  # a decode started at the energy dip already holds every word
        self._start_decode()  # the utterance may be complete: decode it all now

    def _keep_preroll(self, samples: np.ndarray) -> None:
        self._preroll.append(samples)
        self._preroll_samples += len(samples)
        limit = int(self.config.preroll_s * SAMPLE_RATE)
        while self._preroll and self._preroll_samples - len(self._preroll[0]) >= limit:
            self._preroll_samples -= len(self._preroll.pop(0))

    def _on_speech_start(self) -> None:
        utt = self._utterance
        if utt is not None:
            utt.speaking, utt.quiet_from = True, None
            return
        self._count += 1
        pre = self._preroll
        start = self.position - self._preroll_samples
        self._utterance = _Utterance(self._count, start, list(pre), self._preroll_samples)
        self._preroll, self._preroll_samples = [], 0

    # -- decoding -------------------------------------------------------------------------
    def _start_decode(self) -> None:
        utt = self._utterance
        if utt is None or (utt.decoding is not None and not utt.decoding.done()):
            return
        utt.decode_started_at = utt.samples
        utt.decoding = asyncio.ensure_future(self._decode(utt, utt.audio()))

    async def _decode(self, utt: _Utterance, audio: np.ndarray) -> None:
        decoded, elapsed = await self.engine.decode(audio)
        if len(audio) < utt.decoded_upto:
            return
        utt.decoded_upto, utt.decoded_text, utt.decoded_s = len(audio), decoded.text, elapsed
        if self._utterance is not utt:
            return
        if decoded.text:
            self.events.put_nowait(self._transcript(utt, decoded.text, False, elapsed))
        if not utt.speaking and len(audio) < self._speech_end(utt):
            # Speech stopped while this (partial) decode ran: decode the whole utterance now.
            utt.decoding = None
            self._start_decode()

    @staticmethod
    def _speech_end(utt: _Utterance) -> int:
        """Utterance samples up to where the latest speech stopped (all, while speaking):
        where its energy fell quiet, if that is known."""
        if utt.last_speech_end is not None and not utt.speaking:
            end = utt.last_speech_end if utt.quiet_from is None else utt.quiet_from
            return min(end, utt.last_speech_end) - utt.start_sample
        return utt.samples

    def _transcript(self, utt: _Utterance, text: str, final: bool, decode_s: float) -> Transcript:
        return Transcript(
            text=text,
            is_final=final,
            utterance=utt.number,
            audio_start_s=utt.start_sample / SAMPLE_RATE,
            audio_end_s=(utt.start_sample + utt.decoded_upto) / SAMPLE_RATE,
            decode_s=decode_s,
        )

    def _detach(self) -> _Utterance | None:
        utt, self._utterance = self._utterance, None
        if utt is not None and utt.speaking and self.vad.speaking:
            # Cut mid-speech (max length): the rest continues as a new utterance.
            self._on_speech_start()
        return utt

    async def finalize(self) -> Transcript | None:
        """End the current utterance now; its final transcript (None if there was none).

        Reuses the decode made when the speech stopped if no speech came after it. If
        the endpointer already ended the utterance and its final decode is still running
        (a busy box), that final is the answer.
        """
        utt, pending = self._detach(), self._pending_final
        if utt is None and pending is not None and not pending.done():
            return await asyncio.shield(pending)
        return await self._complete(utt)

    def discard(self) -> None:
        """Forget the current utterance (a backchannel, a cough): no final will follow,
        not even one the endpointer already started."""
        for utt in (self._detach(), self._final_of):
            if utt is not None:
                utt.discarded = True
        self._pending_final = self._final_of = None

    async def _complete(self, utt: _Utterance | None) -> Transcript | None:
        if utt is None:
            return None
        if utt.decoding is not None:
            await asyncio.shield(utt.decoding)
        decode_s = 0.0
        if utt.decoded_upto < self._speech_end(utt):
            decoded, decode_s = await self.engine.decode(utt.audio())
            utt.decoded_upto, utt.decoded_text = utt.samples, decoded.text
        transcript = self._transcript(utt, utt.decoded_text, True, decode_s)
        if not transcript.text or utt.discarded:
            return None
        self.events.put_nowait(transcript)
        return transcript

    @property
    def in_utterance(self) -> bool:
        return self._utterance is not None

    @property
    def words_pending(self) -> bool:
        """Speech of the current utterance is not yet covered by a finished decode (its
        words may still come: a busy box can take a second)."""
        final = self._pending_final
        if final is not None and not final.done():
            return True  # ended at its silence, its final decode still running
        utt = self._utterance
        return utt is not None and utt.decoded_upto < self._speech_end(utt)
