"""`parley serve` as a user runs it: starts, prints its addresses, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed")

from parley.v1 import tts_pb2, tts_pb2_grpc
from redis_support import free_port

PARLEY = Path(sys.executable).with_name("parley")
START_TIMEOUT_S = 180.0


def test_parley_serve_starts_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(PARLEY), "serve", "--apps", "tts",
             "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ctrl-C stops." not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        assert process.poll() is None, text
        started = re.search(r"serving tts in ([0-9.]+) s, ([0-9]+) MB", text)
        assert started and float(started[1]) > 0 and int(started[2]) > 100, text
        assert f"gRPC  127.0.0.1:{grpc_port}" in text and f"http://127.0.0.1:{http_port}" in text
        children = psutil.Process(process.pid).children(recursive=True)
        assert children  # the local Ray cluster

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = tts_pb2_grpc.TtsStub(channel)
            requests = [
                tts_pb2.TtsRequest(config=tts_pb2.TtsConfig()),
                tts_pb2.TtsRequest(text="Hello there."),
                tts_pb2.TtsRequest(flush=tts_pb2.FlushText()),
            ]
            events = list(stub.Synthesize(iter(requests), metadata=(("application", "tts"),)))
        assert any(ev.WhichOneof("event") == "speech" for ev in events)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert "parley: stopping" in log.read_text()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.name() for p in alive]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_parley_serve_refuses_an_unreachable_redis_before_starting(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = subprocess.run(
        [str(PARLEY), "serve", "--redis-url", dead, "--grpc-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"cannot reach the sessions gateway's Redis at {dead}" in done.stderr
    assert "Traceback" not in done.stderr
