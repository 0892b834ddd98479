"""Ray Serve deployment of `parley.v1.Llm`: a thin shell over `LlmServicer`.

Reached through Serve's gRPC ingress with the metadata `application: llm`;
`Generate` is server streaming (one `GenerateRequest` in, events out).
Cancelling the call cancels this generator, which stops generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley.serve import ServeContext, deployment_args
from parley.v1 import llm_pb2
from ray import serve
from ray.serve import Application

from services.llm.config import LlmConfig
from services.llm.engine import LlmEngine
from services.llm.servicer import LlmServicer


@serve.deployment(name="llm", max_ongoing_requests=8)
class LlmDeployment:
    async def __init__(self, config: LlmConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        self.engine = LlmEngine(config)
        await self.engine.start()
        self.servicer = LlmServicer(self.engine)

    async def Generate(
        self, request: llm_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[llm_pb2.GenerateEvent]:
        context = ServeContext(grpc_context)
        async for event in self.servicer.Generate(request, context):
            yield event


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `LlmConfig` fields."""
    config = deployment_args(args, LlmConfig)
    assert isinstance(config, LlmConfig)
    return LlmDeployment.bind(config)  # type: ignore[attr-defined]
