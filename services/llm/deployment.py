"""Ray Serve deployment of `parley.v1.Llm`: a thin shell over `LlmServicer`.

Reached through Serve's gRPC ingress with the metadata `application: llm`;
`Generate` is server streaming (one `GenerateRequest` in, events out).
Cancelling the call cancels this generator, which stops generation.

The sessions deployment calls `generate` and `prefill` through a Serve handle
(messages as `ChatMessage`s, no protobuf round trip).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley import metrics
from parley.errors import InvalidInput
from parley.serve import ServeContext, StageKeys, close_keys, deployment_args
from parley.v1 import llm_pb2
from ray import serve
from ray.serve import Application

from services.llm.config import LlmConfig
from services.llm.engine import ChatMessage, GenerationStats, LlmEngine
from services.llm.servicer import LlmServicer


@serve.deployment(name="llm", max_ongoing_requests=8)
class LlmDeployment:
    async def __init__(self, config: LlmConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        metrics.export_to_ray()  # Ray's agent is what Prometheus scrapes
        self.keys = StageKeys.from_env("llm")  # API keys on the direct gRPC service
        self.engine = LlmEngine(config)
        await self.engine.start()
        self.servicer = LlmServicer(self.engine)

    async def Generate(
        self, request: llm_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        context = ServeContext(grpc_context)
        await self.keys.check(context)
        async for event in self.servicer.Generate(request, context):
            yield event

    async def generate(
        self, messages: object, max_tokens: int = 0, temperature: float | None = None
    ) -> AsyncIterator[tuple[str, int, int, int]]:
        """Stream `(text piece, prompt tokens, cached tokens, completion tokens)`.

        The counts ride along with every piece, so the caller's stats are current at
        its first token. Cancelling the call (the caller stops) stops generation.
        """
        stats = GenerationStats()
        pieces = self.engine.generate(
            _messages(messages), max_tokens=max_tokens, temperature=temperature, stats=stats
        )
        async for piece in pieces:
            yield piece, stats.prompt_tokens, stats.cached_tokens, stats.completion_tokens

    async def prefill(self, messages: object) -> int:
        """Read a conversation's prompt ahead into this replica's prefix cache."""
        return await self.engine.prefill(_messages(messages))

    async def prefill_reply(self, messages: object, words_only: bool = False) -> int:
        """Read a whole prompt ahead (speculation) into this replica's live state."""
        return await self.engine.prefill_reply(_messages(messages), words_only=bool(words_only))

    async def config(self) -> dict[str, Any]:
        """This replica's validated config (callers build matching local state from it)."""
        return self.engine.config.model_dump(mode="json", exclude={"api_key"})

    async def __del__(self) -> None:
        await close_keys(self)


def _messages(messages: object) -> list[ChatMessage]:
    if not isinstance(messages, list) or not all(isinstance(m, ChatMessage) for m in messages):
        raise InvalidInput("messages must be a list of ChatMessage")
    return messages


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `LlmConfig` fields."""
    config = deployment_args(args, LlmConfig)
    assert isinstance(config, LlmConfig)
    return LlmDeployment.bind(config)  # type: ignore[attr-defined]
