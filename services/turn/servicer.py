"""gRPC servicer for `parley.v1.Turn`: audio, transcripts and avatar state in, turn events out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from parley import rpc, wire
from parley.errors import InvalidInput
from parley.v1 import turn_pb2, turn_pb2_grpc
from pydantic import ValidationError

from services.turn.config import TurnConfig
from services.turn.detector import DetectorEvent, EventKind
from services.turn.engine import TurnEngine, TurnStream

_KINDS = {
    EventKind.SPEECH_START: turn_pb2.TurnEvent.SPEECH_START,
    EventKind.SPEECH_END: turn_pb2.TurnEvent.SPEECH_END,
    EventKind.END_OF_TURN: turn_pb2.TurnEvent.END_OF_TURN,
    EventKind.SPECULATE: turn_pb2.TurnEvent.SPECULATE,
    EventKind.BACKCHANNEL: turn_pb2.TurnEvent.BACKCHANNEL,
    EventKind.NOT_SPEECH: turn_pb2.TurnEvent.NOT_SPEECH,
}

#: Longest transcript accepted (a 60 s turn is well under this).
MAX_TRANSCRIPT_CHARS = 4000


def event_to_proto(event: DetectorEvent) -> turn_pb2.TurnEvent:
    return turn_pb2.TurnEvent(
        kind=_KINDS[event.kind],
        at_s=event.at_s,
        end_of_turn_probability=event.probability,
        reason=event.reason,
        text=event.text,
    )


def configured(defaults: TurnConfig, request: turn_pb2.TurnConfig) -> TurnConfig:
    """The service defaults with the client's overrides (zero keeps a default), validated."""
    overrides: dict[str, float] = {}
    if request.min_silence_ms:
        overrides["min_silence_s"] = request.min_silence_ms / 1000
    if request.max_silence_ms:
        overrides["max_silence_s"] = request.max_silence_ms / 1000
        if not request.min_silence_ms:  # a short max alone shortens the default min too
            overrides["min_silence_s"] = min(defaults.min_silence_s, request.max_silence_ms / 1000)
    if request.max_turn_ms:
        overrides["max_turn_s"] = request.max_turn_ms / 1000
    if (
        request.min_silence_ms and request.max_silence_ms
        and request.min_silence_ms > request.max_silence_ms
    ):  # fmt: skip
        raise InvalidInput("TurnConfig: min_silence_ms must not exceed max_silence_ms")
    try:
        return TurnConfig.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        raise InvalidInput(f"bad TurnConfig: {exc.errors()[0]['msg']}") from exc


def _transcript(text: str) -> str:
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise InvalidInput(
            f"transcript of {len(text)} characters; at most {MAX_TRANSCRIPT_CHARS} are accepted"
        )
    return text


class TurnServicer(turn_pb2_grpc.TurnServicer):
    def __init__(self, engine: TurnEngine) -> None:
        self.engine = engine

    @rpc.streaming("turn")
    async def Detect(
        self,
        request_iterator: AsyncIterator[turn_pb2.TurnRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[turn_pb2.TurnEvent]:
        """An optional config first, then audio, transcripts and avatar state as they change."""
        stream: TurnStream = self.engine.stream()
        first = True
        async for req in request_iterator:
            kind = req.WhichOneof("payload")
            events: list[DetectorEvent] = []
            if kind == "config":
                if not first:
                    raise InvalidInput("TurnConfig may only be sent first")
                config = configured(self.engine.config, req.config)
                stream = self.engine.stream(config.detector_config())
            elif kind == "audio":
                events = await stream.push(wire.audio_from_proto(req.audio))
            elif kind == "partial_transcript":
                events = await stream.transcript(_transcript(req.partial_transcript))
            elif kind == "transcript":
                end = req.transcript.audio_end_s
                if end < 0 or end > stream.now_s + 1e-3:
                    raise InvalidInput(
                        f"transcript audio_end_s {end:.3f} is outside the audio received"
                        f" (0..{stream.now_s:.3f} s)"
                    )
                events = await stream.transcript(
                    _transcript(req.transcript.text), audio_end_s=end or None
                )
            elif kind == "avatar_speaking":
                stream.set_avatar_speaking(req.avatar_speaking)
            else:
                raise InvalidInput(
                    "empty TurnRequest: set config, audio, transcript or avatar_speaking"
                )
            for event in events:
                yield event_to_proto(event)
            first = False
