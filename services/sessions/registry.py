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
import builtins
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from parley.errors import InvalidInput, RequestRefused
from parley.tenancy import (
    ConcurrencyLimitExceeded,
    LimitExceeded,
    SessionNotFound,
    TenancyStore,
)
from redis.exceptions import RedisError

from services.render.default_avatar import AVATAR_ID
from services.render.engine import AVATAR_ID_PATTERN
from services.sessions.conversation import Conversation, Engines
from services.sessions.records import SessionRecords, StoredSession

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
#: The listener checks this often whether the registry is stopping.
LISTEN_POLL_S = 0.5
#: Background tasks get this long to stop by themselves before they are cancelled.
STOP_WAIT_S = 5.0
#: A stopping replica waits this long for another to confirm it took a session over.
HANDOVER_WAIT_S = 2.0
#: Ended sessions stay in this replica's memory until this many newer ones have ended
#: (with Redis, get/list read the records, which expire a day after their end).
MAX_ENDED_KEPT = 1000
#: How long a new stream waits for the session's previous stream on this replica to end.
STREAM_HANDOVER_WAIT_S = 1
#: What `create` makes (uuid4 hex); anything else is no session.
SESSION_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
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
    #: This replica's conversation of the session (None: it lives on another replica).
    conversation: Conversation | None = None
    streaming: bool = False
    #: Turns as recorded in Redis (a conversation on another replica counts them there).
    stored_turns: int = 0
    #: Created on another replica; this one holds its conversation only while streaming.
    adopted: bool = False
    #: The replica that keeps it (renews its lease), as last read from Redis.
    keeper: str = ""

    @property
    def active(self) -> bool:
        return not self.ended_at

    @property
    def turns(self) -> int:
        return max(self.conversation.turn if self.conversation else 0, self.stored_turns)


def session_not_found(session_id: object) -> SessionNotFound:
    """The one error for a missing session, another tenant's session and a malformed id."""
    quoted = str(session_id)
    if len(quoted) > _QUOTED_ID_CHARS:
        quoted = quoted[:_QUOTED_ID_CHARS] + "…"
    return SessionNotFound(f"no session {quoted!r}")


