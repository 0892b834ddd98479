"""Ray Serve deployment of `parley.v1.Asr`: a thin shell over `AsrServicer`.

Reached through Serve's gRPC ingress with the metadata `application: asr`;
`Transcribe` gets a `gRPCInputStream` of `AsrRequest`s. The sessions deployment
calls `decode` through a Serve handle instead: one utterance in, its text out, so
that any replica serves any session (the stream's VAD state stays with the session).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley import metrics
from parley.serve import ServeContext, StageKeys, check_audio, close_keys, deployment_args
from parley.v1 import asr_pb2
from ray import serve
from ray.serve import Application

from services.asr.config import AsrConfig
from services.asr.engine import AsrEngine, Decoded
from services.asr.servicer import AsrServicer


@serve.deployment(name="asr", max_ongoing_requests=16)
class AsrDeployment:
    async def __init__(self, config: AsrConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        metrics.export_to_ray()  # Ray's agent is what Prometheus scrapes
        self.keys = StageKeys.from_env("asr")  # API keys on the direct gRPC service
        self.engine = AsrEngine(config)
        await self.engine.start()
        self.servicer = AsrServicer(self.engine)

    async def Transcribe(
        self, request_stream: AsyncIterator[asr_pb2.AsrRequest], grpc_context: Any = None
    ) -> AsyncIterator[asr_pb2.AsrEvent]:
        context = ServeContext(grpc_context, request_stream)
        await self.keys.check(context)
        async for event in self.servicer.Transcribe(request_stream, context):
            yield event

    async def decode(self, audio: object) -> Decoded:
        """One utterance of 16 kHz float32 audio → its text (for Serve handle callers)."""
        samples = check_audio(audio, max_s=self.engine.config.max_utterance_s)
        decoded, _ = await self.engine.decode(samples)
        return decoded

    async def config(self) -> dict[str, Any]:
        """This replica's validated config (callers build matching local state from it)."""
        return self.engine.config.model_dump(mode="json")

    async def __del__(self) -> None:
        await close_keys(self)


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `AsrConfig` fields."""
    config = deployment_args(args, AsrConfig)
    assert isinstance(config, AsrConfig)
    return AsrDeployment.bind(config)  # type: ignore[attr-defined]
