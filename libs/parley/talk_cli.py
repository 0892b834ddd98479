"""`parley talk`: one spoken exchange with a running Parley server, from a WAV file.

Reads the WAV (any rate and channel count; converted to 16 kHz mono), creates a
session, streams the audio in real time followed by silence so the avatar can answer,
prints what the server heard, the avatar's reply and each turn's latency breakdown,
writes the avatar's voice to `--out`, and ends the session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from parley.audio import ASR_SAMPLE_RATE, read_audio, write_wav
from parley.client import (
    AuthenticationError,
    AvatarSpeech,
    AvatarText,
    Event,
    Interruption,
    ParleyClient,
    ParleyError,
    Reply,
    TurnLatency,
    UnavailableError,
    UserTranscript,
    parse_target,
)
from parley.errors import InvalidInput

DEFAULT_TARGET = "grpc://127.0.0.1:9000"
#: Silence streamed after the WAV: time for the end of the turn to be detected.
TRAILING_SILENCE_S = 2.0
#: The longest WAV `talk` streams (it plays in real time).
MAX_INPUT_S = 600.0
#: Exit statuses: 2 for input, connection and refusals; 1 when the exchange itself failed.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_MILESTONES = (
    ("asr_final_s", "ASR final"),
    ("end_of_turn_s", "end of turn"),
    ("llm_first_token_s", "LLM first token"),
    ("tts_first_audio_s", "TTS first audio"),
    ("first_output_s", "first audio out"),
    ("first_frame_s", "first video frame"),
)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the `talk` command to a `parley` subparsers object; `run` executes it."""
    talk = subparsers.add_parser(
        "talk",
        help="speak a WAV file to a running Parley server and get the avatar's answer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(talk)
    return talk


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wav", type=Path, required=True, metavar="FILE",
                        help="what the user says (WAV/FLAC/OGG, any rate and channels)")  # fmt: skip
    parser.add_argument("--target", default=None, metavar="URL",
                        help="the sessions gRPC server: grpc://host:port, grpcs://host:port or "
                        f"host:port (default: $PARLEY_TARGET, else {DEFAULT_TARGET})")  # fmt: skip
    parser.add_argument("--key", default=None, metavar="KEY",
                        help="API key (default: $PARLEY_API_KEY)")  # fmt: skip
    parser.add_argument("--persona", default="", metavar="TEXT",
                        help="the avatar's persona prompt")  # fmt: skip
    parser.add_argument("--avatar", default="", metavar="ID", help="avatar id (server default)")
    parser.add_argument("--voice", default="", help="TTS voice (server default)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write the avatar's voice here (WAV, 24 kHz)")  # fmt: skip
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write a JSON report to FILE; alone: print it instead of text")  # fmt: skip
    parser.add_argument("--tls", action="store_true", help="use TLS (implied by grpcs://)")
    parser.add_argument("--application", default="", metavar="NAME",
                        help="send the metadata application=NAME (Ray Serve's gRPC ingress)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `talk` command; 0 on success, 2 for bad input, an unreachable
    server or a refused request, 1 when the exchange failed or the avatar did not answer."""
    try:
        target = args.target or os.environ.get("PARLEY_TARGET") or DEFAULT_TARGET
        parse_target(target)
        audio = load_wav(args.wav)
    except InvalidInput as exc:
        return _fail(str(exc), EXIT_USAGE)
    if args.out is not None and args.out.is_dir():
        return _fail(f"--out {args.out} is a directory; name the WAV file to write", EXIT_USAGE)
    api_key = args.key if args.key is not None else os.environ.get("PARLEY_API_KEY")
    started = time.monotonic()
    try:
        outcome = asyncio.run(_talk(args, target, api_key or None, audio))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    if outcome.exit_code is not None:
        return outcome.exit_code
    return _finish(args, target, audio, outcome, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    """`python -m parley.talk_cli ...`: the `talk` command on its own."""
    parser = argparse.ArgumentParser(prog="parley talk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


def load_wav(path: Path) -> np.ndarray:
    """The file as 16 kHz mono float32 (InvalidInput with what is wrong otherwise)."""
    if not path.exists():
        raise InvalidInput(f"--wav {path}: no such file")
    if not path.is_file():
        raise InvalidInput(f"--wav {path}: not a file")
    audio = read_audio(path, ASR_SAMPLE_RATE)
    seconds = len(audio) / ASR_SAMPLE_RATE
    if seconds > MAX_INPUT_S:
        raise InvalidInput(
            f"--wav {path}: {seconds:.0f} s of audio; talk streams in real time, "
            f"give it at most {MAX_INPUT_S:.0f} s"
        )
    if not np.isfinite(audio).all():
        raise InvalidInput(f"--wav {path}: the audio holds NaN or infinite samples")
    return audio


@dataclass(slots=True)
class _Turn:
    turn: int
    user: str = ""
    avatar: str = ""
    latency: TurnLatency | None = None
    interrupted: bool = False
    avatar_audio_s: float = 0.0


@dataclass(slots=True)
class _Exchange:
    turns: dict[int, _Turn] = field(default_factory=dict)
    speech: list[AvatarSpeech] = field(default_factory=list)

    def turn(self, number: int) -> _Turn:
        return self.turns.setdefault(number, _Turn(number))

    def add(self, event: Event) -> list[str]:
        """Take in a server event; the lines to show for it."""
        if isinstance(event, UserTranscript):
            if event.is_final:
                self.turn(event.turn).user = event.text
                return [f"you:    {event.text}"]
        elif isinstance(event, AvatarText):
            self.turn(event.turn).avatar += event.text
        elif isinstance(event, AvatarSpeech):
            self.speech.append(event)
            self.turn(event.turn).avatar_audio_s += event.duration_s
        elif isinstance(event, Interruption):
            self.turn(event.turn).interrupted = True
        elif isinstance(event, TurnLatency):
            turn = self.turn(event.turn)
            turn.latency = event
            return [
                f"avatar: {turn.avatar.strip()}",
                f"        turn {event.turn} latency from the end of your speech: "
                + _latency_line(event),
            ]
        return []


@dataclass(slots=True)
class _Outcome:
    session_id: str = ""
    exchange: _Exchange = field(default_factory=_Exchange)
    #: Set when the exchange could not be had (the error was printed).
    exit_code: int | None = None


async def _talk(
    args: argparse.Namespace, target: str, api_key: str | None, audio: np.ndarray
) -> _Outcome:
    metadata = (("application", args.application),) if args.application else ()
    outcome = _Outcome()
    async with ParleyClient(target, api_key, secure=args.tls, metadata=metadata) as client:
        try:
            session = await client.create_session(args.avatar, args.persona, args.voice)
            outcome.session_id = session.session_id
            _say(args, f"session {session.session_id} (avatar {session.avatar_id}, "
                 f"voice {session.voice})")  # fmt: skip
            silence = np.zeros(int(TRAILING_SILENCE_S * ASR_SAMPLE_RATE), np.float32)
            # Voice only: this command keeps no video, so the server renders none.
            stream = client.converse(
                session.session_id, np.concatenate([audio, silence]), video="none"
            )
            async with contextlib.aclosing(stream):
                async for event in stream:
                    for line in outcome.exchange.add(event):
                        _say(args, line)
        except AuthenticationError as exc:
            outcome.exit_code = _fail(f"the server refused the API key ({exc}); pass --key KEY "
                                      "or set PARLEY_API_KEY", EXIT_USAGE)  # fmt: skip
        except UnavailableError as exc:
            outcome.exit_code = _fail(f"cannot reach a Parley server at {target} ({exc})",
                                      EXIT_USAGE)  # fmt: skip
        except ParleyError as exc:
            if exc.code in _REFUSALS:
                outcome.exit_code = _fail(f"the server refused the request ({exc})", EXIT_USAGE)
            else:
                outcome.exit_code = _fail(f"the conversation failed ({exc})", EXIT_FAILED)
        finally:
            if outcome.session_id:
                await _end_quietly(client, outcome.session_id)
    return outcome


def _finish(
    args: argparse.Namespace, target: str, audio: np.ndarray, outcome: _Outcome, wall_s: float
) -> int:
    """Show what is left, write --out and --json; the exit status."""
    exchange = outcome.exchange
    for turn in exchange.turns.values():  # a reply cut short has no latency event
        if turn.latency is None and turn.avatar.strip():
            _say(args, f"avatar: {turn.avatar.strip()}")
    wrote: str | None = None
    if args.out is not None and exchange.speech:
        samples, rate = Reply(speech=exchange.speech).avatar_audio()
        try:
            write_wav(args.out, samples, rate)
        except (OSError, RuntimeError) as exc:
            return _fail(f"cannot write {args.out}: {exc}", EXIT_FAILED)
        wrote = str(args.out)
        _say(args, f"wrote {args.out} ({len(samples) / rate:.1f} s of the avatar's voice, "
             f"{rate} Hz)")  # fmt: skip
    if args.json is not None:
        report = _report(args, target, outcome.session_id, audio, exchange, wrote, wall_s)
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text, flush=True)
        else:
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(text + "\n")
            except OSError as exc:
                return _fail(f"cannot write {args.json}: {exc}", EXIT_FAILED)
    if not any(t.avatar_audio_s > 0 or t.avatar.strip() for t in exchange.turns.values()):
        heard = any(t.user for t in exchange.turns.values())
        return _fail("the avatar did not answer" + ("" if heard else
                     f": the server heard no speech in {args.wav}"), EXIT_FAILED)  # fmt: skip
    return EXIT_OK


def _say(args: argparse.Namespace, line: str) -> None:
    if args.json != "-":  # `--json` alone: stdout is the report only
        print(line, flush=True)


#: Statuses that mean the request itself was refused (not a failure of the exchange).
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


async def _end_quietly(client: ParleyClient, session_id: str) -> None:
    try:
        await asyncio.shield(client.end_session(session_id))
    except (ParleyError, asyncio.CancelledError) as exc:
        print(f"parley talk: could not end session {session_id}: {exc}", file=sys.stderr)


def _latency_line(lat: TurnLatency) -> str:
    values = lat.as_dict()
    parts = [
        f"{label} {values[key]:.2f} s" for key, label in _MILESTONES if values[key] is not None
    ]
    return ", ".join(parts) or "no milestones reached"


def _report(
    args: argparse.Namespace,
    target: str,
    session_id: str,
    audio: np.ndarray,
    exchange: _Exchange,
    wrote: str | None,
    wall_s: float,
) -> dict[str, Any]:
    return {
        "target": target,
        "session_id": session_id,
        "input": {"wav": str(args.wav), "seconds": round(len(audio) / ASR_SAMPLE_RATE, 3)},
        "turns": [
            {
                "turn": t.turn,
                "user": t.user,
                "avatar": t.avatar.strip(),
                "avatar_audio_s": round(t.avatar_audio_s, 3),
                "interrupted": t.interrupted,
                "latency": None
                if t.latency is None
                else {k: v if v is None else round(v, 4) for k, v in t.latency.as_dict().items()},
            }
            for t in sorted(exchange.turns.values(), key=lambda t: t.turn)
        ],
        "reply_wav": wrote,
        "wall_s": round(wall_s, 3),
    }


def _fail(message: str, code: int) -> int:
    print(f"parley talk: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
