"""The stage services as Ray Serve deployments, over Serve's real gRPC ingress on loopback.

One small local Ray cluster (2 logical CPUs, no dashboard) runs the applications
of `deploy/serve/parley.yaml` on free ports; every call names its application
in the `application` metadata, as clients of `parley serve` do.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

from parley import serve as parley_serve
from parley import wire
from parley.audio import pcm16_to_float, resample
from parley.v1 import (
    asr_pb2,
    asr_pb2_grpc,
    llm_pb2,
    llm_pb2_grpc,
    render_pb2,
    render_pb2_grpc,
    tts_pb2,
    tts_pb2_grpc,
    turn_pb2,
    turn_pb2_grpc,
)

APPS = ["tts", "asr", "llm", "turn", "render"]
SR = 16_000
FRAME = 320


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def serve_address() -> Iterator[str]:
    import ray
    from ray import serve

    parley_serve.init_local_ray(num_cpus=2)
    try:
        config = parley_serve.load_config(
            grpc_port=free_port(), http_port=free_port(), applications=APPS
        )
        addresses = parley_serve.deploy(config, timeout_s=120)
        assert addresses.http.startswith("http://127.0.0.1:")
        yield addresses.grpc
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
async def channel(serve_address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(serve_address) as ch:
        yield ch


def app(name: str) -> tuple[tuple[str, str]]:
    return (("application", name),)


async def requests(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def expect_error(calls: Any, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in calls:
            pass
    assert err.value.code() == code, err.value.details()
    assert fragment in (err.value.details() or ""), err.value.details()


def tts_requests(text: str) -> list[tts_pb2.TtsRequest]:
    reqs = [tts_pb2.TtsRequest(config=tts_pb2.TtsConfig())]
    reqs += [tts_pb2.TtsRequest(text=w + " ") for w in text.split()]
    reqs.append(tts_pb2.TtsRequest(flush=tts_pb2.FlushText()))
    return reqs


async def synthesize(channel: grpc.aio.Channel, text: str) -> list[tts_pb2.TtsEvent]:
    stub = tts_pb2_grpc.TtsStub(channel)
    return [ev async for ev in stub.Synthesize(requests(tts_requests(text)), metadata=app("tts"))]


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
        tts.Synthesize(requests(twice), metadata=app("tts")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "config may only be sent once",
    )
    await expect_error(
        tts.Synthesize(requests([tts_pb2.TtsRequest()]), metadata=app("tts")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty TtsRequest",
    )
    asr = asr_pb2_grpc.AsrStub(channel)
    await expect_error(
        asr.Transcribe(
            requests([asr_pb2.AsrRequest(config=asr_pb2.AsrConfig(language="fr"))]),
            metadata=app("asr"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not served",
    )
    turn = turn_pb2_grpc.TurnStub(channel)
    bad_turn = turn_pb2.TurnConfig(min_silence_ms=900, max_silence_ms=300)
    await expect_error(
        turn.Detect(requests([turn_pb2.TurnRequest(config=bad_turn)]), metadata=app("turn")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must not exceed",
    )
    llm = llm_pb2_grpc.LlmStub(channel)
    await expect_error(
        llm.Generate(llm_pb2.GenerateRequest(), metadata=app("llm")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one message",
    )
    # An application that is not deployed: Serve's own NOT_FOUND.
    await expect_error(
        tts.Synthesize(requests(tts_requests("Hello there.")), metadata=app("nope")),
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

        return [ev async for ev in tts.Synthesize(paced(), metadata=app("tts"))]

    async def bad() -> None:
        await asyncio.sleep(0.05)
        await expect_error(
            tts.Synthesize(requests([tts_pb2.TtsRequest()]), metadata=app("tts")),
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
    out = [ev async for ev in stub.Transcribe(requests(reqs), metadata=app("asr"))]
    finals = [ev.transcript.text for ev in out if ev.transcript.is_final]
    assert finals and "table" in finals[-1].lower(), finals


async def test_llm_streams_tokens_through_serve(channel: grpc.aio.Channel) -> None:
    stub = llm_pb2_grpc.LlmStub(channel)
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.ChatMessage(role="user", content="Say hello.")],
        max_tokens=8,
        temperature=0.0,
    )
    events = [ev async for ev in stub.Generate(request, metadata=app("llm"))]
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
    frames = [f async for f in stub.Render(requests(reqs), metadata=app("render"))]
    assert frames and all(f.width == f.height == 64 for f in frames)
    assert all(len(f.data) == 64 * 64 * 3 and f.encoding == "rgb24" for f in frames)
    assert frames[-1].pts_s >= 0.2  # frames run to the end of the queued speech
    await expect_error(
        stub.Render(requests(reqs[1:]), metadata=app("render")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be a config",
    )
