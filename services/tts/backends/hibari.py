"""Embedded default: hibari, a small neural en-US voice (Kokoro-derived) run by onnxruntime.

We load the voice's ONNX graph and expose the duration predictor's output as an
extra graph output, so every synthesis also returns the model's own per-phoneme
frame counts: mouth timings that match the audio exactly, at no extra cost.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
from parley.errors import InvalidInput, ModelUnavailable
from parley.visemes import MODIFIERS, PHONEME_TO_VISEME, Phoneme, viseme_for

from services.tts.config import TtsConfig
from services.tts.engine import Speech

#: The graph tensor holding rounded per-phoneme durations (in units of two 12.5 ms frames).
DURATION_TENSOR = "/Clip_output_0"
SAMPLES_PER_DURATION_UNIT = 600  # 2 frames × hop 300 at 24 kHz
#: The model opens every chunk with ~0.3 s of silence (its start pad); we keep this
#: much of it before the first sound, since audible speech sooner is what the user waits for.
LEAD_SILENCE_S = 0.04


class HibariBackend:
    name = "hibari"

    def __init__(self, config: TtsConfig) -> None:
        if importlib.util.find_spec("hibari") is None:
            raise ModelUnavailable("the hibari-tts package is not installed")
        from hibari import Hibari
        from hibari.voices import VOICES, voice_path

        if config.voice not in VOICES:
            raise InvalidInput(f"unknown voice {config.voice!r}; available: {', '.join(VOICES)}")
        try:
            path = voice_path(config.voice, download_missing=False)
        except FileNotFoundError as exc:
            raise ModelUnavailable(
                f"voice {config.voice!r} is not installed (only bundled voices work offline)"
            ) from exc
        self.config = config
        self.sample_rate: int = Hibari.sample_rate
        self._tts = Hibari(voice=config.voice, threads=config.threads)
        self._session = self._session_with_durations(path)

    def _session_with_durations(self, path: str) -> Any:
        import onnx
        import onnxruntime as ort

        model = onnx.load(path)
        names = {o for n in model.graph.node for o in n.output}
        if DURATION_TENSOR not in names:
            raise ModelUnavailable(f"{path}: no duration tensor {DURATION_TENSOR}; unknown export")
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(DURATION_TENSOR, onnx.TensorProto.FLOAT, None)
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = self.config.threads
        opts.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]  # fmt: skip
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)

    def warm_up(self) -> None:
        self.synthesize("Hello there.")

    def synthesize(self, text: str) -> Speech:
        """Text (one clause) → audio and phoneme timings. Blocking; call from a worker thread."""
        from hibari import dsp

        audio_parts: list[np.ndarray] = []
        phonemes: list[Phoneme] = []
        offset = 0
        for chunk in self._tts.phonemize(text):
            symbols = [c for c in chunk if c in self._tts.vocab]
            ids = [0, *(self._tts.vocab[c] for c in symbols), 0]
            if len(ids) < 3:
                continue
            outputs = self._session.run(
                None,
                {
                    "ids": np.asarray([ids], np.int64),
                    "speed": np.asarray([self.config.speed], np.float32),
                },
            )
            *spectra, durations = outputs
            lh, th, ln, lr, phi, f0 = (o[0] for o in spectra)
            wav = dsp.synth(lh, th, ln, lr, phi, f0, np.random.default_rng(0))
            samples = durations.reshape(-1).astype(np.int64) * SAMPLES_PER_DURATION_UNIT
            lead = _leading_silence(wav, self.sample_rate)
            wav = wav[lead:]
            phonemes.extend(_timings(["", *symbols, ""], samples, offset - lead, clip_at=offset))
            audio_parts.append(wav.astype(np.float32))
            offset += len(wav)
        audio = np.concatenate(audio_parts) if audio_parts else np.zeros(0, np.float32)
        return Speech(audio, self.sample_rate, phonemes, text)


def _leading_silence(wav: np.ndarray, sample_rate: int, threshold: float = 0.004) -> int:
    """Samples of silence to drop from the start, keeping LEAD_SILENCE_S before the first sound."""
    window = sample_rate // 100
    n = len(wav) // window
    if n == 0:
        return 0
    rms = np.sqrt((wav[: n * window].reshape(n, window) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > threshold)
    first = int(loud[0]) * window if len(loud) else 0
    return max(0, first - int(LEAD_SILENCE_S * sample_rate))


def _timings(symbols: list[str], samples: np.ndarray, offset: int, clip_at: int) -> list[Phoneme]:
    """Per-symbol durations → phoneme timings; stress marks fold into the next phoneme.

    Timings before `clip_at` (trimmed lead silence) are cut off.
    """
    out = _raw_timings(symbols, samples, offset)
    clipped = []
    for p in out:
        end = p.start_sample + p.num_samples
        if end <= clip_at:
            continue
        start = max(p.start_sample, clip_at)
        clipped.append(Phoneme(p.phoneme, p.viseme, start, end - start))
    return clipped


def _raw_timings(symbols: list[str], samples: np.ndarray, offset: int) -> list[Phoneme]:
    out: list[Phoneme] = []
    pos = offset
    carry = 0
    for sym, n in zip(symbols, samples.tolist(), strict=True):
        if sym in MODIFIERS:
            carry += n
            continue
        start = pos
        length = n + carry
        carry = 0
        pos = start + length
        label = sym if sym in PHONEME_TO_VISEME else "sil"
        if out and label == "sil" and out[-1].phoneme == "sil":
            prev = out[-1]
            out[-1] = Phoneme("sil", "sil", prev.start_sample, prev.num_samples + length)
            continue
        out.append(Phoneme(label, viseme_for(label), start, length))
    return out
