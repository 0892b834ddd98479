"""API keys, tenants and per-tenant session limits, kept in Redis.

One `TenancyStore` serves the sessions gateway (authenticate a caller, admit or refuse
a new session, check who owns a session) and the `parley keys` admin command.

API keys look like ``pk_<key id>_<secret>``: a 16-hex-digit id, so a lookup is one Redis
read, and a 256-bit `secrets.token_urlsafe` secret. Only the SHA-256 of the whole key is
stored. A slow or peppered hash would add nothing here: it protects guessable secrets
such as passwords, and a 256-bit random token cannot be guessed from its hash.

Admission (concurrent sessions and the per-minute creation rate) runs as Lua scripts,
so concurrent gateways can never admit more sessions than a tenant's limits allow, and
the window is measured on the Redis clock, which every gateway shares. The scripts touch
several keys at once, so they need one Redis (or a primary with replicas), not Redis
Cluster.

Redis layout, every key under ``prefix`` (default ``parley:``)::

    apikey:<key id>                 hash  tenant, name, key_sha256, created_at, revoked_at, last_used_at
    apikeys                         zset  key id -> created_at (all keys)
    tenant:<tenant>:apikeys         zset  key id -> created_at (the tenant's keys)
    tenant:<tenant>:limits          hash  max_concurrent_sessions, sessions_per_minute (absent: defaults)
    tenant:<tenant>:sessions        zset  session id -> lease deadline, ms on the Redis clock (+inf: no lease)
    tenant:<tenant>:session_starts  zset  "<ms>:<session id>" -> start, ms, over the last minute
    session:<session id>:tenant     string  the owning tenant, while the session is held

A session held without a lease keeps its slot until `release_session`. A gateway that can
die without releasing (a pod restart) should acquire with a lease and renew it while the
session lives; a lapsed lease frees the slot.

Errors map to transport statuses through `grpc_status` (a `grpc.StatusCode` name) and
`http_status`. A tenant that asks for another tenant's session gets the same
`SessionNotFound` as for a session that does not exist, so session ids of other tenants
cannot be probed. Bad arguments (tenant names, limits) raise `parley.errors.InvalidInput`,
which the servicers already map to INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self, cast

from redis.asyncio import Redis

from parley.errors import InvalidInput, RequestRefused

DEFAULT_PREFIX = "parley:"
KEY_PREFIX = "pk_"
#: Creations counted by `TenantLimits.sessions_per_minute`.
RATE_WINDOW_MS = 60_000
#: `last_used_at` is rewritten at most this often, so authenticating is mostly a read.
LAST_USED_GRANULARITY_S = 60.0

MAX_KEY_NAME_CHARS = 100
MAX_LIMIT = 1_000_000

_TENANT_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
# 16 hex digits of key id, then token_urlsafe(32): 43 characters of the URL-safe alphabet.
_API_KEY_RE = re.compile(r"pk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_MAX_PRESENTED_CHARS = 256


# --------------------------------------------------------------------------- errors


class TenancyError(RequestRefused):
    """A request refused for who is asking or for the tenant's limits.

    Not an `InvalidInput`: the servicers map that to INVALID_ARGUMENT, and these need
    their own statuses. The message is shown to the caller.
    """


class Unauthenticated(TenancyError):
    """No API key, a malformed one, an unknown one or a revoked one."""

    grpc_status = "UNAUTHENTICATED"
    http_status = 401


class NotFound(TenancyError, LookupError):
    """Something the caller named does not exist (or is not theirs to see)."""

    grpc_status = "NOT_FOUND"
    http_status = 404


class ApiKeyNotFound(NotFound):
    """No API key has this id (admin operations)."""


class SessionNotFound(NotFound):
    """No session with this id belongs to the calling tenant.

    Raised the same way whether the session does not exist or belongs to another tenant.
    """


class SessionIdInUse(TenancyError):
    """Another tenant holds a session with this id (session ids must be unique)."""

    grpc_status = "ALREADY_EXISTS"
    http_status = 409


class LimitExceeded(TenancyError):
    """The tenant is at one of its limits; `retry_after_s` hints when to try again."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: Seconds until a retry can succeed; None when no time can be given (the tenant
        #: must end a session first, or its limit is 0).
        self.retry_after_s = retry_after_s


