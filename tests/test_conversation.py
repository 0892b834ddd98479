"""The conversation loop end to end: a full turn over real gRPC on loopback, barge-in, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import av
import grpc
import numpy as np
import pytest
from parley import clock, rpc, wire
from parley.audio import float_to_pcm16, resample
from parley.v1 import audio_pb2, sessions_pb2, sessions_pb2_grpc

from loadtest.replay import word_error_rate
from services.render.animation import Pose
from services.render.config import RenderConfig
from services.render.engine import LocalRenderBackend, RenderEngine
from services.sessions.conversation import (
    AvatarAudioEvent,
    Conversation,
    Engines,
    TurnDoneEvent,
    UserTranscriptEvent,
)
from services.sessions.registry import LOCAL_TENANT, SessionRegistry
from services.sessions.servicer import SessionsServicer
from services.sessions.trace import TurnTrace
from services.sessions.video import AvatarVideoEvent, render_timed
from services.tts.engine import TtsEngine

SR = 16_000
FRAME = 320


async def user_says(tts: TtsEngine, text: str) -> np.ndarray:
    speech = await tts.synthesize(text)
    return resample(speech.samples, speech.sample_rate, SR)


def paced(audio: np.ndarray) -> list[np.ndarray]:
    return [audio[i : i + FRAME] for i in range(0, len(audio), FRAME)]


@pytest.fixture(scope="module")
async def server(engines: Engines) -> AsyncIterator[tuple[str, SessionRegistry]]:
    registry = SessionRegistry(engines)
    srv, port = await rpc.make_server(
        [(sessions_pb2_grpc.add_SessionsServicer_to_server, SessionsServicer(registry))],
        ["parley.v1.Sessions"],
    )
    await srv.start()
    yield f"127.0.0.1:{port}", registry
    await srv.stop(None)
    await registry.close()


async def test_full_turn_over_grpc(
    server: tuple[str, SessionRegistry], tts_engine: TtsEngine
) -> None:
    address, _ = server
    question = "What is the capital of France?"
    audio = np.concatenate([np.zeros(SR // 4, np.float32), await user_says(tts_engine, question)])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        session = await stub.CreateSession(sessions_pb2.CreateSessionRequest(persona_prompt=""))
        assert session.state == sessions_pb2.Session.ACTIVE

        async def client_events() -> AsyncIterator[sessions_pb2.ClientEvent]:
            yield sessions_pb2.ClientEvent(
                start=sessions_pb2.ConverseStart(session_id=session.session_id)
            )
            start = clock.now()
            frames = paced(np.concatenate([audio, np.zeros(SR * 2, np.float32)]))
            for k, frame in enumerate(frames):
                await asyncio.sleep(max(0.0, start + (k + 1) * FRAME / SR - clock.now()))
                yield sessions_pb2.ClientEvent(
                    audio=audio_pb2.AudioChunk(
                        pcm16=float_to_pcm16(frame), sample_rate=SR, channels=1
                    )
                )

        finals, avatar_samples, latencies = [], 0, []
        async for ev in stub.Converse(client_events()):
            kind = ev.WhichOneof("event")
            if kind == "user_transcript" and ev.user_transcript.is_final:
                finals.append(ev.user_transcript.text)
            elif kind == "avatar_speech":
                avatar_samples += len(ev.avatar_speech.audio.pcm16) // 2
                assert ev.avatar_speech.audio.sample_rate == 24_000
            elif kind == "latency":
                latencies.append(ev.latency)
        assert finals, "no final transcript"
        wer = word_error_rate(question, finals[0])
        assert wer is not None and wer <= 0.2, finals
        assert avatar_samples > 0.3 * 24_000  # the avatar said something audible
        assert len(latencies) == 1
        lat = latencies[0]
        # Milestones come in pipeline order; a speculative reply may generate while the
        # detector waits out the pause, so its first token can precede the end of turn.
        assert 0 < lat.end_of_turn_s <= lat.first_output_s
        assert 0 < lat.llm_first_token_s <= lat.tts_first_audio_s <= lat.first_output_s
        ended = await stub.EndSession(sessions_pb2.EndSessionRequest(session_id=session.session_id))
        assert ended.state == sessions_pb2.Session.ENDED


async def test_bad_messages_get_clear_errors_and_spare_other_sessions(
    server: tuple[str, SessionRegistry],
) -> None:
    address, _ = server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        other = await stub.CreateSession(sessions_pb2.CreateSessionRequest())
        victim = await stub.CreateSession(sessions_pb2.CreateSessionRequest())

        async def send(*events: sessions_pb2.ClientEvent) -> grpc.aio.AioRpcError:
            async def it() -> AsyncIterator[sessions_pb2.ClientEvent]:
                for e in events:
                    yield e

            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [e async for e in stub.Converse(it())]
            return err.value

        start = sessions_pb2.ClientEvent(
            start=sessions_pb2.ConverseStart(session_id=victim.session_id)
        )
        wrong_rate = sessions_pb2.ClientEvent(
            audio=audio_pb2.AudioChunk(pcm16=b"\0" * 640, sample_rate=44_100, channels=1)
        )
        stereo = sessions_pb2.ClientEvent(
            audio=audio_pb2.AudioChunk(pcm16=b"\0" * 640, sample_rate=SR, channels=2)
        )
        odd = sessions_pb2.ClientEvent(
            audio=audio_pb2.AudioChunk(pcm16=b"\0" * 3, sample_rate=SR, channels=1)
        )
        for bad, fragment in ((wrong_rate, "16000 Hz"), (stereo, "mono"), (odd, "even number")):
            err = await send(start, bad)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in (err.details() or "")
        err = await send(wrong_rate)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ConverseStart" in (
            err.details() or ""
        )
        missing = sessions_pb2.ClientEvent(start=sessions_pb2.ConverseStart(session_id="nope"))
        assert (await send(missing)).code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as get_err:
            await stub.GetSession(sessions_pb2.GetSessionRequest(session_id="nope"))
        assert get_err.value.code() == grpc.StatusCode.NOT_FOUND
        oversized = sessions_pb2.ClientEvent(
            audio=audio_pb2.AudioChunk(pcm16=b"\0" * (5 << 20), sample_rate=SR, channels=1)
        )
        assert (await send(start, oversized)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Both sessions are still there and usable.
        for s in (other, victim):
            got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=s.session_id))
            assert got.state == sessions_pb2.Session.ACTIVE
        listed = await stub.ListSessions(sessions_pb2.ListSessionsRequest())
        assert {other.session_id, victim.session_id} <= {s.session_id for s in listed.sessions}


async def test_client_disconnect_mid_turn_stops_the_reply_and_keeps_the_session(
    server: tuple[str, SessionRegistry], tts_engine: TtsEngine
) -> None:
    address, registry = server
    question = await user_says(tts_engine, "Tell me a long story about a brave little mouse.")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        session = await stub.CreateSession(
            sessions_pb2.CreateSessionRequest(persona_prompt="You tell long stories.")
        )
        start = sessions_pb2.ClientEvent(
            start=sessions_pb2.ConverseStart(session_id=session.session_id)
        )

        async def talk(audio: np.ndarray) -> AsyncIterator[sessions_pb2.ClientEvent]:
            yield start
            t0 = clock.now()
            for k, frame in enumerate(paced(audio)):
                await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME / SR - clock.now()))
                yield sessions_pb2.ClientEvent(audio=wire.audio_to_proto(frame, SR, 0))

        # The client goes away (its connection drops) while the avatar talks.
        lost = grpc.aio.insecure_channel(address)
        call = sessions_pb2_grpc.SessionsStub(lost).Converse(
            talk(np.concatenate([question, np.zeros(SR * 20, np.float32)]))
        )
        async for ev in call:
            if ev.WhichOneof("event") == "avatar_speech":
                break
        await lost.close(None)
        record = await registry.get(LOCAL_TENANT, session.session_id)
        conv = record.conversation
        assert conv is not None
        for _ in range(100):  # the server notices the cancellation within a few ms
            if not (conv.replying or record.streaming):
                break
            await asyncio.sleep(0.02)
        assert not conv.replying and not record.streaming
        # The same session takes a new stream, which starts clean: no leftovers of the old reply.
        events = [ev async for ev in stub.Converse(talk(np.zeros(SR // 2, np.float32)))]
        assert not any(ev.WhichOneof("event") == "avatar_speech" for ev in events)
        got = await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=session.session_id))
        assert got.state == sessions_pb2.Session.ACTIVE and got.turns == 1


async def test_monologue_is_transcribed_in_bounded_pieces(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    """A user who talks for 5 minutes: bounded memory, transcripts keep coming, no crash."""
    conv = Conversation(engines)
    sentence = await user_says(tts_engine, "and then we walked along the river to the old mill")
    audio = np.concatenate([sentence] * int(300 / (len(sentence) / SR) + 1))[: 300 * SR]
    # Faster than real time (CI time), in 1 s pieces; the ASR lags behind but never piles up.
    for i in range(0, len(audio), SR):
        await conv.push_audio(audio[i : i + SR])
        await asyncio.sleep(0.03)
        utt = conv.asr._utterance
        assert utt is None or utt.samples <= (engines.asr.config.max_utterance_s + 1.5) * SR
    await conv.push_audio(np.zeros(SR * 2, np.float32))

    def finals() -> list[UserTranscriptEvent]:
        events = list(conv.events._queue)  # type: ignore[attr-defined]
        return [e for e in events if isinstance(e, UserTranscriptEvent) and e.is_final]

    # The decodes it fell behind by finish (slowly on a busy machine). How the 300 s
    # split into utterances and turns depends on timing (fed at ~30x real time, with
    # replies and barge-ins in between); the ASR level test counts the pieces exactly.
    for _ in range(600):
        if finals():
            break
        await asyncio.sleep(0.1)
    assert finals()
    assert "river" in " ".join(e.text for e in finals()).lower()
    await conv.close()


async def test_barge_in_stops_the_avatar(engines: Engines, tts_engine: TtsEngine) -> None:
    conv = Conversation(engines, "You are a storyteller. Tell long stories.")
    question = await user_says(tts_engine, "Tell me a long story about a dragon and a knight.")
    interruption = await user_says(tts_engine, "Wait, stop please.")
    start = clock.now()
    sent = 0

    async def push(audio: np.ndarray) -> None:
        nonlocal sent
        for frame in paced(audio):
            sent += len(frame)
            await asyncio.sleep(max(0.0, start + sent / SR - clock.now()))
            await conv.push_audio(frame)

    async def until_avatar_speaks() -> None:
        while True:
            await push(np.zeros(FRAME, np.float32))
            if any(isinstance(e, AvatarAudioEvent) for e in list(conv.events._queue)):  # type: ignore[attr-defined]
                return

    await push(np.concatenate([np.zeros(SR // 4, np.float32), question]))
    await asyncio.wait_for(until_avatar_speaks(), 20)
    await push(np.zeros(SR // 4, np.float32))  # the avatar talks a little
    assert conv.replying
    await push(interruption)
    await push(np.zeros(SR // 2, np.float32))  # the words are in: no backchannel
    traces = [e.trace for e in list(conv.events._queue) if isinstance(e, TurnDoneEvent)]  # type: ignore[attr-defined]
    assert traces and traces[0].interrupted
    # The avatar went quiet as soon as the user's speech was detected.
    assert 0 < traces[0].interruption_stop_s < 0.5
    # No avatar audio of the interrupted turn was sent after the interruption.
    events = list(conv.events._queue)  # type: ignore[attr-defined]
    done_at = next(i for i, e in enumerate(events) if isinstance(e, TurnDoneEvent))
    assert not any(
        isinstance(e, AvatarAudioEvent) and e.turn == traces[0].turn for e in events[done_at:]
    )
    await conv.close()


async def test_avatar_lip_syncs_each_reply_and_times_its_first_frame(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    render = RenderEngine(RenderConfig(width=64, height=64))
    await render.start()
    with_avatar = dataclasses.replace(engines, render=render)
    conv = Conversation(with_avatar)
    question = await user_says(tts_engine, "What is the capital of France?")
    start = clock.now()
    audio = np.concatenate([np.zeros(SR // 4, np.float32), question])
    for k, frame in enumerate(paced(audio)):
        await asyncio.sleep(max(0.0, start + (k + 1) * FRAME / SR - clock.now()))
        await conv.push_audio(frame)
    trace = None
    for _ in range(1500):  # silence until the reply is done
        await conv.push_audio(np.zeros(FRAME, np.float32))
        await asyncio.sleep(FRAME / SR)
        done = [e for e in list(conv.events._queue) if isinstance(e, TurnDoneEvent)]  # type: ignore[attr-defined]
        if done:
            trace = done[0].trace
            break
    assert trace is not None
    # The frame shown with the first audio was rendered, after the audio was synthesized.
    assert trace.first_frame >= trace.tts_first_audio > 0
    avatar = conv.avatar
    assert avatar is not None and avatar.speech_end_s > 0
    # The speech sits on the avatar's session timeline, where the reply was said: the
    # mouth moves within it and rests before it.
    speech_s = np.arange(0.0, avatar.speech_end_s, 1 / avatar.fps)
    openings = [avatar.mouth_open_at(t) for t in speech_s]
    assert max(openings) > 0.2
    assert avatar.mouth_open_at(0.1) < 0.05
    await conv.close()
    await render.close()


async def test_live_video_follows_the_voice_and_never_queues_for_a_slow_reader(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    render = RenderEngine(RenderConfig(width=64, height=64))
    await render.start()
    conv = Conversation(dataclasses.replace(engines, render=render))
    video = conv.start_video("h264")
    config = conv.engines.video
    silence = np.zeros(FRAME, np.float32)
    start = clock.now()

    async def push(audio: np.ndarray) -> None:
        nonlocal start
        for frame in paced(audio):
            start += FRAME / SR
            await asyncio.sleep(max(0.0, start - clock.now()))
            await conv.push_audio(frame)

    # Nobody reads the frames for 0.6 s: at most `max_pending` wait, the rest are skipped.
    await push(np.zeros(int(0.6 * SR), np.float32))
    assert video.stats.rendered == config.max_pending, video.stats
    assert video.stats.dropped_slow_client >= 3, video.stats
    frames: list[AvatarVideoEvent] = []

    async def read() -> None:
        async for frame in video.frames():
            frames.append(frame)

    reader = asyncio.create_task(read())
    question = await user_says(tts_engine, "What is the capital of France?")
    await push(question)
    voice: list[AvatarAudioEvent] = []
    trace = None
    for _ in range(1500):  # silence until the reply is done
        await push(silence)
        while not conv.events.empty():
            event = conv.events.get_nowait()
            if isinstance(event, AvatarAudioEvent):
                voice.append(event)
            elif isinstance(event, TurnDoneEvent):
                trace = event.trace
        if trace is not None:
            break
    assert trace is not None and voice
    await push(np.zeros(SR // 4, np.float32))
    conv.stop_video()
    await reader
    await conv.close()
    await render.close()

    # The reply's first frame was the live one, rendered after its audio was synthesized.
    assert trace.first_frame >= trace.tts_first_audio > 0
    assert trace.first_frame - trace.first_output < 0.5
    # Frames ran on the session's clock at the configured rate, in order.
    assert all(f.width == f.height == 64 and f.encoding == "h264" for f in frames)
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices))
    assert all(abs(f.pts_s - f.index / config.fps) < 1e-9 for f in frames)
    # The voice's pts are on the same timeline: contiguous, and the frames cover them.
    rate = voice[0].sample_rate
    pts = [v.pts_s for v in voice]
    assert all(p is not None for p in pts)
    gaps = [
        (b.pts_s or 0.0) - (a.pts_s or 0.0) - len(a.samples) / rate
        for a, b in itertools.pairwise(voice)
    ]
    # Back to back (a clause that came late starts later: the client's buffer ran dry).
    assert min(gaps) > -2e-3 and sorted(gaps)[len(gaps) // 2] < 2e-3, gaps
    first_s, last_s = voice[0].pts_s or 0.0, voice[-1].pts_s or 0.0
    shown = [f for f in frames if first_s <= f.pts_s <= last_s]
    assert len(shown) >= 0.6 * (last_s - first_s) * config.fps, (len(shown), video.stats)
    # ... and what those frames show is the reply: the mouth moves while the voice plays
    # and rests before it.
    avatar = conv.avatar
    assert avatar is not None
    assert max(avatar.mouth_open_at(avatar.pose_time(f.index)) for f in shown) > 0.2
    assert avatar.mouth_open_at(first_s - 0.3) < 0.05
    # The video held its frame while the reply was being prepared, then went on.
    assert video.stats.held > 0
    # The H.264 stream decodes from the first frame sent (a keyframe), every frame.
    assert frames[0].key
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for f in frames:
        for packet in decoder.parse(f.data):
            decoded += [d.to_ndarray(format="rgb24") for d in decoder.decode(packet)]
    for d in decoder.decode(None):
        decoded.append(d.to_ndarray(format="rgb24"))
    assert len(decoded) >= len(frames) - 1
    assert decoded[0].shape == (64, 64, 3)
    assert len({d.tobytes() for d in decoded}) > len(decoded) // 2  # the avatar moves


class FlakyRenderBackend(LocalRenderBackend):
    """Draws frames here, except calls `lost` (a render replica gone, or timing out)."""

    def __init__(self, config: RenderConfig, lost: range) -> None:
        super().__init__(config)
        self.calls = 0
        self.lost = lost

    def render(self, avatar_id: str, width: int, height: int, pose: Pose) -> np.ndarray:
        self.calls += 1
        if self.calls in self.lost:
            raise TimeoutError("render replica did not answer")
        return super().render(avatar_id, width, height, pose)


async def test_live_video_skips_frames_that_fail_to_render_and_goes_on(engines: Engines) -> None:
    config = RenderConfig(width=64, height=64)
    backend = FlakyRenderBackend(config, lost=range(3, 7))
    render = RenderEngine(config, backend=backend)
    await render.start()  # warm-up is call 1
    conv = Conversation(dataclasses.replace(engines, render=render))
    video = conv.start_video("jpeg")
    frames: list[AvatarVideoEvent] = []
    enough = asyncio.Event()

    async def read() -> None:
        async for frame in video.frames():
            frames.append(frame)
            if len(frames) == 8:
                enough.set()

    reader = asyncio.create_task(read())
    await asyncio.wait_for(enough.wait(), 10.0)
    assert video.running  # the failures did not end the video
    conv.stop_video()
    await reader
    await conv.close()
    await render.close()
    assert video.stats.failed == 4, video.stats
    assert len(frames) >= 8 and video.stats.rendered >= 8
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices))
    # The failed frames are missing from the stream, not sent late or twice.
    assert indices[-1] - indices[0] + 1 >= len(frames) + video.stats.failed


async def test_a_reply_whose_first_frame_fails_to_render_goes_on_without_it() -> None:
    config = RenderConfig(width=64, height=64)
    render = RenderEngine(config, backend=FlakyRenderBackend(config, lost=range(1, 1000)))
    trace = TurnTrace(turn=1)
    with ThreadPoolExecutor(1) as executor:
        await render_timed(executor, render.stream(), trace, 0)  # no exception
    assert trace.first_frame == 0.0  # no milestone: the frame was never drawn
