"""API keys, tenant limits and session admission against a real redis-server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import cast

import grpc
import pytest
from parley import keys_cli
from parley.errors import InvalidInput
from parley.tenancy import (
    ApiKeyNotFound,
    ConcurrencyLimitExceeded,
    LimitExceeded,
    NotFound,
    Principal,
    RateLimited,
    SessionIdInUse,
    SessionNotFound,
    TenancyError,
    TenancyStore,
    TenantLimits,
    Unauthenticated,
)
from redis.asyncio import Redis
from redis_support import RedisServer, free_port, redis_server  # noqa: F401  (a fixture)


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}:"


def secret_of(api_key: str) -> str:
    """The 43-character secret after `pk_<16 hex digits>_` (it may itself contain '_')."""
    return api_key[len("pk_") + 16 + 1 :]


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[TenancyStore]:  # noqa: F811
    async with TenancyStore.from_url(redis_server.url, prefix=unique_prefix()) as opened:
        yield opened


# --------------------------------------------------------------------------- API keys


async def test_created_key_authenticates_as_its_tenant(store: TenancyStore) -> None:
    key_id, api_key = await store.create_key("acme", name="web app")
    assert api_key.startswith(f"pk_{key_id}_")
    assert len(api_key) == len("pk_") + 16 + 1 + 43
    assert await store.authenticate(api_key) == Principal(tenant="acme", key_id=key_id)
    # Every key is distinct, also for the same tenant and name.
    _, other = await store.create_key("acme", name="web app")
    assert other != api_key


async def test_list_keys_shows_metadata_but_no_secret(store: TenancyStore) -> None:
    acme_id, acme_key = await store.create_key("acme", name="backend")
    globex_id, _ = await store.create_key("globex")
    await store.authenticate(acme_key)

    everything = await store.list_keys()
    assert [k.key_id for k in everything] == [acme_id, globex_id]
    [acme] = await store.list_keys("acme")
    assert (acme.key_id, acme.tenant, acme.name, acme.revoked) == (
        acme_id,
        "acme",
        "backend",
        False,
    )
    assert acme.created_at > 0
    assert acme.last_used_at is not None and acme.last_used_at >= acme.created_at
    [globex] = await store.list_keys("globex")
    assert globex.name == "" and globex.last_used_at is None
    assert await store.list_keys("initech") == []

    shown = repr(everything) + repr([dataclasses.asdict(k) for k in everything])
    assert acme_key not in shown and secret_of(acme_key) not in shown
    assert hashlib.sha256(acme_key.encode()).hexdigest() not in shown


async def test_revoked_key_is_refused_and_listed_as_revoked(store: TenancyStore) -> None:
    key_id, api_key = await store.create_key("acme")
    _, kept_key = await store.create_key("acme")
    assert await store.revoke(key_id) == "acme"

    with pytest.raises(Unauthenticated, match="revoked"):
        await store.authenticate(api_key)
    assert (await store.authenticate(kept_key)).tenant == "acme"

    [revoked] = [k for k in await store.list_keys("acme") if k.key_id == key_id]
    assert revoked.revoked and revoked.revoked_at is not None
    # Revoking again is harmless and keeps the first revocation time.
    assert await store.revoke(key_id) == "acme"
    [again] = [k for k in await store.list_keys("acme") if k.key_id == key_id]
    assert again.revoked_at == revoked.revoked_at

    with pytest.raises(ApiKeyNotFound, match="no API key with id 0123456789abcdef"):
        await store.revoke("0123456789abcdef")
    with pytest.raises(InvalidInput, match="16 hex digits"):
        await store.revoke("not-a-key-id")


async def test_redis_holds_only_the_key_hash(store: TenancyStore) -> None:
    _, api_key = await store.create_key("acme", name="ci")
    await store.authenticate(api_key)
    secret = secret_of(api_key)

    stored: list[object] = []
    raw = store.redis
    async for key in raw.scan_iter(match=f"{store.prefix}*"):
        kind = await raw.type(key)
        stored.append(key)
        if kind == "hash":
            for field, value in (await raw.hgetall(key)).items():
                stored += [field, value]
        elif kind == "zset":
            stored += await raw.zrange(key, 0, -1)
        elif kind == "string":
            stored.append(await raw.get(key))
        else:
            pytest.fail(f"unexpected Redis type {kind!r} at {key!r}")
    # The client decodes responses, so every item is a str.
    everything = "\n".join(cast("list[str]", stored))
    assert secret not in everything and api_key not in everything
    assert hashlib.sha256(api_key.encode()).hexdigest() in everything


@pytest.mark.parametrize(
    ("presented", "message"),
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("pk_", "malformed API key"),
        ("sk_0123456789abcdef_" + "a" * 43, "malformed API key"),
        ("pk_0123456789ABCDEF_" + "a" * 43, "malformed API key"),  # ids are lowercase hex
        ("pk_0123456789abcdef_" + "a" * 42, "malformed API key"),
        ("pk_0123456789abcdef_" + "a" * 44, "malformed API key"),
        ("pk_0123456789abcdef_" + "a" * 42 + "=", "malformed API key"),
        ("Bearer pk_0123456789abcdef_" + "a" * 43, "malformed API key"),
        ("pk_0123456789abcdef_" + "a" * 43 + "\n", "malformed API key"),
        ("x" * 100_000, "malformed API key"),
        ("pk_0123456789abcdef_" + "a" * 43, "unknown API key"),
    ],
)
async def test_bad_keys_are_refused(
    store: TenancyStore, presented: str | None, message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        await store.authenticate(presented)


async def test_wrong_secret_reads_like_an_unknown_key(store: TenancyStore) -> None:
    key_id, api_key = await store.create_key("acme")
    forged = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    with pytest.raises(Unauthenticated) as wrong_secret:
        await store.authenticate(forged)
    with pytest.raises(Unauthenticated) as unknown_id:
        await store.authenticate("pk_" + "f" * 16 + api_key[-44:])
    assert str(wrong_secret.value) == str(unknown_id.value) == "unknown API key"
    assert key_id not in str(wrong_secret.value)


@pytest.mark.parametrize(
    "tenant", ["", "Acme", "-acme", "acme-", "ac me", "acme:prod", "a" * 64, "ünïcode"]
)
async def test_invalid_tenant_names_are_refused(store: TenancyStore, tenant: str) -> None:
    with pytest.raises(InvalidInput, match="invalid tenant"):
        await store.create_key(tenant)
    with pytest.raises(InvalidInput, match="invalid tenant"):
        await store.acquire_session(tenant, "s1")


async def test_tenant_names_that_are_valid(store: TenancyStore) -> None:
    for tenant in ("a", "acme", "acme-prod-2", "0", "a" * 63):
        key_id, api_key = await store.create_key(tenant)
        assert (await store.authenticate(api_key)).key_id == key_id


@pytest.mark.parametrize("name", ["x" * 101, "line\nbreak", "tab\there", "\x00"])
async def test_invalid_key_names_are_refused(store: TenancyStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid key name"):
        await store.create_key("acme", name=name)
    assert await store.list_keys() == []


async def test_prefixes_keep_deployments_apart(
    store: TenancyStore,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    _, api_key = await store.create_key("acme")
    await store.acquire_session("acme", "s1")
    async with TenancyStore.from_url(redis_server.url, prefix=unique_prefix()) as other:
        with pytest.raises(Unauthenticated, match="unknown API key"):
            await other.authenticate(api_key)
        assert await other.list_keys() == []
        assert await other.owner_of("s1") is None
        await other.acquire_session("globex", "s1")  # its own namespace: no conflict


async def test_store_needs_a_decoding_client(redis_server: RedisServer) -> None:  # noqa: F811
    client = Redis.from_url(redis_server.url)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            TenancyStore(client)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- limits


async def test_limits_default_until_set(store: TenancyStore) -> None:
    assert await store.get_limits("acme") == store.default_limits
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=2, sessions_per_minute=5))
    assert await store.get_limits("acme") == TenantLimits(2, 5)
    assert await store.get_limits("globex") == store.default_limits

    await store.create_key("initech", limits=TenantLimits(7, 70))
    assert await store.get_limits("initech") == TenantLimits(7, 70)


@pytest.mark.parametrize(
    ("max_concurrent", "per_minute"),
    [(-1, 5), (5, -1), (True, 5), (5, 2.5), (1_000_001, 5), (5, "10")],
)
def test_invalid_limits_are_refused(max_concurrent: object, per_minute: object) -> None:
    with pytest.raises(InvalidInput):
        TenantLimits(max_concurrent, per_minute)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- admission


async def test_concurrent_acquires_never_exceed_the_concurrency_limit(
    store: TenancyStore,
) -> None:
    await store.set_limits(
        "acme", TenantLimits(max_concurrent_sessions=3, sessions_per_minute=1000)
    )
    outcomes = await asyncio.gather(
        *(store.acquire_session("acme", f"s{i}") for i in range(20)), return_exceptions=True
    )
    admitted = [f"s{i}" for i, outcome in enumerate(outcomes) if outcome is None]
    refused = [outcome for outcome in outcomes if outcome is not None]
    assert len(admitted) == 3
    assert len(refused) == 17
    assert all(isinstance(e, ConcurrencyLimitExceeded) for e in refused)
    error = refused[0]
    assert isinstance(error, ConcurrencyLimitExceeded)
    assert "limit of 3 concurrent sessions" in str(error)
    assert error.retry_after_s is None  # no leases: a slot frees when a session ends
    assert sorted(await store.active_sessions("acme")) == sorted(admitted)
    for session_id in admitted:
        assert await store.owner_of(session_id) == "acme"

    assert await store.release_session("acme", admitted[0])
    assert len(await store.active_sessions("acme")) == 2
    await store.acquire_session("acme", "after-release")
    with pytest.raises(ConcurrencyLimitExceeded):
        await store.acquire_session("acme", "one-too-many")
    # Other tenants have their own budget.
    await store.acquire_session("globex", "g1")


async def test_rate_limit_counts_starts_not_active_sessions(store: TenancyStore) -> None:
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=100, sessions_per_minute=4))
    outcomes = await asyncio.gather(
        *(store.acquire_session("acme", f"s{i}") for i in range(10)), return_exceptions=True
    )
    admitted = [f"s{i}" for i, outcome in enumerate(outcomes) if outcome is None]
    refused = [outcome for outcome in outcomes if outcome is not None]
    assert len(admitted) == 4
    assert len(refused) == 6 and all(isinstance(e, RateLimited) for e in refused)
    error = refused[0]
    assert isinstance(error, RateLimited)
    assert error.retry_after_s is not None and 55 < error.retry_after_s <= 60
    assert "limit of 4 new sessions per minute; retry in 60 s" in str(error)

    # Ending sessions frees concurrency, not the per-minute budget.
    for session_id in admitted:
        assert await store.release_session("acme", session_id)
    with pytest.raises(RateLimited):
        await store.acquire_session("acme", "s-next")
    # Reusing an ended session's id is a new start too.
    with pytest.raises(RateLimited):
        await store.acquire_session("acme", admitted[0])


async def test_rate_window_slides(store: TenancyStore) -> None:
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=100, sessions_per_minute=2))
    await store.acquire_session("acme", "s1")
    await store.acquire_session("acme", "s2")
    with pytest.raises(RateLimited):
        await store.acquire_session("acme", "s3")
    # Age the recorded starts by 61 s instead of waiting a minute: the window is measured
    # on the Redis clock, which a test cannot advance.
    starts = f"{store.prefix}tenant:acme:session_starts"
    recorded = cast(
        "list[tuple[str, float]]", await store.redis.zrange(starts, 0, -1, withscores=True)
    )
    assert len(recorded) == 2
    await store.redis.zadd(starts, {member: score - 61_000 for member, score in recorded})
    await store.acquire_session("acme", "s3")
    assert len(await store.redis.zrange(starts, 0, -1)) == 1  # the aged starts were dropped


async def test_zero_limits_suspend_a_tenant(store: TenancyStore) -> None:
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=0, sessions_per_minute=10))
    with pytest.raises(ConcurrencyLimitExceeded) as no_sessions:
        await store.acquire_session("acme", "s1")
    assert no_sessions.value.retry_after_s is None
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=10, sessions_per_minute=0))
    with pytest.raises(RateLimited) as no_starts:
        await store.acquire_session("acme", "s1")
    assert no_starts.value.retry_after_s is None
    assert await store.active_sessions("acme") == []


async def test_acquire_is_idempotent_and_release_safe_to_repeat(store: TenancyStore) -> None:
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=1, sessions_per_minute=10))
    await store.acquire_session("acme", "s1")
    await store.acquire_session("acme", "s1")  # a retried request: still one session
    assert await store.active_sessions("acme") == ["s1"]
    assert await store.release_session("acme", "s1")
    assert not await store.release_session("acme", "s1")
    assert await store.owner_of("s1") is None
    assert await store.active_sessions("acme") == []


async def test_sessions_are_isolated_between_tenants(store: TenancyStore) -> None:
    await store.acquire_session("acme", "s1")
    assert await store.owner_of("s1") == "acme"
    await store.require_owner("acme", "s1")

    with pytest.raises(SessionNotFound) as foreign:
        await store.require_owner("globex", "s1")
    with pytest.raises(SessionNotFound) as missing:
        await store.require_owner("globex", "no-such-session")
    # Same wording for another tenant's session as for none: existence is not revealed.
    assert str(foreign.value) == "no session 's1'"
    assert str(missing.value) == "no session 'no-such-session'"

    assert not await store.release_session("globex", "s1")  # cannot end another's session
    assert await store.owner_of("s1") == "acme"
    assert await store.active_sessions("globex") == []
    with pytest.raises(SessionIdInUse):
        await store.acquire_session("globex", "s1")
    with pytest.raises(SessionNotFound):
        await store.renew_session("globex", "s1", lease_s=10)
    with pytest.raises(InvalidInput, match="invalid session id"):
        await store.require_owner("acme", "../s1")


async def test_leases_lapse_unless_renewed(store: TenancyStore) -> None:
    await store.set_limits("acme", TenantLimits(max_concurrent_sessions=2, sessions_per_minute=100))
    await store.acquire_session("acme", "lapses", lease_s=1.0)
    await store.acquire_session("acme", "renewed", lease_s=1.0)
    await store.renew_session("acme", "renewed", lease_s=30)
    with pytest.raises(ConcurrencyLimitExceeded) as full:
        await store.acquire_session("acme", "waits")
    # The earliest lease ends within 1 s, which is when a retry can succeed.
    assert full.value.retry_after_s is not None and 0 < full.value.retry_after_s <= 1.0

    await asyncio.sleep(1.2)
    assert await store.active_sessions("acme") == ["renewed"]
    assert await store.owner_of("lapses") is None
    with pytest.raises(SessionNotFound):
        await store.renew_session("acme", "lapses", lease_s=30)
    await store.acquire_session("acme", "waits")  # the lapsed lease freed its slot
    with pytest.raises(InvalidInput, match="lease"):
        await store.acquire_session("acme", "bad-lease", lease_s=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "grpc_code", "http"),
    [
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
        (ApiKeyNotFound, grpc.StatusCode.NOT_FOUND, 404),
        (SessionNotFound, grpc.StatusCode.NOT_FOUND, 404),
        (SessionIdInUse, grpc.StatusCode.ALREADY_EXISTS, 409),
        (ConcurrencyLimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    ],
)
def test_errors_name_their_transport_statuses(
    error: type[TenancyError], grpc_code: grpc.StatusCode, http: int
) -> None:
    assert grpc.StatusCode[error.grpc_status] is grpc_code
    assert error.http_status == http
    assert not issubclass(error, InvalidInput)  # would be mapped to INVALID_ARGUMENT
    assert issubclass(SessionNotFound, NotFound) and issubclass(RateLimited, LimitExceeded)


# --------------------------------------------------------------------------- CLI


def keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley")
    keys_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


async def run_keys(argv: list[str]) -> int:
    args = keys_parser().parse_args(argv)
    assert args.command == "keys"
    # run() starts its own event loop, so it runs in a thread beside the test's loop.
    return await asyncio.to_thread(keys_cli.run, args)


async def test_keys_cli_end_to_end(
    redis_server: RedisServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = unique_prefix()
    where = ["--redis", redis_server.url, "--prefix", prefix]

    assert await run_keys(["keys", "create", "--tenant", "acme", "--name", "ci bot", *where]) == 0
    created = capsys.readouterr()
    api_key = created.out.strip()
    assert api_key.startswith("pk_") and "\n" not in api_key
    key_id = api_key.split("_")[1]
    assert f"created API key {key_id} for tenant acme" in created.err
    assert "only time" in created.err

    async with TenancyStore.from_url(redis_server.url, prefix=prefix) as store:
        assert await store.authenticate(api_key) == Principal("acme", key_id)

    assert await run_keys(["keys", "list", *where]) == 0
    listing = capsys.readouterr().out
    header, row = listing.splitlines()
    assert header.split()[:3] == ["KEY", "ID", "TENANT"]
    assert row.startswith(key_id) and "acme" in row and "ci bot" in row and "active" in row
    assert api_key not in listing and secret_of(api_key) not in listing

    assert await run_keys(["keys", "list", "--tenant", "globex", *where]) == 0
    assert capsys.readouterr().out.strip() == "no API keys"

    assert await run_keys(["keys", "limits", "--tenant", "acme", *where]) == 0
    assert capsys.readouterr().out.strip() == (
        "tenant acme: max_concurrent_sessions=10 sessions_per_minute=60"
    )
    assert await run_keys(["keys", "limits", "--tenant", "acme", "--per-minute", "5", *where]) == 0
    assert capsys.readouterr().out.strip() == (
        "tenant acme: max_concurrent_sessions=10 sessions_per_minute=5"
    )
    assert (
        await run_keys(["keys", "limits", "--tenant", "acme", "--max-concurrent", "2", *where]) == 0
    )
    assert capsys.readouterr().out.strip() == (
        "tenant acme: max_concurrent_sessions=2 sessions_per_minute=5"
    )

    assert await run_keys(["keys", "revoke", key_id, *where]) == 0
    assert capsys.readouterr().out.strip() == f"revoked API key {key_id} of tenant acme"
    assert await run_keys(["keys", "list", "--tenant", "acme", *where]) == 0
    assert "revoked" in capsys.readouterr().out
    async with TenancyStore.from_url(redis_server.url, prefix=prefix) as store:
        with pytest.raises(Unauthenticated, match="revoked"):
            await store.authenticate(api_key)


async def test_keys_cli_reports_refusals(
    redis_server: RedisServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    where = ["--redis", redis_server.url, "--prefix", unique_prefix()]
    assert await run_keys(["keys", "revoke", "0123456789abcdef", *where]) == 2
    assert "no API key with id 0123456789abcdef" in capsys.readouterr().err
    assert await run_keys(["keys", "create", "--tenant", "Not Valid", *where]) == 2
    assert "invalid tenant" in capsys.readouterr().err
    assert await run_keys(["keys", "limits", "--tenant", "acme", "--per-minute", "-3", *where]) == 2
    assert "sessions_per_minute must be within" in capsys.readouterr().err
    assert await run_keys(["keys", "list", "--redis", "http://example.com"]) == 2
    assert "not a redis://" in capsys.readouterr().err


async def test_keys_cli_reports_an_unreachable_redis_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    assert await run_keys(["keys", "list", "--redis", url]) == 1
    err = capsys.readouterr().err
    assert "parley keys: Redis at redis://:***@127.0.0.1:" in err
    assert "hunter2" not in err
