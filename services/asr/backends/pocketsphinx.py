"""PocketSphinx (CMU Sphinx), with the en-us acoustic and language model from its wheel.

Kept as a measured alternative: it decodes in a fraction of Whisper's time but
its word error rate on real speech is several times higher (docs/benchmarks.md).
"""

from __future__ import annotations

import threading

import numpy as np
from parley.audio import float_to_pcm16
from parley.errors import ModelUnavailable

from services.asr.config import AsrConfig
from services.asr.engine import Decoded


class PocketSphinxBackend:
    name = "pocketsphinx"

    def __init__(self, config: AsrConfig) -> None:
        if config.language != "en":
            raise ModelUnavailable("the bundled PocketSphinx model is English (en-us) only")
        try:
            from pocketsphinx import Decoder
        except ImportError as exc:
            raise ModelUnavailable("pocketsphinx is not installed") from exc
        kwargs = {"hmm": config.model_path} if config.model_path else {}
        self._decoder = Decoder(samprate=16_000, loglevel="FATAL", **kwargs)
        self._lock = threading.Lock()  # one decoder, one utterance at a time

    def warm_up(self) -> None:
        self.decode(np.zeros(16_000, np.float32))

    def decode(self, audio: np.ndarray) -> Decoded:
        with self._lock:
            self._decoder.start_utt()
            self._decoder.process_raw(float_to_pcm16(audio), full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
        return Decoded(text=hyp.hypstr if hyp is not None else "")
