"""The stage services as Ray Serve deployments, over Serve's real gRPC ingress on loopback.

One small local Ray cluster (2 logical CPUs, no dashboard) runs the applications
of `deploy/helm/parley/files/serve-config.yaml` on free ports; every call names its application
in the `application` metadata, as clients of `parley serve` do.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

from browser_support import launch_chromium, microphone_wav, talk_through_page
from parley import metrics, wire
from parley import serve as parley_serve
from parley.audio import float_to_pcm16, pcm16_to_float, resample
from parley.client import FirstStatus, ParleyClient, ParleyError, collect
from parley.tenancy import TenancyStore
from parley.v1 import (
    asr_pb2,
    asr_pb2_grpc,
    llm_pb2,
    llm_pb2_grpc,
    render_pb2,
    render_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    tts_pb2,
    tts_pb2_grpc,
    turn_pb2,
    turn_pb2_grpc,
)
from redis_support import RedisServer, redis_server  # noqa: F401  (a fixture)

from services.render.assets import save_ply, save_rig
from services.render.config import RenderConfig
from services.render.default_avatar import build_default_avatar
from services.render.engine import RenderEngine
from services.tts.engine import TtsEngine

KEY_PREFIX = "test-serve:"
APPS = ["tts", "asr", "llm", "turn", "render", "sessions"]
SR = 16_000
FRAME = 320


#: An avatar only the render app has: the default head, all red.
TINTED = "tinted"
SH_C0 = 0.28209479  # degree-0 spherical harmonic: colour = 0.5 + SH_C0 * dc


def write_tinted_avatar(directory: Path) -> None:
    avatar = build_default_avatar()
    sh = torch.zeros_like(avatar.cloud.sh)
    sh[:, 0, :] = (torch.tensor([0.85, 0.15, 0.15]) - 0.5) / SH_C0
    save_ply(replace(avatar.cloud, sh=sh), directory / f"{TINTED}.ply")
    save_rig(avatar.rig, directory / f"{TINTED}.rig.json")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """Port of Ray's metrics agent: what Prometheus scrapes on a Ray cluster."""
    return parley_serve.free_port()


@pytest.fixture(scope="module")
def serve_addresses(
    redis_server: RedisServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
    metrics_port: int,
) -> Iterator[parley_serve.ServeAddresses]:
    import ray
    from ray import serve

    avatars = tmp_path_factory.mktemp("avatars")
    write_tinted_avatar(avatars)
    # The stages' own gRPC services check API keys in the gateway's store (as `parley
    # serve` and the Helm chart set it up); the cluster's processes inherit this.
    env = {parley_serve.REDIS_URL_ENV: redis_server.url, parley_serve.KEY_PREFIX_ENV: KEY_PREFIX}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    STAGE_KEY[:] = [asyncio.run(create_key(redis_server.url, "stage-user"))]
    parley_serve.init_local_ray(num_cpus=2, _metrics_export_port=metrics_port)
    try:
        config = parley_serve.load_config(
            grpc_port=parley_serve.free_port(),
            http_port=parley_serve.free_port(),
            applications=APPS,
        )
        apps = {a.name: a for a in config.applications}
        apps["render"].args["config"].update(width=64, height=64, avatars_dir=str(avatars))
        sessions = apps["sessions"]
        sessions.args["config"].update(redis_url=redis_server.url, key_prefix=KEY_PREFIX)
        sessions.args["config"]["video"] = {"fps": 10}
        addresses = parley_serve.deploy(config, timeout_s=180)
        assert addresses.http.startswith("http://127.0.0.1:")
        yield addresses
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def serve_address(serve_addresses: parley_serve.ServeAddresses) -> str:
    return serve_addresses.grpc


