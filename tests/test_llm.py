"""LLM engine on the bundled SmolLM2 GGUF, and its gRPC servicer on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from parley import rpc
from parley.errors import InvalidInput
from parley.v1 import llm_pb2, llm_pb2_grpc

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
