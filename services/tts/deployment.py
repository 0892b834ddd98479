"""Ray Serve deployment of `parley.v1.Tts`: a thin shell over `TtsServicer`.

Serve's gRPC ingress calls `Synthesize` (named like the rpc) with a
`gRPCInputStream` of `TtsRequest`s when the call carries the metadata
`application: tts`; the servicer does the work, `ServeContext` carries its
status codes back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley import metrics
from parley.errors import InvalidInput
from parley.serve import ServeContext, StageKeys, close_keys, deployment_args
from parley.v1 import tts_pb2
from ray import serve
from ray.serve import Application

from services.tts.config import TtsConfig
from services.tts.engine import Speech, TtsEngine
from services.tts.servicer import TtsServicer


@serve.deployment(name="tts", max_ongoing_requests=32)
class TtsDeployment:
    async def __init__(self, config: TtsConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        metrics.export_to_ray()  # Ray's agent is what Prometheus scrapes
        self.keys = StageKeys.from_env("tts")  # API keys on the direct gRPC service
        self.engine = TtsEngine(config)
        await self.engine.start()
        self.servicer = TtsServicer(self.engine)

    async def Synthesize(
        self, request_stream: AsyncIterator[tts_pb2.TtsRequest], grpc_context: Any = None
    ) -> AsyncIterator[tts_pb2.TtsEvent]:
        context = ServeContext(grpc_context, request_stream)
        await self.keys.check(context)
        async for event in self.servicer.Synthesize(request_stream, context):
            yield event

    async def sample_rate(self) -> int:
        return self.engine.sample_rate

    async def synthesize(self, text: object) -> Speech:
        """One clause → its speech (for Serve handle callers, which chunk text themselves)."""
        if not isinstance(text, str):
            raise InvalidInput("text must be a string")
        return await self.engine.synthesize(text)

    async def config(self) -> dict[str, Any]:
        """This replica's validated config (callers build matching local state from it)."""
        return self.engine.config.model_dump(mode="json")

    async def __del__(self) -> None:
        await close_keys(self)


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `TtsConfig` fields."""
    config = deployment_args(args, TtsConfig)
    assert isinstance(config, TtsConfig)
    return TtsDeployment.bind(config)  # type: ignore[attr-defined]
