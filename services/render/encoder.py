"""Video encoding with PyAV (FFmpeg): live H.264 per frame, and MP4 files with audio.

``H264Encoder`` is tuned for conversation: x264 ``ultrafast`` + ``zerolatency`` (no
look-ahead, no B-frames, no frame threads), so every frame's packet comes out of
``encode`` at once; a keyframe (IDR, with SPS/PPS repeated in-band) every ~2 s lets a
client join or recover. Output is an Annex-B byte stream (start codes), what WebRTC and
MSE/WebCodecs H.264 decoders take.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

#: Seconds between keyframes.
KEYFRAME_INTERVAL_S = 2.0


def _check_size(width: int, height: int) -> None:
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise ValueError(f"H.264 (4:2:0) needs even frame sizes, got {width}x{height}")


def _check_frame(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        raise ValueError(
            f"expected a {height}x{width}x3 uint8 RGB frame, got {rgb.shape} {rgb.dtype}"
        )
    return np.ascontiguousarray(rgb)


class H264Encoder:
    """Frame-by-frame H.264 encoder: ``encode(rgb)`` returns that frame's Annex-B bytes."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        crf: int = 23,
        keyframe_interval_s: float = KEYFRAME_INTERVAL_S,
    ) -> None:
        _check_size(width, height)
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.width, self.height, self.fps = width, height, fps
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.framerate = Fraction(fps)
        ctx.time_base = Fraction(1, fps)
        ctx.gop_size = max(1, round(keyframe_interval_s * fps))
        ctx.max_b_frames = 0
        ctx.thread_count = 1
        ctx.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "crf": str(crf),
            # No scene-cut keyframes: keyframes only on the fixed interval (steady size).
            "x264-params": "scenecut=0:repeat-headers=1",
        }
        ctx.open()
        self._ctx = ctx
        self._pts = 0
        self._flushed = False

    def encode(self, rgb: np.ndarray) -> bytes:
        """Encode one HxWx3 uint8 RGB frame; returns its packet(s), Annex-B."""
        if self._flushed:
            raise RuntimeError("the encoder was flushed")
        frame = av.VideoFrame.from_ndarray(_check_frame(rgb, self.width, self.height), "rgb24")
        frame.pts = self._pts
        self._pts += 1
        return b"".join(bytes(p) for p in self._ctx.encode(frame))

    def flush(self) -> bytes:
        """The packets still held by the encoder (none with zerolatency); ends the stream."""
        if self._flushed:
            return b""
        self._flushed = True
        return b"".join(bytes(p) for p in self._ctx.encode(None))


def write_mp4(
    path: str | Path,
    frames_rgb: Iterable[np.ndarray],
    fps: int,
    audio: np.ndarray | None = None,
    audio_rate: int = 24_000,
    crf: int = 20,
) -> int:
    """Write an MP4: H.264 video (yuv420p) of the RGB frames at ``fps`` and, if given,
    AAC audio of ``audio`` (mono float32 in [-1, 1]; sample 0 plays with frame 0).

    Frame sizes must be even and all alike. Returns the number of video frames written.
    """
    if fps <= 0:
        raise ValueError("fps must be positive")
    if audio is not None:
        audio = np.asarray(audio, np.float32).reshape(-1)
        if audio_rate <= 0:
            raise ValueError("audio_rate must be positive")
    frames = iter(frames_rgb)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to write")
    height, width = first.shape[:2]
    _check_size(width, height)
    count = 0
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height = width, height
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "veryfast", "crf": str(crf)}
        sound = None
        if audio is not None:
            sound = out.add_stream("aac", rate=audio_rate)
            sound.layout = "mono"
            sound.bit_rate = 96_000
        sent = 0  # audio samples encoded so far

        def encode_audio(until: int) -> None:
            nonlocal sent
            if sound is None or audio is None:
                return
            step = 1024
            while sent < min(until, len(audio)):
                part = audio[sent : min(sent + step, until, len(audio))]
                frame = av.AudioFrame.from_ndarray(part[None, :], format="flt", layout="mono")
                frame.sample_rate = audio_rate
                frame.pts = sent
                frame.time_base = Fraction(1, audio_rate)
                out.mux(sound.encode(frame))
                sent += len(part)

        frame_rgb: np.ndarray | None = first
        while frame_rgb is not None:
            frame = av.VideoFrame.from_ndarray(_check_frame(frame_rgb, width, height), "rgb24")
            frame.pts = count
            frame.time_base = Fraction(1, fps)
            out.mux(video.encode(frame))
            count += 1
            # Keep the two streams interleaved: audio up to the end of this frame.
            encode_audio(count * audio_rate // fps)
            frame_rgb = next(frames, None)
        out.mux(video.encode(None))
        if sound is not None and audio is not None:
            encode_audio(len(audio))
            out.mux(sound.encode(None))
    return count
