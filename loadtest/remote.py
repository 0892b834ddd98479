"""The latency replay against a running server (`parley bench latency --target ...`).

The same utterances as the in-process replay go to a sessions server over gRPC, as a
client would send them: one session, one Converse stream, 20 ms frames in real time,
silence between turns until the avatar has answered. u2u is measured where a client
sees it: from the moment the last sample of the user's speech was sent to the moment
the reply's first audio arrives (so it includes the network, the Serve proxy and every
hop between the stage deployments).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from parley import clock
from parley.audio import ASR_SAMPLE_RATE
from parley.client import (
    AvatarSpeech,
    AvatarText,
    AvatarVideo,
    Event,
    ParleyClient,
    ReplyDone,
    TurnLatency,
    UserTranscript,
)

from loadtest.corpus import Utterance, speech_bounds
from loadtest.replay import CUT_IN_TOLERANCE_S, FRAME, LEAD_SILENCE_S, REPLY_TIMEOUT_S

#: Silence sent after a reply has finished, before the next utterance.
GAP_S = 0.3


@dataclass(slots=True)
class RemoteTurn:
    index: int
    audio: str
    reference: str
    true_speech_end: float = 0.0  # client clock: the last speech sample was sent
    first_audio_at: float | None = None  # client clock: the reply's first audio arrived
    first_video_at: float | None = None
    hypothesis: str = ""
    reply: str = ""
    server_latency: TurnLatency | None = None
    #: replies that started before the utterance ended (false cut-ins)
    cut_ins: int = 0
    turn: int | None = None

    @property
    def u2u_s(self) -> float | None:
        if self.first_audio_at is None:
            return None
        return self.first_audio_at - self.true_speech_end

    @property
    def u2u_audio_video_s(self) -> float | None:
        if self.first_audio_at is None or self.first_video_at is None:
            return None
        return max(self.first_audio_at, self.first_video_at) - self.true_speech_end

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "audio": self.audio,
            "reference": self.reference,
            "hypothesis": self.hypothesis,
            "reply": self.reply,
            "u2u_s": self.u2u_s,
            "u2u_audio_video_s": self.u2u_audio_video_s,
            "false_cut_ins": self.cut_ins,
            "server_latency_s": self.server_latency.as_dict() if self.server_latency else None,
        }


@dataclass(slots=True)
class _Listener:
    """What the event reader has seen; the sender waits on it between utterances."""

    current: RemoteTurn | None = None
    turns_seen: set[int] = field(default_factory=set)
    done_turns: set[int] = field(default_factory=set)
    texts: dict[int, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, event: Event) -> None:
        turn = self.current
        now = clock.now()
        if isinstance(event, ReplyDone | TurnLatency):  # a turn's latencies come at its end
            self.done_turns.add(event.turn)
        if turn is None:
            return
        elif isinstance(event, UserTranscript) and event.is_final:
            turn.hypothesis = event.text
        elif isinstance(event, AvatarSpeech) and event.turn not in self.turns_seen:
            self.turns_seen.add(event.turn)
            if now < turn.true_speech_end - CUT_IN_TOLERANCE_S:
                turn.cut_ins += 1  # a reply to part of the utterance
            elif turn.turn is None:
                turn.turn, turn.first_audio_at = event.turn, now
        elif isinstance(event, AvatarVideo) and turn.turn is not None:
            if turn.first_video_at is None and now >= (turn.first_audio_at or now):
                turn.first_video_at = now
        elif isinstance(event, AvatarText):  # may come before the reply's first audio
            self.texts[event.turn] = self.texts.get(event.turn, "") + event.text
        elif isinstance(event, TurnLatency) and event.turn == turn.turn:
            turn.server_latency = event
        self.changed.set()


async def replay_remote(
    client: ParleyClient,
    utterances: list[Utterance],
    *,
    video: Literal["h264", "jpeg", "none"] = "h264",
    persona_prompt: str = "",
    on_turn: Any = None,
    before_each: Callable[[int], Awaitable[None]] | None = None,
) -> list[RemoteTurn]:
    """Say each utterance in one session over one stream; measure each reply as it arrives.

    `before_each(i)` runs before utterance i is said (the in-process turn of the same
    run); the stream carries silence meanwhile, as a live microphone would.
    """
    session = await client.create_session(persona_prompt=persona_prompt)
    listener = _Listener()
    turns: list[RemoteTurn] = []
    silence = np.zeros(FRAME, np.float32)

    async def microphone() -> AsyncIterator[np.ndarray]:
        start = clock.now()
        sent = 0

        async def send(audio: np.ndarray) -> AsyncIterator[np.ndarray]:
            nonlocal sent
            for k in range(0, len(audio), FRAME):
                frame = audio[k : k + FRAME]
                sent += len(frame)
                await asyncio.sleep(max(0.0, start + sent / ASR_SAMPLE_RATE - clock.now()))
                yield frame

        for i, utt in enumerate(utterances):
            if before_each is not None:
                other = asyncio.ensure_future(before_each(i))
                try:
                    while not other.done():
                        async for frame in send(silence):
                            yield frame
                finally:
                    if not other.done():  # the stream failed: stop the other side too
                        other.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await other
                other.result()
            turn = RemoteTurn(i, utt.path.name, utt.text)
            listener.current = turn
            lead = np.zeros(int(LEAD_SILENCE_S * ASR_SAMPLE_RATE), np.float32)
            _, end = speech_bounds(utt.audio)
            # Known before sending: a fast reply during the utterance's trailing silence
            # is then measured, not taken for a cut-in.
            turn.true_speech_end = start + (sent + len(lead) + end) / ASR_SAMPLE_RATE
            async for frame in send(np.concatenate([lead, utt.audio])):
                yield frame
            deadline = clock.now() + REPLY_TIMEOUT_S
            while clock.now() < deadline and not (
                turn.turn is not None and turn.turn in listener.done_turns
            ):
                async for frame in send(silence):
                    yield frame
            async for frame in send(np.zeros(int(GAP_S * ASR_SAMPLE_RATE), np.float32)):
                yield frame
            turn.reply = listener.texts.get(turn.turn, "") if turn.turn is not None else ""
            turns.append(turn)
            if on_turn is not None:
                on_turn(turn)

    events = client.converse(session.session_id, microphone(), realtime=False, video=video)
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                listener.on_event(event)
    finally:
        with contextlib.suppress(Exception):
            await client.end_session(session.session_id)
    return turns
