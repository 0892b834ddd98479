"""gRPC servicer for `parley.v1.Render`: speech in, video frames out in real time.

The first request is the config; then speech segments and clears, in any order and at
any pace, while frames stream out at the configured fps (``AvatarStream.frames``):
rgb24 (raw HxWx3 bytes) or h264 (each frame's Annex-B packets). Speech is placed at
``audio.start_sample`` of the avatar's output audio (0: right after the previous
segment); phoneme ``start_sample`` values are stream positions too, as the TTS and
sessions services send them. When the client half-closes, frames continue through
the end of the queued speech plus ``RenderConfig.tail_s``, then the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from parley import clock, rpc, wire
from parley.errors import InvalidInput
from parley.v1 import render_pb2, render_pb2_grpc
from parley.visemes import shift_phonemes

from services.render.default_avatar import AVATAR_ID
from services.render.encoder import H264Encoder
from services.render.engine import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AvatarStream,
    Frame,
    RenderEngine,
)

ENCODINGS = ("rgb24", "h264")
#: Frames handed to gRPC but not yet written; beyond this a slow client makes the
#: stream skip frames (counted as dropped) instead of queueing them.
MAX_FRAMES_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class StreamSettings:
    avatar_id: str
    width: int
    height: int
    fps: int
    encoding: str


def settings_from_proto(config: render_pb2.RenderConfig, engine: RenderEngine) -> StreamSettings:
    """Defaults filled in and validated (InvalidInput says what is wrong)."""
    encoding = config.encoding or "rgb24"
    if encoding not in ENCODINGS:
        raise InvalidInput(f"unknown encoding {config.encoding!r}; expected one of {ENCODINGS}")
    cfg = engine.config
    width, height = config.width or cfg.width, config.height or cfg.height
    fps = config.fps or cfg.fps
    if encoding == "h264" and (width % 2 or height % 2):
        raise InvalidInput(f"h264 needs an even width and height, got {width}x{height}")
    return StreamSettings(config.avatar_id or AVATAR_ID, width, height, fps, encoding)


def add_segment(stream: AvatarStream, segment: render_pb2.SpeechSegment) -> None:
    """Validate a speech segment and queue it on the stream."""
    chunk = segment.audio
    rate = stream.sample_rate or chunk.sample_rate
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidInput(
            f"audio sample_rate {chunk.sample_rate} is not supported;"
            f" use {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    samples = wire.audio_from_proto(chunk, expected_rate=rate)
    start = chunk.start_sample
    if start < 0:
        raise InvalidInput(f"audio start_sample must be >= 0, got {start}")
    # Phonemes are stream positions; relative to the chunk's declared start they stay
    # put when start_sample 0 means "right after the previous segment".
    placed = start or stream.next_sample
    phonemes = shift_phonemes(wire.phonemes_from_proto(segment.phonemes), placed - start)
    stream.add_speech(samples, rate, placed, phonemes)


class RenderServicer(render_pb2_grpc.RenderServicer):
    def __init__(self, engine: RenderEngine) -> None:
        self.engine = engine

    @rpc.streaming("render")
    async def Render(
        self,
        request_iterator: AsyncIterator[render_pb2.RenderRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[render_pb2.VideoFrame]:
        """Config first, then speech and clears; frames flow out in real time."""
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("payload") != "config":
            raise InvalidInput("the first RenderRequest must be a config")
        settings = settings_from_proto(first.config, self.engine)
        stream = await asyncio.to_thread(
            self.engine.stream, settings.avatar_id, settings.width, settings.height, settings.fps
        )
        # The stream's time 0 (audio sample 0, frame 0) is now, once its avatar is loaded.
        start_wall = clock.now()
        encoder = (
            H264Encoder(settings.width, settings.height, settings.fps)
            if settings.encoding == "h264"
            else None
        )
        credits = asyncio.Semaphore(MAX_FRAMES_IN_FLIGHT)

        def to_proto(frame: Frame) -> render_pb2.VideoFrame:
            data = encoder.encode(frame.rgb) if encoder else frame.rgb.tobytes()
            return render_pb2.VideoFrame(
                data=data,
                encoding=settings.encoding,
                width=settings.width,
                height=settings.height,
                pts_s=frame.pts_s,
                index=frame.index,
            )

        async def read() -> None:
            async for req in request_iterator:
                kind = req.WhichOneof("payload")
                if kind == "speech":
                    add_segment(stream, req.speech)
                elif kind == "clear":
                    stream.clear()
                elif kind == "config":
                    raise InvalidInput("config may only be sent once, first")
                else:
                    raise InvalidInput("empty RenderRequest: set config, speech or clear")
            stream.end_after_speech()

        async def produce(emit: Callable[[render_pb2.VideoFrame], None]) -> None:
            async def render() -> None:
                async for frame in stream.frames(start_wall):
                    # Wait for gRPC to take the frames before: a slow client makes the
                    # stream skip frames rather than queue them.
                    await credits.acquire()
                    emit(await asyncio.to_thread(to_proto, frame))

            tasks = {asyncio.create_task(read()), asyncio.create_task(render())}
            try:
                pending = tasks
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # a client error ends the call with its status
            finally:
                stream.close()
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

        async for frame in rpc.relay(produce):
            yield frame
            credits.release()
