"""Ray Serve deployment of `parley.v1.Turn`: a thin shell over `TurnServicer`.

Reached through Serve's gRPC ingress with the metadata `application: turn`;
`Detect` gets a `gRPCInputStream` of `TurnRequest`s. The sessions deployment
calls the models through a Serve handle instead (`audio_probability`,
`text_score`): the detector's frame-by-frame state stays with the session, so any
replica serves any call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley import metrics
from parley.errors import InvalidInput, ModelUnavailable
from parley.serve import ServeContext, StageKeys, check_audio, close_keys, deployment_args
from parley.v1 import turn_pb2
from ray import serve
from ray.serve import Application

from services.turn.config import TurnConfig
from services.turn.engine import TurnEngine
from services.turn.semantic import SemanticScore
from services.turn.servicer import TurnServicer


@serve.deployment(name="turn", max_ongoing_requests=32)
class TurnDeployment:
    async def __init__(self, config: TurnConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        metrics.export_to_ray()  # Ray's agent is what Prometheus scrapes
        self.keys = StageKeys.from_env("turn")  # API keys on the direct gRPC service
        self.engine = TurnEngine(config)
        await self.engine.start()  # loads and warms the models before the replica takes calls
        self.servicer = TurnServicer(self.engine)

    async def Detect(
        self, request_stream: AsyncIterator[turn_pb2.TurnRequest], grpc_context: Any = None
    ) -> AsyncIterator[turn_pb2.TurnEvent]:
        context = ServeContext(grpc_context, request_stream)
        await self.keys.check(context)
        async for event in self.servicer.Detect(request_stream, context):
            yield event

    async def models(self) -> dict[str, bool]:
        """Which end-of-turn models this replica serves."""
        return {
            "audio": self.engine.smart_turn is not None,
            "text": self.engine.semantic is not None,
        }

    async def audio_probability(self, audio: object) -> float:
        """Smart Turn's P(turn complete) for a turn's audio so far (16 kHz float32)."""
        model = self.engine.smart_turn
        if model is None:
            raise ModelUnavailable("this turn service runs without Smart Turn")
        samples = check_audio(audio, max_s=self.engine.config.max_turn_s + 1.0)
        return await self.engine.run(model.probability, samples)

    async def text_score(self, text: object) -> SemanticScore:
        """The text model's end-of-turn score of a transcript."""
        model = self.engine.semantic
        if model is None:
            raise ModelUnavailable("this turn service runs without the text model")
        if not isinstance(text, str):
            raise InvalidInput("a transcript must be a string")
        return await self.engine.run(model.score, text)

    async def config(self) -> dict[str, Any]:
        """This replica's validated config (callers build matching local state from it)."""
        return self.engine.config.model_dump(mode="json")

    async def __del__(self) -> None:
        await close_keys(self)


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `TurnConfig` fields."""
    config = deployment_args(args, TurnConfig)
    assert isinstance(config, TurnConfig)
    return TurnDeployment.bind(config)  # type: ignore[attr-defined]
