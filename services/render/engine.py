"""Render engine: speech on the avatar's audio timeline in, paced video frames out.

Plain async Python (no gRPC): the servicer, the demo and the tests drive it directly.

**One timeline.** Every stream has one clock shared by its audio and its video: sample
``s`` of the avatar's output audio plays at ``s / sample_rate`` seconds, and frame ``i``
is presented at ``i / fps`` seconds (its pts) and stays on screen until the next one.
It shows the avatar at the middle of that interval, ``(i + 0.5) / fps``: a phoneme
that starts at sample ``s`` is half blended in (the viseme crossfade is centred on the
phoneme's start) at ``s / sample_rate``, so the mouth shows it within half a frame of
the sound, early or late (measured: ``av_offset_s``).

**Phoneme positions are absolute**: ``Phoneme.start_sample`` is a position in the
avatar's output audio stream, like ``start_sample`` of the audio it belongs to. That is
what goes on the wire (the TTS servicer sends ``wire.phonemes_to_proto(phonemes,
offset=chunk start)``) and what the conversation's ``AvatarAudioEvent`` carries. A
phoneme must start inside its chunk but may run past its end (the conversation cuts
clauses into 20 ms chunks and sends each phoneme with the chunk it starts in), so a
chunk without phonemes inside phoneme-timed speech is covered by the phonemes before
it; only audio that no phoneme covers drives the jaw from its loudness (EnvelopeTrack).

**Pacing.** ``AvatarStream.frames()`` starts rendering frame ``i`` at ``start + i / fps
- max_lead_s`` on the wall clock (``parley.clock``). When rendering falls behind so
that the next frame is already due, it skips ahead to the newest due frame: pts stay
``index / fps`` and never drift; skipped frames are counted in
``parley_render_frames_dropped_total``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from parley import clock, metrics
from parley.errors import InvalidInput
from parley.visemes import VISEMES, Phoneme

from services.render.animation import (
    Animator,
    BlinkScheduler,
    EnvelopeTrack,
    HeadMotion,
    Pose,
    VisemeTrack,
)
from services.render.assets import Avatar, load_avatar
from services.render.config import MAX_FPS, MAX_SIZE, MIN_FPS, MIN_SIZE, RenderConfig
from services.render.default_avatar import AVATAR_ID, build_default_avatar, default_camera
from services.render.rasterizer import Camera, Rasterizer, RasterSettings

#: Frame sizes whose camera a render backend keeps.
MAX_CAMERAS = 32
#: Avatar ids: letters, digits, '_' and '-' (no dots or slashes: they name files).
AVATAR_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: Audio sample rates accepted for speech.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
#: A phoneme may start this long after the end of its chunk's audio (rounding) and
#: last at most this long.
PHONEME_START_SLACK_S = 0.05
MAX_PHONEME_S = 5.0
#: Visemes whose mouth is clearly open (the "voiced onset" of A/V offset measures).
OPEN_VISEMES = ("aa", "E", "ih", "oh", "ou")
#: After a clear (barge-in) the mouth glides from its shape at that instant to rest.
CLEAR_RELEASE_S = 0.12
#: Pauses in speech shorter than this keep the avatar "speaking" (head motion).
SPEAKING_GAP_S = 0.3
#: Phoneme-less audio that starts within this gap after earlier audio continues the same
#: loudness envelope (the gap is silence), so its smoothing does not restart.
ENVELOPE_GAP_S = 0.5
#: Time constant of the head-motion amplitude glide between listening and speaking.
HEAD_TRANSITION_S = 1.5


@dataclass(frozen=True, slots=True)
class Frame:
    """One rendered video frame."""

    #: HxWx3 uint8 RGB.
    rgb: np.ndarray
    #: Presentation time on the stream's audio timeline: index / fps (the pose shown is
    #: the one at the middle of the frame's display interval, AvatarStream.pose_time).
    pts_s: float
    index: int
    #: Whether the avatar is speaking in this frame (speech queued there, not cleared).
    speaking: bool
    #: Jaw opening of the pose in [0, 1] (visemes' and loudness'); for A/V measures.
    mouth_open: float = 0.0


# --- timeline -------------------------------------------------------------------------


def _add_interval(intervals: list[list[float]], start: float, end: float, gap: float) -> None:
    """Insert [start, end) into sorted disjoint intervals, merging closer than ``gap``."""
    if end <= start:
        return
    i = bisect.bisect_left(intervals, [start, start])
    if i > 0 and intervals[i - 1][1] + gap >= start:
        i -= 1
        start = min(start, intervals[i][0])
    j = i
    while j < len(intervals) and intervals[j][0] <= end + gap:
        end = max(end, intervals[j][1])
        j += 1
    intervals[i:j] = [[start, end]]


def _cut_intervals(intervals: list[list[float]], at: float) -> None:
    """Drop everything at or after ``at``."""
    while intervals and intervals[-1][0] >= at:
        intervals.pop()
    if intervals and intervals[-1][1] > at:
        intervals[-1][1] = at


def _covers(intervals: list[list[float]], t: float) -> bool:
    i = bisect.bisect_right(intervals, [t, math.inf]) - 1
    return i >= 0 and intervals[i][0] <= t < intervals[i][1]


@dataclass(slots=True)
class _EnvelopeRun:
    """Loudness of contiguous audio, from ``start_sample`` on."""

    start_sample: int
    end_sample: int
    track: EnvelopeTrack


@dataclass(slots=True)
class _Epoch:
    """Speech between two clears: phoneme timings, loudness, and where it was cut."""

    visemes: VisemeTrack
    runs: list[_EnvelopeRun] = field(default_factory=list)
    #: Merged [start_s, end_s) intervals covered by phonemes.
    covered: list[list[float]] = field(default_factory=list)
    first_s: float = math.inf
    last_s: float = -math.inf
    cut_s: float = math.inf


def _fade(x: float) -> float:
    """1 at x <= 0 down to 0 at x >= 1, smoothly."""
    x = min(max(x, 0.0), 1.0)
    return 1.0 - x * x * (3.0 - 2.0 * x)


class _Timeline:
    """Speech placed on a stream's timeline; not thread-safe (AvatarStream locks it)."""

    def __init__(self) -> None:
        self.sample_rate: int | None = None
        self.epochs: list[_Epoch] = []
        #: Merged speaking intervals (pauses < SPEAKING_GAP_S bridged), seconds.
        self.speaking: list[list[float]] = []
        #: Audio position where the next chunk may start (end of the previous one).
        self.next_sample = 0
        self.speech_end_s = 0.0

    def _epoch(self, sample_rate: int) -> _Epoch:
        if not self.epochs or self.epochs[-1].cut_s < math.inf:
            self.epochs.append(_Epoch(VisemeTrack(sample_rate)))
        return self.epochs[-1]

    def add(
        self, samples: np.ndarray, sample_rate: int, start_sample: int, phonemes: list[Phoneme]
    ) -> None:
        self.sample_rate = sample_rate
        epoch = self._epoch(sample_rate)
        end_sample = start_sample + len(samples)
        start_s, end_s = start_sample / sample_rate, end_sample / sample_rate
        if phonemes:
            epoch.visemes.extend(phonemes)
            for p in phonemes:
                p_start = p.start_sample / sample_rate
                p_end = (p.start_sample + p.num_samples) / sample_rate
                _add_interval(epoch.covered, p_start, p_end, 0.0)
                epoch.first_s = min(epoch.first_s, p_start)
                epoch.last_s = max(epoch.last_s, p_end)
            self.speech_end_s = max(self.speech_end_s, epoch.last_s)
        if len(samples):
            run = epoch.runs[-1] if epoch.runs else None
            gap = start_sample - run.end_sample if run else -1
            if run is None or not 0 <= gap <= ENVELOPE_GAP_S * sample_rate:
                run = _EnvelopeRun(start_sample, start_sample, EnvelopeTrack(sample_rate))
                epoch.runs.append(run)
            elif gap:
                run.track.extend(np.zeros(gap, np.float32))
            run.track.extend(samples)
            run.end_sample = end_sample
            epoch.first_s = min(epoch.first_s, start_s)
            epoch.last_s = max(epoch.last_s, end_s)
            _add_interval(self.speaking, start_s, end_s, SPEAKING_GAP_S)
            self.speech_end_s = max(self.speech_end_s, end_s)
        self.next_sample = max(self.next_sample, end_sample)

    def clear(self, at_s: float) -> None:
        if self.epochs:
            epoch = self.epochs[-1]
            epoch.cut_s = min(epoch.cut_s, at_s)
        _cut_intervals(self.speaking, at_s)
        self.speech_end_s = min(self.speech_end_s, at_s)
        if self.sample_rate is not None:
            self.next_sample = min(self.next_sample, math.floor(at_s * self.sample_rate))

    def mouth_at(self, t: float) -> tuple[dict[str, float], float]:
        """Viseme weights (summing to 1, "sil" filling) and extra jaw opening at t."""
        weights: dict[str, float] = {}
        jaw = 0.0
        for epoch in self.epochs:
            margin = 0.2
            if t < epoch.first_s - margin or t > epoch.last_s + margin:
                continue
            if t < epoch.cut_s:
                tq, fade = t, 1.0
            else:
                tq, fade = epoch.cut_s, _fade((t - epoch.cut_s) / CLEAR_RELEASE_S)
                if fade <= 0.0:
                    continue
            for name, w in epoch.visemes.weights_at(tq).items():
                if name != "sil":
                    weights[name] = weights.get(name, 0.0) + w * fade
            if not _covers(epoch.covered, tq):
                jaw = max(jaw, fade * self._envelope(epoch, tq))
        total = sum(weights.values())
        if total > 1.0:
            weights = {k: v / total for k, v in weights.items()}
        elif total < 1.0:
            weights["sil"] = 1.0 - total
        return weights, jaw

    def _envelope(self, epoch: _Epoch, t: float) -> float:
        rate = self.sample_rate or 1
        for run in reversed(epoch.runs):
            start, end = run.start_sample / rate, run.end_sample / rate
            if t < start:
                continue
            if t > end + 0.2:
                break
            return run.track.jaw_open_at(t - start)
        return 0.0

    def is_speaking(self, t: float) -> bool:
        return _covers(self.speaking, t)

    def motion_blend(self, t: float) -> float:
        """0 listening .. 1 speaking: the speaking state through a first-order glide
        (time constant HEAD_TRANSITION_S); a closed form, so any frame renders alike."""
        tau = HEAD_TRANSITION_S
        horizon = t - 15.0 * tau
        # Intervals that ended before the horizon contribute < 1e-6.
        i = bisect.bisect_right(self.speaking, horizon, key=lambda iv: iv[1])
        g = 0.0
        for start, end in self.speaking[i:]:
            if start > t:
                break
            g += 1.0 - math.exp(-(t - start) / tau)
            if end <= t:
                g -= 1.0 - math.exp(-(t - end) / tau)
        return min(max(g, 0.0), 1.0)


