"""Ray Serve deployment of the sessions gateway: `parley.v1.Sessions` and the HTTP API.

gRPC: Serve's gRPC ingress calls the methods named like the rpcs when a call
carries the metadata `application: sessions`; `Converse` gets a
`gRPCInputStream`. HTTP: Serve's HTTP proxy hands requests (REST and the
WebSocket stream) under the application's route prefix to the FastAPI app of
`services/sessions/http.py`, built in the replica over the same registry.

The conversations run here; their models are the stage deployments, called
through Serve handles (`services/sessions/backends/serve_stages.py`). Sessions are
records in Redis (`services/sessions/records.py`), so any replica answers any call: a
stream that lands on a replica other than the session's first adopts it there, with
its history (see docs/architecture.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health, health_pb2
from grpc_health.v1 import health as grpc_health
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer
from parley import metrics
from parley.serve import ServeContext, deployment_args
from parley.tenancy import TenancyStore
from parley.v1 import asr_pb2, llm_pb2, render_pb2, sessions_pb2, tts_pb2, turn_pb2
from ray import serve
from ray.serve import Application

from services.sessions.backends.serve_stages import serve_engines
from services.sessions.config import SessionsConfig
from services.sessions.http import create_app
from services.sessions.registry import SessionRegistry
from services.sessions.servicer import SessionsServicer

log = logging.getLogger(__name__)

SESSIONS_SERVICE = sessions_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name
#: What reflection describes: every Parley service on this gRPC port, and itself.
REFLECTED_SERVICES = [
    *(
        module.DESCRIPTOR.services_by_name[name].full_name
        for module, name in (
            (sessions_pb2, "Sessions"),
            (asr_pb2, "Asr"),
            (turn_pb2, "Turn"),
            (llm_pb2, "Llm"),
            (tts_pb2, "Tts"),
            (render_pb2, "Render"),
        )
    ),
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
]


@serve.deployment(name="sessions", max_ongoing_requests=256)
@serve.ingress()
class SessionsDeployment:
    async def __init__(self, config: SessionsConfig | None = None) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        metrics.export_to_ray()  # Ray's agent is what Prometheus scrapes
        self.config = config = config or SessionsConfig()
        tenancy = None
        if redis_url := config.effective_redis_url():
            tenancy = TenancyStore.from_url(redis_url, prefix=config.key_prefix)
            try:
                await tenancy.redis.ping()  # fail the replica's start, not the first call
            except Exception:
                await tenancy.aclose()
                raise
        else:
            log.warning("sessions gateway without a Redis URL: no API keys, one tenant 'local'")
        try:
            self.engines = await serve_engines(config.stages, config.video)
        except BaseException:
            if tenancy is not None:
                await tenancy.aclose()
            raise
        self.registry = SessionRegistry(
            self.engines, tenancy, max_sessions=config.max_sessions, lease_s=config.lease_s
        )
        try:
            await self.registry.start()  # hears hand-overs from replicas that stop
        except BaseException:
            await self.registry.close()
            await self.engines.close()
            if tenancy is not None:
                await tenancy.aclose()
            raise
        self.servicer = SessionsServicer(self.registry)
        # Standard gRPC health checking and reflection, on Serve's gRPC port with the
        # metadata `application: sessions` (e.g. `grpcurl -H application:sessions`).
        self.health = grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]
        for name in ("", SESSIONS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.reflection = AsyncReflectionServicer(REFLECTED_SERVICES)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.registry)

    async def CreateSession(
        self, request: sessions_pb2.CreateSessionRequest, grpc_context: Any = None
    ) -> sessions_pb2.Session:
        return await self.servicer.CreateSession(request, ServeContext(grpc_context))

    async def GetSession(
        self, request: sessions_pb2.GetSessionRequest, grpc_context: Any = None
    ) -> sessions_pb2.Session:
        return await self.servicer.GetSession(request, ServeContext(grpc_context))

    async def ListSessions(
        self, request: sessions_pb2.ListSessionsRequest, grpc_context: Any = None
    ) -> sessions_pb2.ListSessionsResponse:
        return await self.servicer.ListSessions(request, ServeContext(grpc_context))

    async def EndSession(
        self, request: sessions_pb2.EndSessionRequest, grpc_context: Any = None
    ) -> sessions_pb2.Session:
        return await self.servicer.EndSession(request, ServeContext(grpc_context))

    async def Converse(
        self, request_stream: AsyncIterator[sessions_pb2.ClientEvent], grpc_context: Any = None
    ) -> AsyncIterator[sessions_pb2.ServerEvent]:
        context = ServeContext(grpc_context, request_stream)
        async for event in self.servicer.Converse(request_stream, context):
            yield event

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        response: health_pb2.HealthCheckResponse = await self.health.Check(
            request, ServeContext(grpc_context)
        )
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for response in self.health.Watch(request, ServeContext(grpc_context)):
            yield response

    async def ServerReflectionInfo(
        self, request_stream: AsyncIterator[Any], grpc_context: Any = None
    ) -> AsyncIterator[Any]:
        context = ServeContext(grpc_context, request_stream)
        async for response in self.reflection.ServerReflectionInfo(request_stream, context):
            yield response

    async def __del__(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is None:  # __init__ failed before the gateway was up
            return
        await self.health.enter_graceful_shutdown()
        await registry.close()
        await self.engines.close()
        if registry.tenancy is not None:
            await registry.tenancy.aclose()


def build(args: dict[str, Any]) -> Application:
    """App builder for the Serve config: `args.config` holds `SessionsConfig` fields."""
    config = deployment_args(args, SessionsConfig)
    assert isinstance(config, SessionsConfig)
    return SessionsDeployment.bind(config)  # type: ignore[attr-defined]
