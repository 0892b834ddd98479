"""`parley.client` and `parley talk` against a real sessions server: gRPC on loopback, API
keys in a real Redis, real models for the spoken turns."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from gateway_support import grpc_gateway
from parley import clock, talk_cli
from parley.audio import resample, write_wav
from parley.client import (
    AuthenticationError,
    AvatarSpeech,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    ParleyClient,
    ResourceExhaustedError,
    UnavailableError,
    collect,
    parse_target,
)
from parley.errors import InvalidInput
from parley.tenancy import TenancyStore, TenantLimits
from parley.visemes import VISEMES, Phoneme
from redis_support import RedisServer, free_port, redis_server  # noqa: F401  (a fixture)

from loadtest.replay import word_error_rate
from services.sessions.conversation import Engines
from services.sessions.registry import SessionRegistry
from services.tts.engine import TtsEngine

SR = 16_000
AVATAR_RATE = 24_000
PERSONA = "You answer in one short sentence."


@pytest.fixture(scope="module")
async def store(redis_server: RedisServer) -> AsyncIterator[TenancyStore]:  # noqa: F811
    async with TenancyStore.from_url(
        redis_server.url, prefix=f"test-client-{uuid.uuid4().hex[:8]}:"
    ) as opened:
        yield opened


@pytest.fixture(scope="module")
async def target(engines: Engines, store: TenancyStore) -> AsyncIterator[str]:
    """`grpc://127.0.0.1:PORT` of a sessions server with API keys."""
    registry = SessionRegistry(engines, store)
    async with grpc_gateway(registry) as address:
        yield f"grpc://{address}"
    await registry.close()


async def new_tenant(store: TenancyStore, limits: TenantLimits | None = None) -> tuple[str, str]:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    _, api_key = await store.create_key(tenant, name="test-client", limits=limits)
    return tenant, api_key


async def user_says(tts: TtsEngine, text: str) -> np.ndarray:
    speech = await tts.synthesize(text)
    return resample(speech.samples, speech.sample_rate, SR)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


async def run_talk(*args: str, api_key: str | None = None) -> tuple[int, str, str]:
    """`parley talk ARGS` in its own process (as a user runs it): exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("PARLEY_API_KEY", "PARLEY_TARGET")}
    if api_key is not None:
        env["PARLEY_API_KEY"] = api_key
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "parley.talk_cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_targets() -> None:
    assert parse_target("grpc://127.0.0.1:9000") == ("127.0.0.1:9000", False)
    assert parse_target("127.0.0.1:9000") == ("127.0.0.1:9000", False)
    assert parse_target("grpcs://parley.example.com:443/") == ("parley.example.com:443", True)
    assert parse_target("[::1]:50051") == ("[::1]:50051", False)
    assert parse_target("unix:/run/parley.sock") == ("unix:/run/parley.sock", False)
    for bad in ("http://127.0.0.1:9000", "127.0.0.1", "grpc://host:0", "host:70000", ""):
        with pytest.raises(InvalidInput, match="target"):
            parse_target(bad)


