"""Ray Serve deployment of `parley.v1.Render`: a thin shell over `RenderServicer`.

Reached through Serve's gRPC ingress with the metadata `application: render`;
`Render` gets a `gRPCInputStream` of `RenderRequest`s. On GPU nodes the Serve
config asks for a MIG-slice custom resource in `ray_actor_options.resources`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley.serve import ServeContext, deployment_args
from parley.v1 import render_pb2
from ray import serve
from ray.serve import Application

from services.render.config import RenderConfig
from services.render.engine import RenderEngine
from services.render.servicer import RenderServicer


@serve.deployment(name="render", max_ongoing_requests=4)
class RenderDeployment:
    async def __init__(self, config: RenderConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        self.engine = RenderEngine(config)
        await self.engine.start()
        self.servicer = RenderServicer(self.engine)

    async def Render(
        self, request_stream: AsyncIterator[render_pb2.RenderRequest], grpc_context: Any = None
    ) -> AsyncIterator[render_pb2.VideoFrame]:
        context = ServeContext(grpc_context, request_stream)
        async for frame in self.servicer.Render(request_stream, context):
            yield frame


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `RenderConfig` fields."""
    config = deployment_args(args, RenderConfig)
    assert isinstance(config, RenderConfig)
    return RenderDeployment.bind(config)  # type: ignore[attr-defined]
