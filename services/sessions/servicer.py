"""gRPC servicer for `parley.v1.Sessions`: session lifecycle and the Converse stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from parley import rpc, wire
from parley.errors import InvalidInput
from parley.v1 import sessions_pb2, sessions_pb2_grpc

from services.sessions.conversation import (
    AvatarAudioEvent,
    AvatarTextEvent,
    ConversationEvent,
    TurnDoneEvent,
    UserTranscriptEvent,
)
from services.sessions.registry import SessionNotFound, SessionRecord, SessionRegistry


def session_to_proto(r: SessionRecord) -> sessions_pb2.Session:
    return sessions_pb2.Session(
        session_id=r.session_id,
        avatar_id=r.avatar_id,
        persona_prompt=r.persona_prompt,
        voice=r.voice,
        state=sessions_pb2.Session.ACTIVE if r.active else sessions_pb2.Session.ENDED,
        created_at=r.created_at,
        ended_at=r.ended_at,
        turns=r.conversation.turn if r.conversation else 0,
    )


def event_to_proto(ev: ConversationEvent) -> sessions_pb2.ServerEvent:
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
    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry

    async def _get(self, session_id: str, context: grpc.aio.ServicerContext) -> SessionRecord:
        try:
            return self.registry.get(session_id)
        except SessionNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise

    @rpc.unary("sessions")
    async def CreateSession(self, request, context):
        return session_to_proto(
            self.registry.create(request.avatar_id, request.persona_prompt, request.voice)
        )

    @rpc.unary("sessions")
    async def GetSession(self, request, context):
        return session_to_proto(await self._get(request.session_id, context))

    @rpc.unary("sessions")
    async def ListSessions(self, request, context):
        return sessions_pb2.ListSessionsResponse(
            sessions=[session_to_proto(r) for r in self.registry.list()]
        )

    @rpc.unary("sessions")
    async def EndSession(self, request, context):
        await self._get(request.session_id, context)
        return session_to_proto(await self.registry.end(request.session_id))

    @rpc.streaming("sessions")
    async def Converse(
        self,
        request_iterator: AsyncIterator[sessions_pb2.ClientEvent],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[sessions_pb2.ServerEvent]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidInput("the first Converse message must be a ConverseStart")
        record = await self._get(first.start.session_id, context)
        if not record.active or record.conversation is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "session has ended")
        if record.streaming:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, "session already has a Converse stream"
            )
        conv = record.conversation
        assert conv is not None
        record.streaming = True

        closed_cleanly = False

        async def read() -> None:
            nonlocal closed_cleanly
            async for msg in request_iterator:
                if msg.WhichOneof("event") != "audio":
                    raise InvalidInput("after ConverseStart, send only audio")
                await conv.push_audio(wire.audio_from_proto(msg.audio))
            # The request stream also ends when the client goes away: tell that from a half-close.
            if context.cancelled():
                return
            await conv.wait_idle()  # half-closed: finish the reply in progress
            closed_cleanly = True

        try:
            async for event in rpc.forward_while(conv.events, read()):
                yield event_to_proto(event)
        finally:
            if not closed_cleanly:
                # Disconnected, cancelled or a bad message: nobody hears the reply in progress.
                await asyncio.shield(conv.drop_stream())
            record.streaming = False