class ConcurrencyLimitExceeded(LimitExceeded):
    """The tenant already has `max_concurrent_sessions` sessions."""


class RateLimited(LimitExceeded):
    """The tenant started `sessions_per_minute` sessions in the last minute."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an authenticated request acts for."""

    tenant: str
    key_id: str


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What may be shown about an API key: never its secret or hash."""

    key_id: str
    tenant: str
    name: str
    created_at: float
    revoked_at: float | None
    last_used_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_concurrent_sessions: int
    sessions_per_minute: int

    def __post_init__(self) -> None:
        for field in ("max_concurrent_sessions", "sessions_per_minute"):
            value = getattr(self, field)
            # bool is an int; True as a limit is a mistake, not 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"{field} must be an integer, not {value!r}")
            if not 0 <= value <= MAX_LIMIT:
                raise InvalidInput(f"{field} must be within [0, {MAX_LIMIT}], not {value}")


DEFAULT_LIMITS = TenantLimits(max_concurrent_sessions=10, sessions_per_minute=60)


AUTHORIZATION = "authorization"
X_API_KEY = "x-api-key"


def api_key_from_headers(headers: Iterable[tuple[str, str]]) -> str | None:
    """The API key in `authorization: Bearer <key>` or `x-api-key: <key>`; None if neither.

    Header names are matched case-insensitively. Two different keys, or an
    `authorization` header of another scheme, are refused rather than guessed at.
    """
    keys: set[str] = set()
    for name, value in headers:
        name = name.lower()
        if name == AUTHORIZATION:
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                raise Unauthenticated("the authorization header must be 'Bearer <API key>'")
            keys.add(credentials.strip())
        elif name == X_API_KEY:
            keys.add(value.strip())
    if len(keys) > 1:
        raise Unauthenticated("the request carries more than one API key; send one")
    return keys.pop() if keys else None


def validate_tenant(tenant: str) -> str:
    """A tenant name: 1-63 lowercase letters, digits and inner hyphens (a DNS label)."""
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise InvalidInput(
            f"invalid tenant {tenant!r}: use 1-63 lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )
    return tenant


def validate_key_name(name: str) -> str:
    """A label for a key (who or what uses it): printable, at most 100 characters."""
    if not isinstance(name, str) or len(name) > MAX_KEY_NAME_CHARS or not name.isprintable():
        raise InvalidInput(
            f"invalid key name {name!r}: use at most {MAX_KEY_NAME_CHARS} printable characters"
        )
    return name


def validate_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        raise InvalidInput(
            f"invalid session id {session_id!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return session_id


def _key_sha256(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- scripts

# Redis TIME in milliseconds; every script that measures time uses the Redis clock.
_NOW_MS = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_CREATE_KEY = """
-- KEYS: key record, all-keys index, tenant-keys index
-- ARGV: key id, tenant, name, key sha256, created_at
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[2], 'name', ARGV[3], 'key_sha256', ARGV[4],
           'created_at', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return 1
"""

_REVOKE_KEY = """
-- KEYS: key record; ARGV: revoked_at. Returns the key's tenant, nil if there is no such key.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
return redis.call('HGET', KEYS[1], 'tenant')
"""

_ACQUIRE = (
    _NOW_MS
    + """
