"""The sessions gateway with API keys and tenants: real Redis, gRPC on loopback, HTTP and
WebSocket on a real uvicorn server, real models for the spoken turns."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import grpc
import numpy as np
import pytest
from gateway_support import grpc_gateway, http_gateway
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from parley import clock
from parley.audio import float_to_pcm16, resample
from parley.client import ParleyClient, collect
from parley.tenancy import TenancyStore, TenantLimits
from parley.v1 import sessions_pb2, sessions_pb2_grpc
from PIL import Image
from redis_support import RedisServer, redis_server  # noqa: F401  (a fixture)

from services.render.config import RenderConfig
from services.render.engine import RenderEngine
from services.sessions import http
from services.sessions.conversation import Engines
from services.sessions.registry import SessionRegistry
from services.tts.engine import TtsEngine

SR = 16_000
FRAME = 320  # 20 ms
AVATAR_RATE = 24_000


@pytest.fixture(scope="module")
async def store(redis_server: RedisServer) -> AsyncIterator[TenancyStore]:  # noqa: F811
    async with TenancyStore.from_url(
        redis_server.url, prefix=f"test-gateway-{uuid.uuid4().hex[:8]}:"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
async def registry(engines: Engines, store: TenancyStore) -> AsyncIterator[SessionRegistry]:
    sessions = SessionRegistry(engines, store)
    yield sessions
    await sessions.close()


@pytest.fixture(scope="module")
async def grpc_address(registry: SessionRegistry) -> AsyncIterator[str]:
    async with grpc_gateway(registry) as address:
        yield address


@pytest.fixture(scope="module")
async def http_url(registry: SessionRegistry) -> AsyncIterator[str]:
    async with http_gateway(registry) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def new_tenant(store: TenancyStore, limits: TenantLimits | None = None) -> tuple[str, str]:
    """A fresh tenant (so tests don't share limits) and an API key for it."""
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    _, api_key = await store.create_key(tenant, name="test", limits=limits)
    return tenant, api_key


def bearer(api_key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {api_key}"),)


def retry_after(err: grpc.aio.AioRpcError) -> str | None:
    """The `retry-after` trailer of a failed call, if it has one."""
    trailers: Any = err.trailing_metadata()  # an aio Metadata, typed as _Metadatum pairs
    return next((str(value) for key, value in trailers or () if key == "retry-after"), None)


async def user_says(tts: TtsEngine, text: str) -> np.ndarray:
    speech = await tts.synthesize(text)
    return resample(speech.samples, speech.sample_rate, SR)


# --------------------------------------------------------------------------- gRPC


async def test_grpc_calls_need_a_valid_api_key(grpc_address: str, store: TenancyStore) -> None:
    revoked_id, revoked_key = await store.create_key("revoked-tenant")
    await store.revoke(revoked_id)
    unknown_key = f"pk_{'0' * 16}_{'A' * 43}"
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        cases: list[tuple[tuple[tuple[str, str], ...], str]] = [
            ((), "missing API key"),
            (bearer("not-a-key"), "malformed API key"),
            (bearer(unknown_key), "unknown API key"),
            (bearer(revoked_key), "has been revoked"),
            ((("x-api-key", revoked_key),), "has been revoked"),
            ((("authorization", f"Basic {unknown_key}"),), "'Bearer <API key>'"),
        ]
        for metadata, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in (err.value.details() or ""), metadata

        async def start() -> AsyncIterator[sessions_pb2.ClientEvent]:
            yield sessions_pb2.ClientEvent(start=sessions_pb2.ConverseStart(session_id="x"))

        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [e async for e in stub.Converse(start())]
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Health checking and reflection stay open.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="parley.v1.Sessions"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def list_services() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        [answer] = [a async for a in reflection.ServerReflectionInfo(list_services())]
        names = {s.name for s in answer.list_services_response.service}
        assert "parley.v1.Sessions" in names


async def test_grpc_tenants_see_only_their_own_sessions(
    grpc_address: str, store: TenancyStore
) -> None:
    _, key_a = await new_tenant(store)
    _, key_b = await new_tenant(store)
    as_a, as_b = bearer(key_a), (("x-api-key", key_b),)
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        mine = await stub.CreateSession(
            sessions_pb2.CreateSessionRequest(persona_prompt="You are terse."), metadata=as_a
        )
        sid = mine.session_id

        async def refused(call: Any, session_id: str) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(session_id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            return err.value

        async def get(session_id: str) -> Any:
            return await stub.GetSession(
                sessions_pb2.GetSessionRequest(session_id=session_id), metadata=as_b
            )

        async def end(session_id: str) -> Any:
            return await stub.EndSession(
                sessions_pb2.EndSessionRequest(session_id=session_id), metadata=as_b
            )

        async def converse(session_id: str) -> Any:
            async def start() -> AsyncIterator[sessions_pb2.ClientEvent]:
                yield sessions_pb2.ClientEvent(
                    start=sessions_pb2.ConverseStart(session_id=session_id)
                )

            return [e async for e in stub.Converse(start(), metadata=as_b)]

        unknown = uuid.uuid4().hex
        for call in (get, end, converse):
            theirs = await refused(call, sid)
            nobodys = await refused(call, unknown)
            # Another tenant's session reads exactly like one that does not exist.
            assert theirs.details() == (nobodys.details() or "").replace(unknown, sid)
        listed_b = await stub.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=as_b)
        assert sid not in {s.session_id for s in listed_b.sessions}
        listed_a = await stub.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=as_a)
        assert [s.session_id for s in listed_a.sessions] == [sid]
        got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=sid), metadata=as_a)
        assert got.state == sessions_pb2.Session.ACTIVE and got.persona_prompt == "You are terse."
        ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=sid), metadata=as_a)
        assert ended.state == sessions_pb2.Session.ENDED


