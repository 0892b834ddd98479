"""Session records in Redis, shared by every replica of the sessions gateway.

A session is created on one replica, but its later calls (get, list, end, a new
Converse stream) may land on any other: Serve routes each call to any replica of
the deployment. So what a session *is* lives here, in Redis, not in a replica:

    {prefix}session:{id}           hash: tenant, avatar_id, persona_prompt, voice,
                                   created_at, ended_at, turns, history (JSON)
    {prefix}tenant:{t}:session_records  sorted set of the tenant's session ids by creation
    {prefix}session:{id}:stream    the replica streaming it now (token; expires unless renewed)
    {prefix}sessions:ended         pub/sub channel: ids of sessions just ended
    {prefix}sessions:handover      pub/sub channel: sessions a stopping replica offers
    {prefix}handover:{offer}       which replica took an offered session (short-lived)
    {prefix}gateway:{replica}      a gateway replica's heartbeat (expires unless renewed)

A replica keeps a session's `Conversation` (models' state, the live audio) only while
it holds it; the conversation history is written back after every turn, so a stream
that lands on another replica goes on with the same history.

Each session has a *keeper*, the replica that renews its lease: the one that created
it, until it hands it over. A replica that stops (scale-in, a rollout) offers its
sessions to the others: one takes each over (becomes its keeper) and confirms; a
session nobody confirms within a moment ends. A replica that dies instead (or is
killed while streams are open) leaves its sessions without a keeper: its heartbeat
lapses, and the next replica that reads such a session (a get, a new stream) becomes
its keeper, or ends it if its lease has lapsed meanwhile.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis

from services.llm.engine import ChatMessage

#: Ended sessions stay readable (get, list) for this long.
ENDED_TTL_S = 24 * 3600
#: Most messages of history a record keeps (a conversation keeps fewer in its prompt).
MAX_HISTORY_MESSAGES = 200

_END = """
-- KEYS: session hash, ended channel; ARGV: tenant, ended_at, ttl_s, session id
-- 1: ended now; 0: already ended; -1: no such session of this tenant
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'ended_at')) ~= 0 then return 0 end
redis.call('HSET', KEYS[1], 'ended_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
"""

_CLAIM = """
-- KEYS: stream key, session hash; ARGV: token, ttl_ms
-- 1: claimed; 0: another stream holds it; -1: the session has ended or is gone
local ended = redis.call('HGET', KEYS[2], 'ended_at')
if not ended or tonumber(ended) ~= 0 then return -1 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_SAVE = """
-- KEYS: session hash; ARGV: turns, history. Writes only into an existing record, and
-- never an older state over a newer one (a replica's stale copy of the conversation).
if redis.call('HEXISTS', KEYS[1], 'tenant') == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'turns') or '0') > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'turns', ARGV[1], 'history', ARGV[2])
return 1
"""

_STEAL = """
-- KEYS: stream key; ARGV: the holder's value seen, the new value, ttl_ms. 1 if taken.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

_SWAP_KEEPER = """
-- KEYS: session hash; ARGV: the keeper expected now, the new keeper. 1 if swapped.
if redis.call('HEXISTS', KEYS[1], 'tenant') == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'keeper') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'keeper', ARGV[2])
return 1
"""

_RELEASE = """
-- KEYS: stream key; ARGV: token
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
-- KEYS: stream key; ARGV: token, ttl_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass(slots=True)
class StoredSession:
    session_id: str
    tenant: str
    avatar_id: str
    persona_prompt: str
    voice: str
    created_at: float
    ended_at: float = 0.0
    turns: int = 0
    history: list[ChatMessage] = field(default_factory=list)
    #: The gateway replica that keeps it (renews its lease), by its id.
    keeper: str = ""


