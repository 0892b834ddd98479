"""gRPC servicer for `parley.v1.Tts`: text pieces in, speech chunks out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from parley import rpc, wire
from parley.errors import InvalidInput
from parley.v1 import tts_pb2, tts_pb2_grpc

from services.tts.engine import Speech, TtsEngine


def speech_to_proto(speech: Speech, start_sample: int) -> tts_pb2.SpeechChunk:
    return tts_pb2.SpeechChunk(
        audio=wire.audio_to_proto(speech.samples, speech.sample_rate, start_sample),
        phonemes=wire.phonemes_to_proto(speech.phonemes, start_sample),
        text=speech.text,
    )


class TtsServicer(tts_pb2_grpc.TtsServicer):
    def __init__(self, engine: TtsEngine) -> None:
        self.engine = engine

    @rpc.streaming("tts")
    async def Synthesize(
        self, request_iterator: AsyncIterator[tts_pb2.TtsRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tts_pb2.TtsEvent]:
        """Each flush ends one utterance: its clauses stream out, then a `done` event."""
        chunker = self.engine.chunker()
        configured = False

        async def read(emit: Callable[[asyncio.Future[Speech] | str], None]) -> None:
            nonlocal configured

            def synthesize(clauses: list[str]) -> None:
                for clause in clauses:
                    emit(asyncio.ensure_future(self.engine.synthesize(clause)))

            async for req in request_iterator:
                kind = req.WhichOneof("payload")
                if kind == "config":
                    if configured:
                        raise InvalidInput("config may only be sent once, first")
                    if req.config.voice and req.config.voice != self.engine.config.voice:
                        raise InvalidInput(
                            f"voice {req.config.voice!r} is not served here"
                            f" (this replica serves {self.engine.config.voice!r})"
                        )
                    configured = True
                elif kind == "text":
                    synthesize(chunker.push(req.text))
                elif kind == "flush":
                    synthesize(chunker.flush())
                    emit("flush")
                else:
                    raise InvalidInput("empty TtsRequest: set config, text or flush")
            synthesize(chunker.flush())

        # Clauses are synthesized as they arrive and sent in order.
        position = 0
        async for item in rpc.relay(read):
            if isinstance(item, str):
                yield tts_pb2.TtsEvent(done=tts_pb2.SpeechDone(total_samples=position))
                continue
            speech = await item
            if len(speech.samples):
                yield tts_pb2.TtsEvent(speech=speech_to_proto(speech, position))
                position += len(speech.samples)
        yield tts_pb2.TtsEvent(done=tts_pb2.SpeechDone(total_samples=position))