@pytest.fixture
async def channel(serve_address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(serve_address) as ch:
        yield ch


def app(name: str) -> tuple[tuple[str, str]]:
    return (("application", name),)


#: The API key direct calls to the stage applications carry (made by `serve_addresses`).
STAGE_KEY: list[str] = []


async def create_key(redis_url: str, tenant: str) -> str:
    async with TenancyStore.from_url(redis_url, prefix=KEY_PREFIX) as tenancy:
        _, key = await tenancy.create_key(tenant)
        return key


def stage(name: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a direct call to a stage application: its name and an API key."""
    return (*app(name), ("authorization", f"Bearer {STAGE_KEY[0]}"))


async def requests(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def held(items: list[Any]) -> AsyncIterator[Any]:
    """`items`, then no half-close: the stream stays open until the server ends it.

    A write still in flight when the server refuses a stream makes grpc.aio report
    INTERNAL "Internal error from Core" instead of the server's status.
    """
    for item in items:
        yield item
    await asyncio.Event().wait()


async def expect_error(calls: Any, code: grpc.StatusCode, fragment: str) -> None:
    # grpc.aio can replace a refusal's status with INTERNAL when a write was in flight;
    # FirstStatus (the client's remedy) keeps the status the server sent.
    status = FirstStatus()
    calls.add_done_callback(status)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in calls:
            pass
    error = status.error(err.value)
    assert error.code == code, error.details
    assert fragment in error.details, error.details


def tts_requests(text: str) -> list[tts_pb2.TtsRequest]:
    reqs = [tts_pb2.TtsRequest(config=tts_pb2.TtsConfig())]
    reqs += [tts_pb2.TtsRequest(text=w + " ") for w in text.split()]
    reqs.append(tts_pb2.TtsRequest(flush=tts_pb2.FlushText()))
    return reqs


async def synthesize(channel: grpc.aio.Channel, text: str) -> list[tts_pb2.TtsEvent]:
    stub = tts_pb2_grpc.TtsStub(channel)
    return [ev async for ev in stub.Synthesize(requests(tts_requests(text)), metadata=stage("tts"))]


async def test_stage_services_need_an_api_key(channel: grpc.aio.Channel) -> None:
    """Every application shares Serve's gRPC port: a stage is as reachable as the
    sessions API, so it asks for the same API keys."""
    tts = tts_pb2_grpc.TtsStub(channel)
    llm = llm_pb2_grpc.LlmStub(channel)
    wrong = (*app("llm"), ("authorization", "Bearer pk_0000000000000000_wrong"))
    for call, fragment in (
        (tts.Synthesize(held(tts_requests("Hello.")), metadata=app("tts")), "missing API key"),
        (llm.Generate(llm_pb2.GenerateRequest(), metadata=wrong), "malformed API key"),
    ):
        await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, fragment)
    # With the key, the same call goes through (the other stage tests use one).
    assert await synthesize(channel, "Hello.")


async def test_tts_streams_audio_and_phonemes_through_serve(channel: grpc.aio.Channel) -> None:
    events = await synthesize(channel, "Sure, I can help with that. Bye.")
    speech = [ev.speech for ev in events if ev.WhichOneof("event") == "speech"]
    done = [ev.done.total_samples for ev in events if ev.WhichOneof("event") == "done"]
    assert len(speech) >= 2  # clause by clause
    position = 0
    for chunk in speech:
        assert chunk.audio.sample_rate == 24_000 and chunk.audio.start_sample == position
        assert chunk.phonemes and chunk.phonemes[0].start_sample >= position
        position += len(chunk.audio.pcm16) // 2
    assert done[-1] == position > 24_000 // 2


async def test_bad_streams_get_our_status_and_message(channel: grpc.aio.Channel) -> None:
    tts = tts_pb2_grpc.TtsStub(channel)
    twice = [tts_pb2.TtsRequest(config=tts_pb2.TtsConfig())] * 2
    await expect_error(
        tts.Synthesize(held(twice), metadata=stage("tts")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "config may only be sent once",
    )
    await expect_error(
        tts.Synthesize(held([tts_pb2.TtsRequest()]), metadata=stage("tts")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty TtsRequest",
    )
    asr = asr_pb2_grpc.AsrStub(channel)
    await expect_error(
        asr.Transcribe(
            held([asr_pb2.AsrRequest(config=asr_pb2.AsrConfig(language="fr"))]),
            metadata=stage("asr"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not served",
    )
    turn = turn_pb2_grpc.TurnStub(channel)
    bad_turn = turn_pb2.TurnConfig(min_silence_ms=900, max_silence_ms=300)
    await expect_error(
        turn.Detect(held([turn_pb2.TurnRequest(config=bad_turn)]), metadata=stage("turn")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must not exceed",
    )
    llm = llm_pb2_grpc.LlmStub(channel)
    await expect_error(
        llm.Generate(llm_pb2.GenerateRequest(), metadata=stage("llm")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one message",
    )
    # An application that is not deployed: Serve's own NOT_FOUND.
    await expect_error(
        tts.Synthesize(held(tts_requests("Hello there.")), metadata=stage("nope")),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    )


async def test_a_failing_stream_leaves_a_concurrent_one_running(
    channel: grpc.aio.Channel,
) -> None:
    tts = tts_pb2_grpc.TtsStub(channel)

    async def slow_good() -> list[tts_pb2.TtsEvent]:
        async def paced() -> AsyncIterator[tts_pb2.TtsRequest]:
            for r in tts_requests("One moment please, I am looking that up for you."):
                yield r
                await asyncio.sleep(0.02)

        return [ev async for ev in tts.Synthesize(paced(), metadata=stage("tts"))]

    async def bad() -> None:
        await asyncio.sleep(0.05)
        await expect_error(
            tts.Synthesize(held([tts_pb2.TtsRequest()]), metadata=stage("tts")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty TtsRequest",
        )

    good, _ = await asyncio.gather(slow_good(), bad())
    assert any(ev.WhichOneof("event") == "speech" for ev in good)
    assert good[-1].WhichOneof("event") == "done"


async def test_asr_transcribes_speech_through_serve(channel: grpc.aio.Channel) -> None:
    events = await synthesize(channel, "Please book a table for two people tonight.")
    speech = np.concatenate(
        [
            pcm16_to_float(ev.speech.audio.pcm16, 24_000, 1, expected_rate=24_000)
            for ev in events
            if ev.WhichOneof("event") == "speech"
        ]
    )
    audio = np.concatenate(
        [np.zeros(SR // 4, np.float32), resample(speech, 24_000, SR), np.zeros(SR // 4)]
    ).astype(np.float32)
    reqs = [asr_pb2.AsrRequest(config=asr_pb2.AsrConfig(partials=False))]
    reqs += [
        asr_pb2.AsrRequest(audio=wire.audio_to_proto(audio[i : i + FRAME], SR, i))
        for i in range(0, len(audio), FRAME)
    ]
    stub = asr_pb2_grpc.AsrStub(channel)
    out = [ev async for ev in stub.Transcribe(requests(reqs), metadata=stage("asr"))]
    finals = [ev.transcript.text for ev in out if ev.transcript.is_final]
    assert finals and "table" in finals[-1].lower(), finals


async def test_llm_streams_tokens_through_serve(channel: grpc.aio.Channel) -> None:
    stub = llm_pb2_grpc.LlmStub(channel)
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content="Say hello.")],
        max_tokens=8,
        temperature=0.0,
    )
    events = [ev async for ev in stub.Generate(request, metadata=stage("llm"))]
    assert any(ev.WhichOneof("event") == "text" and ev.text for ev in events)
    done = events[-1].done
    assert done.completion_tokens >= 1 and done.time_to_first_token_s > 0


async def test_render_streams_frames_through_serve(channel: grpc.aio.Channel) -> None:
    stub = render_pb2_grpc.RenderStub(channel)
    rate = 24_000
    reqs = [
        render_pb2.RenderRequest(config=render_pb2.RenderConfig(width=64, height=64, fps=10)),
        render_pb2.RenderRequest(
            speech=render_pb2.SpeechSegment(
                audio=wire.audio_to_proto(np.zeros(rate * 3 // 10, np.float32), rate, 0)
            )
        ),
    ]
    frames = [f async for f in stub.Render(requests(reqs), metadata=stage("render"))]
    assert frames and all(f.width == f.height == 64 for f in frames)
    assert all(len(f.data) == 64 * 64 * 3 and f.encoding == "rgb24" for f in frames)
    assert frames[-1].pts_s >= 0.2  # frames run to the end of the queued speech
    await expect_error(
        stub.Render(held(reqs[1:]), metadata=stage("render")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be a config",
    )


# --------------------------------------------------------------------------- sessions


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[TenancyStore]:  # noqa: F811
    async with TenancyStore.from_url(redis_server.url, prefix=KEY_PREFIX) as tenancy:
        yield tenancy


async def question_audio(channel: grpc.aio.Channel, text: str) -> np.ndarray:
    """`text` spoken by the TTS application, at 16 kHz with silence around it."""
    events = await synthesize(channel, text)
    speech = np.concatenate(
        [
            pcm16_to_float(ev.speech.audio.pcm16, 24_000, 1, expected_rate=24_000)
            for ev in events
            if ev.WhichOneof("event") == "speech"
        ]
    )
    pad = np.zeros(SR // 4, np.float32)
    return np.concatenate([pad, resample(speech, 24_000, SR), pad, pad]).astype(np.float32)


def sessions_client(address: str, api_key: str | None) -> ParleyClient:
    return ParleyClient(address, api_key=api_key, metadata=app("sessions"))


def red_share(rgb: np.ndarray) -> float:
    """Red's share of the colour of the pixels that are not background."""
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    figure = pixels[np.abs(pixels - [237, 237, 242]).max(axis=1) > 24]
    assert len(figure) > 200, "the avatar is missing from the frame"
    return float(figure[:, 0].sum() / figure.sum())


async def test_a_spoken_turn_over_grpc_through_serve(
    channel: grpc.aio.Channel, serve_address: str, store: TenancyStore
) -> None:
    """The sessions app answers with audio, video and latencies; its models are the stage
    apps, and the render app draws the session's own avatar."""
    from ray import serve

    render = serve.get_app_handle("render")
    drawn_before = (await render.stats.remote())["frames_rendered"]
    _, key = await store.create_key("acme")
    audio = await question_audio(channel, "What is the capital of France?")
    async with sessions_client(serve_address, key) as client:
        with pytest.raises(ParleyError) as err:
            await client.create_session(avatar_id="nobody")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown avatar 'nobody'" in err.value.details and TINTED in err.value.details
        session = await client.create_session(avatar_id=TINTED)
        assert session.avatar_id == TINTED
        reply = await collect(client.converse(session.session_id, audio, video="jpeg"))
        finals = reply.user_finals
        assert finals and "capital" in finals[0].lower(), finals
        assert "".join(t.text for t in reply.texts).strip() and reply.speech
        (latency,) = reply.latencies
        eot, out = latency.end_of_turn_s, latency.first_output_s
        assert eot is not None and out is not None and 0 < eot < out < 5.0
        assert (await client.get_session(session.session_id)).turns == 1
        ended = await client.end_session(session.session_id)
        assert ended.state == "ended"

    # The frames were drawn by the render app, of the session's avatar.
    assert len(reply.video) >= 10
    drawn = (await render.stats.remote())["frames_rendered"] - drawn_before
    assert drawn >= len(reply.video)
    frame = np.asarray(Image.open(io.BytesIO(reply.video[-1].data)).convert("RGB"))
    assert frame.shape == (64, 64, 3)
    default = RenderEngine(RenderConfig(width=64, height=64)).stream().render_frame(0).rgb
    assert red_share(frame) > red_share(default) + 0.1


async def test_sessions_through_serve_need_a_key_and_keep_tenants_apart(
    serve_address: str, store: TenancyStore
) -> None:
    _, key_a = await store.create_key("tenant-a")
    _, key_b = await store.create_key("tenant-b")
    async with sessions_client(serve_address, None) as anonymous:
        with pytest.raises(ParleyError) as err:
            await anonymous.list_sessions()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with sessions_client(serve_address, "pk_0000000000000000_wrong") as wrong:
        with pytest.raises(ParleyError) as err:
            await wrong.create_session()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with (
        sessions_client(serve_address, key_a) as a,
        sessions_client(serve_address, key_b) as b,
    ):
        mine = await a.create_session()
        assert [s.session_id for s in await b.list_sessions()] == []
        for call in (b.get_session, b.end_session):
            with pytest.raises(ParleyError) as err:
                await call(mine.session_id)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert (await a.get_session(mine.session_id)).state == "active"
        await a.end_session(mine.session_id)


async def test_bad_converse_streams_through_serve_spare_other_sessions(
    channel: grpc.aio.Channel, serve_address: str, store: TenancyStore
) -> None:
    _, key = await store.create_key("acme-bad")
    audio = await question_audio(channel, "What is the capital of Spain?")
    stub = sessions_pb2_grpc.SessionsStub(channel)
    auth = (*app("sessions"), ("authorization", f"Bearer {key}"))
    async with sessions_client(serve_address, key) as client:
        good = await client.create_session()
        victim = await client.create_session()

        async def bad_streams() -> None:
            await asyncio.sleep(0.5)
            audio_8k = sessions_pb2.ClientEvent(
                audio=wire.audio_to_proto(np.zeros(800, np.float32), 8_000, 0)
            )
            odd = sessions_pb2.ClientEvent(audio=audio_8k.audio)
            odd.audio.sample_rate, odd.audio.pcm16 = SR, b"\x00" * 641
            oversized = sessions_pb2.ClientEvent(audio=audio_8k.audio)
            oversized.audio.sample_rate, oversized.audio.pcm16 = SR, b"\x00" * (5 << 20)
            cases = [
                ([odd], "ConverseStart"),
                ([_start("no-such-session")], "no-such-session"),
                ([_start(victim.session_id), audio_8k], "16000 Hz"),
                ([_start(victim.session_id), odd], "even number of bytes"),
                ([_start(victim.session_id), _start(victim.session_id)], "only audio"),
                ([_start(victim.session_id), oversized], "larger than max"),  # > 4 MiB
            ]
            codes = [
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,  # Serve's proxy refuses it (4 MB)
            ]
            for (messages, fragment), code in zip(cases, codes, strict=True):
                await expect_error(stub.Converse(held(messages), metadata=auth), code, fragment)

        reply, _ = await asyncio.gather(
            collect(client.converse(good.session_id, audio)), bad_streams()
        )
        finals = reply.user_finals
        assert finals and "spain" in finals[0].lower(), finals
        assert reply.speech and reply.latencies
        # The session a bad stream targeted is still usable.
        assert (await client.get_session(victim.session_id)).state == "active"


async def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets of every sample the endpoint exports."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


async def test_parley_metrics_reach_prometheus_through_rays_agent(
    channel: grpc.aio.Channel, serve_address: str, store: TenancyStore, metrics_port: int
) -> None:
    """On a Ray cluster Prometheus scrapes Ray's agent: it exports the replicas' Parley
    metrics, under the names the Helm chart's dashboard and alerts use."""
    _, key = await store.create_key("acme-metrics")
    audio = await question_audio(channel, "What is the capital of Italy?")
    async with sessions_client(serve_address, key) as client:
        session = await client.create_session()
        reply = await collect(client.converse(session.session_id, audio, video="none"))
        assert reply.latencies
        await client.end_session(session.session_id)
    wanted = {
        "ray_parley_turn_latency_seconds_count": {"milestone": "first_output"},
        "ray_parley_stage_latency_seconds_bucket": {"service": "llm", "measure": "ttfb"},
        "ray_parley_llm_tokens_total": {"kind": "completion"},
        "ray_parley_render_frame_seconds_count": {},  # the render replica's warm-up
    }
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def missing(samples: dict[str, list[dict[str, str]]]) -> list[str]:
        return [
            name
            for name, labels in wanted.items()
            if not any(labels.items() <= s.items() for s in samples.get(name, []))
        ]

    samples = await scrape(url)
    for _ in range(40):  # Ray's agent publishes what replicas record every few seconds
        if not missing(samples):
            break
        await asyncio.sleep(1.5)
        samples = await scrape(url)
    assert not missing(samples), missing(samples)
    # Every Parley sample the agent exports is one that libs/parley/metrics.py declares
    # (tests/test_helm.py checks the chart's queries against those declarations).
    declared = {n for m in metrics.all_metrics() for n in m.exported_samples()}
    exported = {name for name in samples if name.startswith("ray_parley_")}
    assert exported and exported <= declared, exported - declared


def test_a_counter_mirrored_to_ray_takes_zero(serve_address: str) -> None:
    """A generation cancelled before its first token counts 0 tokens: Ray's own counter
    refuses 0, the mirror must not pass it on (it would replace the cancellation)."""
    tokens = metrics.LLM_TOKENS
    tokens._ray = tokens._make_ray()  # as in a replica after export_to_ray(); Ray runs here
    try:
        tokens.labels("completion").inc(0)
        tokens.labels("completion").inc(2)
        with pytest.raises(ValueError):
            tokens.labels("completion").inc(-1)
    finally:
        tokens._ray = None


def _start(session_id: str) -> sessions_pb2.ClientEvent:
    return sessions_pb2.ClientEvent(start=sessions_pb2.ConverseStart(session_id=session_id))


async def test_a_spoken_turn_over_the_websocket_through_serve(
    channel: grpc.aio.Channel, serve_addresses: parley_serve.ServeAddresses, store: TenancyStore
) -> None:
    import aiohttp

    _, key = await store.create_key("acme-ws")
    audio = await question_audio(channel, "What is the capital of Italy?")
    base = serve_addresses.http
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/sessions", json={}) as refused:
            assert refused.status == 401, await refused.text()
        headers = {"Authorization": f"Bearer {key}"}
        async with http.post(f"{base}/v1/sessions", json={}, headers=headers) as created:
            assert created.status == 201, await created.text()
            session_id = (await created.json())["session_id"]
        url = f"{base.replace('http', 'ws', 1)}/v1/sessions/{session_id}/converse"
        messages: list[dict[str, Any]] = []
        binary = 0
        async with http.ws_connect(url, protocols=[f"parley.key.{key}"]) as ws:
            for i in range(0, len(audio), FRAME):
                await ws.send_bytes(float_to_pcm16(audio[i : i + FRAME]))
                await asyncio.sleep(FRAME / SR)
            await ws.send_json({"type": "end"})
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    messages.append(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    binary += 1
            assert ws.close_code == 1000
    kinds = {m["type"] for m in messages}
    finals = [m["text"] for m in messages if m["type"] == "user_transcript" and m["is_final"]]
    assert finals and "italy" in finals[0].lower(), finals
    assert {"avatar_text", "avatar_speech", "latency"} <= kinds, kinds
    assert binary >= 2  # audio (and video) payloads


async def test_health_and_reflection_answer_on_the_serve_port(channel: grpc.aio.Channel) -> None:
    """Standard clients reach them with the metadata `application: sessions`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "parley.v1.Sessions"):
        request = health_pb2.HealthCheckRequest(service=service)
        response = await health.Check(request, metadata=app("sessions"))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        unknown = health_pb2.HealthCheckRequest(service="parley.v1.Nope")
        await health.Check(unknown, metadata=app("sessions"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="parley.v1.Sessions"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="parley.v1.Nope"),
    ]
    answers = [
        a async for a in reflection.ServerReflectionInfo(requests(asks), metadata=app("sessions"))
    ]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {"parley.v1.Sessions", "parley.v1.Asr", "grpc.health.v1.Health"} <= listed
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert any(b"parley/v1/sessions.proto" in f for f in files)
    assert answers[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
async def browser(tts_engine: TtsEngine, tmp_path: Path) -> AsyncIterator[Any]:
    async for chromium in launch_chromium(await microphone_wav(tts_engine, tmp_path)):
        yield chromium


async def test_the_talk_page_through_serve(
    serve_addresses: parley_serve.ServeAddresses, store: TenancyStore, browser: Any
) -> None:
    """The page served by the sessions app, its WebSocket through Serve's HTTP proxy."""
    _, key = await store.create_key("acme-browser")
    stats = await talk_through_page(browser, serve_addresses.http, key)
    assert stats["videoFrames"] >= 20
