"""Configuration of the sessions gateway (the `sessions` application's `args.config`)."""

from __future__ import annotations

import os

from parley.tenancy import DEFAULT_PREFIX
from pydantic import BaseModel, ConfigDict, Field

from services.sessions.backends.serve_stages import StageApps
from services.sessions.registry import DEFAULT_LEASE_S
from services.sessions.video import LiveVideoConfig


class SessionsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The stage applications the conversations call (names in the Serve config).
    stages: StageApps = Field(default_factory=StageApps)
    #: Redis holding API keys, tenant limits and session leases (`parley keys ...`).
    #: Empty: $PARLEY_REDIS_URL (how the Helm chart passes a URL kept in a Secret);
    #: if that is unset too, no API keys and every caller is the one tenant "local"
    #: (a warning is logged): only for a gateway nobody else can reach.
    redis_url: str = ""
    #: Prefix of every Redis key the gateway writes (several deployments may share a Redis).
    key_prefix: str = Field(default=DEFAULT_PREFIX, min_length=1, max_length=64)
    #: Sessions one replica holds at once (GatewayAtCapacity beyond: RESOURCE_EXHAUSTED / 429).
    max_sessions: int = Field(default=64, ge=1, le=10_000)
    lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0, le=86_400)
    #: Live video of the conversations (fps, size, encoders).
    video: LiveVideoConfig = Field(default_factory=LiveVideoConfig)

    def effective_redis_url(self) -> str:
        return self.redis_url or os.environ.get("PARLEY_REDIS_URL", "")
