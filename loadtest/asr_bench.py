"""`parley bench asr`: word error rate and decode cost of each ASR candidate, same utterances.

Candidates: Whisper tiny.en as faster-whisper runs it (input padded to a 30 s
window), Whisper tiny.en as Parley runs it (window = utterance + 0.3 s, at least
`min_window_s`: 6, 10 (default) and 15 s), and PocketSphinx with the en-us model in its wheel. Each decodes
every whole utterance once; the decode time is what the final transcript costs
after the end of speech when the utterance is decoded as the VAD hears it stop.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
from parley import clock
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loadtest.corpus import DEFAULT_DIR, Utterance, load_corpus, synthesize_default
from loadtest.realspeech import DEFAULT_DIR as REAL_DIR
from loadtest.realspeech import build_real_speech
from loadtest.replay import normalize
from services.asr.config import AsrConfig
from services.asr.engine import AsrBackend, make_backend

CANDIDATES: dict[str, AsrConfig] = {
    "whisper-tiny.en-30s-window": AsrConfig(min_window_s=30.0),
    "whisper-tiny.en-6s-window": AsrConfig(min_window_s=6.0),
    "whisper-tiny.en-parley-10s": AsrConfig(),
    "whisper-tiny.en-15s-window": AsrConfig(min_window_s=15.0),
    "pocketsphinx-en-us": AsrConfig(backend="pocketsphinx"),
}


def corpus_wer(refs: list[str], hyps: list[str]) -> float | None:
    pairs = [(normalize(r), normalize(h) or "<empty>") for r, h in zip(refs, hyps, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def group_of(utt: Utterance) -> str:
    """Source group of a clip: its file name up to the first underscore (librivox, prompt, …)."""
    return utt.path.stem.split("_")[0]


def run_candidate(
    backend: AsrBackend, utterances: list[Utterance], progress: Progress, label: str
) -> dict[str, Any]:
    task = progress.add_task(label, total=len(utterances))
    hyps, times = [], []
    for utt in utterances:
        t0 = clock.now()
        hyps.append(backend.decode(utt.audio).text)
        times.append(clock.now() - t0)
        progress.advance(task)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, utt in enumerate(utterances):
        groups[group_of(utt)].append(i)
    audio_s = sum(len(u.audio) for u in utterances) / 16_000
    return {
        "wer": corpus_wer([u.text for u in utterances], hyps),
        "wer_by_group": {
            g: corpus_wer([utterances[i].text for i in idx], [hyps[i] for i in idx])
            for g, idx in sorted(groups.items())
        },
        "decode_ms_p50": float(np.median(times) * 1000),
        "decode_ms_p95": float(np.percentile(times, 95) * 1000),
        "real_time_factor": float(sum(times) / audio_s),
        "utterances": [
            {"audio": u.path.name, "reference": u.text, "hypothesis": h, "decode_ms": t * 1000}
            for u, h, t in zip(utterances, hyps, times, strict=True)
        ],
    }


def bench_asr(audio_dirs: list[Path] | None, json_path: Path) -> dict[str, Any]:
    console = Console(stderr=True)
    if not audio_dirs:
        with console.status("preparing the bundled (piper) and real-speech corpora"):
            audio_dirs = [synthesize_default(DEFAULT_DIR), build_real_speech(REAL_DIR)]
    corpora = {d.name: load_corpus(d) for d in audio_dirs}
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {platform.processor() or ''}"}
    results: dict[str, dict[str, Any]] = {name: {} for name in corpora}
    with Progress(console=console) as progress:
        for label, config in CANDIDATES.items():
            backend = make_backend(config)
            backend.warm_up()
            for name, utterances in corpora.items():
                results[name][label] = run_candidate(
                    backend, utterances, progress, f"{label} on {name}"
                )
    report["corpora"] = {
        name: {
            "utterances": len(corpora[name]),
            "audio_s": round(sum(len(u.audio) for u in corpora[name]) / 16_000, 1),
            "candidates": cands,
        }
        for name, cands in results.items()
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    table = Table(title="ASR candidates (WER, decode ms p50)")
    table.add_column("candidate")
    for name in corpora:
        table.add_column(name)
    for label in CANDIDATES:
        cells = []
        for name in corpora:
            r = results[name][label]
            cells.append(f"{r['wer'] * 100:.1f}%  {r['decode_ms_p50']:.0f} ms")
        table.add_row(label, *cells)
    console.print(table)
    summary = {
        name: {label: {k: r[k] for k in ("wer", "decode_ms_p50", "wer_by_group")}
               for label, r in cands.items()}
        for name, cands in results.items()
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return report