async def test_a_spoken_turn_and_the_session_lifecycle(
    target: str, store: TenancyStore, tts_engine: TtsEngine
) -> None:
    tenant, api_key = await new_tenant(store)
    question = "What is the capital of France?"
    audio = np.concatenate([silence(0.25), await user_says(tts_engine, question), silence(2.0)])

    async def microphone() -> AsyncIterator[np.ndarray]:
        # Uneven chunks, some int16 like a sound card's, some longer than a frame.
        for k, i in enumerate(range(0, len(audio), 1234)):
            chunk = audio[i : i + 1234]
            yield (chunk * 32767).astype(np.int16) if k % 2 else chunk

    async with ParleyClient(target, api_key) as client:
        session = await client.create_session(persona_prompt=PERSONA)
        assert session.active and session.persona_prompt == PERSONA
        assert session.avatar_id == "default" and session.ended_at is None
        assert (await client.get_session(session.session_id)) == session
        assert [s.session_id for s in await client.list_sessions()] == [session.session_id]

        started = clock.now()
        reply = await collect(client.converse(session.session_id, microphone()))
        assert clock.now() - started >= len(audio) / SR - 0.05  # sent in real time

        [heard] = reply.user_finals
        wer = word_error_rate(question, heard)
        assert wer is not None and wer <= 0.2, heard
        assert reply.avatar_text.strip()
        assert reply.speech and all(isinstance(s, AvatarSpeech) for s in reply.speech)
        position = reply.speech[0].start_sample
        for piece in reply.speech:
            assert piece.sample_rate == AVATAR_RATE and piece.samples.dtype == np.float32
            assert piece.start_sample == position  # one contiguous stream
            position += len(piece.samples)
        voice, rate = reply.avatar_audio()
        assert rate == AVATAR_RATE and len(voice) > 0.3 * AVATAR_RATE
        assert np.abs(voice).max() > 0.05  # audible
        phonemes = [p for s in reply.speech for p in s.phonemes]
        assert phonemes and all(isinstance(p, Phoneme) and p.viseme in VISEMES for p in phonemes)
        [latency] = reply.latencies
        assert latency.end_of_turn_s is not None and latency.first_output_s is not None
        # A speculative reply may generate while the detector waits out the pause: its
        # first token can come before the end of turn, its first audio out cannot.
        assert 0 < latency.end_of_turn_s <= latency.first_output_s
        assert (
            0
            < (latency.llm_first_token_s or 0)
            <= (latency.tts_first_audio_s or 0)
            <= latency.first_output_s
        )
        assert latency.first_frame_s is None  # no renderer here

        assert (await client.get_session(session.session_id)).turns == 1
        ended = await client.end_session(session.session_id)
        assert ended.state == "ended" and ended.ended_at is not None
        assert ended.ended_at >= ended.created_at
        assert (await client.end_session(session.session_id)).state == "ended"  # repeatable
        assert await store.active_sessions(tenant) == []
        with pytest.raises(ConflictError, match="has ended") as err:
            await collect(client.converse(session.session_id, silence(0.1), realtime=False))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_errors_keep_the_status_and_the_server_message(
    target: str, store: TenancyStore
) -> None:
    for api_key, message in ((None, "missing API key"), ("pk_nope", "malformed API key")):
        async with ParleyClient(target, api_key) as client:
            with pytest.raises(AuthenticationError) as auth:
                await client.create_session()
            assert auth.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert message in auth.value.details and str(auth.value).startswith("UNAUTHENTICATED")
            with pytest.raises(AuthenticationError):
                await collect(client.converse("whatever", silence(0.1), realtime=False))

    _, api_key = await new_tenant(
        store, TenantLimits(max_concurrent_sessions=5, sessions_per_minute=1)
    )
    async with ParleyClient(target.removeprefix("grpc://"), api_key) as client:  # host:port
        with pytest.raises(NotFoundError) as missing:
            await client.get_session("nope")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and "nope" in missing.value.details
        with pytest.raises(NotFoundError):
            await collect(client.converse("nope", silence(0.1), realtime=False))
        with pytest.raises(InvalidArgumentError, match="unknown voice"):
            await client.create_session(voice="someone-else")
        await client.create_session()
        with pytest.raises(ResourceExhaustedError, match="per minute") as limited:
            await client.create_session()
        assert limited.value.retry_after_s is not None and 1 <= limited.value.retry_after_s <= 60

    async with ParleyClient(f"127.0.0.1:{free_port()}", api_key) as nobody:
        with pytest.raises(UnavailableError) as unreachable:
            await nobody.list_sessions()
        assert unreachable.value.code == grpc.StatusCode.UNAVAILABLE


async def test_streams_are_paced_cancellable_and_checked(target: str, store: TenancyStore) -> None:
    _, api_key = await new_tenant(store)
    async with ParleyClient(target, api_key) as client:
        sid = (await client.create_session()).session_id

        started = clock.now()
        await collect(client.converse(sid, silence(1.0)))
        assert clock.now() - started >= 0.98  # 50 frames of 20 ms, in real time
        started = clock.now()
        await collect(client.converse(sid, silence(1.0), realtime=False))
        assert clock.now() - started < 0.9

        # Audio of the wrong shape fails on this side, and the call is cancelled.
        with pytest.raises(InvalidInput, match="1-D"):
            await collect(client.converse(sid, np.zeros((320, 2), np.float32)))

        async def once_free(call: Callable[[], Awaitable[object]]) -> None:
            """`call` as soon as the server has noticed the previous stream's cancel."""
            deadline = clock.now() + 3.0
            while True:
                try:
                    await call()
                    return
                except ConflictError:  # the server has not noticed the cancel yet
                    assert clock.now() < deadline, "the cancelled stream still holds the session"
                    await asyncio.sleep(0.05)

        # A stream given up on (here by a timeout) is cancelled: the session takes a new one.
        with pytest.raises(TimeoutError):
            await once_free(
                lambda: asyncio.wait_for(collect(client.converse(sid, silence(30.0))), 0.5)
            )
        await once_free(lambda: collect(client.converse(sid, silence(0.1), realtime=False)))
        assert (await client.get_session(sid)).active
        await client.end_session(sid)


