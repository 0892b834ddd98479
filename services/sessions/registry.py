"""Session lifecycle, scoped to tenants; admission and ownership in Redis via `TenancyStore`.

Every session belongs to the tenant that created it: `get`, `list` and `end` only see
the caller's sessions, and another tenant's session id reads exactly like an unknown one.

With a `TenancyStore`, a new session is admitted by the tenant's limits (concurrent
sessions and creation rate, shared by every gateway through Redis) and holds a lease
there that this registry renews while the session lives, so a gateway that dies without
ending its sessions frees their slots once the leases lapse. Without one
(`tenancy=None`: the in-process demo and tests) nothing is shared and only this
process's `max_sessions` applies; the servers then treat every caller as `LOCAL_TENANT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from parley.errors import InvalidInput, RequestRefused
from parley.tenancy import (
    ConcurrencyLimitExceeded,
    LimitExceeded,
    SessionNotFound,
    TenancyStore,
)
from redis.exceptions import RedisError

from services.render.engine import AVATAR_ID_PATTERN
from services.sessions.conversation import Conversation, Engines

log = logging.getLogger(__name__)

__all__ = [
    "LOCAL_TENANT",
    "GatewayAtCapacity",
    "GatewayUnavailable",
    "SessionEnded",
    "SessionNotFound",
    "SessionRecord",
    "SessionRegistry",
    "StreamInUse",
]

MAX_PERSONA_CHARS = 4000
MAX_VOICE_CHARS = 64
#: The tenant of every caller when the registry has no `TenancyStore`.
LOCAL_TENANT = "local"
#: A session's slot in Redis lapses this long after its gateway stopped renewing it.
DEFAULT_LEASE_S = 60.0
#: Ended sessions stay visible (get/list) until this many newer ones have ended.
MAX_ENDED_KEPT = 1000
#: Session ids quoted in error messages are cut to this length.
_QUOTED_ID_CHARS = 64


class SessionEnded(RequestRefused):
    """The session has ended; it takes no more streams."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 409


class StreamInUse(RequestRefused):
    """The session already has a Converse stream (one at a time)."""

    grpc_status = "ALREADY_EXISTS"
    http_status = 409


class GatewayAtCapacity(LimitExceeded):
    """This gateway process runs as many sessions as it may (whatever the tenant)."""


class GatewayUnavailable(RequestRefused):
    """The gateway cannot serve now: Redis (keys, admissions) is unreachable, or it is
    shutting down."""

    grpc_status = "UNAVAILABLE"
    http_status = 503


@contextlib.contextmanager
def tenancy_errors() -> Iterator[None]:
    """Turn a Redis failure into `GatewayUnavailable`: a clear status rather than INTERNAL."""
    try:
        yield
    except RedisError as exc:
        log.warning("tenancy store unreachable: %s", exc)
        raise GatewayUnavailable("the tenancy store is unreachable; retry shortly") from exc


@dataclass(slots=True)
class SessionRecord:
    session_id: str
    tenant: str
    avatar_id: str
    persona_prompt: str
    voice: str
    created_at: float
    ended_at: float = 0.0
    conversation: Conversation | None = None
    streaming: bool = False

    @property
    def active(self) -> bool:
        return not self.ended_at


def session_not_found(session_id: object) -> SessionNotFound:
    """The one error for a missing session, another tenant's session and a malformed id."""
    quoted = str(session_id)
    if len(quoted) > _QUOTED_ID_CHARS:
        quoted = quoted[:_QUOTED_ID_CHARS] + "…"
    return SessionNotFound(f"no session {quoted!r}")


