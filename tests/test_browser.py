"""The talk page end to end in headless Chromium against the in-process gateway (uvicorn
on loopback, real models, API keys in a private Redis); `tests/browser_support.py` has
what the page must do. tests/test_serve.py runs the same against Ray Serve.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import launch_chromium, microphone_wav, talk_through_page
from gateway_support import http_gateway
from parley.tenancy import TenancyStore
from redis_support import RedisServer, redis_server  # noqa: F401  (a fixture)

from services.render.config import RenderConfig
from services.render.engine import RenderEngine
from services.sessions.conversation import Engines
from services.sessions.registry import SessionRegistry
from services.tts.engine import TtsEngine

#: Frame size of the test's renderer (the default 256 costs ~4x the CPU).
SIZE = 128


@pytest.fixture(scope="module")
async def store(redis_server: RedisServer) -> AsyncIterator[TenancyStore]:  # noqa: F811
    async with TenancyStore.from_url(
        redis_server.url, prefix=f"test-browser-{uuid.uuid4().hex[:8]}:"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
async def gateway_url(engines: Engines, store: TenancyStore) -> AsyncIterator[str]:
    """The HTTP app of a gateway whose sessions have an avatar renderer."""
    render = RenderEngine(RenderConfig(width=SIZE, height=SIZE))
    await render.start()
    registry = SessionRegistry(dataclasses.replace(engines, render=render), store)
    async with http_gateway(registry) as url:
        yield url
    await registry.close()
    await render.close()


@pytest.fixture(scope="module")
async def microphone(tts_engine: TtsEngine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return await microphone_wav(tts_engine, tmp_path_factory.mktemp("mic"))


@pytest.fixture
async def browser(microphone: Path) -> AsyncIterator[Any]:
    async for chromium in launch_chromium(microphone):
        yield chromium


async def test_talk_page_hears_the_user_and_plays_the_avatar(
    gateway_url: str, store: TenancyStore, browser: Any
) -> None:
    _, api_key = await store.create_key(f"t-{uuid.uuid4().hex[:10]}", name="browser")
    await talk_through_page(browser, gateway_url, api_key)