async def test_grpc_limits_are_resource_exhausted(grpc_address: str, store: TenancyStore) -> None:
    tenant, api_key = await new_tenant(
        store, TenantLimits(max_concurrent_sessions=1, sessions_per_minute=2)
    )
    auth = bearer(api_key)
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)

        async def create() -> sessions_pb2.Session:
            return await stub.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=auth)

        async def end(session: sessions_pb2.Session) -> None:
            await stub.EndSession(
                sessions_pb2.EndSessionRequest(session_id=session.session_id), metadata=auth
            )

        async def refused() -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await create()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return err.value

        first = await create()
        at_concurrency = await refused()
        assert "limit of 1 concurrent sessions" in (at_concurrency.details() or "")
        # No retry time: the slot frees when a session ends.
        assert retry_after(at_concurrency) is None
        # Ending a session frees its slot, in Redis too.
        await end(first)
        assert await store.active_sessions(tenant) == []
        second = await create()
        assert await store.active_sessions(tenant) == [second.session_id]
        await end(second)
        at_rate = await refused()  # the third start within a minute
        assert "2 new sessions per minute" in (at_rate.details() or "")
        assert 1 <= int(retry_after(at_rate) or 0) <= 60


# --------------------------------------------------------------------------- REST


async def test_rest_needs_a_valid_api_key(
    http_url: str, client: aiohttp.ClientSession, store: TenancyStore
) -> None:
    unknown_key = f"pk_{'0' * 16}_{'A' * 43}"
    for headers, message in [
        ({}, "missing API key"),
        ({"Authorization": f"Bearer {unknown_key}"}, "unknown API key"),
        ({"X-API-Key": "pk_nope"}, "malformed API key"),
        ({"Authorization": "Token abc"}, "'Bearer <API key>'"),
    ]:
        for method, path in [("POST", "/v1/sessions"), ("GET", "/v1/sessions/abc")]:
            async with client.request(method, http_url + path, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                body = await resp.json()
                assert body["error"]["code"] == "UNAUTHENTICATED"
                assert message in body["error"]["message"]
    # The contract itself is public.
    async with client.get(http_url + "/openapi.json") as resp:
        assert resp.status == 200
        spec = await resp.json()
    assert {"/v1/sessions", "/v1/sessions/{session_id}"} <= set(spec["paths"])
    assert set(spec["paths"]["/v1/sessions/{session_id}"]) == {"get", "delete"}
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])