def voiced_onset_s(
    phonemes: Iterable[Phoneme], sample_rate: int, visemes: Collection[str] = OPEN_VISEMES
) -> float | None:
    """Audio time of the first phoneme whose viseme opens the mouth (None if none does)."""
    starts = [p.start_sample for p in phonemes if p.viseme in visemes and p.num_samples > 0]
    return min(starts) / sample_rate if starts else None


def av_offset_s(
    openings: Iterable[tuple[float, float]],
    onset_s: float,
    threshold: float,
    search_from_s: float = 0.25,
) -> float | None:
    """A/V offset of a mouth opening: (pts of the first frame, from ``onset_s -
    search_from_s`` on, whose opening reaches ``threshold``) − ``onset_s``.

    ``openings`` are (pts_s, opening) pairs in any unit (``Frame.mouth_open``, or dark
    pixels measured in the mouth region of the image). Positive: the mouth opens after
    the sound starts. None when no frame reaches the threshold.
    """
    for pts, opening in sorted(openings):
        if pts >= onset_s - search_from_s and opening >= threshold:
            return pts - onset_s
    return None


# --- streams -----------------------------------------------------------------------------


def set_torch_threads(threads: int) -> None:
    """Thread initializer: torch's intra-op threads (process-wide in torch)."""
    torch.set_num_threads(threads)


