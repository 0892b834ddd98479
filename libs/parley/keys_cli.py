"""`parley keys`: API keys and per-tenant session limits, kept in Redis."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisError

from parley.errors import InvalidInput
from parley.tenancy import DEFAULT_PREFIX, ApiKeyInfo, TenancyError, TenancyStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the `keys` command to a `parley` subparsers object; `run` executes it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help=f"Redis to use (default: $PARLEY_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    common.add_argument(
        "--prefix",
        default=None,
        help=f"prefix of every Redis key (default: $PARLEY_REDIS_PREFIX, else {DEFAULT_PREFIX!r})",
    )

    keys = subparsers.add_parser("keys", help="API keys and per-tenant session limits")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser(
        "create", parents=[common], help="create an API key (the key is printed only once)"
    )
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="", help="who or what uses the key")

    listing = keys_sub.add_parser("list", parents=[common], help="API keys, without secrets")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")

    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke an API key for good")
    revoke.add_argument("key_id", metavar="KEY_ID")

    limits = keys_sub.add_parser(
        "limits", parents=[common], help="show a tenant's limits, or set those given"
    )
    limits.add_argument("--tenant", required=True)
    limits.add_argument("--max-concurrent", type=int, default=None, metavar="N")
    limits.add_argument("--per-minute", type=int, default=None, metavar="N",
                        help="new sessions per minute")  # fmt: skip
    return keys


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `keys` command; 0 on success, 2 for a refused request, 1 if Redis fails."""
    url = args.redis or os.environ.get("PARLEY_REDIS_URL") or DEFAULT_REDIS_URL
    prefix = args.prefix if args.prefix is not None else os.environ.get("PARLEY_REDIS_PREFIX")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        print(f"parley keys: --redis {_without_password(url)!r} is not a redis://, rediss:// "
              "or unix:// URL", file=sys.stderr)  # fmt: skip
        return 2
    try:
        asyncio.run(_run(args, url, DEFAULT_PREFIX if prefix is None else prefix))
    except (InvalidInput, TenancyError) as exc:
        print(f"parley keys: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"parley keys: Redis at {_without_password(url)}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run(args: argparse.Namespace, url: str, prefix: str) -> None:
    async with TenancyStore.from_url(url, prefix=prefix) as store:
        if args.keys_command == "create":
            key_id, api_key = await store.create_key(args.tenant, name=args.name)
            print(api_key, flush=True)
            print(
                f"created API key {key_id} for tenant {args.tenant}; "
                "this is the only time it is shown, store it now",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            print(_key_table(await store.list_keys(args.tenant)))
        elif args.keys_command == "revoke":
            tenant = await store.revoke(args.key_id)
            print(f"revoked API key {args.key_id} of tenant {tenant}")
        elif args.keys_command == "limits":
            limits = await store.get_limits(args.tenant)
            if args.max_concurrent is not None or args.per_minute is not None:
                limits = dataclasses.replace(
                    limits,
                    max_concurrent_sessions=limits.max_concurrent_sessions
                    if args.max_concurrent is None
                    else args.max_concurrent,
                    sessions_per_minute=limits.sessions_per_minute
                    if args.per_minute is None
                    else args.per_minute,
                )
                await store.set_limits(args.tenant, limits)
            print(
                f"tenant {args.tenant}: max_concurrent_sessions={limits.max_concurrent_sessions}"
                f" sessions_per_minute={limits.sessions_per_minute}"
            )
        else:
            raise InvalidInput(f"unknown keys command {args.keys_command!r}")


def _key_table(keys: list[ApiKeyInfo]) -> str:
    if not keys:
        return "no API keys"
    rows = [("KEY ID", "TENANT", "NAME", "CREATED (UTC)", "LAST USED (UTC)", "STATUS")]
    rows += [
        (
            k.key_id,
            k.tenant,
            k.name or "-",
            _utc(k.created_at),
            _utc(k.last_used_at),
            f"revoked {_utc(k.revoked_at)}" if k.revoked else "active",
        )
        for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _without_password(url: str) -> str:
    # Error messages end up in logs; a Redis URL may carry credentials.
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
