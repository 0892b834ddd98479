"""Shared fixtures: real models loaded once per test session, real gRPC on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.llm.config import LlmConfig
from services.llm.engine import LlmEngine


@pytest.fixture(scope="session")
async def llm_engine() -> AsyncIterator[LlmEngine]:
    engine = LlmEngine(LlmConfig(temperature=0.0))
    await engine.start()
    yield engine
    await engine.close()