-- KEYS: limits, active sessions, session starts, session owner
-- ARGV: tenant, session id, default max concurrent, default per minute, window ms,
--       lease ms ('' for none)
-- Returns {status, retry-after ms (-1: none), limit}.
local window_ms = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms - window_ms)
local owner = redis.call('GET', KEYS[4])
if owner and owner ~= ARGV[1] then return {'in_use', -1, 0} end
-- A retried acquire of a session the tenant already holds counts once.
if owner and redis.call('ZSCORE', KEYS[2], ARGV[2]) then return {'held', -1, 0} end
local max_active = tonumber(redis.call('HGET', KEYS[1], 'max_concurrent_sessions') or ARGV[3])
local max_starts = tonumber(redis.call('HGET', KEYS[1], 'sessions_per_minute') or ARGV[4])
if redis.call('ZCARD', KEYS[2]) >= max_active then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if first[2] == nil or first[2] == 'inf' then return {'concurrency', -1, max_active} end
  return {'concurrency', tonumber(first[2]) - now_ms, max_active}
end
if redis.call('ZCARD', KEYS[3]) >= max_starts then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if first[2] == nil then return {'rate', -1, max_starts} end
  return {'rate', tonumber(first[2]) + window_ms - now_ms, max_starts}
end
if ARGV[6] == '' then
  redis.call('ZADD', KEYS[2], '+inf', ARGV[2])
  redis.call('SET', KEYS[4], ARGV[1])
else
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[6]), ARGV[2])
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[6])
end
-- The member carries the time so that reusing a session id still counts as a new start.
redis.call('ZADD', KEYS[3], now_ms, now_ms .. ':' .. ARGV[2])
redis.call('PEXPIRE', KEYS[3], window_ms)
return {'ok', -1, 0}
"""
)

_RELEASE = """
-- KEYS: active sessions, session owner; ARGV: tenant, session id. Returns 1 if released.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
return redis.call('ZREM', KEYS[1], ARGV[2])
"""

_RENEW = (
    _NOW_MS
    + """
-- KEYS: active sessions, session owner; ARGV: tenant, session id, lease ms.
-- Returns 1 if renewed, 0 if the tenant does not hold the session (or its lease lapsed).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
)

