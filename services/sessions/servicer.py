"""gRPC servicer for `parley.v1.Sessions`: session lifecycle and the Converse stream.

Converse sends the avatar's live video as `avatar_video` frames (`ConverseStart.
video_encoding`: "h264" by default, Annex-B, the stream's first frame a keyframe;
"jpeg"; "none"), with `pts_s` on the timeline of the `avatar_speech` chunks' `pts_s`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
from parley import rpc, wire
from parley.errors import InvalidInput
from parley.tenancy import Principal, api_key_from_headers
from parley.v1 import render_pb2, sessions_pb2, sessions_pb2_grpc

from services.sessions import gateway
from services.sessions.conversation import (
    AvatarAudioEvent,
    AvatarTextEvent,
    ConversationEvent,
    TurnDoneEvent,
    UserTranscriptEvent,
)
from services.sessions.registry import SessionRecord, SessionRegistry
from services.sessions.video import AvatarVideoEvent, check_encoding

#: The live video of a Converse stream that does not name an encoding.
DEFAULT_VIDEO_ENCODING = "h264"


def session_to_proto(r: SessionRecord) -> sessions_pb2.Session:
    return sessions_pb2.Session(
        session_id=r.session_id,
        avatar_id=r.avatar_id,
        persona_prompt=r.persona_prompt,
        voice=r.voice,
        state=sessions_pb2.Session.ACTIVE if r.active else sessions_pb2.Session.ENDED,
        created_at=r.created_at,
        ended_at=r.ended_at,
        turns=r.turns,
    )


def event_to_proto(ev: ConversationEvent | AvatarVideoEvent) -> sessions_pb2.ServerEvent:
    if isinstance(ev, AvatarVideoEvent):
        return sessions_pb2.ServerEvent(
            avatar_video=render_pb2.VideoFrame(
                data=ev.data,
                encoding=ev.encoding,
                width=ev.width,
                height=ev.height,
                pts_s=ev.pts_s,
                index=ev.index,
            )
        )
    if isinstance(ev, UserTranscriptEvent):
        return sessions_pb2.ServerEvent(
            user_transcript=sessions_pb2.UserTranscript(
                text=ev.text, is_final=ev.is_final, turn=ev.turn
            )
        )
    if isinstance(ev, AvatarTextEvent):
        return sessions_pb2.ServerEvent(
            avatar_text=sessions_pb2.AvatarText(text=ev.text, turn=ev.turn)
        )
    if isinstance(ev, AvatarAudioEvent):
        return sessions_pb2.ServerEvent(
            avatar_speech=sessions_pb2.AvatarSpeech(
                audio=wire.audio_to_proto(ev.samples, ev.sample_rate, ev.start_sample),
                phonemes=wire.phonemes_to_proto(ev.phonemes),
                turn=ev.turn,
                pts_s=ev.pts_s or 0.0,
            )
        )
    assert isinstance(ev, TurnDoneEvent)
    lat = ev.trace.latencies()
    return sessions_pb2.ServerEvent(
        latency=sessions_pb2.TurnLatency(
            turn=ev.trace.turn,
            asr_final_s=lat["asr_final"] or 0.0,
            end_of_turn_s=lat["end_of_turn"] or 0.0,
            llm_first_token_s=lat["llm_first_token"] or 0.0,
            tts_first_audio_s=lat["tts_first_audio"] or 0.0,
            first_output_s=lat["first_output"] or 0.0,
            first_frame_s=lat["first_frame"] or 0.0,
        )
    )


class SessionsServicer(sessions_pb2_grpc.SessionsServicer):
    """`parley.v1.Sessions` over a registry; every call acts for the tenant of its API key.

    The key is checked here, at the start of each method, rather than in a server
    interceptor: Ray Serve's gRPC ingress runs these methods without our server (and
    its interceptors), but passes the metadata. Health checking and reflection are
    other services on the same server and stay open.
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        metadata = context.invocation_metadata() or ()
        headers = [(k, v) for k, v in metadata if isinstance(v, str)]
        return await gateway.authenticate(self.registry, api_key_from_headers(headers))

    @rpc.unary("sessions")
    async def CreateSession(self, request, context):
        caller = await self._caller(context)
        record = await self.registry.create(
            caller.tenant, request.avatar_id, request.persona_prompt, request.voice
        )
        return session_to_proto(record)

    @rpc.unary("sessions")
    async def GetSession(self, request, context):
        caller = await self._caller(context)
        return session_to_proto(await self.registry.get(caller.tenant, request.session_id))

    @rpc.unary("sessions")
    async def ListSessions(self, request, context):
        caller = await self._caller(context)
        return sessions_pb2.ListSessionsResponse(
            sessions=[session_to_proto(r) for r in await self.registry.list(caller.tenant)]
        )

    @rpc.unary("sessions")
    async def EndSession(self, request, context):
        caller = await self._caller(context)
        return session_to_proto(await self.registry.end(caller.tenant, request.session_id))

    @rpc.streaming("sessions")
    async def Converse(
        self,
        request_iterator: AsyncIterator[sessions_pb2.ClientEvent],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[sessions_pb2.ServerEvent]:
        caller = await self._caller(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidInput("the first Converse message must be a ConverseStart")
        video = check_encoding(first.start.video_encoding or DEFAULT_VIDEO_ENCODING)
        record = await self.registry.get(caller.tenant, first.start.session_id)

        async def audio_in() -> AsyncIterator[np.ndarray]:
            async for msg in request_iterator:
                if msg.WhichOneof("event") != "audio":
                    raise InvalidInput("after ConverseStart, send only audio")
                yield wire.audio_from_proto(msg.audio)

        async with self.registry.stream(record) as conversation:
            # The request stream also ends when the client goes away: tell that from a half-close.
            events = gateway.relay(
                record,
                conversation,
                audio_in(),
                client_left=context.cancelled,
                video=video,
                on_turn_done=lambda: self.registry.save_turn(record),
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event_to_proto(event)
