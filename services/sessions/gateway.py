"""What the gRPC servicer and the HTTP app share: who is calling, and relaying a stream.

Both transports authenticate with the same API key headers and relay a Converse stream
the same way: claim the session (one stream at a time), push the client's audio into
its conversation, send the conversation's events back (and the avatar's live video, if
the stream asked for it), and on an unclean end (disconnect, bad message) drop what the
stream left behind so the session starts the next stream clean. Only decoding client
messages and encoding events differ.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import numpy as np
from parley import rpc
from parley.tenancy import Principal

from services.sessions.conversation import Conversation, ConversationEvent, TurnDoneEvent
from services.sessions.registry import (
    LOCAL_TENANT,
    SessionEnded,
    SessionRecord,
    SessionRegistry,
    tenancy_errors,
)
from services.sessions.video import NO_VIDEO, AvatarVideoEvent

#: What a Converse stream sends: the conversation's events and live video frames.
StreamEvent = ConversationEvent | AvatarVideoEvent
#: After a half-close, video goes on this long past the reply (the mouth closes on screen).
VIDEO_TAIL_S = 0.25

#: Who every caller is when the registry has no `TenancyStore` (in-process use).
LOCAL_PRINCIPAL = Principal(tenant=LOCAL_TENANT, key_id="")


async def authenticate(registry: SessionRegistry, api_key: str | None) -> Principal:
    """The caller behind `api_key` (`Unauthenticated` if none or not valid).

    Without a `TenancyStore` every caller is `LOCAL_PRINCIPAL`, key or not.
    """
    if registry.tenancy is None:
        return LOCAL_PRINCIPAL
    with tenancy_errors():
        return await registry.tenancy.authenticate(api_key)


async def relay(
    record: SessionRecord,
    conversation: Conversation,
    audio_in: AsyncIterator[np.ndarray],
    *,
    client_left: Callable[[], bool],
    video: str = NO_VIDEO,
    on_turn_done: Callable[[], Awaitable[None]] | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """Push `audio_in` (validated 16 kHz float32) into the conversation; yield its events,
    and with `video` (an encoding of `services.sessions.video.ENCODINGS`) the avatar's live
    video frames while the stream lasts (none if the deployment has no renderer).

    When `audio_in` ends, the client either half-closed (`client_left()` is False: the
    reply in progress is finished and its events sent before this ends) or went away.
    An error raised by `audio_in` (a bad message) ends this with that error, after the
    events before it. Use under `SessionRegistry.stream`, and close it with
    `contextlib.aclosing` so that the clean-up below runs when the consumer stops early.
    `on_turn_done` runs after each turn's latencies went out (the registry saves the turn).

    Video frames are lossy: the next one is taken from the live video only once the
    consumer has sent the one before (asked for the next event), so a slow client gets
    fewer frames, never a growing queue.
    """
    closed_cleanly = False
    live = None
    if video != NO_VIDEO and conversation.avatar is not None:
        live = conversation.start_video(video)
    frame_sent = asyncio.Event()

    async def read() -> None:
        nonlocal closed_cleanly
        async for samples in audio_in:
            if not record.active:
                raise SessionEnded(f"session {record.session_id!r} has ended")
            await conversation.push_audio(samples)
        if client_left():
            return
        await conversation.wait_idle()  # half-closed: finish the reply in progress
        if live is not None:
            await asyncio.sleep(VIDEO_TAIL_S)
        closed_cleanly = True

    async def produce(emit: Callable[[StreamEvent], None]) -> None:
        async def forward_events() -> None:
            while True:
                emit(await conversation.events.get())

        async def forward_video() -> None:
            assert live is not None
            async with contextlib.aclosing(live.frames()) as frames:
                async for frame in frames:
                    frame_sent.clear()
                    emit(frame)
                    await frame_sent.wait()

        forwarders = [asyncio.create_task(forward_events())]
        if live is not None:
            forwarders.append(asyncio.create_task(forward_video()))
        try:
            await read()
        finally:
            for task in forwarders:
                task.cancel()
            for task in forwarders:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while not conversation.events.empty():
            emit(conversation.events.get_nowait())

    try:
        async with contextlib.aclosing(rpc.relay(produce)) as events:
            async for event in events:
                yield event
                if isinstance(event, AvatarVideoEvent):
                    frame_sent.set()  # the transport has taken it: the next may come
                elif isinstance(event, TurnDoneEvent) and on_turn_done is not None:
                    await on_turn_done()
    finally:
        if live is not None and conversation.video is live:
            conversation.stop_video()
        if not closed_cleanly and record.active:
            # Disconnected, cancelled or a bad message: nobody hears the reply in progress.
            await asyncio.shield(conversation.drop_stream())