_ACTIVE = (
    _NOW_MS
    + """
-- KEYS: active sessions. Returns the unexpired session ids, oldest lease first.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)


# --------------------------------------------------------------------------- store


class TenancyStore:
    """API keys, tenant limits and session admission over one Redis connection pool.

    The client must decode responses to str (`from_url` makes such a client; the casts
    below rely on it); the store closes it in `aclose`.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        default_limits: TenantLimits = DEFAULT_LIMITS,
    ) -> None:
        if not redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("TenancyStore needs a Redis client with decode_responses=True")
        self.redis = redis
        self.prefix = prefix
        self.default_limits = default_limits
        self._create_key = redis.register_script(_CREATE_KEY)
        self._revoke_key = redis.register_script(_REVOKE_KEY)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._active = redis.register_script(_ACTIVE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        default_limits: TenantLimits = DEFAULT_LIMITS,
    ) -> Self:
        return cls(
            Redis.from_url(url, decode_responses=True),
            prefix=prefix,
            default_limits=default_limits,
        )

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- key names

    def _apikey(self, key_id: str) -> str:
        return f"{self.prefix}apikey:{key_id}"

    def _all_keys(self) -> str:
        return f"{self.prefix}apikeys"

    def _tenant(self, tenant: str, what: str) -> str:
        return f"{self.prefix}tenant:{tenant}:{what}"

    def _owner(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:tenant"

    # ---- API keys

    async def create_key(
        self, tenant: str, *, name: str = "", limits: TenantLimits | None = None
    ) -> tuple[str, str]:
        """A new API key for `tenant` (and its limits, if given): (key id, full key).

        The full key is returned only here; the store keeps its hash.
        """
        validate_tenant(tenant)
        validate_key_name(name)
        if limits is not None:
            await self.set_limits(tenant, limits)
        while True:
            key_id = secrets.token_hex(8)
            api_key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            created = await self._create_key(
                keys=[self._apikey(key_id), self._all_keys(), self._tenant(tenant, "apikeys")],
                args=[key_id, tenant, name, _key_sha256(api_key), repr(time.time())],
            )
            if created:  # else a 64-bit id collided: draw again
                return key_id, api_key

    async def authenticate(self, presented_key: str | None) -> Principal:
        """The tenant and key behind a presented API key, or `Unauthenticated`."""
        if not presented_key:
            raise Unauthenticated("missing API key")
        match = (
            _API_KEY_RE.fullmatch(presented_key)
            if isinstance(presented_key, str) and len(presented_key) <= _MAX_PRESENTED_CHARS
            else None
        )
        if match is None:
            raise Unauthenticated(
                f"malformed API key: expected {KEY_PREFIX}<16 hex digits>_<43-character secret>"
            )
        key_id = match.group(1)
        record = await self.redis.hmget(
            self._apikey(key_id), ["tenant", "key_sha256", "revoked_at", "last_used_at"]
        )
        tenant, stored_sha256, revoked_at, last_used_at = cast("list[str | None]", record)
        # An unknown id and a wrong secret for a known id read the same, so ids can't be probed.
        if (
            tenant is None
            or stored_sha256 is None
            or not hmac.compare_digest(_key_sha256(presented_key), stored_sha256)
        ):
            raise Unauthenticated("unknown API key")
        if revoked_at is not None:
            raise Unauthenticated(f"API key {key_id} has been revoked")
        now = time.time()
        if last_used_at is None or now - float(last_used_at) >= LAST_USED_GRANULARITY_S:
            await self.redis.hset(self._apikey(key_id), "last_used_at", repr(now))
        return Principal(tenant=tenant, key_id=key_id)

    async def list_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        """Keys of one tenant, or of all tenants, oldest first. No secrets, no hashes."""
        index = (
            self._all_keys() if tenant is None else self._tenant(validate_tenant(tenant), "apikeys")
        )
        key_ids = cast("list[str]", await self.redis.zrange(index, 0, -1))
        fields = ["tenant", "name", "created_at", "revoked_at", "last_used_at"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hmget(self._apikey(key_id), fields)
            rows: list[list[str | None]] = await pipe.execute()
        return [
            ApiKeyInfo(
                key_id=key_id,
                tenant=row_tenant,
                name=name or "",
                created_at=float(created_at or 0.0),
                revoked_at=None if revoked_at is None else float(revoked_at),
                last_used_at=None if last_used_at is None else float(last_used_at),
            )
            for key_id, (row_tenant, name, created_at, revoked_at, last_used_at) in zip(
                key_ids, rows, strict=True
            )
            if row_tenant is not None
        ]

    async def revoke(self, key_id: str) -> str:
        """Revoke a key for good; returns its tenant. Revoking twice keeps the first time."""
        if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            raise InvalidInput(f"invalid key id {key_id!r}: expected 16 hex digits")
        tenant = await self._revoke_key(keys=[self._apikey(key_id)], args=[repr(time.time())])
        if tenant is None:
            raise ApiKeyNotFound(f"no API key with id {key_id}")
        return str(tenant)

    # ---- limits

    async def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        validate_tenant(tenant)
        await self.redis.hset(
            self._tenant(tenant, "limits"),
            mapping={
                "max_concurrent_sessions": limits.max_concurrent_sessions,
                "sessions_per_minute": limits.sessions_per_minute,
            },
        )

    async def get_limits(self, tenant: str) -> TenantLimits:
        """The tenant's limits; a limit never set is the store's default."""
        validate_tenant(tenant)
        max_concurrent, per_minute = await self.redis.hmget(
            self._tenant(tenant, "limits"), ["max_concurrent_sessions", "sessions_per_minute"]
        )
        return TenantLimits(
            max_concurrent_sessions=self.default_limits.max_concurrent_sessions
            if max_concurrent is None
            else int(max_concurrent),
            sessions_per_minute=self.default_limits.sessions_per_minute
            if per_minute is None
            else int(per_minute),
        )

    # ---- sessions

    async def acquire_session(
        self, tenant: str, session_id: str, *, lease_s: float | None = None
    ) -> None:
        """Admit a new session for `tenant` and record it as the tenant's, or raise.

        Checks, atomically with recording the session, that the tenant has fewer than
        `max_concurrent_sessions` active sessions and started fewer than
        `sessions_per_minute` in the last 60 s. Acquiring a session the tenant already
        holds succeeds without counting again. With `lease_s` the session is dropped
        unless `renew_session` is called within that time.
        """
        validate_tenant(tenant)
        validate_session_id(session_id)
        lease_ms = "" if lease_s is None else str(_lease_ms(lease_s))
        status, retry_ms, limit = await self._acquire(
            keys=[
                self._tenant(tenant, "limits"),
                self._tenant(tenant, "sessions"),
                self._tenant(tenant, "session_starts"),
                self._owner(session_id),
            ],
            args=[
                tenant,
                session_id,
                self.default_limits.max_concurrent_sessions,
                self.default_limits.sessions_per_minute,
                RATE_WINDOW_MS,
                lease_ms,
            ],
        )
        retry_after_s = None if int(retry_ms) < 0 else max(int(retry_ms), 1) / 1000
        if status in ("ok", "held"):
            return
        if status == "in_use":
            raise SessionIdInUse(f"session id {session_id!r} is already in use")
        if status == "concurrency":
            raise ConcurrencyLimitExceeded(
                f"tenant {tenant!r} is at its limit of {limit} concurrent sessions; "
                "end a session and retry",
                retry_after_s,
            )
        if status == "rate":
            raise RateLimited(
                f"tenant {tenant!r} is at its limit of {limit} new sessions per minute"
                + ("" if retry_after_s is None else f"; retry in {math.ceil(retry_after_s)} s"),
                retry_after_s,
            )
        raise RuntimeError(f"unexpected admission reply {status!r}")

    async def renew_session(self, tenant: str, session_id: str, *, lease_s: float) -> None:
        """Extend a held session's lease to `lease_s` from now, or `SessionNotFound`."""
        validate_tenant(tenant)
        validate_session_id(session_id)
        renewed = await self._renew(
            keys=[self._tenant(tenant, "sessions"), self._owner(session_id)],
            args=[tenant, session_id, _lease_ms(lease_s)],
        )
        if not renewed:
            raise _session_not_found(session_id)

    async def release_session(self, tenant: str, session_id: str) -> bool:
        """Free the session's slot. False if the tenant did not hold it (safe to repeat)."""
        validate_tenant(tenant)
        validate_session_id(session_id)
        released = await self._release(
            keys=[self._tenant(tenant, "sessions"), self._owner(session_id)],
            args=[tenant, session_id],
        )
        return bool(released)

    async def active_sessions(self, tenant: str) -> list[str]:
        """Ids of the tenant's held sessions."""
        validate_tenant(tenant)
        session_ids: list[str] = await self._active(keys=[self._tenant(tenant, "sessions")])
        return session_ids

    async def owner_of(self, session_id: str) -> str | None:
        """The tenant holding the session, None if no tenant does."""
        validate_session_id(session_id)
        return cast("str | None", await self.redis.get(self._owner(session_id)))

    async def require_owner(self, tenant: str, session_id: str) -> None:
        """Raise `SessionNotFound` unless `tenant` holds the session.

        Another tenant's session and a missing one raise the same error.
        """
        validate_tenant(tenant)
        if await self.owner_of(session_id) != tenant:
            raise _session_not_found(session_id)


def _lease_ms(lease_s: float) -> int:
    if (
        isinstance(lease_s, bool)
        or not isinstance(lease_s, int | float)
        or not 0 < lease_s <= 86_400
    ):
        raise InvalidInput(f"lease must be within (0, 86400] seconds, not {lease_s!r}")
    return max(1, round(lease_s * 1000))


def _session_not_found(session_id: str) -> SessionNotFound:
    # Same wording as services.sessions.registry for a session that does not exist.
    return SessionNotFound(f"no session {session_id!r}")