class SessionRegistry:
    """This gateway's sessions, each with its `Conversation`.

    `tenancy=None` keeps everything in this process (no limits but `max_sessions`).
    With Redis, `start` it (it then hears the other replicas' ends and hand-overs), and
    `close` it on shutdown: its sessions go to the other replicas, or end if none is left.
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
        self._listener: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        #: Set to stop both: they end at their next wait rather than being cancelled
        #: (cancelling a redis-py pub/sub read could leave its connection's lock held).
        self._stopping = asyncio.Event()
        self._closed = False
        #: Shared with every replica of the gateway (None: this process only).
        self.records = SessionRecords(tenancy.redis, tenancy.prefix) if tenancy else None
        #: This replica's stream claims in Redis: session id -> token.
        self._streams: dict[str, str] = {}
        #: Sessions whose stream here is ending (saving, releasing its claim).
        self._finishing: set[str] = set()
        #: Whether this replica's listener is subscribed (it hears its own offers too).
        self._listening = False
        #: Its heartbeat in Redis lasts half a lease (renewed every sixth): a replica that
        #: dies is seen gone while its sessions' leases still hold, so others keep them.
        self._replica_id = uuid.uuid4().hex

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
        if self.engines.render is not None:  # an avatar nobody can draw is refused now
            await self.engines.render.load(avatar_id or AVATAR_ID)
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
                conversation = Conversation(
                    self.engines, persona_prompt, avatar_id=avatar_id or AVATAR_ID
                )
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
        if self.records is not None:
            record.keeper = self._replica_id
            try:
                with tenancy_errors():
                    await self.records.beat(self._replica_id, self.lease_s / 2)
                    await self.records.put(_stored(record))
            except BaseException:  # a failure, or the caller gone: nothing may stay behind
                await asyncio.shield(self._abandon(conversation, tenant, session_id))
                raise
        self._sessions[session_id] = record
        self._start_background()
        return record

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        """The tenant's session; `SessionNotFound` if there is none (or it is another's).

        With Redis, sessions created on other replicas too (without a conversation here).
        """
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
            raise session_not_found(session_id)  # also keeps ids from naming other Redis keys
        local = self._sessions.get(session_id)
        if self.records is None:
            if local is None or local.tenant != tenant:
                raise session_not_found(session_id)
            return local
        with tenancy_errors():
            stored = await self.records.get(tenant, session_id)
        if stored is None:
            raise session_not_found(session_id)
        if local is not None and local.tenant == tenant:
            local.stored_turns = stored.turns
            if stored.ended_at:  # perhaps ended elsewhere, the news on its way: Redis's time
                await self._end(local, release=False, at=stored.ended_at)
                local.ended_at = stored.ended_at
            return local
        if not stored.ended_at and not self._closed:
            with tenancy_errors():
                if stored.keeper == self._replica_id or not await self.records.keeper_alive(
                    stored.keeper
                ):
                    return await self._keep_orphan(stored)
        return _record(stored)

    async def _keep_orphan(self, stored: StoredSession) -> SessionRecord:
        """Keep a session whose keeper died (killed with streams open, or lost): renew its
        lease here, or end it if the lease has lapsed meanwhile."""
        assert self.records is not None and self.tenancy is not None
        if stored.keeper != self._replica_id and not await self.records.swap_keeper(
            stored.session_id, stored.keeper, self._replica_id
        ):
            return _record(stored)  # another replica keeps it now
        if self._closed:
            await self.records.swap_keeper(stored.session_id, self._replica_id, stored.keeper)
            return _record(stored)
        record = self._hold(stored)  # no await since the swap
        try:
            await self.tenancy.renew_session(record.tenant, record.session_id, lease_s=self.lease_s)
        except SessionNotFound:  # its lease lapsed: the tenant's slot is free, the session over
            await self._end_everywhere(record, release=False)
        else:
            log.info(
                "keeping session %s (%s): its replica is gone", record.session_id, record.tenant
            )
        return record

    def _hold(self, stored: StoredSession) -> SessionRecord:
        """Make this replica the holder of a session it has just become the keeper of."""
        local = self._sessions.get(stored.session_id)
        if local is not None and local.tenant == stored.tenant:
            local.adopted = False  # streaming here already: now it is this replica's
            local.keeper = self._replica_id
            return local
        record = _record(stored)
        record.keeper = self._replica_id
        self._sessions[stored.session_id] = record
        self._start_background()
        return record

    async def list(self, tenant: str) -> list[SessionRecord]:
        """The tenant's sessions (active and recently ended), oldest first."""
        if self.records is None:
            return [r for r in self._sessions.values() if r.tenant == tenant]
        with tenancy_errors():
            stored = await self.records.of_tenant(tenant)
            stored = await self._end_lapsed_orphans(tenant, stored)
        out = []
        for s in stored:
            local = self._sessions.get(s.session_id)
            if local is not None and local.tenant == tenant:
                local.stored_turns = s.turns
                out.append(local)
            else:
                out.append(_record(s))
        return out

    async def _end_lapsed_orphans(
        self, tenant: str, stored: builtins.list[StoredSession]
    ) -> builtins.list[StoredSession]:
        """End (and show ended) the listed sessions whose keeper is gone and whose lease
        has lapsed: nobody read them in time to keep them."""
        assert self.records is not None and self.tenancy is not None
        here = set(self._sessions)
        candidates = [s for s in stored if not s.ended_at and s.session_id not in here and s.keeper]
        keepers = {s.keeper for s in candidates}
        alive = {k for k in keepers if await self.records.keeper_alive(k)}
        orphans = [s for s in candidates if s.keeper not in alive]
        if not orphans:
            return stored
        leased = set(await self.tenancy.active_sessions(tenant))
        now = time.time()
        for s in orphans:
            if s.session_id not in leased:
                await self.records.end(tenant, s.session_id, now)
                s.ended_at = now
        return stored

    async def end(self, tenant: str, session_id: str) -> SessionRecord:
        """End the tenant's session (ending an ended session is a no-op), on every replica."""
        record = await self.get(tenant, session_id)
        if not record.active:
            return record
        stamp = time.time()
        if self.records is not None:
            with tenancy_errors():
                ended = await self.records.end(tenant, session_id, stamp)
                if ended < 0:
                    raise session_not_found(session_id)
                if ended == 0:  # another replica ended it just now: its time counts
                    stored = await self.records.get(tenant, session_id)
                    stamp = stored.ended_at if stored is not None else stamp
        await self._end(record, release=True, at=stamp)
        # Our own listener may have ended it first on the news (without releasing).
        await self._release(tenant, session_id)
        return record

    @contextlib.asynccontextmanager
    async def stream(self, record: SessionRecord) -> AsyncIterator[Conversation]:
        """Hold the session's one stream (across replicas) while the block runs; inside,
        its conversation on this replica, adopted from Redis if it was created elsewhere.

        `SessionEnded` or `StreamInUse` when the session cannot take a stream.
        """
        if not record.active:
            raise SessionEnded(f"session {record.session_id!r} has ended")
        # A client that reconnects at once may find its old stream still letting go here.
        for _ in range(STREAM_HANDOVER_WAIT_S * 50):
            if record.session_id not in self._finishing:
                break
            await asyncio.sleep(0.02)
        if record.streaming:
            raise StreamInUse(f"session {record.session_id!r} already has a Converse stream")
        record.streaming = True  # before any wait: a second stream here is refused at once
        token = ""
        try:
            if self.records is not None:
                token = await self._claim(record)
            conversation = await self._conversation(record)
            yield conversation
        finally:
            self._finishing.add(record.session_id)
            try:
                await asyncio.shield(self._let_go(record, token))
            finally:
                record.streaming = False
                self._finishing.discard(record.session_id)

    async def _let_go(self, record: SessionRecord, token: str) -> None:
        """The end of a stream: save its turns, forget an adopted session, free the claim."""
        if token and record.active:
            # A turn cut short by a disconnect emits no TurnDoneEvent to save it.
            await self.save_turn(record)
        if record.adopted and record.active and self._sessions.get(record.session_id) is record:
            await self._keep_if_orphaned(record)  # its keeper may have died meanwhile
        if record.adopted and self._sessions.get(record.session_id) is record:
            # Its own replica keeps it (and its lease); here it was only this stream's.
            await self._drop_local(record)
        if token:
            self._streams.pop(record.session_id, None)
            with contextlib.suppress(RedisError):
                await self.records.release_stream(record.session_id, token)  # type: ignore[union-attr]

    async def _keep_if_orphaned(self, record: SessionRecord) -> None:
        """Keep a session here (`_keep_orphan`) if its keeper is gone."""
        if self.records is None or self._closed:
            return
        try:
            stored = await self.records.get(record.tenant, record.session_id)
            if (
                stored
                and not stored.ended_at
                and not await self.records.keeper_alive(stored.keeper)
            ):
                await self._keep_orphan(stored)
        except RedisError as exc:
            log.warning("could not check the keeper of %s: %s", record.session_id, exc)

    async def save_turn(self, record: SessionRecord) -> None:
        """Write a finished turn (count and history) where every replica sees it."""
        conversation = record.conversation
        if self.records is None or conversation is None:
            return
        record.stored_turns = conversation.turn
        try:
            await self.records.save_turn(
                record.session_id, conversation.turn, list(conversation.history)
            )
        except RedisError as exc:  # the conversation goes on; another replica would lag
            log.warning("could not save a turn of session %s: %s", record.session_id, exc)

    async def start(self) -> None:
        """Listen for the other replicas' ends and hand-overs (with Redis) from now on,
        not only once this replica holds a session: a stopping replica offers its
        sessions to whoever listens."""
        if self.records is not None and not self._closed:
            with tenancy_errors():
                await self.records.beat(self._replica_id, self.lease_s / 2)
            self._start_background()
            for _ in range(100):  # subscribed within a round trip or two
                if self._listening:
                    break
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Hand this replica's sessions to the other replicas (each keeps one's lease and
        takes its next stream), or end them if no other is left, and free their slots;
        the registry admits no more."""
        self._closed = True  # no take-over registers a session here from now on
        await self._stop_background()  # (its listener does not count among those offered to)
        if self.records is not None:  # alive through the offers, however long stopping took
            with contextlib.suppress(RedisError):
                await self.records.beat(self._replica_id, self.lease_s / 2 + HANDOVER_WAIT_S)
        active = [r for r in self._sessions.values() if r.active]
        # Sessions adopted for a stream belong to their own replica, which goes on.
        adopted = [r for r in active if r.adopted]
        owned = [r for r in active if not r.adopted]
        handed = await asyncio.gather(*(self._offer(r) for r in owned))
        if self.records is not None:  # its sessions left now have no keeper here
            with contextlib.suppress(RedisError):
                await self.records.stop_beating(self._replica_id)
        await asyncio.gather(
            *(self._drop_local(r) for r in adopted),
            *(self._drop_local(r) for r, given in zip(owned, handed, strict=True) if given),
            *(self._end_everywhere(r) for r, given in zip(owned, handed, strict=True) if not given),
        )
        # Streams cut by the stop: a client reconnecting elsewhere need not wait for them.
        if self.records is not None:
            for session_id, token in list(self._streams.items()):
                with contextlib.suppress(RedisError):
                    await self.records.release_stream(session_id, token)

    async def _offer(self, record: SessionRecord) -> bool:
        """Offer a session to the other replicas: whether one confirmed it took it over."""
        if self.records is None:
            return False
        if record.conversation is not None:
            await self.save_turn(record)  # the taker goes on from the last turn
        offer_id = uuid.uuid4().hex
        try:
            keeper = await self.records.keeper_of(record.session_id)
            if keeper and keeper != self._replica_id:
                return True  # another replica keeps it by now: only forget it here
            heard = await self.records.offer(
                record.tenant, record.session_id, self._replica_id, offer_id
            )
            if heard <= 0:
                return False  # nobody else listens: the last replica
            for _ in range(round(HANDOVER_WAIT_S / 0.05)):
                if await self.records.offer_taken(offer_id):
                    return True
                await asyncio.sleep(0.05)
        except RedisError as exc:
            log.warning("could not offer session %s: %s", record.session_id, exc)
        return False

    async def _take_over(self, message: object) -> None:
        """Keep a session a stopping replica offered, if this replica is the one to."""
        assert self.records is not None
        try:
            offer = json.loads(str(message))
            tenant, session_id = str(offer["tenant"]), str(offer["session_id"])
            sender, offer_id = str(offer["from"]), str(offer["offer"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed session hand-over: %.200r", message)
            return
        if sender == self._replica_id or self._closed:
            return
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            return
        if session_id not in self._sessions and (
            self._active_count() + self._admitting >= self.max_sessions
        ):
            return  # another replica may take it; if none does, it ends
        if not await self.records.claim_offer(offer_id, self._replica_id, HANDOVER_WAIT_S * 5):
            return  # another replica took it
        stored = await self.records.get(tenant, session_id)
        if stored is None or stored.ended_at or self._closed:
            return
        if stored.keeper != sender:  # another keeps it already: the sender only forgets it
            await self.records.confirm_offer(offer_id, self._replica_id, HANDOVER_WAIT_S * 5)
            return
        if not await self.records.swap_keeper(session_id, sender, self._replica_id):
            if await self.records.keeper_of(session_id) not in ("", sender):
                # Another replica keeps it by now: the sender must only forget it.
                await self.records.confirm_offer(offer_id, self._replica_id, HANDOVER_WAIT_S * 5)
            return
        if self._closed:  # closed meanwhile: give it back (its sender ends it unconfirmed)
            await self.records.swap_keeper(session_id, self._replica_id, sender)
            return
        self._hold(stored)  # no await since the swap: Redis and this replica agree
        await self.records.confirm_offer(offer_id, self._replica_id, HANDOVER_WAIT_S * 5)
        log.info("took over session %s (%s) from a stopping replica", session_id, tenant)

    # -- internals ------------------------------------------------------------------------

    async def _abandon(self, conversation: Conversation, tenant: str, session_id: str) -> None:
        await conversation.close()
        await self._release(tenant, session_id)

    async def _drop_local(self, record: SessionRecord) -> None:
        """Forget this replica's copy of a session another replica keeps."""
        self._sessions.pop(record.session_id, None)
        conversation, record.conversation = record.conversation, None
        if conversation is not None:
            with contextlib.suppress(Exception):
                await conversation.close()

    async def _end_everywhere(self, record: SessionRecord, *, release: bool = True) -> None:
        """End a session here and in Redis (so every replica sees it ended)."""
        stamp = time.time()
        if self.records is not None:
            try:
                await self.records.end(record.tenant, record.session_id, stamp)
            except RedisError as exc:
                log.warning("could not record the end of %s: %s", record.session_id, exc)
        await self._end(record, release=release, at=stamp)

    def _active_count(self) -> int:
        return sum(r.active for r in self._sessions.values())

    async def _end(self, record: SessionRecord, *, release: bool, at: float | None = None) -> None:
        if not record.active:
            return
        record.ended_at = at or time.time()  # first: a concurrent end returns at once
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

    async def _claim(self, record: SessionRecord) -> str:
        """Claim the session's stream in Redis (one stream across every replica)."""
        assert self.records is not None and self.tenancy is not None
        # The claim names this replica: a claim left by a replica that died (its stream
        # cut with it) is taken over rather than waited out for a whole lease.
        token = f"{self._replica_id}:{uuid.uuid4().hex}"
        with tenancy_errors():
            claimed = await self.records.claim_stream(record.session_id, token, self.lease_s)
            if claimed == 0:
                holder = await self.records.stream_holder(record.session_id)
                replica, named, _ = holder.partition(":")
                if (
                    named  # a claim of this release names its replica
                    and replica != self._replica_id
                    and not await self.records.keeper_alive(replica)
                    and await self.records.steal_stream(
                        record.session_id, holder, token, self.lease_s
                    )
                ):
                    claimed = 1
        if claimed < 0:
            raise SessionEnded(f"session {record.session_id!r} has ended")
        if claimed == 0:
            raise StreamInUse(f"session {record.session_id!r} already has a Converse stream")
        self._streams[record.session_id] = token
        try:
            with tenancy_errors():
                # Its lease may have lapsed (its first replica is gone): then it is over.
                await self.tenancy.renew_session(
                    record.tenant, record.session_id, lease_s=self.lease_s
                )
        except SessionNotFound:
            self._streams.pop(record.session_id, None)
            with contextlib.suppress(RedisError):
                await self.records.release_stream(record.session_id, token)
                await self.records.end(record.tenant, record.session_id)
            raise SessionEnded(f"session {record.session_id!r} has ended") from None
        except BaseException:
            self._streams.pop(record.session_id, None)
            with contextlib.suppress(RedisError):
                await self.records.release_stream(record.session_id, token)
            raise
        return token

    async def _conversation(self, record: SessionRecord) -> Conversation:
        """This replica's conversation of the session, up to date with the last turn saved."""
        if self.records is None:
            if record.conversation is None:
                raise SessionEnded(f"session {record.session_id!r} has ended")
            return record.conversation
        if self.engines.render is not None and record.conversation is None:
            await self.engines.render.load(record.avatar_id)  # before any check it may outlast
        with tenancy_errors():
            stored = await self.records.get(record.tenant, record.session_id)
        if stored is None or stored.ended_at:
            raise SessionEnded(f"session {record.session_id!r} has ended")
        local = self._sessions.get(record.session_id)
        if local is not record:  # created on another replica: adopt it here
            if local is not None:
                raise StreamInUse(f"session {record.session_id!r} already has a Converse stream")
            if self._active_count() + self._admitting >= self.max_sessions:
                raise GatewayAtCapacity(
                    f"this gateway is at its capacity of {self.max_sessions} sessions; retry later"
                )
            record.adopted = True
            self._sessions[record.session_id] = record
            self._start_background()
        conversation = record.conversation
        created = conversation is None
        if conversation is None:
            conversation = Conversation(
                self.engines, record.persona_prompt, avatar_id=record.avatar_id
            )
            record.conversation = conversation
        if created or stored.turns != conversation.turn:
            # Turns happened on another replica: go on from their history.
            conversation.continue_from(stored.history, stored.turns)
        record.stored_turns = stored.turns
        return conversation

    def _start_background(self) -> None:
        if self.tenancy is not None and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_leases(self.tenancy))
        if self.records is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen_for_ends(self.records))
        if self.records is not None and self._beater is None:
            self._beater = asyncio.create_task(self._beat(self.records))

    async def _stop_background(self) -> None:
        """Stop renewing and listening: at once at their next wait, else cancelled."""
        self._stopping.set()
        for task in (self._renewer, self._listener, self._beater):
            if task is not None and not task.done():
                done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
                if not done:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _listen_for_ends(self, records: SessionRecords) -> None:
        """End this replica's conversation of a session another replica ended; take over
        sessions a stopping replica offers."""
        channels = (records.ended_channel, records.handover_channel)
        while not self._stopping.is_set():
            try:
                async with records.redis.pubsub() as pubsub:
                    await pubsub.subscribe(*channels)
                    confirmed = 0
                    while not self._stopping.is_set():
                        message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                        if message is None:
                            continue
                        kind = message.get("type")
                        if kind == "subscribe":
                            confirmed += 1
                            self._listening = confirmed == len(channels)
                        elif kind != "message":
                            continue
                        elif message.get("channel") == records.handover_channel:
                            try:  # one failed take-over must not drop the messages after it
                                await self._take_over(message.get("data"))
                            except Exception:  # the offer is not confirmed: its sender ends it
                                log.exception("taking over an offered session failed")
                        else:
                            record = self._sessions.get(str(message.get("data")))
                            if record is not None and record.active:
                                await self._end(record, release=False)
            except asyncio.CancelledError:
                self._listening = False
                raise
            except Exception as exc:  # Redis went away: listen again shortly
                self._listening = False
                log.warning("listening for ended sessions failed: %s; retrying", exc)
                await self._pause(1.0)
        self._listening = False

    async def _kept_elsewhere(self, record: SessionRecord) -> bool:
        """Whether another replica keeps a session this one thought its own (it took it
        while this replica's heartbeat lapsed): then only the stream here holds it."""
        if self.records is None:
            return False
        try:
            keeper = await self.records.keeper_of(record.session_id)
        except RedisError:
            return False
        if not keeper or keeper == self._replica_id:
            return False
        log.warning("session %s is kept by another replica now", record.session_id)
        if record.streaming:
            record.adopted = True  # dropped here when its stream ends
        else:
            await self._drop_local(record)
        return True

    async def _beat(self, records: SessionRecords) -> None:
        """This replica's heartbeat: half a lease long, renewed every sixth, so a missed
        beat or two does not make a live replica look gone."""
        while not self._stopping.is_set():
            try:
                await records.beat(self._replica_id, self.lease_s / 2)
            except RedisError as exc:
                log.warning("could not renew this replica's heartbeat: %s", exc)
            await self._pause(self.lease_s / 6)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or less once the registry is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _renew_leases(self, tenancy: TenancyStore) -> None:
        """Renew every active session's lease at a third of its length, for as long as it lives.

        A lease found lapsed (Redis was unreachable for longer than the lease, and the
        slot may be someone else's by now) ends the session: the tenant's limit holds.
        """
        while True:
            await self._pause(self.lease_s / 3)
            if self._stopping.is_set():
                return
            if self.records is not None:
                for session_id, token in list(self._streams.items()):
                    try:
                        if not await self.records.renew_stream(session_id, token, self.lease_s):
                            # Lapsed (Redis or this loop stalled for a whole lease): take it
                            # back unless another stream has it by now.
                            again = await self.records.claim_stream(session_id, token, self.lease_s)
                            if again != 1:
                                log.warning("stream of session %s lost its claim", session_id)
                    except RedisError as exc:
                        log.warning("could not renew the stream of %s: %s", session_id, exc)
            for record in [r for r in self._sessions.values() if r.active]:
                if not record.adopted and await self._kept_elsewhere(record):
                    continue
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
                        await self._end_everywhere(record, release=False)
                except RedisError as exc:
                    log.warning("could not renew session %s: %s", record.session_id, exc)
                except Exception:  # one session's failure must not stop the others' renewals
                    log.exception("renewing session %s failed", record.session_id)


def _stored(record: SessionRecord) -> StoredSession:
    return StoredSession(
        session_id=record.session_id,
        tenant=record.tenant,
        avatar_id=record.avatar_id,
        persona_prompt=record.persona_prompt,
        voice=record.voice,
        created_at=record.created_at,
        ended_at=record.ended_at,
        keeper=record.keeper,
    )


def _record(stored: StoredSession) -> SessionRecord:
    return SessionRecord(
        session_id=stored.session_id,
        tenant=stored.tenant,
        avatar_id=stored.avatar_id,
        persona_prompt=stored.persona_prompt,
        voice=stored.voice,
        created_at=stored.created_at,
        ended_at=stored.ended_at,
        stored_turns=stored.turns,
        keeper=stored.keeper,
    )
