"""The sessions gateway served on loopback for tests: gRPC and HTTP over one registry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from parley import rpc
from parley.v1 import sessions_pb2_grpc

from services.sessions import http
from services.sessions.registry import SessionRegistry
from services.sessions.servicer import SessionsServicer


@contextlib.asynccontextmanager
async def grpc_gateway(registry: SessionRegistry) -> AsyncIterator[str]:
    """`parley.v1.Sessions` on a free loopback port; yields `127.0.0.1:PORT`."""
    server, port = await rpc.make_server(
        [(sessions_pb2_grpc.add_SessionsServicer_to_server, SessionsServicer(registry))],
        ["parley.v1.Sessions"],
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def http_gateway(registry: SessionRegistry) -> AsyncIterator[str]:
    """The HTTP app (uvicorn) on a free loopback port; yields `http://127.0.0.1:PORT`."""
    server = uvicorn.Server(http.server_config(http.create_app(registry), port=0))
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving
