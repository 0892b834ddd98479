"""Live avatar video of a conversation: what a Converse stream shows while it is open.

    session timeline (avatar time 0 = the conversation's start, wall clock since then)
       │ speech placed on it by the conversation as each reply's audio goes out
       ▼
    LiveVideo: frame i (pts i / fps) rendered from `origin + i / fps - lead` on, from
       the conversation's one render thread, encoded there (JPEG or H.264), queued for
       the transport; the pose is that of (i + 0.5) / fps (AvatarStream.pose_time)

**Where frames are drawn.** The pose comes from the session's timeline, here; the
image from the render engine's backend: this process (in-process gateway, `parley
demo`), or on Ray Serve a render replica through a handle (one pose in, one image
out), so rendering scales on its own (GPU / MIG) apart from the gateway. A frame that
fails or times out (a replica lost) is skipped and counted (*failed*); the video goes
on with the next one.

**One clock.** Video pts and the `pts_s` of each avatar audio chunk are seconds on the
same avatar timeline: the sample of a chunk whose pts is p plays when the frame of pts
p shows. Between replies the avatar idles (blinks, slow head motion at the listening
amplitude) and frames keep coming.

The frame shown with a reply's first audio is rendered at once when the reply's speech
is placed (up to a frame early): its time is the turn's `first_frame` milestone.

**Bounded, lossy.** Frame i is due at `origin + i / fps - lead`; when rendering falls a
whole frame behind, frames are skipped to the newest one due (counted as *late*, also
in ``parley_render_frames_dropped_total``). A frame is queued only while fewer than
`max_pending` frames await the transport (the consumer asking for the next frame means
it has sent the previous one); otherwise it is not rendered at all (counted as
*slow_client*). Frames are skipped before they are encoded, so an H.264 stream stays
decodable: it holds fewer frames, never a missing reference.

**The voice first.** From the end of the user's speech to the reply's first audio (at
most 1.5 s) the video holds its frame (`hold`, counted as *held*): the render thread
then leaves the CPU to the stages that decide the turn and write the reply, and idle
motion missing for half a second is not seen. The reply's first frame is rendered at
once.

**CPU.** A 256×256 frame takes ~31 ms on one CPU thread (docs/benchmarks.md), so 25 fps
would take a whole core from the conversation. The default for live video is 256×256
(the render config's size) at 12 fps: ~0.4 of a core, lips within half a frame (42 ms);
measured, it leaves the utterance-to-utterance latency as it was (docs/benchmarks.md,
"Live avatar video"). With a GPU, raise `fps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import math
import os
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from parley import clock, metrics
from parley.errors import InvalidInput
from pydantic import BaseModel, ConfigDict, Field

from services.render.encoder import H264Encoder
from services.render.engine import AvatarStream
from services.sessions.trace import TurnTrace

log = logging.getLogger(__name__)

#: Encodings a stream may ask for. "jpeg": each frame a baseline JPEG (any browser
#: decodes it with createImageBitmap; frames are independent). "h264": Annex-B, one
#: encoder per stream, the first frame a keyframe (IDR with SPS/PPS), then every 2 s.
ENCODINGS = ("jpeg", "h264")
#: What a stream asks for to get no video.
NO_VIDEO = "none"


class LiveVideoConfig(BaseModel):
    """Live video of conversations (the frames a Converse stream shows)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Frames per second. 12 on CPU (a frame costs ~31 ms at 256×256 on one thread).
    fps: int = Field(default=12, ge=1, le=60)
    #: Frame size; 0 takes the render config's (256). Even, for H.264.
    width: int = Field(default=0, ge=0, le=1024, multiple_of=2)
    height: int = Field(default=0, ge=0, le=1024, multiple_of=2)
    #: Frames sent ahead of their presentation time (the client's jitter buffer).
    lead_s: float = Field(default=0.04, ge=0.0, le=0.5)
    #: Frames rendered but not yet taken by the transport, at most (more: frames are
    #: skipped, never queued).
    max_pending: int = Field(default=2, ge=1, le=30)
    jpeg_quality: int = Field(default=80, ge=10, le=95)
    h264_crf: int = Field(default=23, ge=0, le=51)
    #: Niceness of a conversation's render thread (Linux). 0: measured on 2 cores, nice
    #: 10 left the utterance-to-utterance latency as it was but rendered each reply's
    #: first frame ~250 ms later (the LLM still generating took the CPU); the voice is
    #: protected instead by holding the video while a reply is prepared (`hold`).
    render_nice: int = Field(default=0, ge=0, le=19)


