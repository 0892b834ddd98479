"""LLM engine: validates requests, streams text from a backend, measures TTFT.

Plain async Python; the gRPC servicer and the conversation engine both use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from parley import clock, metrics
from parley.errors import InvalidInput

from services.llm.config import LlmConfig

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    image: bytes = b""


@dataclass(slots=True)
class GenerationParams:
    max_tokens: int
    temperature: float


@dataclass(slots=True)
class GenerationStats:
    """Filled in while a generation runs; final once the stream ends."""

    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token_s: float = 0.0
    started_at: float = field(default_factory=clock.now)


class LlmBackend(Protocol):
    """What every LLM backend implements (see backends/)."""

    name: str

    async def start(self) -> None:
        """Load or connect, then warm up so the first real request is fast."""

    def generate(
        self, messages: list[ChatMessage], params: GenerationParams, stats: GenerationStats
    ) -> AsyncIterator[str]:
        """Stream reply text. Closing the iterator cancels the generation."""
        ...

    async def close(self) -> None: ...


def validate_messages(messages: list[ChatMessage], max_chars: int) -> None:
    if not messages:
        raise InvalidInput("a generation request needs at least one message")
    total = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidInput(f"message {i}: role must be one of {ROLES}, got {m.role!r}")
        if m.role == "system" and i != 0:
            raise InvalidInput(f"message {i}: a system message may only come first")
        total += len(m.content)
    if messages[-1].role != "user":
        raise InvalidInput("the last message must come from the user")
    if total > max_chars:
        raise InvalidInput(f"messages hold {total} characters; the limit is {max_chars}")


def make_backend(config: LlmConfig) -> LlmBackend:
    if config.backend == "llama_cpp":
        from services.llm.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(config)
    if config.backend == "openai":
        from services.llm.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(config)
    from services.llm.backends.triton import TritonBackend

    return TritonBackend(config)


class LlmEngine:
    """One per process; serves many concurrent sessions through one backend."""

    def __init__(self, config: LlmConfig | None = None, backend: LlmBackend | None = None):
        self.config = config or LlmConfig()
        self.backend = backend or make_backend(self.config)
        # A stage replica behind the backend records its own metrics (not twice).
        self._own_metrics = not getattr(self.backend, "remote", False)

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        await self.backend.close()

    async def prefill(self, messages: list[ChatMessage]) -> int:
        """Read a conversation's prompt ahead of its next turn, where the backend can.

        `messages` is the persona (a system message) and the history so far: called
        when a session starts and after each reply, while the user is still talking,
        so the next reply only reads the user's new words. Returns the prefix length
        in tokens. Remote servers (vLLM, llama.cpp server) cache prefixes on their
        own; this returns 0 for them.
        """
        if not messages or messages[0].role != "system":
            raise InvalidInput("prefill takes the conversation from its system message on")
        validate_messages([*messages, ChatMessage("user", "")], self.config.max_prompt_chars)
        return await self._read_ahead("prefill", messages)

    async def prefill_reply(self, messages: list[ChatMessage], *, words_only: bool = False) -> int:
        """Read a whole prompt, the user's words included, so that a reply to exactly
        these messages starts at once (speculation: the words of a pause, before the end
        of turn is certain). Returns its length in tokens, 0 where the backend cannot.

        `words_only`: the last message is the user's words *so far* (they are still
        talking): read up to them and no further, so that the pause's prompt only adds
        its last words. Free if the turn ends on other words: the next prompt shares
        its start.
        """
        if not messages or messages[0].role != "system" or messages[-1].role != "user":
            raise InvalidInput("prefill_reply takes a conversation from its system message"
                               " to the user's words")  # fmt: skip
        validate_messages(messages, self.config.max_prompt_chars)
        return await self._read_ahead("prefill_reply", messages, words_only)

    async def _read_ahead(self, method: str, *args: object) -> int:
        """Call the backend's read-ahead `method` if it has one (0 otherwise), timed."""
        read = getattr(self.backend, method, None)
        if read is None:
            return 0
        started = clock.now()
        tokens: int = await read(*args)
        if self._own_metrics:
            metrics.STAGE_LATENCY.labels("llm", "prefill").observe(clock.now() - started)
        return tokens

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        stats: GenerationStats | None = None,
    ) -> AsyncGenerator[str, None]:
        """Stream the reply. Cancel the consuming task (or stop iterating) to stop generation."""
        validate_messages(messages, self.config.max_prompt_chars)
        params = GenerationParams(
            max_tokens=min(max_tokens or self.config.max_tokens, 4096),
            temperature=self.config.temperature if temperature is None else temperature,
        )
        if not 0.0 <= params.temperature <= 2.0:
            raise InvalidInput(f"temperature must be within [0, 2], got {params.temperature}")
        stats = stats if stats is not None else GenerationStats()
        stats.started_at = clock.now()
        first = True
        stream = self.backend.generate(messages, params, stats)
        try:
            async for piece in stream:
                if not piece:
                    continue
                if first:
                    stats.time_to_first_token_s = clock.now() - stats.started_at
                    if self._own_metrics:
                        ttfb = stats.time_to_first_token_s
                        metrics.STAGE_LATENCY.labels("llm", "ttfb").observe(ttfb)
                    first = False
                yield piece
        except (asyncio.CancelledError, GeneratorExit):
            stats.finish_reason = "cancelled"
            raise
        finally:
            await _aclose(stream)
            if self._own_metrics:
                metrics.LLM_TOKENS.labels("prompt").inc(stats.prompt_tokens)
                metrics.LLM_TOKENS.labels("completion").inc(stats.completion_tokens)


async def _aclose(stream: AsyncIterator[str]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