async def test_rest_lifecycle_validation_and_tenant_isolation(
    http_url: str, client: aiohttp.ClientSession, store: TenancyStore
) -> None:
    _, key_a = await new_tenant(store)
    _, key_b = await new_tenant(store)
    as_a, as_b = {"X-API-Key": key_a}, {"Authorization": f"Bearer {key_b}"}
    sessions = http_url + "/v1/sessions"

    async with client.post(sessions, json={"persona_prompt": "Be brief."}, headers=as_a) as resp:
        assert resp.status == 201, await resp.text()
        created = await resp.json()
    sid = created["session_id"]
    assert created["state"] == "active" and created["persona_prompt"] == "Be brief."
    assert created["ended_at"] is None and created["avatar_id"] == "default"
    async with client.get(f"{sessions}/{sid}", headers=as_a) as resp:
        assert resp.status == 200 and (await resp.json())["session_id"] == sid
    async with client.get(sessions, headers=as_a) as resp:
        assert [s["session_id"] for s in (await resp.json())["sessions"]] == [sid]

    # Tenant B sees none of it, and A's id reads like an unknown one.
    async with client.get(sessions, headers=as_b) as resp:
        assert resp.status == 200 and (await resp.json()) == {"sessions": []}
    unknown = uuid.uuid4().hex
    for method in ("GET", "DELETE"):
        async with client.request(method, f"{sessions}/{sid}", headers=as_b) as resp:
            assert resp.status == 404
            theirs = await resp.json()
        async with client.request(method, f"{sessions}/{unknown}", headers=as_b) as resp:
            assert resp.status == 404
            nobodys = await resp.json()
        assert theirs["error"]["code"] == "NOT_FOUND"
        assert theirs["error"]["message"] == nobodys["error"]["message"].replace(unknown, sid)

    # Bodies are validated: 422 for the schema, 400 for values the deployment refuses.
    for body, status, fragment in [
        ({"persona": "typo"}, 422, "body.persona: Extra inputs are not permitted"),
        ({"persona_prompt": "x" * 4001}, 422, "at most 4000 characters"),
        ({"voice": 5}, 422, "body.voice"),
        ({"voice": "someone-else"}, 400, "unknown voice"),
        ({"avatar_id": "../etc"}, 400, "invalid avatar_id"),
    ]:
        async with client.post(sessions, json=body, headers=as_a) as resp:
            assert resp.status == status, body
            error = (await resp.json())["error"]
            assert error["code"] == "INVALID_ARGUMENT" and fragment in error["message"], error
    bad_json = {**as_a, "Content-Type": "application/json"}
    async with client.post(sessions, data=b"{nope", headers=bad_json) as resp:
        assert resp.status == 422
        assert "JSON" in (await resp.json())["error"]["message"]
    async with client.post(sessions, data=b"x" * (65 * 1024), headers=bad_json) as resp:
        assert resp.status == 413

    # Ending: B cannot (above); A can, and again.
    for _ in range(2):
        async with client.delete(f"{sessions}/{sid}", headers=as_a) as resp:
            assert resp.status == 200
            ended = await resp.json()
        assert ended["state"] == "ended" and ended["ended_at"] >= ended["created_at"]


async def test_rest_limits_are_429(
    http_url: str, client: aiohttp.ClientSession, store: TenancyStore
) -> None:
    _, api_key = await new_tenant(
        store, TenantLimits(max_concurrent_sessions=1, sessions_per_minute=2)
    )
    headers = {"X-API-Key": api_key}
    sessions = http_url + "/v1/sessions"
    async with client.post(sessions, headers=headers) as resp:
        assert resp.status == 201
        first = (await resp.json())["session_id"]
    async with client.post(sessions, headers=headers) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"] == {
            "code": "RESOURCE_EXHAUSTED",
            "message": f"tenant {(await store.authenticate(api_key)).tenant!r} is at its limit"
            " of 1 concurrent sessions; end a session and retry",
        }
        assert "Retry-After" not in resp.headers  # a slot frees when a session ends
    async with client.delete(f"{sessions}/{first}", headers=headers) as resp:
        assert resp.status == 200
    async with client.post(sessions, headers=headers) as resp:
        assert resp.status == 201  # the second start this minute
        second = (await resp.json())["session_id"]
    async with client.delete(f"{sessions}/{second}", headers=headers) as resp:
        assert resp.status == 200
    async with client.post(sessions, headers=headers) as resp:
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert "new sessions per minute" in (await resp.json())["error"]["message"]


