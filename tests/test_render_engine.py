"""Render engine: speech placed on the audio timeline drives the mouth in frames whose pts
share that timeline; pacing skips (and counts) frames it cannot render in time;
H.264 and MP4 output."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncGenerator, AsyncIterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from parley import clock
from parley.errors import InvalidInput
from parley.visemes import Phoneme
from prometheus_client import REGISTRY
from render_support import mouth_dark_pixels

from services.render.animation import Pose
from services.render.assets import save_ply, save_rig
from services.render.config import RenderConfig
from services.render.encoder import H264Encoder, write_mp4
from services.render.engine import (
    CLEAR_RELEASE_S,
    AvatarStream,
    Frame,
    RenderEngine,
    av_offset_s,
    check_pose,
    voiced_onset_s,
)

SR = 16_000
SIZE = 128


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[RenderEngine]:
    e = RenderEngine(RenderConfig())
    await e.start()
    yield e
    await e.close()


def ms(t: float) -> int:
    return round(t * SR)


def speech(visemes: list[tuple[str, float, float]], total_s: float) -> list[Phoneme]:
    return [Phoneme(v.lower(), v, ms(a), ms(b) - ms(a)) for v, a, b in visemes]


def dropped_total() -> float:
    return REGISTRY.get_sample_value("parley_render_frames_dropped_total") or 0.0


async def test_frames_share_the_audio_timeline_and_show_the_visemes(engine: RenderEngine) -> None:
    fps = 25
    stream = engine.stream("default", SIZE, SIZE, fps)
    phonemes = speech(
        [("sil", 0.0, 0.4), ("aa", 0.4, 0.8), ("PP", 0.8, 1.2), ("sil", 1.2, 1.4)], 1.4
    )
    stream.add_speech(np.zeros(ms(1.4), np.float32), SR, 0, phonemes)
    frames = [stream.render_frame(i) for i in range(0, 40)]
    for i, f in enumerate(frames):
        assert f.index == i and f.pts_s == pytest.approx(i / fps)
        assert f.rgb.shape == (SIZE, SIZE, 3) and f.rgb.dtype == np.uint8
    dark = [mouth_dark_pixels(engine, f.rgb) for f in frames]
    vowel = [d for f, d in zip(frames, dark, strict=True) if 0.45 <= f.pts_s <= 0.75]
    closed = [d for f, d in zip(frames, dark, strict=True) if 0.85 <= f.pts_s <= 1.15]
    rest = [d for f, d in zip(frames, dark, strict=True) if f.pts_s <= 0.35]
    assert min(vowel) >= 10, dark
    assert max(closed) <= 2 and max(rest) <= 2, dark
    assert all(f.mouth_open > 0.8 for f in frames if 0.45 <= f.pts_s <= 0.75)
    assert all(f.speaking for f in frames if f.pts_s < 1.4)
    # Deterministic, whatever was rendered before: a fresh stream renders frame 30 alike.
    other = engine.stream("default", SIZE, SIZE, fps)
    other.add_speech(np.zeros(ms(1.4), np.float32), SR, 0, phonemes)
    assert np.array_equal(other.render_frame(30).rgb, frames[30].rgb)
    assert np.array_equal(stream.render_frame(15).rgb, frames[15].rgb)


async def test_av_offset_is_within_one_frame(engine: RenderEngine) -> None:
    fps = 25
    for onset in (0.5, 0.613, 0.737):  # on and between frame times
        stream = engine.stream("default", SIZE, SIZE, fps)
        phonemes = speech(
            [("sil", 0.0, onset), ("aa", onset, onset + 0.3), ("sil", onset + 0.3, 1.2)], 1.2
        )
        stream.add_speech(np.zeros(ms(1.2), np.float32), SR, 0, phonemes)
        start = voiced_onset_s(phonemes, SR)
        assert start is not None and start == pytest.approx(onset, abs=1 / SR)
        frames = [
            stream.render_frame(i) for i in range(math.floor(0.3 * fps), math.ceil(1.1 * fps))
        ]
        # The pose: half open (0.85 / 2 for "aa") within half a frame of the sound.
        pose_offset = av_offset_s([(f.pts_s, f.mouth_open) for f in frames], start, 0.4)
        # Seen in the image: the mouth's dark pixels reach half their peak.
        dark = [(f.pts_s, float(mouth_dark_pixels(engine, f.rgb))) for f in frames]
        peak = max(d for _, d in dark)
        image_offset = av_offset_s(dark, start, peak / 2)
        assert pose_offset is not None and image_offset is not None
        assert abs(pose_offset) <= 0.5 / fps + 0.005, (onset, pose_offset)
        assert -1 / fps <= image_offset <= 1 / fps, (onset, image_offset)


async def test_loudness_drives_the_jaw_only_where_no_phoneme_does(engine: RenderEngine) -> None:
    stream = engine.stream("default", 64, 64, 25)
    t = np.arange(ms(1.0)) / SR
    loud = (0.3 * np.sin(2 * math.pi * 220 * t)).astype(np.float32)
    # TTS without phoneme timings: the audio envelope opens the jaw.
    stream.add_speech(np.concatenate([np.zeros(ms(0.5), np.float32), loud]), SR, 0, [])
    assert stream.mouth_open_at(0.3) == pytest.approx(0.0, abs=1e-6)
    assert stream.mouth_open_at(1.0) > 0.4
    # Conversation-style 20 ms chunks, each with the phonemes that start in it: a long
    # closed "PP" spans loud chunks that carry no phonemes; the mouth stays closed.
    start = ms(2.0)
    step = ms(0.02)
    phonemes = {
        0: [Phoneme("m", "PP", start, ms(0.5))],
        ms(0.5): [Phoneme("a", "aa", start + ms(0.5), ms(0.3))],
    }
    for offset in range(0, ms(0.8), step):
        stream.add_speech(
            loud[offset : offset + step], SR, start + offset, phonemes.get(offset, [])
        )
    assert all(stream.mouth_open_at(2.0 + x) < 0.05 for x in np.arange(0.0, 0.45, 0.02))
    assert stream.mouth_open_at(2.65) > 0.8


async def test_clear_drops_speech_and_the_mouth_returns_to_rest(engine: RenderEngine) -> None:
    fps = 25
    stream = engine.stream("default", SIZE, SIZE, fps)
    phonemes = speech([("aa", 0.2, 2.0)], 2.0)
    stream.add_speech(np.zeros(ms(2.0), np.float32), SR, 0, phonemes)
    cut = 0.6
    stream.clear(cut)
    assert stream.mouth_open_at(cut - 0.05) > 0.8
    openings = [stream.mouth_open_at(cut + x) for x in np.arange(0.0, CLEAR_RELEASE_S, 0.01)]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(openings))  # glides
    assert 0.0 < openings[len(openings) // 2] < openings[0]
    after = [stream.render_frame(i) for i in range(math.ceil((cut + CLEAR_RELEASE_S) * fps), 50)]
    assert all(f.mouth_open == 0.0 and not f.speaking for f in after)
    assert max(mouth_dark_pixels(engine, f.rgb) for f in after) <= 2
    assert stream.speech_end_s == pytest.approx(cut)
    # The next reply may start where the clear cut the old one.
    assert stream.next_sample == ms(cut)
    stream.add_speech(
        np.zeros(ms(0.5), np.float32), SR, ms(cut) + ms(0.4), speech([("aa", 1.0, 1.5)], 0)
    )
    assert stream.mouth_open_at(1.25) > 0.8
    assert stream.render_frame(31).speaking


async def test_speech_and_avatar_validation(engine: RenderEngine, tmp_path: Path) -> None:
    stream = engine.stream("default", 64, 64, 25)
    stream.add_speech(np.zeros(1600, np.float32), SR, 0, [])
    silence = np.zeros(160, np.float32)
    bad = {
        "one stream has one sample rate": lambda: stream.add_speech(silence, 24_000, 1600, []),
        "must not overlap": lambda: stream.add_speech(silence, SR, 800, []),
        "start_sample must be >= 0": lambda: stream.add_speech(silence, SR, -1, []),
        "not supported": lambda: stream.add_speech(silence, 1000, 1600, []),
        "NaN": lambda: stream.add_speech(np.full(10, np.nan, np.float32), SR, 1600, []),
        "unknown viseme": lambda: stream.add_speech(
            silence, SR, 1600, [Phoneme("x", "XX", 1600, 10)]
        ),
        "outside its audio chunk": lambda: stream.add_speech(
            silence, SR, 1600, [Phoneme("a", "aa", 10, 10)]
        ),
        "lasts": lambda: stream.add_speech(silence, SR, 1600, [Phoneme("a", "aa", 1600, -5)]),
        "ahead of the video": lambda: stream.add_speech(silence, SR, 10_000 * SR, []),
    }
    for fragment, call in bad.items():
        with pytest.raises(InvalidInput, match=fragment):
            call()
    for avatar_id in ("../etc/passwd", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(InvalidInput, match="invalid avatar id"):
            engine.avatar(avatar_id)
    with pytest.raises(InvalidInput, match=r"unknown avatar 'nobody'.*\['default'\]"):
        engine.stream("nobody")
    for kwargs, fragment in (
        ({"width": 8}, "width 8 is out of range"),
        ({"height": 2048}, "height 2048"),
        ({"fps": 61}, "fps 61"),
    ):
        with pytest.raises(InvalidInput, match=fragment):
            engine.stream("default", **kwargs)

    # Avatars from a directory: <id>.ply + <id>.rig.json.
    default = engine.avatar("default")
    save_ply(default.cloud, tmp_path / "alice.ply")
    save_rig(default.rig, tmp_path / "alice.rig.json")
    (tmp_path / "broken.ply").write_bytes(b"not a ply")
    (tmp_path / "broken.rig.json").write_text("{}")
    files = RenderEngine(RenderConfig(avatars_dir=str(tmp_path)))
    assert files.avatar_ids() == ["alice", "broken", "default"]
    alice = files.avatar("alice")
    assert alice.avatar_id == "alice" and alice.cloud.num == default.cloud.num
    assert files.avatar("alice") is alice  # cached
    frame = files.stream("alice", 64, 64, 25).render_frame(0)
    assert frame.rgb.shape == (64, 64, 3)
    with pytest.raises(InvalidInput, match="not a PLY"):
        files.avatar("broken")


async def collect(stream: AvatarStream, start: float | None = None) -> list[Frame]:
    return [f async for f in stream.frames(start)]


async def test_paced_frames_keep_pts_on_schedule(engine: RenderEngine) -> None:
    fps = 10
    stream = engine.stream("default", 64, 64, fps)
    stream.add_speech(np.zeros(ms(0.8), np.float32), SR, 0, speech([("aa", 0.2, 0.6)], 0.8))
    stream.end_after_speech(0.2)
    started = clock.now()
    frames = await collect(stream, started)
    elapsed = clock.now() - started
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)) and indices[-1] == 10  # through 0.8 + 0.2 s
    assert all(f.pts_s == pytest.approx(f.index / fps) for f in frames)
    assert len(frames) + stream.frames_dropped == 11
    assert 0.9 <= elapsed < 10.0  # paced at real time (generous upper bound: busy box)


async def test_slow_rendering_skips_frames_and_counts_them(
    engine: RenderEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    fps = 20
    render = AvatarStream.render_frame

    def slow(self: AvatarStream, index: int) -> Frame:
        frame = render(self, index)
        clock_start = clock.now()
        while clock.now() - clock_start < 0.12:  # 2.4 frame periods per frame
            pass
        return frame

    monkeypatch.setattr(AvatarStream, "render_frame", slow)
    stream = engine.stream("default", 64, 64, fps)
    stream.add_speech(np.zeros(ms(1.0), np.float32), SR, 0, [])
    stream.end_after_speech(0.0)
    before = dropped_total()
    frames = await collect(stream)
    indices = [f.index for f in frames]
    assert all(f.pts_s == pytest.approx(f.index / fps) for f in frames)
    assert indices == sorted(set(indices))
    # Every frame through the end of the speech (1.0 s: frame 20) is shown or counted.
    missing = set(range(21)) - set(indices)
    assert missing and len(missing) == stream.frames_dropped
    assert dropped_total() - before == stream.frames_dropped
    assert max(indices) <= 20


async def test_close_stops_frames(engine: RenderEngine) -> None:
    stream = engine.stream("default", 64, 64, 25)
    got = []
    async for frame in stream.frames():
        got.append(frame)
        if len(got) == 3:
            stream.close()
    assert len(got) == 3
    # One pacer per stream.
    other = engine.stream("default", 64, 64, 25)
    running = aiter(other.frames())
    assert isinstance(running, AsyncGenerator)
    await anext(running)
    with pytest.raises(RuntimeError, match="already running"):
        await anext(other.frames())
    await running.aclose()


def test_h264_encoder_emits_each_frame_at_once_and_decodes() -> None:
    fps = 10
    encoder = H264Encoder(64, 48, fps)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(25)]
    packets = [encoder.encode(img) for img in images]
    assert all(packets), "zerolatency: every frame comes out at once"
    assert encoder.flush() == b""
    idr = [i for i, p in enumerate(packets) if b"\x00\x00\x01\x65" in p]
    assert idr == [0, 20]  # a keyframe every 2 s
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for packet in decoder.parse(b"".join(packets)):
        decoded += decoder.decode(packet)
    for packet in decoder.parse(None):
        decoded += decoder.decode(packet)
    decoded += decoder.decode(None)
    assert len(decoded) == 25
    assert (decoded[0].width, decoded[0].height) == (64, 48)
    with pytest.raises(ValueError, match="even"):
        H264Encoder(63, 48, fps)
    with pytest.raises(ValueError, match="48x64x3"):
        H264Encoder(64, 48, fps).encode(np.zeros((48, 64), np.uint8))


def test_write_mp4_muxes_video_and_audio(engine: RenderEngine, tmp_path: Path) -> None:
    fps, rate = 25, 24_000
    stream = engine.stream("default", 64, 64, fps)
    t = np.arange(2 * rate) / rate
    audio = (0.3 * np.sin(2 * math.pi * 220 * t) * (t > 0.5)).astype(np.float32)
    stream.add_speech(audio, rate, 0, [])
    path = tmp_path / "conversation.mp4"
    count = write_mp4(path, (stream.render_frame(i).rgb for i in range(50)), fps, audio, rate)
    assert count == 50
    with av.open(str(path)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and sound.codec_context.name == "aac"
        assert (video.codec_context.width, video.codec_context.height) == (64, 64)
        assert video.frames == 50
        assert video.duration is not None and sound.duration is not None
        assert video.time_base is not None and sound.time_base is not None
        assert float(video.duration * video.time_base) == pytest.approx(2.0, abs=0.05)
        assert float(sound.duration * sound.time_base) == pytest.approx(2.0, abs=0.05)
        assert sound.sample_rate == rate
        # Read while the container is open (PyAV 18 refuses a closed stream's fields).
        assert Fraction(video.average_rate or 0) == fps
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert len(decoded) == pytest.approx(2 * rate, abs=2048)
    # The sine starts at 0.5 s in the decoded audio too (AAC priming is trimmed).
    loud = np.flatnonzero(np.abs(decoded) > 0.1)
    assert loud[0] / rate == pytest.approx(0.5, abs=0.03)


async def test_head_motion_is_subtle_and_glides_with_speaking() -> None:
    engine = RenderEngine(RenderConfig(listening_motion_deg=0.0, speaking_motion_deg=2.0))
    stream = engine.stream("default", 64, 64, 25)
    stream.add_speech(np.zeros(ms(10.0), np.float32), SR, ms(5.0), [])
    times = np.arange(0.0, 25.0, 0.04)
    poses = [stream.pose_at(float(t)) for t in times]
    yaw = np.degrees([p.yaw for p in poses])
    angles = np.degrees([[p.yaw, p.pitch, p.roll] for p in poses])
    assert np.abs(yaw[times < 5.0]).max() == 0.0  # still while listening (amplitude 0)
    assert np.abs(angles).max() <= 2.0 + 1e-9
    assert np.abs(yaw[(times > 9.0) & (times < 15.0)]).max() > 0.3  # moves while speaking
    assert np.abs(np.diff(angles, axis=0)).max() < 0.1  # no jumps at speech start or end
    assert np.abs(yaw[times > 24.0]).max() < 0.02  # and settles after speaking
    # The same pose whatever was asked before (closed form).
    fresh = engine.stream("default", 64, 64, 25)
    fresh.add_speech(np.zeros(ms(10.0), np.float32), SR, ms(5.0), [])
    assert fresh.pose_at(12.0) == stream.pose_at(12.0)


def test_poses_from_other_processes_are_checked() -> None:
    assert check_pose(Pose(visemes={"aa": 0.5}, yaw=1.0)).yaw == 1.0
    for bad, fragment in (
        ({"visemes": "aa"}, "expected a Pose"),
        (Pose(visemes={"zz": 1.0}), "unknown viseme 'zz'"),
        (Pose(visemes={"aa": float("nan")}), "not a finite number"),
        (Pose(yaw=float("inf")), "finite numbers"),
        (Pose(translation=(0.0, 1.0)), "3 numbers"),  # type: ignore[arg-type]
        (Pose(blink_left="x"), "finite numbers"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput, match=fragment):
            check_pose(bad)


async def test_conversation_video_longer_than_the_speech_queue(tmp_path: Path) -> None:
    """The demo's MP4 of a conversation longer than the stream may queue ahead
    (`max_queued_speech_s`) is written: each reply is queued as the video nears it."""
    from rich.console import Console

    from loadtest.latency import mix, write_video
    from loadtest.replay import Recording
    from services.sessions.conversation import AvatarAudioEvent

    config = RenderConfig(width=64, height=64, fps=10, max_queued_speech_s=1.0)
    render = RenderEngine(config)
    await render.start()
    try:
        rate = 24_000
        tone = (0.3 * np.sin(2 * math.pi * 220 * np.arange(rate // 2) / rate)).astype(np.float32)
        rec = Recording(start=0.0, avatar_rate=rate)
        for k, at in enumerate((0.5, 3.0)):  # the second reply 2.5 s after the first
            rec.avatar.append((at, AvatarAudioEvent(tone, rate, round(at * rate), [], k)))
        audio, _ = mix(rec)
        path = tmp_path / "long.mp4"
        frames = write_video(path, rec, audio, render, Console(quiet=True))
        assert frames == int(len(audio) / rate * config.fps) and path.stat().st_size > 0
        with av.open(str(path)) as container:
            assert container.streams.video[0].frames == frames
    finally:
        await render.close()