async def test_talk_speaks_a_wav_and_writes_the_reply(
    target: str, store: TenancyStore, tts_engine: TtsEngine, tmp_path: Path
) -> None:
    tenant, api_key = await new_tenant(store)
    question = "What is the capital of France?"
    speech = await user_says(tts_engine, question)
    # A 44.1 kHz stereo file: talk converts it.
    stereo = resample(speech, SR, 44_100)
    wav = tmp_path / "question.wav"
    sf.write(str(wav), np.stack([stereo, 0.5 * stereo], axis=1), 44_100, subtype="PCM_16")
    out, report = tmp_path / "reply.wav", tmp_path / "out" / "talk.json"

    code, stdout, stderr = await run_talk(
        "--wav", str(wav), "--target", target, "--persona", PERSONA,
        "--out", str(out), "--json", str(report),
        api_key=api_key,
    )  # fmt: skip
    assert code == 0, stderr
    assert "you:" in stdout and "avatar:" in stdout and "end of turn" in stdout, stdout
    info = sf.info(str(out))
    assert info.samplerate == AVATAR_RATE and info.channels == 1 and info.duration > 0.3

    result = json.loads(report.read_text())
    assert result["reply_wav"] == str(out) and result["target"] == target
    assert abs(result["input"]["seconds"] - len(speech) / SR) < 0.01
    [turn] = result["turns"]
    wer = word_error_rate(question, turn["user"])
    assert wer is not None and wer <= 0.2, turn
    assert turn["avatar"] and turn["avatar"] in stdout
    assert abs(turn["avatar_audio_s"] - info.duration) < 0.01
    assert 0 < turn["latency"]["end_of_turn_s"] <= turn["latency"]["first_output_s"]
    # The session was ended, its slot freed.
    assert await store.active_sessions(tenant) == []
    async with ParleyClient(target, api_key) as client:
        [session] = await client.list_sessions()
    assert session.session_id == result["session_id"] and session.state == "ended"


async def test_talk_refuses_bad_input_keys_and_servers(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    talk_cli.add_arguments(parser)

    def talk(*args: str) -> tuple[int, str]:
        # These fail before any connection is made (no event loop is started).
        code = talk_cli.run(parser.parse_args(["--target", target, *args]))
        return code, capsys.readouterr().err

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32), SR)
    for args, message in [
        (["--wav", str(tmp_path / "missing.wav")], "no such file"),
        (["--wav", str(tmp_path)], "not a file"),
        (["--wav", str(not_audio)], "cannot read audio file"),
        (["--wav", str(empty)], "holds no samples"),
        (["--wav", str(empty), "--target", "http://127.0.0.1:1"], "grpc://host:port"),
    ]:
        code, err = talk(*args)
        assert code == 2 and err.startswith("parley talk: ") and message in err, (args, err)

    wav = tmp_path / "hello.wav"
    write_wav(wav, np.zeros(SR // 2, np.float32), SR)
    (bad_key, _, key_err), (no_server, _, server_err) = await asyncio.gather(
        run_talk("--wav", str(wav), "--target", target, "--key", "pk_nope"),
        run_talk("--wav", str(wav), "--target", f"127.0.0.1:{free_port()}", api_key="pk_x"),
    )
    assert bad_key == 2 and "refused the API key" in key_err and "UNAUTHENTICATED" in key_err
    assert no_server == 2 and "cannot reach a Parley server" in server_err, server_err


async def test_a_stream_refused_mid_write_keeps_the_servers_status(
    target: str, store: TenancyStore
) -> None:
    # When the server ends the call while a write is in flight, grpc.aio reports INTERNAL
    # "Internal error from Core"; the client must still raise the server's own status.
    _, api_key = await new_tenant(store)
    async with ParleyClient(target, api_key) as client:
        for _ in range(20):
            with pytest.raises(NotFoundError) as err:
                await collect(client.converse("nope", silence(1.0), realtime=False))
            assert err.value.details == "no session 'nope'"
