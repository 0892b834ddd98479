"""gRPC servicer for `parley.v1.Turn`: audio and partial transcripts in, turn events out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from parley import rpc, wire
from parley.errors import InvalidInput
from parley.v1 import turn_pb2, turn_pb2_grpc
from parley.vad import SileroVadModel
from pydantic import ValidationError

from services.turn.config import TurnConfig
from services.turn.engine import TurnDetector, TurnEvent, TurnEventKind

_KINDS = {
    TurnEventKind.SPEECH_START: turn_pb2.TurnEvent.SPEECH_START,
    TurnEventKind.SPEECH_END: turn_pb2.TurnEvent.SPEECH_END,
    TurnEventKind.END_OF_TURN: turn_pb2.TurnEvent.END_OF_TURN,
}

#: Longest partial transcript accepted (a 60 s turn is well under this).
MAX_TRANSCRIPT_CHARS = 4000


def event_to_proto(event: TurnEvent) -> turn_pb2.TurnEvent:
    return turn_pb2.TurnEvent(
        kind=_KINDS[event.kind], at_s=event.at_s, end_of_turn_probability=event.probability
    )


def configured(defaults: TurnConfig, request: turn_pb2.TurnConfig) -> TurnConfig:
    """The service defaults with the client's overrides (zero keeps a default), validated."""
    overrides: dict[str, float] = {}
    if request.min_silence_ms:
        overrides["min_silence_s"] = request.min_silence_ms / 1000
    if request.max_silence_ms:
        overrides["max_silence_s"] = request.max_silence_ms / 1000
    try:
        config = TurnConfig.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        raise InvalidInput(f"bad TurnConfig: {exc.errors()[0]['msg']}") from exc
    if config.min_silence_s > config.max_silence_s:
        raise InvalidInput("TurnConfig: min_silence_ms must not exceed max_silence_ms")
    return config


class TurnServicer(turn_pb2_grpc.TurnServicer):
    def __init__(self, vad_model: SileroVadModel, config: TurnConfig | None = None) -> None:
        self.vad_model = vad_model
        self.config = config or TurnConfig()

    @rpc.streaming("turn")
    async def Detect(
        self,
        request_iterator: AsyncIterator[turn_pb2.TurnRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[turn_pb2.TurnEvent]:
        """An optional config first, then audio and the latest partial transcript as it changes."""
        detector = TurnDetector(self.vad_model, self.config)
        first = True
        async for req in request_iterator:
            kind = req.WhichOneof("payload")
            if kind == "config":
                if not first:
                    raise InvalidInput("TurnConfig may only be sent first")
                detector = TurnDetector(self.vad_model, configured(self.config, req.config))
            elif kind == "audio":
                for event in detector.push(wire.audio_from_proto(req.audio)):
                    yield event_to_proto(event)
            elif kind == "partial_transcript":
                if len(req.partial_transcript) > MAX_TRANSCRIPT_CHARS:
                    raise InvalidInput(
                        f"partial transcript of {len(req.partial_transcript)} characters;"
                        f" at most {MAX_TRANSCRIPT_CHARS} are accepted"
                    )
                detector.update_transcript(req.partial_transcript)
            else:
                raise InvalidInput("empty TurnRequest: set config, audio or partial_transcript")
            first = False
