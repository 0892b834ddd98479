"""The latency report as HTML: a per-turn waterfall from the end of the user's speech."""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SEGMENTS = (
    ("speech_end_detected", "VAD hears silence", "#b0bec5"),
    ("asr_final", "ASR final ready", "#4fc3f7"),
    ("end_of_turn", "end of turn decided", "#9575cd"),
    ("llm_first_token", "LLM first token", "#ffb74d"),
    ("tts_first_audio", "TTS first audio", "#81c784"),
    ("first_output", "first audio out", "#e57373"),
    ("first_frame", "first avatar frame", "#f06292"),
)


def waterfall_svg(turns: list[dict[str, Any]]) -> str:
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(turns) + 1.4))
    for row, t in enumerate(turns):
        lat = t["latency_s"]
        prev = 0.0
        for key, label, color in SEGMENTS:
            v = lat.get(key)
            if v is None:
                continue
            v *= 1000
            lo, hi = min(prev, v), max(prev, v)
            ax.barh(row, hi - lo, left=lo, color=color, label=label if row == 0 else None)
            prev = max(prev, v)
        if t.get("u2u_s") is not None:
            ax.text(prev + 8, row, f"{t['u2u_s'] * 1000:.0f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(turns)), [f"turn {t['index'] + 1}" for t in turns])
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("ms after the end of user speech")
    ax.legend(loc="lower right", fontsize=7, ncols=3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def write_html(path: Path, report: dict[str, Any]) -> None:
    s = report["summary"]
    rows = []
    for t in report["turns"]:
        lat = t["latency_s"]
        cells = "".join(
            f"<td>{'' if lat.get(k) is None else f'{lat[k] * 1000:.0f}'}</td>"
            for k, _, _ in SEGMENTS
        )
        wer = "" if t["wer"] is None else f"{t['wer'] * 100:.0f}%"
        rows.append(
            f"<tr><td>{t['index'] + 1}</td><td>{html.escape(t['reference'])}</td>"
            f"<td>{html.escape(t['hypothesis'])}</td><td>{wer}</td>"
            f"<td>{html.escape(t['reply'])}</td>{cells}</tr>"
        )
    head = "".join(f"<th>{label} (ms)</th>" for _, label, _ in SEGMENTS)

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v * 1000:.0f} ms"

    wer = "–" if s["asr_wer"] is None else f"{s['asr_wer'] * 100:.1f}%"
    path.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>Parley latency report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ddd;padding:4px 6px}}
.big{{font-size:1.4em}}</style></head><body>
<h1>Parley — utterance-to-utterance latency</h1>
<p class="big">u2u p50 <b>{ms(s["u2u_p50_s"])}</b> · p95 <b>{ms(s["u2u_p95_s"])}</b>
(audio + first frame: p50 {ms(s.get("u2u_audio_video_p50_s"))}, p95
{ms(s.get("u2u_audio_video_p95_s"))}) · ASR WER <b>{wer}</b> ·
{s["answered"]}/{s["turns"]} turns answered · {s.get("false_cut_ins", 0)} false cut-ins</p>
<p>Measured from the true end of the user's speech (by energy, independent of the VAD)
to the first avatar audio frame leaving the engine. Memory: {report["memory_mb"]}.</p>
{waterfall_svg(report["turns"])}
<h2>Turns</h2><table><tr><th>#</th><th>user said</th><th>ASR heard</th><th>WER</th>
<th>avatar replied</th>{head}</tr>{"".join(rows)}</table>
</body></html>"""
    )


#: How the detectors in a `parley bench turns` table are drawn: (label, colour, marker).
TURN_DETECTORS = {
    "silence_500ms": ("silence 500 ms", "#90a4ae", "s"),
    "silence_800ms": ("silence 800 ms", "#607d8b", "s"),
    "smart_turn_v3.2": ("Smart Turn v3.2 alone", "#ff8a65", "D"),
    "parley_vad+semantic": ("Parley, VAD + text", "#9fa8da", "o"),
    "parley_vad+semantic+smart_turn": ("Parley (this config)", "#3949ab", "*"),
}


def write_turn_tradeoff(
    path: Path, table: dict[str, dict[str, Any]], sweep: list[dict[str, Any]], title: str
) -> None:
    """False cut-ins against end-of-turn p50: each detector as a point, Parley as a curve
    over its wait before a confident end (`min_silence_s`), the dial operators can turn."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [r["latency_p50_ms"] for r in sweep if r["latency_p50_ms"] is not None]
    ys = [r["false_cut_ins_per_100_turns"] for r in sweep if r["latency_p50_ms"] is not None]
    ax.plot(xs, ys, "-", color="#3949ab", alpha=0.5, label="Parley, min_silence_s swept")
    for r in sweep:
        if r["latency_p50_ms"] is not None:
            missed = f", {r['missed_turns']} missed" if r["missed_turns"] else ""
            ax.annotate(
                f"{r['min_silence_s']:.2f} s{missed}",
                (r["latency_p50_ms"], r["false_cut_ins_per_100_turns"]),
                textcoords="offset points", xytext=(4, 4), fontsize=7, color="#3949ab",
            )  # fmt: skip
    for name, (label, color, marker) in TURN_DETECTORS.items():
        row = table.get(name)
        if row is None or row["latency_p50_ms"] is None:
            continue
        missed = f", {row['missed_turns']} missed" if row["missed_turns"] else ""
        ax.scatter(
            row["latency_p50_ms"], row["false_cut_ins_per_100_turns"], s=90 if marker == "*" else 45,
            color=color, marker=marker, zorder=3, label=f"{label}{missed}",
        )  # fmt: skip
    ax.set_xlabel("end of turn, p50 ms after the true end")
    ax.set_ylabel("false cut-ins per 100 turns")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
