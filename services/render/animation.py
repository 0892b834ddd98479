"""Animation: rig deformation for a pose, and the signals that make poses over time.

``Animator.deform(pose)`` moves the Gaussians of an avatar (vectorised torch, on the
cloud's device): viseme blend targets on the lips, jaw rotation about the hinge,
eyelids rotating over the eyes, then a rigid head rotation about the neck.

Poses over time come from ``VisemeTrack`` (phoneme timings with crossfades),
``EnvelopeTrack`` (loudness when TTS gives no phonemes), ``BlinkScheduler`` and
``HeadMotion`` (subtle, slow, never triggered by an utterance).

Angles are radians, right-handed, in the avatar's frame (x to its left, y up, z out of
the face): positive pitch looks down, positive yaw turns to the avatar's left.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from parley.visemes import VISEMES, Phoneme

from services.render.assets import Avatar, GaussianCloud, LipOffset


@dataclass(frozen=True, slots=True)
class Pose:
    """What the face does in one frame."""

    #: Viseme name -> weight (weights summing above 1 are normalised).
    visemes: Mapping[str, float] = field(default_factory=dict)
    #: Extra jaw opening in [0, 1] added to the visemes' (e.g. from the audio envelope).
    jaw_open: float = 0.0
    #: 0 open .. 1 closed, per eye (the avatar's left and right).
    blink_left: float = 0.0
    blink_right: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    #: Head translation in scene units.
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of quaternions [...,4] (w, x, y, z)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def axis_angle_quat(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Quaternions [N,4] rotating by angle [N] about the unit axis [3]."""
    half = 0.5 * angle
    return torch.cat([half.cos()[:, None], half.sin()[:, None] * axis[None, :]], dim=1)


def _euler_quat(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """q_yaw(y) ⊗ q_pitch(x) ⊗ q_roll(z) as (w, x, y, z)."""

    def about(axis: int, angle: float) -> np.ndarray:
        q = np.zeros(4)
        q[0] = math.cos(angle / 2)
        q[1 + axis] = math.sin(angle / 2)
        return q

    q = _left_quat_matrix(about(1, yaw)) @ about(0, pitch)
    return _left_quat_matrix(q) @ about(2, roll)


def _left_quat_matrix(q: np.ndarray) -> np.ndarray:
    """L with q ⊗ p == L @ p."""
    w, x, y, z = q
    return np.array([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]])


def _quat_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a unit quaternion (w, x, y, z)."""
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotate_vectors(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate vectors [N,3] by unit quaternions [N,4]."""
    w, u = q[:, :1], q[:, 1:]
    t = 2.0 * torch.linalg.cross(u, v)
    return v + w * t + torch.linalg.cross(u, t)


