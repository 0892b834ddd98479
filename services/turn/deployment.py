"""Ray Serve deployment of `parley.v1.Turn`: a thin shell over `TurnServicer`.

Reached through Serve's gRPC ingress with the metadata `application: turn`;
`Detect` gets a `gRPCInputStream` of `TurnRequest`s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley.serve import ServeContext, deployment_args
from parley.v1 import turn_pb2
from ray import serve
from ray.serve import Application

from services.turn.config import TurnConfig
from services.turn.engine import TurnEngine
from services.turn.servicer import TurnServicer


@serve.deployment(name="turn", max_ongoing_requests=32)
class TurnDeployment:
    async def __init__(self, config: TurnConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        engine = TurnEngine(config)
        await engine.start()  # loads and warms the models before the replica takes calls
        self.servicer = TurnServicer(engine)

    async def Detect(
        self, request_stream: AsyncIterator[turn_pb2.TurnRequest], grpc_context: Any = None
    ) -> AsyncIterator[turn_pb2.TurnEvent]:
        context = ServeContext(grpc_context, request_stream)
        async for event in self.servicer.Detect(request_stream, context):
            yield event


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `TurnConfig` fields."""
    config = deployment_args(args, TurnConfig)
    assert isinstance(config, TurnConfig)
    return TurnDeployment.bind(config)  # type: ignore[attr-defined]