class AvatarStream:
    """One avatar's video on one timeline: speech in (``add_speech``, ``clear``), frames
    out (``render_frame`` for any frame, ``frames()`` paced in real time).

    The timeline and the pose of each frame are worked out here; turning a pose into an
    image is the renderer's (``FrameRenderer``: this process's tensors, or a render
    replica behind a Serve handle)."""

    def __init__(
        self,
        profile: AvatarProfile,
        renderer: FrameRenderer,
        width: int,
        height: int,
        fps: int,
        config: RenderConfig,
        seed: int = 0,
    ) -> None:
        self.avatar_id = profile.avatar_id
        self.width, self.height, self.fps = width, height, fps
        self.config = config
        self._renderer = renderer
        self._blink = BlinkScheduler(seed)
        # Unit amplitude: the listening/speaking amplitude is applied per frame from the
        # timeline (motion_blend), so a frame's pose never depends on earlier calls.
        self._head = HeadMotion(seed, listening_deg=1.0, speaking_deg=1.0)
        self._jaw_targets = dict(profile.jaw_targets)
        self._timeline = _Timeline()
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._start_wall: float | None = None
        self._end_s: float | None = None
        self._closed = False
        self._running = False
        #: Newest pts rendered (seconds).
        self.video_s = 0.0
        self.frames_rendered = 0
        self.frames_dropped = 0

    # -- speech in --

    @property
    def sample_rate(self) -> int | None:
        """Audio rate of this stream, fixed by its first speech (None before)."""
        return self._timeline.sample_rate

    @property
    def next_sample(self) -> int:
        """Where the next speech chunk may start: the end of the previous one (or where
        a clear cut it)."""
        return self._timeline.next_sample

    @property
    def speech_end_s(self) -> float:
        """End of the queued speech (audio and phonemes), seconds; 0 with none."""
        return self._timeline.speech_end_s

    def add_speech(
        self,
        samples: np.ndarray,
        sample_rate: int,
        start_sample: int,
        phonemes: list[Phoneme] | None = None,
    ) -> None:
        """Queue speech: mono audio whose first sample plays at ``start_sample`` of the
        avatar's output audio, and its phonemes at absolute positions (module doc).

        Chunks come in order and do not overlap (gaps are silence); the first one fixes
        the sample rate. Raises InvalidInput with what is wrong.
        """
        phonemes = list(phonemes or [])
        x = np.asarray(samples)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
            raise InvalidInput("speech audio must be a 1-D float or int16 array (mono)")
        x = x.astype(np.float32, copy=False)
        if not np.all(np.isfinite(x)):
            raise InvalidInput("speech audio contains NaN or infinite samples")
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise InvalidInput(
                f"sample_rate {sample_rate} is not supported;"
                f" use {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
            )
        if start_sample < 0:
            raise InvalidInput(f"start_sample must be >= 0, got {start_sample}")
        with self._lock:
            rate = self._timeline.sample_rate
            if rate is not None and sample_rate != rate:
                raise InvalidInput(
                    f"speech at {sample_rate} Hz, but this stream's audio is {rate} Hz;"
                    " one stream has one sample rate"
                )
            if start_sample < self._timeline.next_sample:
                raise InvalidInput(
                    f"speech starts at sample {start_sample}, before the end of the speech"
                    f" already queued ({self._timeline.next_sample}); chunks must not overlap"
                )
            ahead = start_sample / sample_rate - self.video_s
            if ahead > self.config.max_queued_speech_s:
                raise InvalidInput(
                    f"speech starts {ahead:.1f} s ahead of the video;"
                    f" at most {self.config.max_queued_speech_s:.0f} s may be queued"
                )
            self._check_phonemes(phonemes, sample_rate, start_sample, start_sample + len(x))
            self._timeline.add(x, sample_rate, start_sample, phonemes)

    @staticmethod
    def _check_phonemes(phonemes: list[Phoneme], rate: int, start: int, end: int) -> None:
        latest = end + round(PHONEME_START_SLACK_S * rate)
        longest = round(MAX_PHONEME_S * rate)
        for i, p in enumerate(phonemes):
            if p.viseme not in VISEMES:
                raise InvalidInput(
                    f"phoneme {i} has unknown viseme {p.viseme!r}; expected one of {list(VISEMES)}"
                )
            if not start <= p.start_sample <= latest:
                raise InvalidInput(
                    f"phoneme {i} starts at sample {p.start_sample}, outside its audio chunk"
                    f" [{start}, {end}]; phoneme positions are absolute stream positions"
                )
            if not 0 <= p.num_samples <= longest:
                raise InvalidInput(
                    f"phoneme {i} lasts {p.num_samples} samples; expected 0..{longest}"
                    f" ({MAX_PHONEME_S:.0f} s)"
                )

    def clear(self, at_s: float | None = None) -> None:
        """Barge-in: speech after ``at_s`` (default: now on the stream's clock) is dropped;
        the mouth glides to rest over CLEAR_RELEASE_S. New speech may then start at
        ``at_s``."""
        with self._lock:
            self._timeline.clear(self.now_s() if at_s is None else at_s)

    def advance_to(self, t_s: float) -> None:
        """The stream's clock has reached ``t_s`` without rendering every frame (a
        conversation that renders only the first frame of each reply): speech placed
        from here on counts as queued relative to it."""
        with self._lock:
            self.video_s = max(self.video_s, t_s)

    def now_s(self) -> float:
        """Current time on the stream's timeline: wall-clock time since the start of
        ``frames()``, or the newest rendered pts when not paced."""
        if self._start_wall is None:
            return self.video_s
        return max(0.0, clock.now() - self._start_wall)

    # -- frames out --

    def pose_time(self, index: int) -> float:
        """Time on the timeline whose pose frame ``index`` shows: the middle of its
        display interval, (index + 0.5) / fps."""
        return (index + 0.5) / self.fps

    def pose_at(self, t: float) -> Pose:
        """The avatar's pose at t: mouth from the speech, blinks, head motion whose
        amplitude glides between the listening and speaking values."""
        return self._pose(t)[0]

    def _pose(self, t: float) -> tuple[Pose, bool]:
        with self._lock:
            weights, jaw = self._timeline.mouth_at(t)
            speaking = self._timeline.is_speaking(t)
            blend = self._timeline.motion_blend(t)
            blink = self._blink.value_at(t)
            head = self._head.at(t)
        cfg = self.config
        amplitude = cfg.listening_motion_deg + blend * (
            cfg.speaking_motion_deg - cfg.listening_motion_deg
        )
        pose = Pose(
            visemes=weights,
            jaw_open=jaw,
            blink_left=blink,
            blink_right=blink,
            yaw=head.yaw * amplitude,
            pitch=head.pitch * amplitude,
            roll=head.roll * amplitude,
            translation=head.translation,
        )
        return pose, speaking

    def mouth_open_at(self, t: float) -> float:
        """Jaw opening in [0, 1] of the pose at t (visemes' targets and loudness)."""
        with self._lock:
            weights, jaw = self._timeline.mouth_at(t)
        return self._jaw(weights, jaw)

    def _jaw(self, weights: Mapping[str, float], jaw: float) -> float:
        total = sum(max(w, 0.0) for w in weights.values())
        norm = 1.0 / total if total > 1.0 else 1.0
        opened = sum(max(w, 0.0) * norm * self._jaw_targets.get(k, 0.0) for k, w in weights.items())
        return min(max(opened + jaw, 0.0), 1.0)

    def render_frame(self, index: int) -> Frame:
        """Frame ``index`` (pts = index / fps, pose at ``pose_time(index)``): blocking
        CPU (or CUDA) work, or a wait for a render replica.

        Deterministic: the same speech gives the same image for an index, whatever was
        rendered before. Not re-entrant (one caller at a time per stream).
        """
        if index < 0:
            raise ValueError("frame index must be >= 0")
        pts = index / self.fps
        pose, speaking = self._pose(self.pose_time(index))
        rgb = self._renderer(pose)
        self.video_s = max(self.video_s, pts)
        self.frames_rendered += 1
        return Frame(rgb, pts, index, speaking, self._jaw(pose.visemes, pose.jaw_open))

    def end_after_speech(self, tail_s: float | None = None) -> None:
        """Let ``frames()`` end after the queued speech plus ``tail_s`` (config.tail_s)."""
        tail = self.config.tail_s if tail_s is None else tail_s
        with self._lock:
            self._end_s = self._timeline.speech_end_s + tail
        self._wake.set()

    def close(self) -> None:
        """Stop ``frames()`` at once."""
        self._closed = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def frames(self, start_wall: float | None = None) -> AsyncIterator[Frame]:
        """Frames in real time from frame 0, whose pts 0 is ``start_wall`` (``clock.now()``
        seconds; default: now) on the wall clock.

        Frame i is rendered (on this stream's own worker thread) from ``start_wall + i/fps
        - max_lead_s`` on; when rendering has fallen a whole frame behind, frames are
        skipped to the newest one due (counted in ``frames_dropped`` and the
        ``parley_render_frames_dropped_total`` metric). Ends after ``close()``, or after
        the end set by ``end_after_speech()``.
        """
        if self._running:
            raise RuntimeError("frames() is already running on this stream")
        self._running = True
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="render",
            initializer=set_torch_threads,
            initargs=(self.config.threads,),
        )
        start = clock.now() if start_wall is None else start_wall
        self._start_wall = start
        fps, lead = self.fps, self.config.max_lead_s
        index = 0
        try:
            while not self._closed:
                end = self._end_s
                if end is not None and index / fps > end + 1e-9:
                    break
                now = clock.now()
                release = start + index / fps - lead
                if now < release:
                    await self._sleep(release - now)
                    continue
                due = math.floor((now - start + lead) * fps + 1e-9)
                if end is not None:  # frames past the end are not dropped, just not made
                    due = min(due, math.floor(end * fps + 1e-9) + 1)
                if due > index:
                    skipped = due - index
                    self.frames_dropped += skipped
                    metrics.RENDER_FRAMES_DROPPED.inc(skipped)
                    index = due
                    continue  # re-check the end
                frame = await loop.run_in_executor(executor, self.render_frame, index)
                yield frame
                index += 1
        finally:
            self._running = False
            executor.shutdown(wait=False, cancel_futures=True)