class Animator:
    """Deforms one avatar; the rig is kept as tensors on the cloud's device."""

    def __init__(self, avatar: Avatar) -> None:
        self.avatar = avatar
        cloud = avatar.cloud
        dev = cloud.device
        rig = avatar.rig

        def region(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            r = rig.regions[name]
            return (
                torch.as_tensor(r.indices, dtype=torch.long, device=dev),
                torch.as_tensor(r.weights, dtype=torch.float32, device=dev),
            )

        self._regions = {name: region(name) for name in rig.regions}
        head_idx, head_w = self._regions["head"]
        blend = head_w < 1.0
        self._head_blend = (head_idx[blend], head_w[blend])
        outside = torch.ones(cloud.num, dtype=torch.bool, device=dev)
        outside[head_idx] = False
        self._head_static = outside.nonzero().squeeze(1)

        def vec(v: Iterable[float]) -> torch.Tensor:
            return torch.tensor(list(v), dtype=torch.float32, device=dev)

        self._hinge = vec(rig.pivots.jaw_hinge)
        self._neck = vec(rig.pivots.neck)
        self._mouth = vec(rig.pivots.mouth_centre)
        axis = vec(rig.jaw.axis)
        self._jaw_axis = axis / axis.norm()
        self._jaw_max = math.radians(rig.jaw.max_angle_deg)
        self._x_axis = vec((1.0, 0.0, 0.0))
        self._y_axis = vec((0.0, 1.0, 0.0))
        self._z_axis = vec((0.0, 0.0, 1.0))
        self._eyes = {
            side: (vec(eye.centre), math.radians(eye.lid_top_deg), eye.open_fraction)
            for side, eye in rig.eyes.items()
        }
        self._visemes = rig.visemes

    @property
    def cloud(self) -> GaussianCloud:
        return self.avatar.cloud

    def deform(self, pose: Pose) -> GaussianCloud:
        """The cloud in ``pose`` (opacity, scales and colours are shared, not copied)."""
        with torch.inference_mode():
            return self._deform(pose)

    def _deform(self, pose: Pose) -> GaussianCloud:
        base = self.avatar.cloud
        means = base.means.clone()
        quats = base.quats.clone()

        jaw_open, upper, lower = self._blend(pose.visemes)
        self._move_lip(means, "upper_lip", upper)
        self._move_lip(means, "lower_lip", lower)
        angle = min(max(jaw_open + pose.jaw_open, 0.0), 1.0) * self._jaw_max
        if angle > 0.0:
            idx, w = self._regions["jaw"]
            self._rotate(means, quats, idx, self._jaw_axis, self._hinge, w * angle)
        for side, blink in (("left", pose.blink_left), ("right", pose.blink_right)):
            self._lid(means, quats, side, min(max(blink, 0.0), 1.0))

        if pose.yaw or pose.pitch or pose.roll or any(pose.translation):
            means, quats = self._move_head(means, quats, pose)
        return base.with_means(means, quats)

    def _move_head(
        self, means: torch.Tensor, quats: torch.Tensor, pose: Pose
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = means.device
        shift = torch.tensor(pose.translation, dtype=torch.float32, device=dev)
        # Turn everything rigidly with one matrix product (cheaper than gathering the
        # head), then restore what is not head and redo the neck's partial rotations.
        q = _euler_quat(pose.yaw, pose.pitch, pose.roll)
        rot = torch.as_tensor(_quat_matrix(q), dtype=torch.float32, device=dev)
        left = torch.as_tensor(_left_quat_matrix(q), dtype=torch.float32, device=dev)
        moved = torch.addmm(self._neck + shift - self._neck @ rot.T, means, rot.T)
        turned = torch.mm(quats, left.T)
        idx = self._head_static
        moved[idx] = means[idx]
        turned[idx] = quats[idx]
        idx, w = self._head_blend
        if idx.numel():
            qb = axis_angle_quat(self._y_axis, w * pose.yaw)
            qb = quat_multiply(qb, axis_angle_quat(self._x_axis, w * pose.pitch))
            qb = quat_multiply(qb, axis_angle_quat(self._z_axis, w * pose.roll))
            rel = means[idx] - self._neck
            moved[idx] = self._neck + rotate_vectors(qb, rel) + w[:, None] * shift
            turned[idx] = quat_multiply(qb, quats[idx])
        return moved, turned

    def _blend(self, weights: Mapping[str, float]) -> tuple[float, np.ndarray, np.ndarray]:
        """Weighted sum of the viseme targets (normalised when the weights exceed 1):
        jaw opening, and (dx, dy, dz, stretch_x) of the upper and of the lower lip."""
        total = sum(max(w, 0.0) for w in weights.values())
        norm = 1.0 / total if total > 1.0 else 1.0
        jaw = 0.0
        upper, lower = np.zeros(4), np.zeros(4)
        for name, w in weights.items():
            target = self._visemes.get(name)
            if target is None or w <= 0.0:
                continue
            w *= norm
            jaw += w * target.jaw_open
            upper += w * _lip_vector(target.upper_lip)
            lower += w * _lip_vector(target.lower_lip)
        return jaw, upper, lower

    def _move_lip(self, means: torch.Tensor, name: str, move: np.ndarray) -> None:
        if not move.any():
            return
        idx, w = self._regions[name]
        p = means[idx]
        shift = torch.tensor(move[:3], dtype=torch.float32, device=means.device)
        stretched = self._mouth[0] + (p[:, 0] - self._mouth[0]) * (1.0 + w * float(move[3]))
        p = p + w[:, None] * shift
        p[:, 0] = stretched + w * shift[0]
        means[idx] = p

    def _rotate(
        self,
        means: torch.Tensor,
        quats: torch.Tensor,
        idx: torch.Tensor,
        axis: torch.Tensor,
        pivot: torch.Tensor,
        angle: torch.Tensor,
    ) -> None:
        q = axis_angle_quat(axis, angle)
        means[idx] = pivot + rotate_vectors(q, means[idx] - pivot)
        quats[idx] = quat_multiply(q, quats[idx])

    def _lid(self, means: torch.Tensor, quats: torch.Tensor, side: str, blink: float) -> None:
        """Squeeze the (closed-authored) lid towards its top edge by rotating each
        Gaussian about the eye's horizontal axis."""
        if blink >= 1.0:
            return
        centre, top, open_fraction = self._eyes[side]
        idx, w = self._regions[f"{side}_eyelid"]
        rel = means[idx] - centre
        elevation = torch.atan2(rel[:, 1], rel[:, 2])
        span = open_fraction + (1.0 - open_fraction) * blink
        target = top - (top - elevation) * span
        # A positive rotation about +x lowers the elevation.
        self._rotate(means, quats, idx, self._x_axis, centre, w * (elevation - target))


def _lip_vector(offset: LipOffset) -> np.ndarray:
    return np.array([*offset.translate, offset.stretch_x])


class VisemeTrack:
    """Viseme weights over time from phoneme timings, with linear crossfades.

    Each phoneme's viseme fades in over ``crossfade_s`` centred on its start and out over
    ``crossfade_s`` centred on its end, so neighbouring shapes blend (coarticulation) and
    weights sum to 1 inside continuous speech; uncovered time is silence ("sil").
    """

    def __init__(
        self,
        sample_rate: int,
        phonemes: Iterable[Phoneme] = (),
        crossfade_s: float = 0.05,
    ) -> None:
        if sample_rate <= 0 or crossfade_s <= 0:
            raise ValueError("sample_rate and crossfade_s must be positive")
        self.sample_rate = sample_rate
        self.crossfade_s = crossfade_s
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._visemes: list[str] = []
        self.extend(phonemes)

    def extend(self, phonemes: Iterable[Phoneme], offset_samples: int = 0) -> None:
        """Append phonemes (e.g. of the next TTS chunk, which starts at ``offset_samples``)."""
        for p in phonemes:
            start = (p.start_sample + offset_samples) / self.sample_rate
            end = start + max(p.num_samples, 0) / self.sample_rate
            viseme = p.viseme if p.viseme in VISEMES else "sil"
            i = bisect.bisect_right(self._starts, start)
            self._starts.insert(i, start)
            self._ends.insert(i, end)
            self._visemes.insert(i, viseme)

    @property
    def end_s(self) -> float:
        return max(self._ends, default=0.0)

    def weights_at(self, t: float) -> dict[str, float]:
        """Viseme -> weight at time t (seconds from the start of the audio)."""
        half = 0.5 * self.crossfade_s
        weights: dict[str, float] = {}
        i = bisect.bisect_right(self._starts, t + half) - 1
        # Phonemes do not overlap, so earlier ones have ended once one ends before t.
        while i >= 0 and self._ends[i] + half > t - self.crossfade_s:
            rise = (t - (self._starts[i] - half)) / self.crossfade_s
            fall = ((self._ends[i] + half) - t) / self.crossfade_s
            w = min(rise, fall, 1.0)
            if w > 0.0:
                name = self._visemes[i]
                weights[name] = weights.get(name, 0.0) + w
            i -= 1
        total = sum(weights.values())
        if total > 1.0:
            return {k: v / total for k, v in weights.items()}
        if total < 1.0:
            weights["sil"] = weights.get("sil", 0.0) + 1.0 - total
        return weights


class EnvelopeTrack:
    """Jaw opening from the loudness of the audio, for speech without phoneme timings.

    RMS over ``window_s`` every 10 ms, mapped from [floor_db, ceil_db] to [0, 1], then
    smoothed with a fast attack and a slower release so the jaw does not flutter.
    """

    def __init__(
        self,
        sample_rate: int,
        window_s: float = 0.03,
        floor_db: float = -45.0,
        ceil_db: float = -14.0,
        attack_s: float = 0.03,
        release_s: float = 0.08,
        max_open: float = 0.7,
    ) -> None:
        if sample_rate <= 0 or ceil_db <= floor_db:
            raise ValueError("need sample_rate > 0 and ceil_db > floor_db")
        self.sample_rate = sample_rate
        self.hop = max(1, round(sample_rate * 0.01))
        self.window = max(self.hop, round(sample_rate * window_s))
        self.floor_db, self.ceil_db, self.max_open = floor_db, ceil_db, max_open
        self._attack = 1.0 - math.exp(-self.hop / (attack_s * sample_rate))
        self._release = 1.0 - math.exp(-self.hop / (release_s * sample_rate))
        self._pending = np.zeros(0, np.float32)
        self._consumed = 0  # samples dropped from the front of _pending so far
        self._level = 0.0
        self._levels: list[float] = []

    def extend(self, samples: np.ndarray) -> None:
        """Append mono audio (float in [-1, 1] or int16)."""
        x = np.asarray(samples)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        self._pending = np.concatenate([self._pending, x.astype(np.float32).reshape(-1)])
        n = len(self._levels)
        # Window k is centred on sample k*hop.
        while True:
            start = n * self.hop - self.window // 2 - self._consumed
            end = start + self.window
            if end > len(self._pending):
                break
            frame = self._pending[max(start, 0) : end]
            rms = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) if frame.size else 0.0
            db = 20.0 * math.log10(max(rms, 1e-9))
            target = min(max((db - self.floor_db) / (self.ceil_db - self.floor_db), 0.0), 1.0)
            rate = self._attack if target > self._level else self._release
            self._level += (target - self._level) * rate
            self._levels.append(self._level * self.max_open)
            n += 1
        drop = max(0, n * self.hop - self.window // 2 - self._consumed)
        self._pending = self._pending[drop:]
        self._consumed += drop

    @property
    def end_s(self) -> float:
        return len(self._levels) * self.hop / self.sample_rate

    def jaw_open_at(self, t: float) -> float:
        """Jaw opening in [0, max_open] at time t (0 outside the analysed audio)."""
        pos = t * self.sample_rate / self.hop
        n = len(self._levels)
        if pos < 0 or pos > n - 1 or n == 0:
            return 0.0
        i = min(int(pos), n - 2) if n > 1 else 0
        frac = pos - i
        if n == 1:
            return self._levels[0]
        return self._levels[i] * (1.0 - frac) + self._levels[i + 1] * frac


class BlinkScheduler:
    """Blinks at random intervals (seeded): 0 open .. 1 closed."""

    def __init__(
        self,
        seed: int = 0,
        min_interval_s: float = 2.0,
        max_interval_s: float = 6.0,
        duration_s: float = 0.15,
    ) -> None:
        if not 0 < min_interval_s <= max_interval_s or duration_s <= 0:
            raise ValueError("need 0 < min_interval_s <= max_interval_s and duration_s > 0")
        self._rng = np.random.default_rng(seed)
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.duration_s = duration_s
        self._starts = [float(self._rng.uniform(0.5 * min_interval_s, max_interval_s))]

    def blink_starts(self, until_s: float) -> list[float]:
        """Start times of the blinks before ``until_s``."""
        while self._starts[-1] < until_s:
            gap = self._rng.uniform(self.min_interval_s, self.max_interval_s)
            self._starts.append(self._starts[-1] + float(gap))
        return [s for s in self._starts if s < until_s]

    def value_at(self, t: float) -> float:
        self.blink_starts(t + self.duration_s)
        i = bisect.bisect_right(self._starts, t) - 1
        if i < 0:
            return 0.0
        phase = (t - self._starts[i]) / self.duration_s
        if phase >= 1.0:
            return 0.0
        # Lids close fast (40 %) and open more slowly, as real blinks do.
        if phase < 0.4:
            return math.sin(0.5 * math.pi * phase / 0.4)
        return math.cos(0.5 * math.pi * (phase - 0.4) / 0.6)


@dataclass(frozen=True, slots=True)
class HeadPose:
    yaw: float
    pitch: float
    roll: float
    translation: tuple[float, float, float]


class HeadMotion:
    """Subtle idle head motion: per axis a sum of three slow sines (0.04-0.3 Hz).

    The amplitude (degrees, the bound on |yaw|; pitch and roll use 0.8 and 0.5 of it)
    glides between the listening and speaking values over ``transition_s`` when the
    avatar starts or stops speaking; nothing else depends on the utterance.
    """

    def __init__(
        self,
        seed: int = 0,
        listening_deg: float = 1.2,
        speaking_deg: float = 1.8,
        translation: float = 0.001,
        transition_s: float = 1.5,
    ) -> None:
        if listening_deg < 0 or speaking_deg < 0 or translation < 0 or transition_s <= 0:
            raise ValueError("amplitudes must be >= 0 and transition_s > 0")
        rng = np.random.default_rng(seed)
        self.listening_deg, self.speaking_deg = listening_deg, speaking_deg
        self.translation = translation
        self.transition_s = transition_s
        # 6 channels (yaw, pitch, roll, tx, ty, tz) x 3 components.
        self._freq = rng.uniform(0.04, 0.3, size=(6, 3))
        self._phase = rng.uniform(0.0, 2 * math.pi, size=(6, 3))
        share = rng.uniform(0.5, 1.0, size=(6, 3))
        self._share = share / share.sum(axis=1, keepdims=True)  # |sum| <= 1 per channel
        self._scale = np.array([1.0, 0.8, 0.5, 1.0, 0.6, 0.6])
        self._amp: float | None = None
        self._last_t = 0.0

    @property
    def bound_deg(self) -> float:
        """No angle ever exceeds this."""
        return max(self.listening_deg, self.speaking_deg)

    def at(self, t: float, speaking: bool = False) -> HeadPose:
        target = self.speaking_deg if speaking else self.listening_deg
        dt = t - self._last_t
        if self._amp is None or dt < 0:
            self._amp = target
        else:
            self._amp += (target - self._amp) * (1.0 - math.exp(-dt / self.transition_s))
        self._last_t = t
        waves = (self._share * np.sin(2 * math.pi * self._freq * t + self._phase)).sum(axis=1)
        waves *= self._scale
        angles = np.radians(self._amp) * waves[:3]
        shift = self.translation * waves[3:]
        tx, ty, tz = (float(v) for v in shift)
        return HeadPose(float(angles[0]), float(angles[1]), float(angles[2]), (tx, ty, tz))


class PoseDriver:
    """Combines mouth signals, blinks and idle head motion into a Pose per frame."""

    def __init__(
        self,
        seed: int = 0,
        blink: BlinkScheduler | None = None,
        head: HeadMotion | None = None,
    ) -> None:
        self.blink = blink or BlinkScheduler(seed)
        self.head = head or HeadMotion(seed)

    def pose_at(
        self,
        t: float,
        visemes: Mapping[str, float] | None = None,
        jaw_open: float = 0.0,
        speaking: bool = False,
    ) -> Pose:
        b = self.blink.value_at(t)
        h = self.head.at(t, speaking)
        return Pose(
            visemes=visemes or {"sil": 1.0},
            jaw_open=jaw_open,
            blink_left=b,
            blink_right=b,
            yaw=h.yaw,
            pitch=h.pitch,
            roll=h.roll,
            translation=h.translation,
        )
