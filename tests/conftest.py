"""Shared fixtures: real models loaded once per test session, real gRPC on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.asr.engine import AsrEngine
from services.llm.config import LlmConfig
from services.llm.engine import LlmEngine
from services.sessions.conversation import Engines
from services.tts.engine import TtsEngine
from services.turn.engine import TurnEngine


@pytest.fixture(scope="session")
async def llm_engine() -> AsyncIterator[LlmEngine]:
    engine = LlmEngine(LlmConfig(temperature=0.0))
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def asr_engine() -> AsyncIterator[AsrEngine]:
    engine = AsrEngine()
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def tts_engine() -> AsyncIterator[TtsEngine]:
    engine = TtsEngine()
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def turn_engine(asr_engine: AsrEngine) -> AsyncIterator[TurnEngine]:
    engine = TurnEngine(vad_model=asr_engine.vad_model)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
def engines(
    asr_engine: AsrEngine, llm_engine: LlmEngine, tts_engine: TtsEngine, turn_engine: TurnEngine
) -> Engines:
    """The shared engines as a conversation takes them (voice only; add a renderer with
    `dataclasses.replace(engines, render=...)`)."""
    return Engines(asr=asr_engine, llm=llm_engine, tts=tts_engine, turn=turn_engine)
