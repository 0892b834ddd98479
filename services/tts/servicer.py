"""gRPC servicer for `parley.v1.Tts`: text pieces in, speech chunks out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from parley import rpc
from parley.audio import float_to_pcm16
from parley.errors import InvalidInput
from parley.v1 import audio_pb2, tts_pb2, tts_pb2_grpc

from services.tts.engine import Speech, TtsEngine


def speech_to_proto(speech: Speech, start_sample: int) -> tts_pb2.SpeechChunk:
    return tts_pb2.SpeechChunk(
        audio=audio_pb2.AudioChunk(
            pcm16=float_to_pcm16(speech.samples),
            sample_rate=speech.sample_rate,
            channels=1,
            start_sample=start_sample,
        ),
        phonemes=[
            audio_pb2.PhonemeTiming(
                phoneme=p.phoneme,
                viseme=p.viseme,
                start_sample=start_sample + p.start_sample,
                num_samples=p.num_samples,
            )
            for p in speech.phonemes
        ],
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
        position = 0
        pending: asyncio.Queue[asyncio.Future[Speech] | str] = asyncio.Queue()
        configured = False

        async def read() -> None:
            nonlocal configured
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
                    for clause in chunker.push(req.text):
                        pending.put_nowait(asyncio.ensure_future(self.engine.synthesize(clause)))
                elif kind == "flush":
                    for clause in chunker.flush():
                        pending.put_nowait(asyncio.ensure_future(self.engine.synthesize(clause)))
                    pending.put_nowait("flush")
                else:
                    raise InvalidInput("empty TtsRequest: set config, text or flush")
            for clause in chunker.flush():
                pending.put_nowait(asyncio.ensure_future(self.engine.synthesize(clause)))
            pending.put_nowait("end")

        reader = asyncio.create_task(read())
        try:
            while True:
                if reader.done():
                    reader.result()  # raises the reader's error, if any
                    item = await pending.get()
                else:
                    getter = asyncio.ensure_future(pending.get())
                    await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    item = getter.result()
                if item == "end":
                    break
                if item == "flush":
                    yield tts_pb2.TtsEvent(done=tts_pb2.SpeechDone(total_samples=position))
                    continue
                assert not isinstance(item, str)
                speech = await item
                if len(speech.samples):
                    yield tts_pb2.TtsEvent(speech=speech_to_proto(speech, position))
                    position += len(speech.samples)
            yield tts_pb2.TtsEvent(done=tts_pb2.SpeechDone(total_samples=position))
        finally:
            reader.cancel()
