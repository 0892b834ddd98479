"""A turn case set spoken by people: the real-speech corpus packed into multi-turn files.

The default case set (`loadtest.turn_cases`) is spoken by piper. Piper ends a
phrase before a comma with the falling pitch of a finished sentence, so both
end-of-turn models hear its in-turn pauses as the end, and the cut-ins it counts
are partly piper's. This set asks the same question of human prosody, with the
only recordings of people this machine can reach (`loadtest.realspeech`: read
LibriVox sentences, a professional's phone prompts, spoken commands, JFK).

Each clip is one turn, and the pauses inside it (commas, clause breaks,
breaths) are the speaker's own: a reply started there is a false cut-in. A
prompt of two sentences ("The person at the extension you dialed is not
available. Please try again later.") is still one turn, as a caller would mean
it; its turn kind, `prompt_sentences`, keeps such cut-ins apart in the report.
Clips are cut to their speech (energy within 40 dB of the peak: a person's
last sound fades slowly) with 60 ms either side, set to one
peak level per file, and joined by 2-3 s gaps where the avatar would answer.
Low room noise runs under the whole file so that no gap is digital silence.
Half the files (seeded) are `split: train`: the combination of the two models and
the thresholds that trade latency for politeness are tuned on them together with
the piper set's train split (human pauses inside a turn are mostly 0.1-0.4 s;
piper's set lists none that short). The text model's calibration is not fitted on
them: their pauses often follow words complete as text.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from parley.audio import read_audio, write_wav

from loadtest.corpus import Loudness, loud_frames
from loadtest.realspeech import DEFAULT_DIR as REAL_SPEECH_DIR
from loadtest.realspeech import build_real_speech
from loadtest.turn_cases import SR, room_noise

DEFAULT_DIR = Path("out/turn_cases_human")
SEED = 9
TURNS_PER_FILE = 3
TEST_FRACTION = 0.5
MARGIN_S = 0.06  # kept either side of the energy bounds: onsets and soft last sounds
#: Speech is within 40 dB of the clip's peak and 12 dB over its noise floor (the
#: quietest 2 % of 10 ms frames: the clips are cut tight, with little silence): a
#: person's last sound decays for 100 ms or more below the -26 dB that bounds piper's.
PEOPLE = Loudness(below_peak_db=40.0, over_floor=4.0, floor_percentile=2.0)
MIN_PAUSE_S = 0.15  # quiet this long inside a clip is listed as an in-turn pause
MIN_TAIL_S = 0.05
ROOM_DBFS = -62.0


def turn_kind(name: str, text: str) -> str:
    """What a clip is as a turn, from its source and text."""
    if name.startswith("prompt_"):
        # A sentence end followed by more words: two sentences in one turn.
        return "prompt_sentences" if re.search(r"[.?!]\s+\S", text.strip()) else "prompt"
    if name.startswith("librivox_"):
        return "read"
    if name == "jfk":
        return "speech"
    return "command"


def in_clip_pauses(audio: np.ndarray, min_pause_s: float = MIN_PAUSE_S) -> list[tuple[int, int]]:
    """Quiet runs of at least `min_pause_s` between the first and last loud frame (samples)."""
    loud = np.flatnonzero(loud_frames(audio, SR, PEOPLE))
    win = SR // 100
    out = []
    for a, b in itertools.pairwise(loud):
        if (b - a - 1) * win >= min_pause_s * SR:
            out.append((int(a + 1) * win, int(b) * win))
    return out


def _speech(audio: np.ndarray) -> tuple[np.ndarray, int, int, list[tuple[int, int]]]:
    """The clip cut to its speech plus the margin, peak-normalised, with 5 ms fades;
    where in it the speech starts and ends, and its pauses. All are measured on the
    whole clip, whose silences give the true noise floor. A last sound shorter than
    `MIN_TAIL_S` after a pause is a click or a breath: the words ended before it."""
    loud = np.flatnonzero(loud_frames(audio, SR, PEOPLE))
    if not len(loud):
        raise ValueError("clip has no speech")
    win = SR // 100
    pauses = in_clip_pauses(audio)
    while pauses and (int(loud[-1]) + 1) * win - pauses[-1][1] < MIN_TAIL_S * SR:
        cut = pauses.pop()[0]
        loud = loud[loud * win < cut]
    start, end = int(loud[0]) * win, (int(loud[-1]) + 1) * win
    margin = round(MARGIN_S * SR)
    lo = max(0, start - margin)
    piece = audio[lo : min(len(audio), end + margin)].astype(np.float32)
    piece /= float(np.abs(piece).max()) + 1e-9
    fade = min(SR // 200, len(piece) // 2)
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
    piece[:fade] *= ramp
    piece[len(piece) - fade :] *= ramp[::-1]
    return piece, start - lo, end - lo, [(a - lo, b - lo) for a, b in pauses]


def _render(
    name: str, clips: list[dict[str, Any]], rng: np.random.Generator, split: str
) -> tuple[np.ndarray, dict[str, Any]]:
    level = 10 ** (rng.uniform(-10.0, -4.0) / 20)
    parts: list[np.ndarray] = []
    pos = 0
    starts: list[float] = []
    ends: list[float] = []
    pauses: list[list[float]] = []

    def silence(seconds: float) -> None:
        nonlocal pos
        parts.append(np.zeros(round(seconds * SR), np.float32))
        pos += len(parts[-1])

    silence(rng.uniform(0.5, 1.0))
    for clip in clips:
        piece, first, last, inside = _speech(clip["audio"])
        piece *= level
        starts.append((pos + first) / SR)
        ends.append((pos + last) / SR)
        pauses += [[round((pos + a) / SR, 3), round((pos + b) / SR, 3)] for a, b in inside]
        parts.append(piece)
        pos += len(piece)
        silence(rng.uniform(2.0, 3.0))  # the avatar would answer here
    audio = np.concatenate(parts)
    audio = audio + room_noise(rng, len(audio), ROOM_DBFS)
    entry = {
        "audio": f"{name}.wav",
        "turn_ends": [round(t, 3) for t in ends],
        "text": " ".join(c["text"] for c in clips),
        "kind": "human",
        "turn_starts": [round(t, 3) for t in starts],
        "turn_texts": [c["text"] for c in clips],
        "turn_kinds": [turn_kind(c["name"], c["text"]) for c in clips],
        "pauses": pauses,
        "split": split,
        "sources": [c["source"] for c in clips],
        "licenses": [c["license"] for c in clips],
    }
    return audio.astype(np.float32), entry


def build_human_turn_cases(
    out: Path = DEFAULT_DIR,
    real_speech: Path = REAL_SPEECH_DIR,
    progress: Callable[[str], None] | None = None,
    *,
    seed: int = SEED,
) -> Path:
    """Write the human-voiced case set to `out` (idempotent); returns `out`."""
    if (out / "manifest.jsonl").is_file():
        return out
    say = progress or (lambda _msg: None)
    build_real_speech(real_speech, progress=say)
    clips = []
    for line in (real_speech / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            audio = read_audio(real_speech / entry["audio"], SR)
            clips.append({**entry, "name": Path(entry["audio"]).stem, "audio": audio})
    rng = np.random.default_rng(seed)
    order = [clips[i] for i in rng.permutation(len(clips))]
    groups = [order[i : i + TURNS_PER_FILE] for i in range(0, len(order), TURNS_PER_FILE)]
    test = set(rng.permutation(len(groups))[: round(len(groups) * TEST_FRACTION)].tolist())
    out.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp)
        for i, group in enumerate(groups):
            split = "test" if i in test else "train"
            audio, entry = _render(f"human_{i:02d}", group, np.random.default_rng([seed, i]), split)
            write_wav(staging / entry["audio"], audio, SR)
            entries.append(entry)
        (staging / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    turns = sum(len(e["turn_ends"]) for e in entries)
    pauses = sum(len(e["pauses"]) for e in entries)
    say(f"wrote {len(entries)} files, {turns} human turns with {pauses} pauses inside to {out}")
    return out
