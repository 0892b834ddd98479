"""Ray Serve deployment of `parley.v1.Asr`: a thin shell over `AsrServicer`.

Reached through Serve's gRPC ingress with the metadata `application: asr`;
`Transcribe` gets a `gRPCInputStream` of `AsrRequest`s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley.serve import ServeContext, deployment_args
from parley.v1 import asr_pb2
from ray import serve
from ray.serve import Application

from services.asr.config import AsrConfig
from services.asr.engine import AsrEngine
from services.asr.servicer import AsrServicer


@serve.deployment(name="asr", max_ongoing_requests=16)
class AsrDeployment:
    async def __init__(self, config: AsrConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        self.engine = AsrEngine(config)
        await self.engine.start()
        self.servicer = AsrServicer(self.engine)

    async def Transcribe(
        self, request_stream: AsyncIterator[asr_pb2.AsrRequest], grpc_context: Any = None
    ) -> AsyncIterator[asr_pb2.AsrEvent]:
        context = ServeContext(grpc_context, request_stream)
        async for event in self.servicer.Transcribe(request_stream, context):
            yield event


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `AsrConfig` fields."""
    config = deployment_args(args, AsrConfig)
    assert isinstance(config, AsrConfig)
    return AsrDeployment.bind(config)  # type: ignore[attr-defined]