@dataclass(frozen=True, slots=True)
class AvatarVideoEvent:
    """One encoded frame of the avatar's live video."""

    data: bytes
    encoding: str
    width: int
    height: int
    #: Presentation time, seconds on the session's avatar timeline (that of the audio).
    pts_s: float
    index: int
    #: Decodable on its own (JPEG: always; H.264: an IDR frame).
    key: bool


@dataclass(slots=True)
class VideoStats:
    rendered: int = 0
    sent: int = 0  # taken by the consumer
    dropped_late: int = 0  # rendering fell behind real time
    dropped_slow_client: int = 0  # the consumer had not taken the frames before
    held: int = 0  # not rendered while a reply was being prepared (`hold`)
    failed: int = 0  # the renderer failed or timed out (e.g. a render replica lost)

    def as_dict(self) -> dict[str, int]:
        return {
            "rendered": self.rendered,
            "sent": self.sent,
            "dropped_late": self.dropped_late,
            "dropped_slow_client": self.dropped_slow_client,
            "held": self.held,
            "failed": self.failed,
        }


class FrameFailed(Exception):
    """The renderer could not draw a frame (its cause says why)."""


def check_encoding(encoding: str) -> str:
    """`encoding` if a stream may ask for it (one of ENCODINGS or NO_VIDEO); InvalidInput if not."""
    if encoding not in (*ENCODINGS, NO_VIDEO):
        raise InvalidInput(
            f"unknown video encoding {encoding[:40]!r}; use one of {[*ENCODINGS, NO_VIDEO]}"
        )
    return encoding


def init_render_thread(torch_threads: int, nice: int) -> None:
    """Set up a conversation's render thread: torch's intra-op threads, and its niceness
    (a per-thread value on Linux; elsewhere setpriority would renice a process)."""
    torch.set_num_threads(torch_threads)
    if nice and sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:
            log.warning("could not lower the render thread's priority: %s", exc)


def render_timed(
    executor: Executor, avatar: AvatarStream, trace: TurnTrace, index: int
) -> asyncio.Future[None]:
    """Render frame `index` on `executor` and note when it was ready (`trace.first_frame`)."""

    def render() -> None:
        try:
            avatar.render_frame(index)
        except Exception as exc:  # the turn goes on without its first_frame milestone
            log.warning("the frame of a reply's first audio failed to render: %r", exc)
            return
        trace.first_frame = clock.now()

    return asyncio.get_running_loop().run_in_executor(executor, render)


def is_h264_keyframe(data: bytes) -> bool:
    """Whether an Annex-B access unit holds an IDR slice (NAL unit type 5)."""
    i = data.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(data):
        if data[i + 3] & 0x1F == 5:
            return True
        i = data.find(b"\x00\x00\x01", i + 3)
    return False


class _JpegEncoder:
    def __init__(self, quality: int) -> None:
        self.quality = quality

    def encode(self, rgb: np.ndarray) -> bytes:
        from PIL import Image  # Pillow; imported on first use

        out = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(out, "JPEG", quality=self.quality)
        return out.getvalue()


@dataclass(slots=True)
class _Waiter:
    """A reply's first frame, to be timed: the first frame rendered after the reply's
    speech was placed whose pts is at or after its first audio."""

    index: int
    trace: TurnTrace
    future: asyncio.Future[None]


