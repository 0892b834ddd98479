"""gRPC servicer for `parley.v1.Asr`: audio in, voice activity and transcripts out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from parley import rpc, wire
from parley.errors import InvalidInput
from parley.v1 import asr_pb2, asr_pb2_grpc

from services.asr.engine import Activity, AsrEngine, AsrEvent, AsrStream

#: A gap in `start_sample` up to this long (lost packets) is filled with silence;
#: a longer one, or audio that goes back in time, is a client error.
MAX_GAP_SAMPLES = 16_000


def event_to_proto(event: AsrEvent) -> asr_pb2.AsrEvent:
    if isinstance(event, Activity):
        return asr_pb2.AsrEvent(
            activity=asr_pb2.VoiceActivity(speaking=event.speaking, at_s=event.at_s)
        )
    return asr_pb2.AsrEvent(
        transcript=asr_pb2.Transcript(
            text=event.text,
            is_final=event.is_final,
            utterance=event.utterance,
            audio_start_s=event.audio_start_s,
            audio_end_s=event.audio_end_s,
        )
    )


def place_chunk(stream: AsrStream, samples: np.ndarray, start_sample: int) -> None:
    """Push a chunk at its stream position: 0 means "right after the previous chunk"."""
    if start_sample and start_sample != stream.position:
        gap = start_sample - stream.position
        if gap < 0:
            raise InvalidInput(
                f"audio chunk starts at sample {start_sample}, before the end of the audio"
                f" already received ({stream.position}); chunks must not overlap"
            )
        if gap > MAX_GAP_SAMPLES:
            raise InvalidInput(
                f"audio chunk starts {gap} samples after the previous one ended;"
                f" gaps longer than {MAX_GAP_SAMPLES} samples are not filled"
            )
        stream.push(np.zeros(gap, np.float32))
    stream.push(samples)


class AsrServicer(asr_pb2_grpc.AsrServicer):
    def __init__(self, engine: AsrEngine) -> None:
        self.engine = engine

    @rpc.streaming("asr")
    async def Transcribe(
        self, request_iterator: AsyncIterator[asr_pb2.AsrRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[asr_pb2.AsrEvent]:
        """An optional config first, then audio and finalize requests, in any order."""
        stream = self.engine.stream()
        partials = True

        async def read() -> None:
            nonlocal partials
            first = True
            async for req in request_iterator:
                kind = req.WhichOneof("payload")
                if kind == "config":
                    if not first:
                        raise InvalidInput("AsrConfig may only be sent first")
                    language = req.config.language or self.engine.config.language
                    if language != self.engine.config.language:
                        raise InvalidInput(
                            f"language {language!r} is not served here"
                            f" (this replica serves {self.engine.config.language!r})"
                        )
                    partials = req.config.partials if req.config.HasField("partials") else True
                elif kind == "audio":
                    place_chunk(stream, wire.audio_from_proto(req.audio), req.audio.start_sample)
                elif kind == "finalize":
                    await stream.finalize()
                else:
                    raise InvalidInput("empty AsrRequest: set config, audio or finalize")
                first = False
            await stream.finalize()  # client half-closed: the utterance in progress ends here

        async for event in rpc.forward_while(stream.events, read()):
            if not partials and not isinstance(event, Activity) and not event.is_final:
                continue
            yield event_to_proto(event)
