"""Production backend: any OpenAI-compatible streaming server (vLLM, llama.cpp server, ...).

Prefix caching is the server's job (vLLM: --enable-prefix-caching); closing the
stream closes the HTTP connection, which aborts the request on the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley.errors import InvalidInput, ModelUnavailable

from services.llm.config import LlmConfig
from services.llm.engine import ChatMessage, GenerationParams, GenerationStats


class OpenAICompatBackend:
    name = "openai"

    def __init__(self, config: LlmConfig) -> None:
        if not config.url:
            raise InvalidInput("llm.url must name the server's base URL, e.g. http://host:8000/v1")
        self.config = config
        self._client: Any = None
        self._model = config.model_name

    async def start(self) -> None:
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=self.config.url,
            api_key=self.config.api_key,
            timeout=self.config.request_timeout_s,
            max_retries=0,
        )
        try:
            if not self._model:
                models = await self._client.models.list()
                if not models.data:
                    raise ModelUnavailable(f"{self.config.url} serves no models")
                self._model = models.data[0].id
            # Warm-up: also primes the server's prefix cache path.
            warm = GenerationStats()
            async for _ in self.generate(
                [ChatMessage("user", "Hi")], GenerationParams(2, 0.0), warm
            ):
                pass
        except openai.APIError as exc:
            raise ModelUnavailable(f"LLM server {self.config.url} failed: {exc}") from exc

    async def generate(
        self, messages: list[ChatMessage], params: GenerationParams, stats: GenerationStats
    ) -> AsyncIterator[str]:
        import openai

        if self._client is None:
            raise ModelUnavailable("LLM backend not started")
        if any(m.image for m in messages):
            raise InvalidInput("image input is not supported by the OpenAI-compatible backend yet")
        try:
            stream = await self._client.chat.completions.create(
                model=self._model,
                messages=[{"role": m.role, "content": m.content} for m in messages],
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=self.config.top_p,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.APIError as exc:
            raise ModelUnavailable(f"LLM server {self.config.url} failed: {exc}") from exc
        deltas = 0
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    stats.prompt_tokens = chunk.usage.prompt_tokens
                    stats.completion_tokens = chunk.usage.completion_tokens
                    details = getattr(chunk.usage, "prompt_tokens_details", None)
                    stats.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    stats.finish_reason = choice.finish_reason
                if choice.delta and choice.delta.content:
                    deltas += 1
                    yield choice.delta.content
        finally:
            await stream.close()
            # Servers that ignore stream_options (llama.cpp's Python server) send no usage;
            # they stream one token per delta.
            stats.completion_tokens = stats.completion_tokens or deltas

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
