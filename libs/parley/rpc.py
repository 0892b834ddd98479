"""gRPC plumbing shared by the servicers: error mapping and a loopback server helper."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parley import metrics
from parley.errors import InvalidInput, ModelUnavailable, RequestRefused

T = TypeVar("T")

#: Largest message a Parley server accepts (audio chunks are bounded well below this).
MAX_MESSAGE_BYTES = 4 << 20


#: The errors a handler may raise for the caller to see, each mapped to a status.
MAPPED_ERRORS = (InvalidInput, ModelUnavailable, RequestRefused)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ModelUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, RequestRefused):
        return getattr(grpc.StatusCode, exc.grpc_status, grpc.StatusCode.UNKNOWN), str(exc)
    return grpc.StatusCode.UNKNOWN, str(exc)


def _trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """`retry-after` (whole seconds) when the error knows when a retry can succeed."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if isinstance(retry_after_s, int | float) and retry_after_s > 0:
        return (("retry-after", str(math.ceil(retry_after_s))),)
    return ()


async def abort_with(exc: BaseException, context: grpc.aio.ServicerContext, service: str) -> None:
    """End the call with the status of a `MAPPED_ERRORS` error (counted per service)."""
    metrics.INPUT_ERRORS.labels(service).inc()
    code, msg = _status_for(exc)
    await context.abort(code, msg, _trailers_for(exc))


def unary(service: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Map Parley errors raised by a unary handler to gRPC statuses."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            try:
                return await fn(self, request, context)
            except MAPPED_ERRORS as exc:
                await abort_with(exc, context, service)
                raise  # unreachable: abort raises

        return handler

    return wrap


def streaming(
    service: str,
) -> Callable[[Callable[..., AsyncIterator[T]]], Callable[..., AsyncIterator[T]]]:
    """Map Parley errors raised by a server-streaming handler to gRPC statuses."""

    def wrap(fn: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(fn)
        async def handler(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[T]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except MAPPED_ERRORS as exc:
                await abort_with(exc, context, service)

        return handler

    return wrap


_END = object()


async def relay(
    produce: Callable[[Callable[[T], None]], Awaitable[None]],
) -> AsyncGenerator[T, None]:
    """Run `produce(emit)` as a task and yield what it emits, in order, until it returns.

    Bidirectional handlers read their request stream inside `produce` while results
    flow out here; an error raised by `produce` (say, a client's bad message) is
    re-raised after what was emitted before it, so the stream ends with its status.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def run() -> None:
        try:
            await produce(queue.put_nowait)
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        while (item := await queue.get()) is not _END:
            yield item
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def forward_while(events: asyncio.Queue[T], read: Awaitable[None]) -> AsyncGenerator[T, None]:
    """Yield what a stream engine queues in `events` while `read` consumes the requests.

    Once `read` returns (the client half-closed and the engine finished), the
    events still queued follow; if it raises, the stream ends with that error.
    """

    async def produce(emit: Callable[[T], None]) -> None:
        async def forward() -> None:
            while True:
                emit(await events.get())

        forwarder = asyncio.create_task(forward())
        try:
            await read
        finally:
            forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forwarder
        while not events.empty():
            emit(events.get_nowait())

    async for item in relay(produce):
        yield item


async def make_server(
    add_servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any]],
    service_names: list[str],
    address: str = "127.0.0.1:0",
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with health checking and reflection; returns it and its bound port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    for add, servicer in add_servicers:
        add(servicer, server)
    health_servicer = grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    return server, port
