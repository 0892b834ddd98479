"""Turn engine: the models behind end-of-turn detection, and one async stream per session.

`ParleyTurnDetector` (detector.py) is the frame-driven logic; this wraps it for
async callers. Model calls (Smart Turn ~45 ms at a speech stop, the text model
~36 ms per transcript) must not block the event loop that paces other sessions'
audio, so every call of a stream runs on the engine's one worker thread, in the
order the caller made them. One thread for all streams: both models use one core
each, and more threads would fight the ASR and the LLM for the cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import numpy as np
from parley.vad import SileroVadModel

from services.turn.backends.smart_turn import SmartTurnModel
from services.turn.config import TurnConfig
from services.turn.detector import (
    AudioTurnModel,
    DetectorEvent,
    ParleyTurnConfig,
    ParleyTurnDetector,
    TextTurnModel,
)
from services.turn.semantic import SemanticTurnModel

P = ParamSpec("P")
T = TypeVar("T")


class TurnEngine:
    """One per process: the VAD, Smart Turn and text models, and the worker thread."""

    def __init__(
        self,
        config: TurnConfig | None = None,
        vad_model: SileroVadModel | None = None,
        *,
        smart_turn: AudioTurnModel | None = None,
        semantic: TextTurnModel | None = None,
        workers: int = 1,
    ):
        """`smart_turn` / `semantic`: models to use instead of loading them (e.g. remote ones).

        `workers`: threads for the streams' calls. One for models in this process (they
        take one call at a time); more for remote models, whose calls mostly wait, so
        that one session's model call does not hold up the others' frames. A stream's
        own calls still run one at a time, in order.
        """
        if not 1 <= workers <= 64:
            raise ValueError(f"workers must be within [1, 64], not {workers}")
        self.config = config or TurnConfig()
        self.vad_model = vad_model or SileroVadModel()
        self.smart_turn: AudioTurnModel | None = smart_turn
        self.semantic: TextTurnModel | None = semantic
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="turn")

    def _load(self) -> None:
        cfg = self.config
        if cfg.smart_turn and self.smart_turn is None:
            smart_turn = SmartTurnModel(cfg.smart_turn_path)
            smart_turn.warm_up()
            self.smart_turn = smart_turn
        if cfg.semantic and self.semantic is None:
            semantic = SemanticTurnModel(cfg.semantic_model_path)
            semantic.warm_up()
            self.semantic = semantic

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.semantic, "close", None)
        if close is not None:
            close()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a model call on the engine's worker thread (in order with the streams' calls)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def detector(self, config: ParleyTurnConfig | None = None) -> ParleyTurnDetector:
        return ParleyTurnDetector(
            self.vad_model,
            smart_turn=self.smart_turn,
            semantic=self.semantic,
            config=config or self.config.detector_config(),
        )

    def stream(self, config: ParleyTurnConfig | None = None) -> TurnStream:
        return TurnStream(self, self.detector(config))


class TurnStream:
    """One session's detector; every call runs on an engine thread, one at a time, in order."""

    def __init__(self, engine: TurnEngine, detector: ParleyTurnDetector) -> None:
        self.engine = engine
        self.detector = detector
        # In order, one at a time, even when the engine has several threads (FIFO lock).
        self._turn = asyncio.Lock()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._turn:
            return await self.engine.run(fn, *args, **kwargs)

    async def push(self, samples: np.ndarray) -> list[DetectorEvent]:
        return await self._run(self.detector.push_events, samples)

    async def speculate(
        self, text: str, *, audio_end_s: float | None = None
    ) -> list[DetectorEvent]:
        """SPECULATE if a new transcript holds the words up to the current pause (no model)."""
        return await self._run(self.detector.speculate, text, audio_end_s=audio_end_s)

    async def update_transcript(self, text: str, *, audio_end_s: float | None = None) -> None:
        """The ASR's latest transcript of the current turn (scored by the text model)."""
        await self._run(self.detector.update_transcript, text, audio_end_s=audio_end_s)

    async def transcript(
        self, text: str, *, audio_end_s: float | None = None
    ) -> list[DetectorEvent]:
        """`speculate` then `update_transcript`, for callers that act on both at once."""
        events = await self.speculate(text, audio_end_s=audio_end_s)
        await self.update_transcript(text, audio_end_s=audio_end_s)
        return events

    def set_avatar_speaking(self, speaking: bool) -> None:
        # A plain flag read by the worker; the next decision sees it.
        self.detector.set_avatar_speaking(speaking)

    def set_asr_pending(self, pending: bool) -> None:
        # A plain flag read by the worker, like the one above.
        self.detector.asr_pending = bool(pending)

    @property
    def now_s(self) -> float:
        return self.detector.now_s
