"""The render service over real gRPC on loopback, on the real renderer (small frames)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import av
import grpc
import numpy as np
import pytest
from parley import clock, rpc, wire
from parley.v1 import audio_pb2, render_pb2, render_pb2_grpc
from parley.visemes import Phoneme
from prometheus_client import REGISTRY
from render_support import mouth_dark_pixels

from services.render.engine import AvatarStream, Frame, RenderEngine, av_offset_s, voiced_onset_s
from services.render.servicer import RenderServicer

SR = 24_000  # the TTS voice's rate


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[RenderEngine]:
    e = RenderEngine()
    await e.start()
    yield e
    await e.close()


@pytest.fixture(scope="module")
async def stub(engine: RenderEngine) -> AsyncIterator[render_pb2_grpc.RenderAsyncStub]:
    server, port = await rpc.make_server(
        [(render_pb2_grpc.add_RenderServicer_to_server, RenderServicer(engine))],
        ["parley.v1.Render"],
    )
    await server.start()
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", rpc.MAX_MESSAGE_BYTES)]
    ) as channel:
        yield render_pb2_grpc.RenderStub(channel)
    await server.stop(None)


def samples(t: float) -> int:
    return round(t * SR)


def config(**kwargs: Any) -> render_pb2.RenderRequest:
    return render_pb2.RenderRequest(config=render_pb2.RenderConfig(**kwargs))


def segment(
    start_s: float,
    duration_s: float,
    phonemes: Sequence[tuple[str, float, float]] = (),
    rate: int = SR,
) -> render_pb2.RenderRequest:
    """A TTS-style chunk: audio at its stream position, phonemes relative to the chunk
    moved to stream positions by ``wire.phonemes_to_proto(offset)``."""
    start = round(start_s * rate)
    audio = np.zeros(round(duration_s * rate), np.float32)
    relative = [
        Phoneme(v.lower(), v, round(a * rate), round((b - a) * rate)) for v, a, b in phonemes
    ]
    return render_pb2.RenderRequest(
        speech=render_pb2.SpeechSegment(
            audio=wire.audio_to_proto(audio, rate, start),
            phonemes=wire.phonemes_to_proto(relative, offset=start),
        )
    )


async def requests(
    items: list[render_pb2.RenderRequest],
) -> AsyncIterator[render_pb2.RenderRequest]:
    for item in items:
        yield item


async def queued(queue: asyncio.Queue[Any]) -> AsyncIterator[render_pb2.RenderRequest]:
    while (item := await queue.get()) is not None:
        yield item


def dropped_total() -> float:
    return REGISTRY.get_sample_value("parley_render_frames_dropped_total") or 0.0


def image(frame: render_pb2.VideoFrame) -> np.ndarray:
    return np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 3)


def check_schedule(frames: list[render_pb2.VideoFrame], fps: int, last: int) -> set[int]:
    """pts = index / fps, indices increasing; returns the missing indices 0..last."""
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)), indices
    for f in frames:
        assert f.pts_s == pytest.approx(f.index / fps)
    assert max(indices) <= last
    return set(range(last + 1)) - set(indices)


async def expect_error(call: Callable[[], Any], code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call():
            pass
    assert err.value.code() == code, err.value.details()
    assert fragment in (err.value.details() or ""), (fragment, err.value.details())


async def test_rgb24_frames_follow_the_speech_and_end_after_it(
    stub: render_pb2_grpc.RenderAsyncStub, engine: RenderEngine
) -> None:
    fps, size = 10, 128
    reqs = [
        config(width=size, height=size, fps=fps),  # avatar and encoding: defaults
        segment(0.0, 0.5, [("sil", 0.0, 0.3), ("aa", 0.3, 0.5)]),
        segment(0.5, 0.7, [("aa", 0.0, 0.2), ("PP", 0.2, 0.5), ("sil", 0.5, 0.7)]),
    ]
    before = dropped_total()
    started = clock.now()
    frames = [f async for f in stub.Render(requests(reqs))]
    elapsed = clock.now() - started
    # Half-closed: frames run through the speech (1.2 s) plus the 0.2 s tail.
    missing = check_schedule(frames, fps, last=14)
    assert len(missing) == dropped_total() - before, missing
    assert len(missing) <= 3, missing  # 10 fps at 128 px is easy even on a busy box
    assert 1.0 < elapsed < 15.0
    for f in frames:
        assert (f.encoding, f.width, f.height) == ("rgb24", size, size)
        assert len(f.data) == size * size * 3
    dark = {round(f.pts_s, 3): mouth_dark_pixels(engine, image(f)) for f in frames}
    vowel = [d for t, d in dark.items() if 0.4 <= t <= 0.6]
    closed = [d for t, d in dark.items() if 0.8 <= t <= 0.9 or t <= 0.2]
    assert vowel and min(vowel) >= 10, dark
    assert closed and max(closed) <= 2, dark
    # A/V: the mouth opens within a frame of the vowel's sound.
    if 0.3 in dark and 0.2 in dark:
        offset = av_offset_s(list(dark.items()), 0.3, max(dark.values()) / 2)
        assert offset is not None and abs(offset) <= 1 / fps + 1e-9, dark


async def test_h264_frames_decode_to_the_right_size(stub: render_pb2_grpc.RenderAsyncStub) -> None:
    fps = 10
    reqs = [
        config(avatar_id="default", width=96, height=64, fps=fps, encoding="h264"),
        segment(0.0, 0.3, [("aa", 0.1, 0.3)]),
        # start_sample 0: right after the previous segment (0.3 s; an overlap otherwise).
        segment(0.0, 0.2, [("aa", 0.0, 0.1)]),
    ]
    before = dropped_total()
    frames = [f async for f in stub.Render(requests(reqs))]
    # Through 0.5 s of speech plus the tail: frame 7, shown or counted as dropped.
    missing = check_schedule(frames, fps, last=7)
    assert len(missing) == dropped_total() - before
    assert all(f.encoding == "h264" and f.data for f in frames)
    assert frames[0].data.startswith(b"\x00\x00\x00\x01")  # Annex-B
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for f in frames:
        for packet in decoder.parse(f.data):
            decoded += decoder.decode(packet)
    for packet in decoder.parse(None):
        decoded += decoder.decode(packet)
    decoded += decoder.decode(None)
    assert len(decoded) == len(frames)
    assert {(d.width, d.height) for d in decoded} == {(96, 64)}


async def test_bad_requests_end_only_their_call(stub: render_pb2_grpc.RenderAsyncStub) -> None:
    fps = 10
    before = dropped_total()
    good_reqs = [config(width=64, height=64, fps=fps), segment(0.0, 1.5)]
    good = asyncio.create_task(_collect(stub, good_reqs))
    silence = np.zeros(240, np.float32)

    def speech(
        chunk: audio_pb2.AudioChunk, *timings: tuple[str, int, int]
    ) -> render_pb2.RenderRequest:
        return render_pb2.RenderRequest(
            speech=render_pb2.SpeechSegment(
                audio=chunk,
                phonemes=[
                    audio_pb2.PhonemeTiming(phoneme="x", viseme=v, start_sample=s, num_samples=n)
                    for v, s, n in timings
                ],
            )
        )

    ok = config(width=64, height=64, fps=fps)
    bad = {
        "unknown encoding 'vp8'": [config(encoding="vp8")],
        "h264 needs an even width": [config(width=65, height=64, encoding="h264")],
        "fps 61 is out of range": [config(fps=61)],
        "fps -1 is out of range": [config(fps=-1)],
        "width 2000 is out of range": [config(width=2000)],
        "unknown avatar 'nobody'": [config(avatar_id="nobody")],
        "invalid avatar id": [config(avatar_id="../../etc/passwd")],
        "first RenderRequest must be a config": [segment(0.0, 0.1)],
        "config may only be sent once": [ok, ok],
        "empty RenderRequest": [ok, render_pb2.RenderRequest()],
        "must be 24000 Hz": [ok, segment(0.0, 0.1), segment(0.1, 0.1, rate=16_000)],
        "even number of bytes": [
            ok,
            speech(audio_pb2.AudioChunk(pcm16=b"\x00", sample_rate=SR, channels=1)),
        ],
        "mono": [ok, speech(audio_pb2.AudioChunk(pcm16=b"", sample_rate=SR, channels=2))],
        "sample_rate 0 is not supported": [ok, speech(audio_pb2.AudioChunk(channels=1))],
        "must not overlap": [ok, segment(0.5, 0.2), segment(0.6, 0.2)],
        "unknown viseme 'XX'": [ok, speech(wire.audio_to_proto(silence, SR, 0), ("XX", 0, 10))],
        "outside its audio chunk": [
            ok,
            speech(wire.audio_to_proto(silence, SR, SR), ("aa", 0, 10)),
        ],
        "lasts": [ok, speech(wire.audio_to_proto(silence, SR, 0), ("aa", 0, -3))],
    }
    for fragment, reqs in bad.items():
        await expect_error(
            lambda r=reqs: stub.Render(requests(r)),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            fragment,
        )
    assert not good.done() or good.exception() is None
    frames = await good
    missing = check_schedule(frames, fps, last=17)
    # On a busy machine the good call may fall behind; every frame it skipped is counted.
    assert len(missing) <= dropped_total() - before, missing
    assert len(frames) >= 6


async def _collect(
    stub: render_pb2_grpc.RenderAsyncStub, reqs: list[render_pb2.RenderRequest]
) -> list[render_pb2.VideoFrame]:
    return [f async for f in stub.Render(requests(reqs))]


async def test_clear_stops_the_mouth(
    stub: render_pb2_grpc.RenderAsyncStub, engine: RenderEngine
) -> None:
    fps, size = 10, 128
    queue: asyncio.Queue[Any] = asyncio.Queue()
    queue.put_nowait(config(width=size, height=size, fps=fps))
    queue.put_nowait(segment(0.0, 3.0, [("sil", 0.0, 0.2), ("aa", 0.2, 3.0)]))
    frames = []
    cleared_after: float | None = None
    async for frame in stub.Render(queued(queue)):
        frames.append(frame)
        if cleared_after is None and frame.pts_s >= 0.6:
            cleared_after = frame.pts_s
            queue.put_nowait(render_pb2.RenderRequest(clear=render_pb2.ClearSpeech()))
        elif cleared_after is not None and frame.pts_s >= cleared_after + 0.7:
            queue.put_nowait(None)  # half-close: the speech was cut, so the call ends
    assert cleared_after is not None
    check_schedule(frames, fps, last=math.ceil(frames[-1].pts_s * fps))
    assert frames[-1].pts_s < 2.0  # not through the 3 s of speech
    dark = [(f.pts_s, mouth_dark_pixels(engine, image(f))) for f in frames]
    speaking = [d for t, d in dark if 0.3 <= t <= cleared_after]
    stopped = [d for t, d in dark if t >= cleared_after + 0.4]
    assert speaking and min(speaking) >= 10, dark
    assert stopped and max(stopped) <= 2, dark


async def test_unreachable_frame_rate_drops_frames_on_schedule(
    stub: render_pb2_grpc.RenderAsyncStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fps = 30
    render = AvatarStream.render_frame

    def slow(self: AvatarStream, index: int) -> Frame:
        frame = render(self, index)
        deadline = clock.now() + 0.08  # with the render itself, ~3 frame periods
        while clock.now() < deadline:
            pass
        return frame

    monkeypatch.setattr(AvatarStream, "render_frame", slow)
    before = dropped_total()
    rendered_before = REGISTRY.get_sample_value("parley_render_frame_seconds_count") or 0.0
    frames = await _collect(stub, [config(width=64, height=64, fps=fps), segment(0.0, 1.0)])
    missing = check_schedule(frames, fps, last=36)  # 1.0 s of speech + 0.2 s tail
    assert len(missing) >= 12, missing  # at most ~1 in 2 frames can be made
    assert dropped_total() - before == len(missing)
    rendered = (
        REGISTRY.get_sample_value("parley_render_frame_seconds_count") or 0.0
    ) - rendered_before
    assert rendered >= len(frames)


async def test_av_offset_of_tts_style_speech(engine: RenderEngine) -> None:
    """The bench's measure on conversation-style chunks (20 ms, phonemes where they
    start): the mouth opens within one frame of the first vowel's sound."""
    fps = 25
    stream = engine.stream("default", 64, 64, fps)
    timings = [("m", "PP", 0.10, 0.18), ("a", "aa", 0.18, 0.43), ("n", "nn", 0.43, 0.5)]
    phonemes = [Phoneme(p, v, samples(a), samples(b) - samples(a)) for p, v, a, b in timings]
    step = samples(0.02)
    for start in range(0, samples(0.6), step):
        stream.add_speech(
            np.zeros(step, np.float32),
            SR,
            start,
            [p for p in phonemes if start <= p.start_sample < start + step],
        )
    onset = voiced_onset_s(phonemes, SR)
    assert onset is not None and onset == pytest.approx(0.18)
    openings = [(i / fps, stream.mouth_open_at(stream.pose_time(i))) for i in range(20)]
    offset = av_offset_s(openings, onset, 0.4)
    assert offset is not None and abs(offset) <= 0.5 / fps + 0.005, offset