# --------------------------------------------------------------------------- WebSocket


@dataclass
class StreamLog:
    """What a WebSocket client received."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    audio: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)
    video: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)
    close_code: int | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    def finals(self) -> list[str]:
        return [m["text"] for m in self.of("user_transcript") if m["is_final"]]


async def create_session(client: aiohttp.ClientSession, http_url: str, api_key: str) -> str:
    async with client.post(f"{http_url}/v1/sessions", headers={"X-API-Key": api_key}) as resp:
        assert resp.status == 201, await resp.text()
        session_id: str = (await resp.json())["session_id"]
        return session_id


def connect(
    client: aiohttp.ClientSession,
    http_url: str,
    session_id: str,
    api_key: str | None,
    *,
    key_in_header: bool = False,
    query: str = "",
) -> Any:
    """A WebSocket as a browser opens it (the key as a subprotocol), or with a header."""
    protocols = [http.WS_SUBPROTOCOL]
    headers = {}
    if api_key is not None and key_in_header:
        headers["Authorization"] = f"Bearer {api_key}"
    elif api_key is not None:
        protocols.append(http.WS_KEY_SUBPROTOCOL_PREFIX + api_key)
    url = http_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/converse{query}"
    return client.ws_connect(url, protocols=protocols, headers=headers, max_msg_size=1 << 20)


async def receive_all(ws: aiohttp.ClientWebSocketResponse, log: StreamLog) -> None:
    """Record every message until the server closes; audio and video pair with their header."""
    pending_header: dict[str, Any] | None = None
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            message = json.loads(msg.data)
            assert pending_header is None, f"a {pending_header} header without its data"
            if message["type"] in ("avatar_speech", "avatar_video"):
                pending_header = message
            log.messages.append(message)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            assert pending_header is not None, "binary data without a header"
            kind = log.audio if pending_header["type"] == "avatar_speech" else log.video
            kind.append((pending_header, msg.data))
            pending_header = None
    log.close_code = ws.close_code


async def send_paced(ws: aiohttp.ClientWebSocketResponse, audio: np.ndarray) -> None:
    """20 ms PCM16 frames in real time, as a microphone would send them."""
    t0 = clock.now()
    for k, i in enumerate(range(0, len(audio), FRAME)):
        await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME / SR - clock.now()))
        await ws.send_bytes(float_to_pcm16(audio[i : i + FRAME]))


async def test_websocket_full_spoken_turn(
    http_url: str, client: aiohttp.ClientSession, store: TenancyStore, tts_engine: TtsEngine
) -> None:
    _, api_key = await new_tenant(store)
    session_id = await create_session(client, http_url, api_key)
    question = await user_says(tts_engine, "What is the capital of France?")
    audio = np.concatenate([np.zeros(SR // 4, np.float32), question, np.zeros(SR * 3, np.float32)])
    log = StreamLog()
    async with connect(client, http_url, session_id, api_key) as ws:
        assert ws.protocol == http.WS_SUBPROTOCOL
        receiving = asyncio.create_task(receive_all(ws, log))
        await send_paced(ws, audio)
        await ws.send_str(json.dumps({"type": "end"}))  # the reply finishes, then the close
        await asyncio.wait_for(receiving, timeout=120)

    assert log.close_code == 1000, log.messages[-3:]
    ready = log.messages[0]
    assert ready["type"] == "ready" and ready["session_id"] == session_id
    assert ready["audio_in"] == {
        "sample_rate": SR,
        "channels": 1,
        "encoding": "pcm_s16le",
        "max_bytes": 2 * SR,
    }
    assert log.finals(), "no final transcript"
    heard = log.finals()[0].lower()
    assert "capital" in heard and "france" in heard, heard
    assert log.of("avatar_text"), "no avatar text"
    assert log.audio, "no avatar audio"
    position = log.audio[0][0]["start_sample"]
    for header, pcm in log.audio:
        assert header["sample_rate"] == AVATAR_RATE and header["encoding"] == "pcm_s16le"
        assert len(pcm) == 2 * header["num_samples"]
        assert header["start_sample"] == position  # contiguous in the avatar's stream
        position += header["num_samples"]
        for p in header["phonemes"]:
            assert set(p) == {"phoneme", "viseme", "start_sample", "num_samples"}
    assert position - log.audio[0][0]["start_sample"] > 0.3 * AVATAR_RATE  # audible
    assert any(h["phonemes"] for h, _ in log.audio), "no phoneme timings"
    [latency] = log.of("latency")
    assert latency["turn"] == 1
    assert 0 < latency["end_of_turn_s"] <= latency["first_output_s"]
    async with client.get(
        f"{http_url}/v1/sessions/{session_id}", headers={"X-API-Key": api_key}
    ) as resp:
        assert (await resp.json())["turns"] == 1


async def test_bad_websocket_messages_get_clear_errors_and_spare_other_sessions(
    http_url: str, client: aiohttp.ClientSession, store: TenancyStore, tts_engine: TtsEngine
) -> None:
    _, api_key = await new_tenant(store)
    _, other_key = await new_tenant(store)
    healthy = await create_session(client, http_url, api_key)
    victim = await create_session(client, http_url, api_key)
    hello = await user_says(tts_engine, "Good morning, how are you today?")

    async def refused(
        session_id: str, key: str | None, *messages: str | bytes
    ) -> tuple[dict[str, Any], int | None]:
        """Send `messages`; return the error message received and the close code."""
        log = StreamLog()
        async with connect(client, http_url, session_id, key) as ws:
            receiving = asyncio.create_task(receive_all(ws, log))
            for message in messages:
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message)
            await asyncio.wait_for(receiving, timeout=30)
        [error] = log.of("error")
        return error, log.close_code

    async def misbehave() -> None:
        cases: list[tuple[str, str | None, list[str | bytes], str, int, str]] = [
            # session, key, messages, error code, close code, message fragment
            (victim, api_key, [b"\0" * (2 * SR + 2)], "INVALID_ARGUMENT", 4400, "at most 1 s"),
            (victim, api_key, [b"\0" * 640, b"\0" * 641], "INVALID_ARGUMENT", 4400, "even"),
            (victim, api_key, ["{nope"], "INVALID_ARGUMENT", 4400, "must be JSON"),
            (victim, api_key, ['{"type": "start"}'], "INVALID_ARGUMENT", 4400, "'end'"),
            (victim, None, [], "UNAUTHENTICATED", 4401, "missing API key"),
            (victim, other_key, [], "NOT_FOUND", 4404, "no session"),
            (healthy, api_key, [], "ALREADY_EXISTS", 4409, "already has a Converse stream"),
        ]
        for session_id, key, messages, code, close_code, fragment in cases:
            error, closed = await refused(session_id, key, *messages)
            assert (error["code"], closed) == (code, close_code), error
            assert fragment in error["message"], error
        # Beyond the server's frame limit the WebSocket layer itself refuses (1009).
        async with connect(client, http_url, victim, api_key) as ws:
            await ws.send_bytes(b"\0" * (http.MAX_WS_MESSAGE_BYTES + 2))
            async for _ in ws:
                pass
            assert ws.close_code == 1009

    log = StreamLog()
    async with connect(client, http_url, healthy, api_key) as ws:
        receiving = asyncio.create_task(receive_all(ws, log))
        await asyncio.sleep(0.2)  # the healthy stream holds its session before the misuse
        await asyncio.gather(
            send_paced(ws, np.concatenate([hello, np.zeros(SR * 2, np.float32)])), misbehave()
        )
        for _ in range(300):
            if log.finals():
                break
            await asyncio.sleep(0.1)
        await ws.close()  # mid-reply: the server drops it
        await receiving
    heard = " ".join(log.finals()).lower()
    assert "morning" in heard, log.messages
    assert not log.of("error")

    # Both sessions are active and take new streams.
    for session_id in (healthy, victim):
        async with client.get(
            f"{http_url}/v1/sessions/{session_id}", headers={"X-API-Key": api_key}
        ) as resp:
            assert (await resp.json())["state"] == "active"
        stream = StreamLog()
        async with connect(client, http_url, session_id, api_key, key_in_header=True) as ws:
            receiving = asyncio.create_task(receive_all(ws, stream))
            await ws.send_bytes(b"\0" * 640)
            await ws.send_str('{"type": "end"}')
            await asyncio.wait_for(receiving, timeout=30)
        assert stream.of("ready") and stream.close_code == 1000, stream.messages


async def test_ended_session_takes_no_stream(
    http_url: str, client: aiohttp.ClientSession, store: TenancyStore
) -> None:
    _, api_key = await new_tenant(store)
    session_id = await create_session(client, http_url, api_key)
    async with client.delete(
        f"{http_url}/v1/sessions/{session_id}", headers={"X-API-Key": api_key}
    ) as resp:
        assert resp.status == 200
    log = StreamLog()
    async with connect(client, http_url, session_id, api_key) as ws:
        await receive_all(ws, log)
    [error] = log.of("error")
    assert error["code"] == "FAILED_PRECONDITION" and "has ended" in error["message"]
    assert log.close_code == 4409


# --------------------------------------------------------------------------- leases


async def test_leases_are_renewed_while_sessions_live(
    engines: Engines,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    # A store of its own: the module's other gateways would take the session over when
    # this one closes (tests/test_session_replicas.py).
    async with TenancyStore.from_url(
        redis_server.url, prefix=f"test-leases-{uuid.uuid4().hex[:8]}:"
    ) as store:
        tenant, _ = await new_tenant(store)
        registry = SessionRegistry(engines, store, lease_s=0.6)
        try:
            record = await registry.create(tenant)
            await asyncio.sleep(1.5)  # 2.5 leases: only renewals keep it
            assert await store.active_sessions(tenant) == [record.session_id]
            assert record.active
        finally:
            await registry.close()
        # The only gateway closed: the session ended and freed its slot.
        assert await store.active_sessions(tenant) == []
        assert not record.active


# --------------------------------------------------------------------------- live video

VIDEO_SIZE = 64


@pytest.fixture(scope="module")
async def video_registry(engines: Engines, store: TenancyStore) -> AsyncIterator[SessionRegistry]:
    """A gateway whose sessions have an avatar renderer (small frames: cheap)."""
    render = RenderEngine(RenderConfig(width=VIDEO_SIZE, height=VIDEO_SIZE))
    await render.start()
    sessions = SessionRegistry(dataclasses.replace(engines, render=render), store)
    yield sessions
    await sessions.close()
    await render.close()


@pytest.fixture(scope="module")
async def video_grpc_target(video_registry: SessionRegistry) -> AsyncIterator[str]:
    async with grpc_gateway(video_registry) as address:
        yield f"grpc://{address}"


@pytest.fixture(scope="module")
async def video_http_url(video_registry: SessionRegistry) -> AsyncIterator[str]:
    async with http_gateway(video_registry) as url:
        yield url


def decode_h264(frames: list[bytes]) -> list[np.ndarray]:
    """Decode an Annex-B stream from its first frame, as a client joining it would."""
    decoder = av.CodecContext.create("h264", "r")
    images = []
    for data in [*frames, None]:
        packets = decoder.parse(data) if data is not None else [None]
        for packet in packets:
            images += [f.to_ndarray(format="rgb24") for f in decoder.decode(packet)]
    return images


async def test_grpc_converse_sends_live_video_on_the_voices_timeline(
    video_grpc_target: str, store: TenancyStore, tts_engine: TtsEngine
) -> None:
    _, api_key = await new_tenant(store)
    question = await user_says(tts_engine, "What is the capital of France?")
    audio = np.concatenate([np.zeros(SR // 4, np.float32), question, np.zeros(SR, np.float32)])
    async with ParleyClient(video_grpc_target, api_key) as client:
        session = await client.create_session()
        reply = await collect(client.converse(session.session_id, audio))
        assert reply.speech and reply.latencies, reply.others
        video = reply.video
        assert len(video) >= 12, len(video)  # ~12 fps for the stream's seconds
        assert {(v.encoding, v.width, v.height) for v in video} == {
            ("h264", VIDEO_SIZE, VIDEO_SIZE)
        }
        indices = [v.index for v in video]
        assert indices == sorted(set(indices))
        # The first frame is a keyframe: the stream decodes from it, frame for frame.
        images = decode_h264([v.data for v in video])
        assert len(images) >= len(video) - 1 and images[0].shape == (VIDEO_SIZE, VIDEO_SIZE, 3)
        # Voice and video share one timeline: the voice's pts fall among the frames'.
        voice = sorted(reply.speech, key=lambda s: s.start_sample)
        first_s, last_s = voice[0].pts_s, voice[-1].pts_s
        assert first_s is not None and last_s is not None and first_s < last_s
        assert video[0].pts_s < first_s and video[-1].pts_s > last_s
        [latency] = reply.latencies
        assert latency.first_output_s is not None and latency.first_frame_s is not None
        assert latency.first_frame_s - latency.first_output_s < 0.5

        # Voice only: no frames (and the same session takes the new stream).
        silent = await collect(
            client.converse(session.session_id, np.zeros(SR // 2, np.float32), video="none")
        )
        assert not silent.video
        await client.end_session(session.session_id)


async def test_websocket_video_is_jpeg_by_default_or_h264_or_none(
    video_http_url: str, client: aiohttp.ClientSession, store: TenancyStore
) -> None:
    _, api_key = await new_tenant(store)
    session_id = await create_session(client, video_http_url, api_key)

    async def stream(query: str, seconds: float | None = 1.0) -> StreamLog:
        """Send `seconds` of silence and the end (None: nothing); what came back."""
        log = StreamLog()
        async with connect(client, video_http_url, session_id, api_key, query=query) as ws:
            receiving = asyncio.create_task(receive_all(ws, log))
            if seconds is not None:
                await send_paced(ws, np.zeros(int(seconds * SR), np.float32))
                await ws.send_str('{"type": "end"}')
            await asyncio.wait_for(receiving, timeout=30)
        return log

    jpeg = await stream("")
    assert jpeg.close_code == 1000, jpeg.messages[-3:]
    ready = jpeg.messages[0]
    assert ready["video_out"] == {
        "encoding": "jpeg", "width": VIDEO_SIZE, "height": VIDEO_SIZE, "fps": 12
    }  # fmt: skip
    assert len(jpeg.video) >= 8, len(jpeg.video)  # 12 fps over ~1.2 s
    for header, data in jpeg.video:
        assert set(header) == {"type", "index", "pts_s", "width", "height", "encoding", "key"}
        assert header["encoding"] == "jpeg" and header["key"]
        assert header["pts_s"] == pytest.approx(header["index"] / 12, abs=1e-6)
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.size == (VIDEO_SIZE, VIDEO_SIZE)
    pixels = np.asarray(Image.open(io.BytesIO(jpeg.video[-1][1])))
    assert pixels.std() > 10  # the avatar, not a flat background

    h264 = await stream("?video=h264")
    assert h264.messages[0]["video_out"]["encoding"] == "h264"
    assert h264.video[0][0]["key"] and not all(h["key"] for h, _ in h264.video)
    assert len(decode_h264([data for _, data in h264.video])) >= len(h264.video) - 1

    none = await stream("?video=none", seconds=0.3)
    assert none.messages[0]["video_out"] is None and not none.video and none.close_code == 1000

    bad = await stream("?video=vp9", seconds=None)
    [error] = bad.of("error")
    assert error["code"] == "INVALID_ARGUMENT" and "'vp9'" in error["message"]
    assert bad.close_code == 4400