class SessionRegistry:
    """This gateway's sessions, each with its `Conversation`.

    `tenancy=None` keeps everything in this process (no limits but `max_sessions`).
    Call `close` on shutdown: it ends every session and frees their slots.
    """

    def __init__(
        self,
        engines: Engines,
        tenancy: TenancyStore | None = None,
        *,
        max_sessions: int = 64,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if not 0 < lease_s <= 86_400:
            raise ValueError(f"lease_s must be within (0, 86400], not {lease_s}")
        self.engines = engines
        self.tenancy = tenancy
        self.max_sessions = max_sessions
        self.lease_s = lease_s
        self._sessions: dict[str, SessionRecord] = {}
        self._admitting = 0  # creations between the capacity check and the record
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def create(
        self, tenant: str, avatar_id: str = "", persona_prompt: str = "", voice: str = ""
    ) -> SessionRecord:
        """A new session for `tenant`, admitted by its limits (raises if refused)."""
        if self._closed:
            raise GatewayUnavailable("this gateway is shutting down; retry on another")
        if len(persona_prompt) > MAX_PERSONA_CHARS:
            raise InvalidInput(f"persona_prompt is too long (limit {MAX_PERSONA_CHARS} characters)")
        if avatar_id and not AVATAR_ID_PATTERN.fullmatch(avatar_id):
            raise InvalidInput(
                f"invalid avatar_id {avatar_id[:80]!r}: use 1-64 letters, digits, '_' or '-',"
                " starting with a letter or digit"
            )
        served_voice = self.engines.tts.config.voice
        if voice and voice != served_voice:
            raise InvalidInput(
                f"unknown voice {voice[:MAX_VOICE_CHARS]!r}; this deployment serves {served_voice!r}"
            )
        if self._active_count() + self._admitting >= self.max_sessions:
            raise GatewayAtCapacity(
                f"this gateway is at its capacity of {self.max_sessions} sessions; retry later"
            )
        session_id = uuid.uuid4().hex
        self._admitting += 1
        try:
            if self.tenancy is not None:
                with tenancy_errors():
                    try:
                        await self.tenancy.acquire_session(tenant, session_id, lease_s=self.lease_s)
                    except ConcurrencyLimitExceeded as exc:
                        # Its hint is when the oldest lease would lapse, but leases are
                        # renewed here: a slot frees when a session ends, at no known time.
                        exc.retry_after_s = None
                        raise
            try:
                if self._closed:  # closed while Redis admitted it: close() would miss it
                    raise GatewayUnavailable("this gateway is shutting down; retry on another")
                conversation = Conversation(self.engines, persona_prompt)
                conversation.prepare()
            except Exception:
                await self._release(tenant, session_id)
                raise
        finally:
            self._admitting -= 1
        record = SessionRecord(
            session_id=session_id,
            tenant=tenant,
            avatar_id=avatar_id or "default",
            persona_prompt=persona_prompt,
            voice=voice or served_voice,
            created_at=time.time(),
            conversation=conversation,
        )
        self._sessions[session_id] = record
        self._start_renewing()
        return record

    def get(self, tenant: str, session_id: str) -> SessionRecord:
        """The tenant's session; `SessionNotFound` if there is none (or it is another's)."""
        record = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if record is None or record.tenant != tenant:
            raise session_not_found(session_id)
        return record

    def list(self, tenant: str) -> list[SessionRecord]:
        """The tenant's sessions (active and recently ended), oldest first."""
        return [r for r in self._sessions.values() if r.tenant == tenant]

    async def end(self, tenant: str, session_id: str) -> SessionRecord:
        """End the tenant's session (ending an ended session is a no-op)."""
        record = self.get(tenant, session_id)
        await self._end(record, release=True)
        return record

    async def close(self) -> None:
        """End every session and free their slots; the registry admits no more."""
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        active = [r for r in self._sessions.values() if r.active]
        await asyncio.gather(*(self._end(r, release=True) for r in active))

    # -- internals ------------------------------------------------------------------------

    def _active_count(self) -> int:
        return sum(r.active for r in self._sessions.values())

    async def _end(self, record: SessionRecord, *, release: bool) -> None:
        if not record.active:
            return
        record.ended_at = time.time()  # first: a concurrent end returns at once
        try:
            if record.conversation is not None:
                await record.conversation.close()
        finally:
            if release:
                await self._release(record.tenant, record.session_id)
            self._forget_old_ended()

    async def _release(self, tenant: str, session_id: str) -> None:
        if self.tenancy is None:
            return
        try:
            await self.tenancy.release_session(tenant, session_id)
        except RedisError as exc:
            # The session is over here either way; its lease lapses on its own.
            log.warning("could not release session %s of %s: %s", session_id, tenant, exc)

    def _forget_old_ended(self) -> None:
        ended = [r for r in self._sessions.values() if not r.active]
        for record in sorted(ended, key=lambda r: r.ended_at)[
            : max(0, len(ended) - MAX_ENDED_KEPT)
        ]:
            del self._sessions[record.session_id]

    def _start_renewing(self) -> None:
        if self.tenancy is not None and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_leases(self.tenancy))

    async def _renew_leases(self, tenancy: TenancyStore) -> None:
        """Renew every active session's lease at a third of its length, for as long as it lives.

        A lease found lapsed (Redis was unreachable for longer than the lease, and the
        slot may be someone else's by now) ends the session: the tenant's limit holds.
        """
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for record in [r for r in self._sessions.values() if r.active]:
                try:
                    await tenancy.renew_session(
                        record.tenant, record.session_id, lease_s=self.lease_s
                    )
                except SessionNotFound:
                    if record.active:
                        log.warning(
                            "lease of session %s (%s) lapsed; ending it",
                            record.session_id,
                            record.tenant,
                        )
                        await self._end(record, release=False)
                except RedisError as exc:
                    log.warning("could not renew session %s: %s", record.session_id, exc)
                except Exception:  # one session's failure must not stop the others' renewals
                    log.exception("renewing session %s failed", record.session_id)