# --- engine ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AvatarProfile:
    """What a stream needs to know of an avatar away from its Gaussians: how far each
    viseme opens the jaw (for ``Frame.mouth_open``)."""

    avatar_id: str
    jaw_targets: Mapping[str, float]


class FrameRenderer(Protocol):
    """Pose in, HxWx3 uint8 RGB out: the costly half of a frame, for one stream's avatar
    and frame size."""

    def __call__(self, pose: Pose) -> np.ndarray: ...


class RenderBackend(Protocol):
    """Where avatars live and frames are rasterized (blocking calls, made on worker
    threads): `LocalRenderBackend` here, or a render replica behind a Serve handle."""

    def avatar_ids(self) -> list[str]: ...

    def profile(self, avatar_id: str) -> AvatarProfile:
        """The avatar's profile, loading it; InvalidInput for an unknown or bad id."""
        ...

    def render(self, avatar_id: str, width: int, height: int, pose: Pose) -> np.ndarray: ...

    def warm_up(self) -> None: ...


def check_pose(pose: object) -> Pose:
    """A pose from another process (a render request): known visemes, finite numbers."""
    if not isinstance(pose, Pose):
        raise InvalidInput(f"expected a Pose, got {type(pose).__name__}")
    if not isinstance(pose.visemes, Mapping) or len(pose.visemes) > len(VISEMES):
        raise InvalidInput("pose visemes must map viseme names to weights")
    for name, weight in pose.visemes.items():
        if name not in VISEMES:
            raise InvalidInput(f"pose has unknown viseme {str(name)[:20]!r}")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidInput(f"pose weight of viseme {name!r} is not a finite number")
    numbers = [pose.jaw_open, pose.blink_left, pose.blink_right, pose.yaw, pose.pitch, pose.roll]
    if not isinstance(pose.translation, tuple) or len(pose.translation) != 3:
        raise InvalidInput("pose translation must be 3 numbers")
    for value in (*numbers, *pose.translation):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInput("pose angles, blinks, jaw and translation must be finite numbers")
    return pose