class LiveVideo:
    """One stream's live video of a conversation's avatar (see the module doc).

    `start()` runs it; `frames()` yields the encoded frames (one consumer); `stop()` ends
    both. Rendering and encoding run on `executor`, the conversation's single render
    thread, so the event loop never waits for a frame. While `hold()` is true no frame is
    rendered (the client keeps showing the one before), except a reply's first frame.
    """

    def __init__(
        self,
        avatar: AvatarStream,
        executor: Executor,
        origin: float,
        encoding: str,
        config: LiveVideoConfig,
        *,
        hold: Callable[[], bool] | None = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise InvalidInput(f"unknown video encoding {encoding!r}; use one of {ENCODINGS}")
        self.avatar = avatar
        self.executor = executor
        self.origin = origin  # wall clock (parley.clock) of avatar time 0
        self.encoding = encoding
        self.config = config
        self._hold = hold
        self.width, self.height, self.fps = avatar.width, avatar.height, avatar.fps
        self.stats = VideoStats()
        self._queue: asyncio.Queue[AvatarVideoEvent | None] = asyncio.Queue()
        self._pending = 0  # queued or handed to the consumer, not yet sent
        self._waiters: list[_Waiter] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._encode: Callable[[np.ndarray], bytes] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("this live video has already started")
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # The conversation goes on without video; the error is not lost.
            log.error("live video failed", exc_info=task.exception())
            self.stop()

    def stop(self) -> None:
        """Stop rendering (at once) and end `frames()`; a reply's first frame still
        awaited is rendered on its own."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        self._queue.put_nowait(None)
        for waiter in self._waiters:
            rendered = render_timed(self.executor, self.avatar, waiter.trace, waiter.index)
            rendered.add_done_callback(functools.partial(_resolve_after, waiter.future))
        self._waiters.clear()

    async def frames(self) -> AsyncGenerator[AvatarVideoEvent, None]:
        """The encoded frames, in order, until `stop()`. Asking for the next frame tells
        that the previous one was sent: a consumer that reads slowly gets fewer frames."""
        while (frame := await self._queue.get()) is not None:
            yield frame
            self._pending -= 1
            self.stats.sent += 1

    def time_first_frame(self, trace: TurnTrace, at_s: float) -> asyncio.Future[None]:
        """Note in `trace.first_frame` when the frame shown with audio at `at_s` (avatar
        time; its speech already placed) has been rendered; the future resolves then."""
        future = asyncio.get_running_loop().create_future()
        index = math.ceil(at_s * self.fps - 1e-9)
        if self._stopped:
            rendered = render_timed(self.executor, self.avatar, trace, index)
            rendered.add_done_callback(functools.partial(_resolve_after, future))
        else:
            self._waiters.append(_Waiter(index, trace, future))
            self._wake.set()
        return future

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        fps, lead = self.fps, self.config.lead_s
        # Start at the newest frame due (nothing before it counts as dropped).
        index = max(0, math.floor((clock.now() - self.origin + lead) * fps + 1e-9))
        while not self._stopped:
            now = clock.now()
            release = self.origin + index / fps - lead
            # A reply's first frame goes at once (its speech is placed): it is the
            # turn's first_frame milestone, and the client buffers frames anyway.
            if now < release and not any(w.index <= index for w in self._waiters):
                await self._sleep(release - now)
                continue
            due = math.floor((now - self.origin + lead) * fps + 1e-9)
            if due > index:  # a whole frame behind: skip to the newest one due
                self.stats.dropped_late += due - index
                metrics.RENDER_FRAMES_DROPPED.inc(due - index)
                index = due
                continue
            send = self._pending < self.config.max_pending
            # Only waiters registered before this render starts: their speech is in it.
            waiters = [w for w in self._waiters if w.index <= index]
            if not waiters and self._hold is not None and self._hold():
                self.stats.held += 1  # the client keeps showing the frame before
                index += 1
                continue
            if not send and not waiters:
                self.stats.dropped_slow_client += 1
                metrics.VIDEO_FRAMES_DROPPED_SLOW_CLIENT.inc()
                index += 1
                continue
            try:
                ready, data = await loop.run_in_executor(self.executor, self._render, index, send)
            except FrameFailed as exc:  # the client keeps the frame before; the next may work
                self._render_failed(exc.__cause__ or exc)
                ready, data = None, None
            else:
                self.stats.rendered += 1
            for waiter in waiters:
                if ready is not None:
                    waiter.trace.first_frame = ready
                self._waiters.remove(waiter)
                _resolve(waiter.future)
            if data is not None:
                self._pending += 1
                key = self.encoding == "jpeg" or is_h264_keyframe(data)
                self._queue.put_nowait(
                    AvatarVideoEvent(
                        data, self.encoding, self.width, self.height, index / fps, index, key
                    )
                )
            index += 1

    def _render_failed(self, exc: BaseException) -> None:
        self.stats.failed += 1
        metrics.RENDER_FRAMES_DROPPED.inc()
        if self.stats.failed in (1, 10) or self.stats.failed % 100 == 0:  # not every frame
            log.warning(
                "live video: %d frame(s) failed to render, latest: %r", self.stats.failed, exc
            )

    def _render(self, index: int, encode: bool) -> tuple[float, bytes | None]:
        """On the render thread: frame `index`, and its encoding when it is to be sent.
        FrameFailed if the renderer failed (an encoder's failure ends the video)."""
        try:
            frame = self.avatar.render_frame(index)
        except Exception as exc:
            raise FrameFailed from exc
        ready = clock.now()
        if not encode:
            return ready, None
        if self._encode is None:  # made on the render thread: the first frame is a keyframe
            if self.encoding == "h264":
                self._encode = H264Encoder(
                    self.width, self.height, self.fps, crf=self.config.h264_crf
                ).encode
            else:
                self._encode = _JpegEncoder(self.config.jpeg_quality).encode
        return ready, self._encode(frame.rgb)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_after(future: asyncio.Future[None], _done: asyncio.Future[None]) -> None:
    _resolve(future)  # whether the render worked or not: the reply must not wait forever
