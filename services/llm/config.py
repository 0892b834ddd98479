"""Typed options of the LLM service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class LlmConfig(BaseModel):
    """Which backend generates replies, and how."""

    #: "llama_cpp" runs a GGUF in-process (embedded default); "openai" streams from an
    #: OpenAI-compatible server (vLLM, llama.cpp server); "triton" uses Triton's generate stream.
    backend: Literal["llama_cpp", "openai", "triton"] = "llama_cpp"
    #: GGUF file for llama_cpp; empty takes the model that ships with Parley.
    model_path: str = ""
    #: Model name sent to OpenAI-compatible / Triton servers.
    model_name: str = ""
    #: Base URL of the OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1),
    #: or host:port of Triton's gRPC endpoint.
    url: str = ""
    api_key: str = "none"
    #: Context window for llama_cpp.
    n_ctx: int = Field(default=2048, ge=256, le=131072)
    #: CPU threads for llama_cpp token generation, and for reading prompts.
    #: Prompts are read ahead while the user talks, alongside ASR decodes: two
    #: threads there made p95 u2u 1.9 s (llama.cpp's threads spin-wait on each other
    #: and stall when another thread takes their core); one keeps it at 0.7 s.
    #: Generation runs while ASR is idle: two threads gave p50 -55 ms. With other
    #: busy processes on the same cores, set `threads: 1` (docs/benchmarks.md).
    threads: int = Field(default=2, ge=1, le=256)
    batch_threads: int = Field(default=1, ge=1, le=256)
    #: Layers offloaded to a GPU when llama.cpp was built with one (-1: all).
    gpu_layers: int = -1
    max_tokens: int = Field(default=40, ge=1, le=4096)
    temperature: float = Field(default=0.3, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    #: Small models loop without it.
    repeat_penalty: float = Field(default=1.1, ge=1.0, le=2.0)
    #: Bytes of KV-cache snapshots kept for prefix reuse (persona prompt, earlier turns).
    prefix_cache_bytes: int = Field(default=512 << 20, ge=0)
    #: Longest accepted request (all message texts together), in characters.
    max_prompt_chars: int = Field(default=16_000, ge=100)
    request_timeout_s: float = Field(default=30.0, gt=0)
