"""Production backend: a decoupled Triton model (e.g. Triton's vLLM or TensorRT-LLM backend).

Uses the conventions of Triton's vLLM backend: inputs `text_input` (BYTES),
`stream` (BOOL), `sampling_parameters` (JSON BYTES); output `text_output`.
The chat prompt is formatted by the caller-side template of the served model,
so `llm.model_name` must name a model whose template is "chatml" compatible.
Only the request encoding is tested here (no Triton server runs on CPU CI).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from parley.errors import InvalidInput, ModelUnavailable

from services.llm.config import LlmConfig
from services.llm.engine import ChatMessage, GenerationParams, GenerationStats


def chatml_prompt(messages: list[ChatMessage]) -> str:
    parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def build_inputs(prompt: str, params: GenerationParams, top_p: float) -> list[Any]:
    from tritonclient.grpc import InferInput

    sampling = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": top_p}
    values = {
        "text_input": np.array([prompt.encode("utf-8")], dtype=np.object_),
        "stream": np.array([True], dtype=bool),
        "sampling_parameters": np.array([json.dumps(sampling).encode()], dtype=np.object_),
    }
    inputs = []
    for name, value in values.items():
        inp = InferInput(name, list(value.shape), "BOOL" if value.dtype == bool else "BYTES")
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    return inputs


class TritonBackend:
    name = "triton"

    def __init__(self, config: LlmConfig) -> None:
        if not config.url or not config.model_name:
            raise InvalidInput("llm.url (host:port of Triton gRPC) and llm.model_name are required")
        self.config = config
        self._client: Any = None

    async def start(self) -> None:
        from tritonclient.grpc.aio import InferenceServerClient

        self._client = InferenceServerClient(url=self.config.url)
        try:
            ready = await self._client.is_model_ready(self.config.model_name)
        except Exception as exc:
            raise ModelUnavailable(f"Triton at {self.config.url} unreachable: {exc}") from exc
        if not ready:
            raise ModelUnavailable(f"Triton model {self.config.model_name} is not ready")

    async def generate(
        self, messages: list[ChatMessage], params: GenerationParams, stats: GenerationStats
    ) -> AsyncIterator[str]:
        if self._client is None:
            raise ModelUnavailable("LLM backend not started")
        inputs = build_inputs(chatml_prompt(messages), params, self.config.top_p)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.config.model_name,
                "inputs": inputs,
                "request_id": uuid.uuid4().hex,
            }

        responses = self._client.stream_infer(requests())
        try:
            async for result, error in responses:
                if error is not None:
                    raise ModelUnavailable(f"Triton generation failed: {error}")
                out = result.as_numpy("text_output")
                if out is None:
                    continue
                text = b"".join(out.reshape(-1)).decode("utf-8", "replace")
                stats.completion_tokens += 1
                yield text
            stats.finish_reason = "stop"
        finally:
            close = getattr(responses, "cancel", None)
            if close is not None:
                close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