def check_avatar_id(avatar_id: str) -> str:
    if not isinstance(avatar_id, str) or not AVATAR_ID_PATTERN.fullmatch(avatar_id):
        raise InvalidInput(
            f"invalid avatar id {str(avatar_id)[:80]!r}: use 1-64 letters, digits, '_' or '-'"
        )
    return avatar_id


def check_frame_size(width: int, height: int, fps: int | None = None) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or not MIN_SIZE <= value <= MAX_SIZE:
            raise InvalidInput(f"{name} {value} is out of range; use {MIN_SIZE}..{MAX_SIZE}")
    if fps is not None and (not isinstance(fps, int) or not MIN_FPS <= fps <= MAX_FPS):
        raise InvalidInput(f"fps {fps} is out of range; use {MIN_FPS}..{MAX_FPS}")


class LocalRenderBackend:
    """Avatars loaded into this process (once, cached; on CUDA when configured) and
    rasterized on the calling thread. Thread-safe: a pose's deformation is a new cloud,
    and several threads may render at once (each its own frame)."""

    def __init__(self, config: RenderConfig) -> None:
        self.config = config
        if config.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = config.device
        self._avatars: dict[str, tuple[Avatar, Animator]] = {}
        self._cameras: OrderedDict[tuple[int, int], Camera] = OrderedDict()
        self._rasterizer = Rasterizer(RasterSettings(background=config.background))
        self._lock = threading.Lock()  # the caches; never held while loading or rendering
        self._loading: dict[str, threading.Lock] = {}  # one load per avatar at a time
        self._dir = Path(config.avatars_dir) if config.avatars_dir else None

    def avatar_ids(self) -> list[str]:
        ids = {AVATAR_ID}
        if self._dir is not None and self._dir.is_dir():
            for ply in self._dir.glob("*.ply"):
                name = ply.name[: -len(".ply")]
                if AVATAR_ID_PATTERN.fullmatch(name) and (self._dir / f"{name}.rig.json").is_file():
                    ids.add(name)
        return sorted(ids)

    def avatar(self, avatar_id: str) -> Avatar:
        """The avatar ``avatar_id`` (loaded on first use; InvalidInput if unknown)."""
        return self._animated(avatar_id)[0]

    def profile(self, avatar_id: str) -> AvatarProfile:
        rig = self.avatar(avatar_id).rig
        return AvatarProfile(avatar_id, {name: v.jaw_open for name, v in rig.visemes.items()})

    def render(self, avatar_id: str, width: int, height: int, pose: Pose) -> np.ndarray:
        _avatar, animator = self._animated(avatar_id)
        camera = self._camera(width, height)
        started = clock.now()
        rgb = self._rasterizer.render(animator.deform(pose), camera).to_uint8()
        metrics.RENDER_FRAME_SECONDS.observe(clock.now() - started)
        return rgb

    def warm_up(self) -> None:
        set_torch_threads(self.config.threads)
        self.render(AVATAR_ID, 64, 64, Pose())

    def _camera(self, width: int, height: int) -> Camera:
        with self._lock:
            camera = self._cameras.get((width, height))
            if camera is None:
                camera = self._cameras[(width, height)] = default_camera(width, height)
                if len(self._cameras) > MAX_CAMERAS:  # any size may be asked for
                    self._cameras.popitem(last=False)
            else:
                self._cameras.move_to_end((width, height))
            return camera

    def _animated(self, avatar_id: str) -> tuple[Avatar, Animator]:
        check_avatar_id(avatar_id)
        with self._lock:
            cached = self._avatars.get(avatar_id)
            if cached is not None:
                return cached
            loading = self._loading.setdefault(avatar_id, threading.Lock())
        # Loaded outside the cache lock: frames of other avatars go on meanwhile.
        with loading:
            with self._lock:
                cached = self._avatars.get(avatar_id)
            if cached is not None:
                return cached
            try:
                avatar = self._load(avatar_id)
                if self.device != "cpu":
                    avatar = Avatar(avatar.avatar_id, avatar.cloud.to(self.device), avatar.rig)
                entry = (avatar, Animator(avatar))
            finally:
                with self._lock:
                    self._loading.pop(avatar_id, None)
            with self._lock:
                self._avatars[avatar_id] = entry
            return entry

    def _load(self, avatar_id: str) -> Avatar:
        if self._dir is not None:
            ply = self._dir / f"{avatar_id}.ply"
            rig = self._dir / f"{avatar_id}.rig.json"
            if ply.is_file() and rig.is_file():
                return load_avatar(avatar_id, ply, rig)
        if avatar_id == AVATAR_ID:
            return build_default_avatar()
        raise InvalidInput(f"unknown avatar {avatar_id!r}; this service has {self.avatar_ids()}")

    def clear(self) -> None:
        with self._lock:
            self._avatars.clear()


