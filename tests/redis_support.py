"""A real, throwaway redis-server for tests: its own free port and directory, no persistence.

A test module gets one server for the whole test session with::

    from redis_support import RedisServer, redis_server  # noqa: F401  (a fixture)

or starts one itself with `running_redis_server(directory)`. Tests sharing a server keep
apart by giving their stores distinct key prefixes.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

STARTUP_TIMEOUT_S = 10.0
# Another process can take the free port between our probe and redis-server's bind.
PORT_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class RedisServer:
    host: str
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def running_redis_server(directory: Path) -> Iterator[RedisServer]:
    """Start redis-server on a free loopback port with its files in `directory`; stop it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed (Debian package redis-server; `make install` as root adds it)"
        )
    host = "127.0.0.1"
    log = directory / "redis.log"
    for _ in range(PORT_ATTEMPTS):
        port = free_port(host)
        process = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", host,
                "--dir", str(directory),
                "--logfile", str(log),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if _wait_until_ready(process, host, port):
                yield RedisServer(host=host, port=port, directory=directory)
                return
        finally:
            _stop(process)
    raise RuntimeError(
        f"redis-server did not start after {PORT_ATTEMPTS} attempts; its log: {log.read_text()[-2000:]}"
        if log.exists()
        else f"redis-server did not start after {PORT_ATTEMPTS} attempts"
    )


def _wait_until_ready(process: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """True once the server answers PING; False if it exited (port taken). Raises on timeout."""
    client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.02)
    finally:
        client.close()
    raise RuntimeError(f"redis-server on port {port} did not answer within {STARTUP_TIMEOUT_S} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server
