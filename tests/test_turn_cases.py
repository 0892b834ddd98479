"""The end-of-turn case set: builder, loader validation, scoring and the baseline evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from parley.audio import write_wav
from parley.errors import InvalidInput

from loadtest.corpus import speech_bounds
from loadtest.turn_cases import (
    TEST_FRACTION,
    TurnCase,
    TurnScore,
    build_turn_cases,
    evaluate_smart_turn,
    load_turn_cases,
    plan_cases,
)

SR = 16_000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_turn_cases(tmp_path_factory.mktemp("cases") / "set", limit=2)


def test_plan_covers_the_cases_issue_4_asks_for() -> None:
    files = plan_cases()
    turns = [t for f in files for t in f.turns]
    assert len(files) >= 20 and len(turns) >= 60
    kinds = {t.kind for t in turns}
    assert {"question", "statement", "hesitation", "backchannel"} <= kinds
    assert sum(t.kind == "hesitation" for t in turns) >= 12
    assert {"fast", "slow", "noisy", "clipped", "backchannel", "noise_only"} <= {
        f.kind for f in files
    }
    test = [f for f in files if f.split == "test"]
    assert abs(len(test) / len(files) - TEST_FRACTION) < 0.1
    assert any(t.kind == "hesitation" for f in test for t in f.turns)
    assert plan_cases() == files  # deterministic
    assert len({t.text for t in turns}) == len(turns)  # no turn spoken twice


def test_builder_writes_a_valid_measured_manifest(built: Path) -> None:
    lines = [json.loads(x) for x in (built / "manifest.jsonl").read_text().splitlines()]
    assert [e["audio"] for e in lines] == ["turn_00.wav", "turn_01.wav"]
    cases = load_turn_cases(built)
    assert len(cases) == 2
    pauses = 0
    for case, entry in zip(cases, lines, strict=True):
        assert entry["split"] in ("train", "test") and entry["kind"]
        assert len(case.turn_ends) == len(case.turn_kinds) == len(case.turn_texts) >= 3
        for start, end in zip(case.turn_starts, case.turn_ends, strict=True):
            # speech right up to the measured end, then 2-3 s of silence (the avatar's turn)
            before = case.audio[int((end - 0.3) * SR) : int(end * SR)]
            after = case.audio[int(end * SR) + 160 : int((end + 2.0) * SR)]
            assert np.abs(before).max() > 0.05
            assert np.abs(after).max() < 1e-3
            # measured per piece; re-measuring the whole turn agrees within ~0.1 s
            lo, hi = speech_bounds(case.audio[int(start * SR) : int(end * SR)])
            assert lo < SR // 10 and hi > (end - start) * SR - SR // 10
        for a, b in case.pauses:
            assert 0.4 - 0.01 <= b - a <= 1.2 + 0.01
            assert np.abs(case.audio[int(a * SR) + 160 : int(b * SR) - 160]).max() < 1e-3
            pauses += 1
    assert pauses >= 2


def test_builder_is_idempotent_and_deterministic(built: Path, tmp_path: Path) -> None:
    manifest = built / "manifest.jsonl"
    stamp = manifest.stat().st_mtime_ns
    assert build_turn_cases(built, limit=2) == built
    assert manifest.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    again = build_turn_cases(tmp_path / "again", limit=1)
    assert (again / "turn_00.wav").read_bytes() == (built / "turn_00.wav").read_bytes()
    first = json.loads(manifest.read_text().splitlines()[0])
    assert json.loads((again / "manifest.jsonl").read_text()) == first


def _case_dir(tmp_path: Path, *entries: object, seconds: float = 3.0) -> Path:
    write_wav(tmp_path / "a.wav", np.zeros(int(seconds * SR), np.float32), SR)
    lines = [e if isinstance(e, str) else json.dumps(e) for e in entries]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"turn_ends": [1.0]}, "expected an object"),
        ({"audio": "a.wav"}, "'turn_ends' is missing"),
        ({"audio": "missing.wav", "turn_ends": [1.0]}, "does not exist"),
        ({"audio": "../a.wav", "turn_ends": [1.0]}, "inside"),
        ({"audio": "a.wav", "turn_ends": "1.0"}, "list of numbers"),
        ({"audio": "a.wav", "turn_ends": [2.0, 1.0]}, "strictly increasing"),
        ({"audio": "a.wav", "turn_ends": [1.0, 1.0]}, "strictly increasing"),
        ({"audio": "a.wav", "turn_ends": [1.0, 3.5]}, "inside the audio"),
        ({"audio": "a.wav", "turn_ends": [-1.0]}, "inside the audio"),
        ({"audio": "a.wav", "turn_ends": [1.0], "turn_starts": [0.2, 0.5]}, "differ in length"),
        ({"audio": "a.wav", "turn_ends": [1.0, 2.0], "turn_starts": [0.2, 0.9]}, "start after"),
        ({"audio": "a.wav", "turn_ends": [1.0], "split": "dev"}, "split"),
        ({"audio": "a.wav", "turn_ends": [1.0], "turn_kinds": ["a", "b"]}, "one item per turn"),
        ({"audio": "a.wav", "turn_ends": [1.0], "turn_kinds": [3]}, "hold strings"),
        ({"audio": "a.wav", "turn_ends": [1.0], "kind": ["human"]}, "kind must be a string"),
        ({"audio": "a.wav", "turn_ends": [1.0], "pauses": [[0.5, 0.2]]}, "start < end"),
        ({"audio": "a.wav", "turn_ends": [1.0], "pauses": [[0.2, 9.0]]}, "inside the audio"),
        ({"audio": "a.wav", "turn_ends": [1.0], "pauses": [[True, 0.5]]}, "pairs"),
    ],
)
def test_loader_rejects_bad_manifests(tmp_path: Path, entry: object, message: str) -> None:
    sub = tmp_path / "set"
    sub.mkdir()
    directory = _case_dir(sub, entry)
    with pytest.raises(InvalidInput, match=message):
        load_turn_cases(directory)


def test_loader_needs_a_manifest_with_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no manifest"):
        load_turn_cases(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("\n")
    with pytest.raises(InvalidInput, match="lists no files"):
        load_turn_cases(tmp_path)


def test_loader_measures_turn_starts_when_absent(tmp_path: Path) -> None:
    audio = np.zeros(4 * SR, np.float32)
    t = np.arange(SR // 2) / SR
    audio[SR : SR + SR // 2] = 0.3 * np.sin(2 * np.pi * 200 * t)  # speech 1.0-1.5 s
    audio[2 * SR : 2 * SR + SR // 2] = 0.3 * np.sin(2 * np.pi * 200 * t)  # speech 2.0-2.5 s
    write_wav(tmp_path / "a.wav", audio, SR)
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"audio": "a.wav", "turn_ends": [1.5, 2.5]})
    )
    (case,) = load_turn_cases(tmp_path)
    assert case.turn_starts == pytest.approx((1.0, 2.0), abs=0.02)
    assert case.split is None and case.turn_kinds == ()


def test_scoring_counts_cut_ins_latency_misses_and_spurious() -> None:
    case = TurnCase(
        path=Path("x.wav"),
        audio=np.zeros(12 * SR, np.float32),
        turn_ends=(3.0, 7.0, 10.0),
        turn_starts=(1.0, 5.0, 9.0),
        turn_kinds=("hesitation", "question", "statement"),
    )
    score = TurnScore("test")
    # 0.5: before any turn; 2.0: inside turn 0; 3.2: answers turn 0; 4.0: a repeat;
    # 7.6: answers turn 1; turn 2 never answered.
    score.add(case, [7.6, 0.5, 2.0, 3.2, 4.0])
    summary = score.summary()
    assert summary["turns"] == 3
    assert summary["false_cut_ins"] == 1 and summary["cut_ins_by_turn_kind"] == {"hesitation": 1}
    assert summary["false_cut_ins_per_100_turns"] == pytest.approx(33.3)
    assert summary["missed_turns"] == 1 and summary["missed_by_turn_kind"] == {"statement": 1}
    assert summary["spurious"] == 2
    assert score.latencies_s == pytest.approx([0.2, 0.6])
    assert summary["latency_p50_ms"] == pytest.approx(400.0)


def test_evaluation_runs_baselines_and_smart_turn(built: Path) -> None:
    cases = load_turn_cases(built)
    result = evaluate_smart_turn(cases)
    assert set(result) == {"silence_500ms", "silence_800ms", "smart_turn_v3.2"}
    for summary in result.values():
        assert summary["turns"] == sum(len(c.turn_ends) for c in cases)
        detected = summary["turns"] - summary["missed_turns"]
        assert detected == 0 or summary["latency_p50_ms"] is not None
    fast, slow = result["silence_500ms"], result["silence_800ms"]
    assert fast["missed_turns"] == slow["missed_turns"] == 0  # 2-3 s gaps after every turn
    assert slow["latency_p50_ms"] > fast["latency_p50_ms"] >= 500.0
    assert fast["false_cut_ins"] >= slow["false_cut_ins"]
    assert result["smart_turn_v3.2"]["model_ms_mean"] is not None
    with pytest.raises(InvalidInput, match="split"):
        evaluate_smart_turn([c for c in cases if c.split == "train"], split="test")