class RenderEngine:
    """Avatars and the streams that render them. Frames are rasterized by its backend:
    this process (the default) or the render deployment (the sessions gateway on Serve)."""

    def __init__(
        self, config: RenderConfig | None = None, backend: RenderBackend | None = None
    ) -> None:
        self.config = config or RenderConfig()
        self.backend: RenderBackend = backend or LocalRenderBackend(self.config)
        self._profiles: dict[str, AvatarProfile] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        """Build the default avatar and render one frame (allocator, thread pool)."""
        await asyncio.get_running_loop().run_in_executor(None, self.backend.warm_up)

    async def close(self) -> None:
        with self._lock:
            self._profiles.clear()
        if isinstance(self.backend, LocalRenderBackend):
            self.backend.clear()

    def avatar_ids(self) -> list[str]:
        """Avatars this engine serves."""
        return self.backend.avatar_ids()

    def avatar(self, avatar_id: str) -> Avatar:
        """The loaded avatar (Gaussians and rig): only with this process's backend."""
        if not isinstance(self.backend, LocalRenderBackend):
            raise RuntimeError("this engine's avatars live in a render replica")
        return self.backend.avatar(avatar_id)

    def profile(self, avatar_id: str) -> AvatarProfile:
        """The avatar's profile (loaded on first use, then cached; InvalidInput if unknown)."""
        check_avatar_id(avatar_id)
        with self._lock:
            cached = self._profiles.get(avatar_id)
        if cached is not None:
            return cached
        profile = self.backend.profile(avatar_id)
        with self._lock:
            self._profiles[avatar_id] = profile
        return profile

    async def load(self, avatar_id: str) -> AvatarProfile:
        """`profile` off the event loop: loading an avatar (or asking a render replica)
        blocks. After it, `stream(avatar_id)` does not block."""
        return await asyncio.to_thread(self.profile, avatar_id)

    def stream(
        self,
        avatar_id: str = AVATAR_ID,
        width: int = 0,
        height: int = 0,
        fps: int = 0,
        seed: int | None = None,
    ) -> AvatarStream:
        """A new stream of ``avatar_id``; 0 for width, height or fps takes the config's.

        Raises InvalidInput for an unknown avatar or out-of-range sizes. Blocks while
        the avatar loads, unless `load` has been awaited for it.
        """
        cfg = self.config
        width, height, fps = width or cfg.width, height or cfg.height, fps or cfg.fps
        check_frame_size(width, height, fps)
        profile = self.profile(avatar_id)
        renderer = functools.partial(self.backend.render, avatar_id, width, height)
        return AvatarStream(
            profile, renderer, width, height, fps, cfg, cfg.seed if seed is None else seed
        )
