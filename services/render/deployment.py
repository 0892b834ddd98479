"""Ray Serve deployment of `parley.v1.Render`: a thin shell over `RenderServicer`.

Reached through Serve's gRPC ingress with the metadata `application: render`;
`Render` gets a `gRPCInputStream` of `RenderRequest`s. The sessions gateway calls
`render_pose` through a Serve handle instead, once per frame of its live video: a
pose in, an image out. The session's timeline (speech, blinks, head motion) stays in
the gateway, so any render replica draws any frame, and the replicas that need the
GPU (on MIG nodes, the Serve config asks for a slice in
`ray_actor_options.resources`) scale apart from the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from parley import metrics
from parley.errors import InvalidInput
from parley.serve import ServeContext, StageKeys, close_keys, deployment_args
from parley.v1 import render_pb2
from ray import serve
from ray.serve import Application

from services.render.config import RenderConfig
from services.render.engine import (
    AvatarProfile,
    RenderEngine,
    check_avatar_id,
    check_frame_size,
    check_pose,
    set_torch_threads,
)
from services.render.servicer import RenderServicer


@serve.deployment(name="render", max_ongoing_requests=8)
class RenderDeployment:
    async def __init__(self, config: RenderConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        metrics.export_to_ray()  # Ray's agent is what Prometheus scrapes
        self.keys = StageKeys.from_env("render")  # API keys on the direct gRPC service
        self.engine = RenderEngine(config)
        await self.engine.start()
        self.servicer = RenderServicer(self.engine)
        cfg = self.engine.config
        # Handle callers' frames, `workers` at a time, off the replica's event loop.
        self._frames = ThreadPoolExecutor(
            cfg.workers,
            thread_name_prefix="frame",
            initializer=set_torch_threads,
            initargs=(cfg.threads,),
        )
        self.frames_rendered = 0

    async def Render(
        self, request_stream: AsyncIterator[render_pb2.RenderRequest], grpc_context: Any = None
    ) -> AsyncIterator[render_pb2.VideoFrame]:
        context = ServeContext(grpc_context, request_stream)
        await self.keys.check(context)
        async for frame in self.servicer.Render(request_stream, context):
            yield frame

    async def render_pose(
        self, avatar_id: str, width: int, height: int, pose: object
    ) -> np.ndarray:
        """One frame of `avatar_id` in `pose`: HxWx3 uint8 RGB (for Serve handle callers)."""
        check_avatar_id(avatar_id)
        check_frame_size(width, height)
        checked = check_pose(pose)
        loop = asyncio.get_running_loop()
        rgb: np.ndarray = await loop.run_in_executor(
            self._frames, self.engine.backend.render, avatar_id, width, height, checked
        )
        self.frames_rendered += 1
        return rgb

    async def profile(self, avatar_id: str) -> AvatarProfile | str:
        """The avatar's profile, or why there is none (a message for the API caller):
        a failure here is the caller's input, not this replica's."""
        try:
            return await self.engine.load(avatar_id)
        except InvalidInput as exc:
            return str(exc)

    async def avatar_ids(self) -> list[str]:
        return await asyncio.to_thread(self.engine.avatar_ids)

    async def config(self) -> dict[str, Any]:
        """This replica's validated config (the gateway sizes its streams from it)."""
        return self.engine.config.model_dump(mode="json")

    async def stats(self) -> dict[str, int]:
        """Frames this replica has rendered for handle callers."""
        return {"frames_rendered": self.frames_rendered}

    async def __del__(self) -> None:
        frames = getattr(self, "_frames", None)  # absent if __init__ failed
        if frames is not None:
            frames.shutdown(wait=False, cancel_futures=True)
        await close_keys(self)


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `RenderConfig` fields."""
    config = deployment_args(args, RenderConfig)
    assert isinstance(config, RenderConfig)
    return RenderDeployment.bind(config)  # type: ignore[attr-defined]
