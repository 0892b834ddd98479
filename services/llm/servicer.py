"""gRPC servicer for `parley.v1.Llm`: a thin translation over LlmEngine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from parley import rpc
from parley.v1 import llm_pb2, llm_pb2_grpc

from services.llm.engine import ChatMessage, GenerationStats, LlmEngine


class LlmServicer(llm_pb2_grpc.LlmServicer):
    def __init__(self, engine: LlmEngine) -> None:
        self.engine = engine

    @rpc.streaming("llm")
    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        messages = [ChatMessage(m.role, m.content, m.image) for m in request.messages]
        stats = GenerationStats()
        temperature = request.temperature if request.HasField("temperature") else None
        async for piece in self.engine.generate(
            messages, max_tokens=request.max_tokens, temperature=temperature, stats=stats
        ):
            yield llm_pb2.GenerateEvent(text=piece)
        yield llm_pb2.GenerateEvent(
            done=llm_pb2.GenerateDone(
                finish_reason=stats.finish_reason,
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                cached_tokens=stats.cached_tokens,
                time_to_first_token_s=stats.time_to_first_token_s,
            )
        )
