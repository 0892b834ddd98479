"""Several replicas of the sessions gateway share their sessions through Redis.

Two `SessionRegistry`s on one private redis-server stand for two replicas of the
sessions deployment (Serve sends each call to any replica): a session created on one
is seen, ended and streamed on the other, and a stream there goes on from the turns
spoken on the first.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import numpy as np
import pytest
from parley import clock
from parley.audio import resample
from parley.tenancy import TenancyStore
from redis_support import RedisServer, redis_server  # noqa: F401  (a fixture)

from services.llm.engine import ChatMessage
from services.sessions.conversation import Conversation, Engines, TurnDoneEvent
from services.sessions.registry import (
    SessionEnded,
    SessionNotFound,
    SessionRegistry,
    StreamInUse,
)
from services.tts.engine import TtsEngine

SR = 16_000
FRAME = 320
_prefixes = itertools.count()


@pytest.fixture
async def replicas(
    engines: Engines,
    redis_server: RedisServer,  # noqa: F811
) -> AsyncIterator[tuple[SessionRegistry, SessionRegistry]]:
    prefix = f"test-replicas-{next(_prefixes)}:"
    stores = [TenancyStore.from_url(redis_server.url, prefix=prefix) for _ in range(2)]
    a, b = (SessionRegistry(engines, store, lease_s=3.0) for store in stores)
    try:
        yield a, b
    finally:
        for registry, store in zip((a, b), stores, strict=True):
            await registry.close()
            await store.aclose()


async def say(conversation: Conversation, audio: np.ndarray, limit_s: float = 30.0) -> int:
    """Speak `audio` in real time, then silence until a turn is done; its number."""
    start, sent = clock.now(), 0
    silence = np.zeros(FRAME, np.float32)
    deadline = clock.now() + len(audio) / SR + limit_s
    source = iter(range(0, len(audio), FRAME))
    while clock.now() < deadline:
        i = next(source, None)
        frame = audio[i : i + FRAME] if i is not None else silence
        sent += len(frame)
        await asyncio.sleep(max(0.0, start + sent / SR - clock.now()))
        await conversation.push_audio(frame)
        while not conversation.events.empty():
            event = conversation.events.get_nowait()
            if isinstance(event, TurnDoneEvent) and i is None:
                await conversation.wait_idle()
                return event.trace.turn
    raise AssertionError("no reply")


async def speech(tts: TtsEngine, text: str) -> np.ndarray:
    spoken = await tts.synthesize(text)
    pad = np.zeros(SR // 4, np.float32)
    return np.concatenate([pad, resample(spoken.samples, spoken.sample_rate, SR)])


async def test_a_session_is_seen_and_ended_on_every_replica(
    replicas: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = replicas
    created = await a.create("acme", persona_prompt="You are terse.")
    seen = await b.get("acme", created.session_id)
    assert seen.conversation is None and seen.active  # it lives on replica a
    assert seen.persona_prompt == "You are terse."
    assert [r.session_id for r in await b.list("acme")] == [created.session_id]
    with pytest.raises(SessionNotFound):
        await b.get("other", created.session_id)  # tenants stay apart across replicas
    assert await b.list("other") == []

    ended = await b.end("acme", created.session_id)
    assert not ended.active
    # Replica a hears of it and closes its conversation.
    for _ in range(100):  # up to 5 s
        if not created.active:
            break
        await asyncio.sleep(0.05)
    assert not created.active
    with pytest.raises(SessionEnded):
        async with a.stream(created):
            pass
    assert not (await a.get("acme", created.session_id)).active
    assert (await b.end("acme", created.session_id)).ended_at == ended.ended_at  # repeatable


async def test_one_stream_across_replicas_and_history_follows_the_stream(
    replicas: tuple[SessionRegistry, SessionRegistry], tts_engine: TtsEngine
) -> None:
    a, b = replicas
    record = await a.create("acme")
    on_b = await b.get("acme", record.session_id)
    async with a.stream(record) as conversation:
        with pytest.raises(StreamInUse):  # the other replica refuses a second stream
            async with b.stream(on_b):
                pass
        turn = await say(conversation, await speech(tts_engine, "What is the capital of France?"))
        assert turn == 1
        await a.save_turn(record)
        history = list(conversation.history)
    assert [m.role for m in history] == ["user", "assistant"]

    on_b = await b.get("acme", record.session_id)
    assert on_b.turns == 1
    async with b.stream(on_b) as adopted:
        assert adopted is not conversation  # replica b's own conversation of the session
        assert adopted.history == history
        turn = await say(adopted, await speech(tts_engine, "And what about Spain?"))
        assert turn == 2  # numbering goes on
        await b.save_turn(on_b)
    # b held it only for that stream; a sees the turn b spoke.
    assert (await a.get("acme", record.session_id)).turns == 2
    assert on_b.conversation is None
    async with a.stream(record) as again:
        assert again.history[-2].content.lower().startswith("and what about spain")


async def test_a_stopping_replica_hands_its_sessions_to_the_others(
    engines: Engines,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    prefix = f"test-replicas-{next(_prefixes)}:"
    stores = [TenancyStore.from_url(redis_server.url, prefix=prefix) for _ in range(4)]
    a, b, c, d = (SessionRegistry(engines, store, lease_s=3.0) for store in stores)
    try:
        await a.start()
        await b.start()
        record = await a.create("acme")
        # A turn happened on a.
        assert record.conversation is not None
        record.conversation.history += [ChatMessage("user", "hi"), ChatMessage("assistant", "hey")]
        record.conversation.turn = 1
        # Replica b streamed a's session once (it only adopted it for that stream).
        async with b.stream(await b.get("acme", record.session_id)):
            pass
        # Replica a stops (scale-in, rollout): b takes the session over ...
        await a.close()
        assert record.conversation is None  # a let go of it; the session goes on
        await asyncio.sleep(4.0)  # ... and keeps its lease past the lease's length
        on_b = await b.get("acme", record.session_id)
        assert on_b.active
        assert await stores[1].active_sessions("acme") == [record.session_id]
        # ... takes its next stream, from the last turn ...
        async with b.stream(on_b) as conversation:
            assert conversation.turn == 1 and conversation.history[-1].content == "hey"
        assert (await b.get("acme", record.session_id)).active  # ... and keeps it after
        # A rolling update: b stops soon after it took the session; c, new, takes it.
        await c.start()
        await b.close()
        assert record.session_id in c._sessions  # taken over, not found orphaned later
        on_c = await c.get("acme", record.session_id)
        assert on_c.active and (await d.get("acme", record.session_id)).keeper == c._replica_id
        async with c.stream(on_c) as conversation:
            assert conversation.turn == 1
        # The last replica stops: nobody is left to keep the session, so it ends for
        # everyone and frees the tenant's slot.
        await c.close()
        assert not (await d.get("acme", record.session_id)).active
        assert await stores[3].active_sessions("acme") == []
    finally:
        for registry in (a, b, c, d):
            await registry.close()
        for store in stores:
            await store.aclose()


async def kill(registry: SessionRegistry) -> None:
    """Stop a replica as a crash (or Serve's kill) would: no close, nothing handed over,
    its heartbeat and renewals simply stop."""
    await registry._stop_background()


async def test_sessions_of_a_replica_that_died_are_kept_by_the_next_one_to_read_them(
    engines: Engines,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    prefix = f"test-replicas-{next(_prefixes)}:"
    stores = [TenancyStore.from_url(redis_server.url, prefix=prefix) for _ in range(3)]
    a, b, c = (SessionRegistry(engines, store, lease_s=3.0) for store in stores)
    try:
        await b.start()
        # a streams one of its sessions; b streams another of a's (adopted for it).
        kept = await a.create("acme")
        cut = a.stream(kept)
        await cut.__aenter__()  # never left: a dies with the stream open
        moved = await a.create("acme")
        on_b_stream = b.stream(await b.get("acme", moved.session_id))
        await on_b_stream.__aenter__()
        await kill(a)  # killed (Serve's graceful timeout, a crash): nothing handed over
        # Its heartbeat (half a lease) lapses before the sessions' leases do.
        await asyncio.sleep(1.6)
        # The client of `kept` reconnects to b at once: b keeps the session, and takes
        # the stream claim the dead replica left (not waiting a whole lease for it).
        on_b = await b.get("acme", kept.session_id)
        assert on_b.active and kept.session_id in b._sessions
        async with b.stream(on_b) as conversation:
            assert conversation.turn == 0
        # b's adopted stream of `moved` ends after a died: b keeps that session too.
        await on_b_stream.__aexit__(None, None, None)
        assert moved.session_id in b._sessions and not b._sessions[moved.session_id].adopted
        await asyncio.sleep(3.5)  # b renews both leases now
        for session in (kept, moved):
            assert (await b.get("acme", session.session_id)).active
        assert sorted(await stores[1].active_sessions("acme")) == sorted(
            [kept.session_id, moved.session_id]
        )

        # A session nobody read until its lease lapsed is over, and its slot free.
        lost = await c.create("acme")
        await kill(c)
        await asyncio.sleep(3.5)
        # Listing shows it ended (and ends it), as reading it would.
        listed = {r.session_id: r.active for r in await b.list("acme")}
        assert listed[lost.session_id] is False and listed[kept.session_id] is True
        assert not (await b.get("acme", lost.session_id)).active
        assert lost.session_id not in await stores[1].active_sessions("acme")
    finally:
        for registry in (a, b, c):
            await registry.close()
        for store in stores:
            await store.aclose()


async def test_ids_that_are_no_session_ids_are_not_found(
    replicas: tuple[SessionRegistry, SessionRegistry],
) -> None:
    a, b = replicas
    record = await a.create("acme")
    for bad in (f"{record.session_id}:tenant", f"{record.session_id}:stream", "x" * 10_000, ""):
        with pytest.raises(SessionNotFound):
            await b.get("acme", bad)
        with pytest.raises(SessionNotFound):
            await b.end("acme", bad)
    assert (await b.get("acme", record.session_id)).active
