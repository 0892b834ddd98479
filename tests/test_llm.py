"""LLM engine on the bundled SmolLM2 GGUF, and its gRPC servicer on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from parley import rpc
from parley.errors import InvalidInput
from parley.v1 import llm_pb2, llm_pb2_grpc

from services.llm.backends.llama_cpp import bundled_model_path
from services.llm.config import LlmConfig
from services.llm.engine import ChatMessage, GenerationStats, LlmEngine
from services.llm.servicer import LlmServicer

PERSONA = ChatMessage("system", "You are a helpful assistant. Answer in one short sentence.")


async def collect(
    engine: LlmEngine, messages: list[ChatMessage], **kw: object
) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    parts = [p async for p in engine.generate(messages, stats=stats, **kw)]  # type: ignore[arg-type]
    return "".join(parts), stats


async def test_answers_a_factual_question(llm_engine: LlmEngine) -> None:
    text, stats = await collect(
        llm_engine, [PERSONA, ChatMessage("user", "What is the capital of France?")]
    )
    assert "paris" in text.lower()
    assert stats.finish_reason in ("stop", "length")
    assert stats.completion_tokens > 0 and stats.time_to_first_token_s > 0


async def test_second_turn_reuses_the_cached_prefix(llm_engine: LlmEngine) -> None:
    history = [PERSONA, ChatMessage("user", "Name a color.")]
    first, _ = await collect(llm_engine, history)
    history += [ChatMessage("assistant", first), ChatMessage("user", "Name another one.")]
    _, stats = await collect(llm_engine, history)
    # Everything up to the new user message was already in the KV cache.
    assert stats.cached_tokens >= stats.prompt_tokens - 20
    assert stats.cached_tokens > 20


async def test_cancellation_stops_generation_and_frees_the_model(llm_engine: LlmEngine) -> None:
    msgs = [PERSONA, ChatMessage("user", "Count from one to one hundred, in words.")]
    stats = GenerationStats()
    got: list[str] = []
    three_pieces = asyncio.Event()

    async def consume() -> None:
        async for piece in llm_engine.generate(msgs, max_tokens=400, stats=stats):
            got.append(piece)
            if len(got) == 3:
                three_pieces.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(three_pieces.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stats.finish_reason == "cancelled"
    # The model is usable again at once.
    text, _ = await collect(llm_engine, [PERSONA, ChatMessage("user", "Say hello.")], max_tokens=8)
    assert text.strip()
    assert stats.completion_tokens < 400


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "at least one message"),
        ([ChatMessage("robot", "hi")], "role must be"),
        (
            [ChatMessage("user", "hi"), ChatMessage("system", "x")],
            "system message may only come first",
        ),
        ([ChatMessage("user", "x" * 20_000)], "limit"),
        ([ChatMessage("assistant", "hi")], "last message must come from the user"),
    ],
)
async def test_bad_requests_are_rejected(
    llm_engine: LlmEngine, messages: list[ChatMessage], fragment: str
) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        await collect(llm_engine, messages)


async def test_grpc_generate_streams_and_rejects_bad_input(llm_engine: LlmEngine) -> None:
    server, port = await rpc.make_server(
        [(llm_pb2_grpc.add_LlmServicer_to_server, LlmServicer(llm_engine))], ["parley.v1.Llm"]
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = llm_pb2_grpc.LlmStub(channel)
            request = llm_pb2.GenerateRequest(
                messages=[
                    llm_pb2.ChatMessage(role="system", content=PERSONA.content),
                    llm_pb2.ChatMessage(role="user", content="What is two plus two?"),
                ],
                max_tokens=20,
            )
            events = [e async for e in stub.Generate(request)]
            text = "".join(e.text for e in events if e.WhichOneof("event") == "text")
            assert text.strip()
            assert events[-1].done.completion_tokens > 0
            bad = llm_pb2.GenerateRequest(
                messages=[llm_pb2.ChatMessage(role="nobody", content="hi")]
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [e async for e in stub.Generate(bad)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "role must be" in (err.value.details() or "")
    finally:
        await server.stop(None)


async def test_prefill_reads_the_persona_ahead_of_the_first_turn(llm_engine: LlmEngine) -> None:
    persona = ChatMessage("system", "You are Bo, a terse ship's cook. Answer in five words.")
    tokens = await llm_engine.prefill([persona])
    assert tokens > 10
    # Another session in between: the persona must come back from the RAM cache.
    await collect(llm_engine, [PERSONA, ChatMessage("user", "Hello!")])
    _, stats = await collect(llm_engine, [persona, ChatMessage("user", "What is for dinner?")])
    assert stats.cached_tokens >= tokens, (stats.cached_tokens, tokens)
    with pytest.raises(InvalidInput, match="system message"):
        await llm_engine.prefill([ChatMessage("user", "hi")])


async def test_prefill_reads_the_history_while_the_user_talks(llm_engine: LlmEngine) -> None:
    """After a reply, the next turn's prompt up to the user's words is read ahead."""
    persona = ChatMessage("system", "You are Kit, a park ranger. Answer briefly.")
    history = [
        ChatMessage("user", "Which trail is the easiest one for children?"),
        ChatMessage("assistant", "The lakeside loop: flat, shaded and two miles long."),
    ]
    tokens = await llm_engine.prefill([persona, *history])
    # Another session uses the model meanwhile; the prefix comes back from a snapshot.
    await collect(llm_engine, [PERSONA, ChatMessage("user", "Good morning!")])
    _, stats = await collect(
        llm_engine, [persona, *history, ChatMessage("user", "Are dogs allowed there?")]
    )
    assert stats.cached_tokens >= tokens > 30
    assert stats.prompt_tokens - stats.cached_tokens < 20  # only the new words were read
    # A prefix already held is not read again.
    assert await llm_engine.prefill([persona, *history]) == tokens


async def test_prefill_reply_reads_the_whole_prompt_for_a_speculative_reply(
    llm_engine: LlmEngine,
) -> None:
    """Speculation reads the user's words ahead (while they talk, then at the pause):
    the reply then reads no prompt at all, and answers the words it was given."""
    persona = PERSONA
    turn = [persona, ChatMessage("user", "What is the capital of France?")]
    other = ChatMessage("system", "You are Mo, a train conductor. Answer briefly.")
    await collect(llm_engine, [other, ChatMessage("user", "Hi there.")])  # another session
    so_far = await llm_engine.prefill_reply(
        [persona, ChatMessage("user", "What is the capital")], words_only=True
    )
    tokens = await llm_engine.prefill_reply(turn)
    assert 20 < so_far < tokens < so_far + 12  # the pause only added its last words
    text, stats = await collect(llm_engine, turn)
    assert stats.prompt_tokens == stats.cached_tokens == tokens
    assert "paris" in text.lower(), text
    # The turn ended on other words than the speculation's: the reply reads only what
    # differs, and answers the words it was given (not the speculation's).
    await llm_engine.prefill_reply([persona, ChatMessage("user", "What is the capital of Spain?")])
    text, stats = await collect(llm_engine, turn)
    assert stats.prompt_tokens - stats.cached_tokens < 10
    assert "paris" in text.lower() and "madrid" not in text.lower(), text
    with pytest.raises(InvalidInput, match="user's words"):
        await llm_engine.prefill_reply([persona])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real llama.cpp OpenAI-compatible server (llama_cpp.server) on loopback."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("llama_server") / "server.log").open("w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
         "--model_alias", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited: {log.read()[-2000:]!r}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def test_openai_backend_streams_from_a_real_server(llama_server: str) -> None:
    engine = LlmEngine(LlmConfig(backend="openai", url=llama_server, temperature=0.0))
    await engine.start()  # finds the model name and warms up
    try:
        text, stats = await collect(
            engine, [PERSONA, ChatMessage("user", "What is the capital of France?")]
        )
        assert "paris" in text.lower(), text
        assert stats.completion_tokens > 0  # prompt usage: only servers that send it
        assert stats.finish_reason in ("stop", "length")
        # Cancellation closes the HTTP stream; the server serves the next request.
        gen = engine.generate([PERSONA, ChatMessage("user", "Count from one to fifty.")])
        first = await anext(gen)
        await gen.aclose()
        assert first
        text, _ = await collect(engine, [PERSONA, ChatMessage("user", "Say hello.")])
        assert text.strip()
    finally:
        await engine.close()


async def test_openai_backend_reports_an_unreachable_server() -> None:
    from parley.errors import ModelUnavailable

    engine = LlmEngine(LlmConfig(backend="openai", url=f"http://127.0.0.1:{_free_port()}/v1"))
    with pytest.raises(ModelUnavailable, match="failed"):
        await engine.start()
    await engine.close()