class SessionRecords:
    """The gateway's sessions in Redis (see the module docstring). Shares the tenancy
    store's client and key prefix."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ended_channel = f"{prefix}sessions:ended"
        self.handover_channel = f"{prefix}sessions:handover"
        self._end = redis.register_script(_END)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._save = redis.register_script(_SAVE)
        self._swap_keeper = redis.register_script(_SWAP_KEEPER)
        self._steal = redis.register_script(_STEAL)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _stream(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}:stream"

    def _index(self, tenant: str) -> str:
        # Not `tenant:{t}:sessions`: that is the tenancy store's set of leases.
        return f"{self.prefix}tenant:{tenant}:session_records"

    async def put(self, s: StoredSession) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._key(s.session_id),
                mapping={
                    "tenant": s.tenant,
                    "avatar_id": s.avatar_id,
                    "persona_prompt": s.persona_prompt,
                    "voice": s.voice,
                    "created_at": repr(s.created_at),
                    "ended_at": repr(s.ended_at),
                    "turns": s.turns,
                    "history": _dump_history(s.history),
                    "keeper": s.keeper,
                },
            )
            pipe.zadd(self._index(s.tenant), {s.session_id: s.created_at})
            await pipe.execute()

    async def get(self, tenant: str, session_id: str) -> StoredSession | None:
        """The tenant's session, or None (unknown, expired, or another tenant's)."""
        data = cast(dict[str, str], await self.redis.hgetall(self._key(session_id)))
        if not data or data.get("tenant") != tenant:
            return None
        return _from_hash(session_id, data)

    async def of_tenant(self, tenant: str) -> list[StoredSession]:
        """The tenant's sessions, oldest first (ended ones until they expire)."""
        index = self._index(tenant)
        ids = cast(list[str], await self.redis.zrange(index, 0, -1))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(self._key(session_id))
            rows = cast(list[dict[str, str]], await pipe.execute())
        found, gone = [], []
        for session_id, data in zip(ids, rows, strict=True):
            if data and data.get("tenant") == tenant:
                found.append(_from_hash(session_id, data))
            else:
                gone.append(session_id)
        if gone:  # expired ended sessions leave the index lazily
            await self.redis.zrem(index, *gone)
        return found

    async def end(self, tenant: str, session_id: str, ended_at: float | None = None) -> int:
        """Mark ended and tell every replica: 1 ended now, 0 already ended, -1 not found."""
        stamp = time.time() if ended_at is None else ended_at
        keys = [self._key(session_id), self.ended_channel]
        return int(await self._end(keys=keys, args=[tenant, repr(stamp), ENDED_TTL_S, session_id]))

    async def save_turn(self, session_id: str, turns: int, history: list[ChatMessage]) -> bool:
        """A finished turn: its count and the history a new stream goes on from. False if
        the record is gone (expired after its end): nothing is written then."""
        keys = [self._key(session_id)]
        return bool(await self._save(keys=keys, args=[turns, _dump_history(history)]))

    # -- replicas: heartbeats, keepers, hand-overs --

    def _heartbeat(self, replica: str) -> str:
        return f"{self.prefix}gateway:{replica}"

    def _offer(self, offer_id: str) -> str:
        return f"{self.prefix}handover:{offer_id}"

    async def beat(self, replica: str, ttl_s: float) -> None:
        """Replica `replica` is alive for `ttl_s` more (renewed with the leases)."""
        await self.redis.set(self._heartbeat(replica), "1", px=int(ttl_s * 1000))

    async def stop_beating(self, replica: str) -> None:
        await self.redis.delete(self._heartbeat(replica))

    async def keeper_alive(self, keeper: str) -> bool:
        return bool(keeper) and bool(await self.redis.exists(self._heartbeat(keeper)))

    async def keeper_of(self, session_id: str) -> str:
        return str(await self.redis.hget(self._key(session_id), "keeper") or "")

    async def stream_holder(self, session_id: str) -> str:
        """The value of the session's stream claim ("" if none)."""
        return str(await self.redis.get(self._stream(session_id)) or "")

    async def steal_stream(self, session_id: str, seen: str, token: str, ttl_s: float) -> bool:
        """Take the stream claim `seen` (its replica is gone) for `token`."""
        keys = [self._stream(session_id)]
        return bool(await self._steal(keys=keys, args=[seen, token, int(ttl_s * 1000)]))

    async def swap_keeper(self, session_id: str, expected: str, keeper: str) -> bool:
        """Make `keeper` the session's keeper if `expected` still is (compare and set)."""
        return bool(await self._swap_keeper(keys=[self._key(session_id)], args=[expected, keeper]))

    async def offer(self, tenant: str, session_id: str, sender: str, offer_id: str) -> int:
        """Offer a session to the other replicas (replica `sender` is stopping): how many
        listeners heard it. One answers by `claim_offer`, then `confirm_offer`."""
        message = {"tenant": tenant, "session_id": session_id, "from": sender, "offer": offer_id}
        return int(await self.redis.publish(self.handover_channel, json.dumps(message)))

    async def claim_offer(self, offer_id: str, replica: str, ttl_s: float) -> bool:
        """Whether `replica` is the one (of those that heard the offer) to take it."""
        return bool(
            await self.redis.set(self._offer(offer_id), replica, nx=True, px=int(ttl_s * 1000))
        )

    async def confirm_offer(self, offer_id: str, replica: str, ttl_s: float) -> None:
        """The taker holds the session now (what the stopping replica waits for)."""
        await self.redis.set(self._offer(offer_id), f"done:{replica}", px=int(ttl_s * 1000))

    async def offer_taken(self, offer_id: str) -> bool:
        return str(await self.redis.get(self._offer(offer_id)) or "").startswith("done:")

    async def claim_stream(self, session_id: str, token: str, ttl_s: float) -> int:
        """1: this stream holds the session; 0: another does; -1: it has ended or is gone."""
        keys = [self._stream(session_id), self._key(session_id)]
        return int(await self._claim(keys=keys, args=[token, int(ttl_s * 1000)]))

    async def renew_stream(self, session_id: str, token: str, ttl_s: float) -> bool:
        keys = [self._stream(session_id)]
        return bool(await self._renew(keys=keys, args=[token, int(ttl_s * 1000)]))

    async def release_stream(self, session_id: str, token: str) -> None:
        await self._release(keys=[self._stream(session_id)], args=[token])


def _dump_history(history: list[ChatMessage]) -> str:
    kept = history[-MAX_HISTORY_MESSAGES:]
    return json.dumps([{"role": m.role, "content": m.content} for m in kept])


def _load_history(text: str) -> list[ChatMessage]:
    try:
        items: Any = json.loads(text or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list):
        return []
    return [
        ChatMessage(str(m.get("role", "")), str(m.get("content", "")))
        for m in items
        if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]


def _from_hash(session_id: str, data: dict[str, str]) -> StoredSession:
    return StoredSession(
        session_id=session_id,
        tenant=data["tenant"],
        avatar_id=data.get("avatar_id", ""),
        persona_prompt=data.get("persona_prompt", ""),
        voice=data.get("voice", ""),
        created_at=float(data.get("created_at", "0")),
        ended_at=float(data.get("ended_at", "0")),
        turns=int(data.get("turns", "0")),
        history=_load_history(data.get("history", "")),
        keeper=data.get("keeper", ""),
    )
