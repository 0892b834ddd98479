"""TTS engine: text pieces in (as the LLM writes them), speech per clause out.

Plain async Python: clause chunking, synthesis off the event loop, time to
first audio measured, cancellation by stopping iteration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from parley import clock, metrics
from parley.errors import InvalidInput
from parley.visemes import Phoneme

from services.tts.chunker import ClauseChunker
from services.tts.config import TtsConfig


@dataclass(slots=True)
class Speech:
    """Synthesized audio for one clause, with the timing of each phoneme in it."""

    samples: np.ndarray  # float32 mono
    sample_rate: int
    phonemes: list[Phoneme] = field(default_factory=list)
    text: str = ""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


class TtsBackend(Protocol):
    name: str
    sample_rate: int

    def warm_up(self) -> None: ...

    def synthesize(self, text: str) -> Speech:
        """Blocking synthesis of one clause (run in a worker thread)."""
        ...


def make_backend(config: TtsConfig) -> TtsBackend:
    from services.tts.backends.hibari import HibariBackend

    return HibariBackend(config)


class TtsEngine:
    def __init__(
        self,
        config: TtsConfig | None = None,
        backend: TtsBackend | None = None,
        *,
        workers: int = 2,
    ):
        self.config = config or TtsConfig()
        self.backend = backend or make_backend(self.config)
        # A stage replica behind the backend records its own metrics (not twice).
        self._own_metrics = not getattr(self.backend, "remote", False)
        self.sample_rate = self.backend.sample_rate
        # Two: the next clause is synthesized while one plays. More for a remote backend.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tts")

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.backend.warm_up)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def chunker(self) -> ClauseChunker:
        c = self.config
        return ClauseChunker(c.first_clause_min_words, c.clause_min_words, c.clause_max_words)

    async def synthesize(self, text: str) -> Speech:
        """One clause → speech. Empty or unpronounceable text gives empty speech."""
        if len(text) > self.config.max_text_chars:
            raise InvalidInput(
                f"text of {len(text)} characters is too long (limit {self.config.max_text_chars})"
            )
        started = clock.now()
        speech = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.backend.synthesize, text
        )
        if self._own_metrics:
            metrics.STAGE_LATENCY.labels("tts", "clause").observe(clock.now() - started)
        return speech

    async def stream(self, pieces: AsyncIterator[str]) -> AsyncIterator[Speech]:
        """Speak text as it streams in: each clause's audio as soon as the clause is complete.

        The next clause is synthesized while the caller plays the current one.
        """
        chunker = self.chunker()
        started = clock.now()
        first = True
        pending: asyncio.Queue[asyncio.Future[Speech] | None] = asyncio.Queue()

        async def feed() -> None:
            total = 0
            try:
                async for piece in pieces:
                    total += len(piece)
                    if total > self.config.max_text_chars:
                        raise InvalidInput(
                            f"text longer than {self.config.max_text_chars} characters"
                        )
                    for clause in chunker.push(piece):
                        pending.put_nowait(asyncio.ensure_future(self.synthesize(clause)))
                for clause in chunker.flush():
                    pending.put_nowait(asyncio.ensure_future(self.synthesize(clause)))
            finally:
                pending.put_nowait(None)

        feeder = asyncio.create_task(feed())
        try:
            while (future := await pending.get()) is not None:
                speech = await future
                if len(speech.samples) == 0:
                    continue
                if first:
                    metrics.STAGE_LATENCY.labels("tts", "ttfb").observe(clock.now() - started)
                    first = False
                yield speech
            await feeder  # surfaces errors from the text source
        finally:
            feeder.cancel()
            while not pending.empty():
                if (f := pending.get_nowait()) is not None:
                    f.cancel()
