"""Animation: mouth shapes seen in renders, blinks, idle head motion, viseme timing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from parley.visemes import Phoneme

from services.render.animation import (
    Animator,
    BlinkScheduler,
    EnvelopeTrack,
    HeadMotion,
    Pose,
    PoseDriver,
    VisemeTrack,
)
from services.render.assets import Avatar
from services.render.bench import bench_render, resample_avatar
from services.render.default_avatar import build_default_avatar, default_camera
from services.render.rasterizer import Camera, Rasterizer, RasterSettings, quat_to_rotmat

SIZE = 256


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return build_default_avatar()


@pytest.fixture(scope="module")
def animator(avatar: Avatar) -> Animator:
    return Animator(avatar)


@pytest.fixture(scope="module")
def rasterizer() -> Rasterizer:
    return Rasterizer(RasterSettings(background=(1.0, 1.0, 1.0)))


def to_pixel(camera: Camera, point: np.ndarray) -> tuple[int, int]:
    view = camera.view.double().numpy()
    x, y, z = view[:3, :3] @ point + view[:3, 3]
    return int(camera.fx * x / z + camera.cx), int(camera.fy * y / z + camera.cy)


def render(animator: Animator, rasterizer: Rasterizer, pose: Pose) -> np.ndarray:
    return rasterizer.render(animator.deform(pose), default_camera(SIZE, SIZE)).image.numpy()


def mouth_dark_pixels(avatar: Avatar, image: np.ndarray) -> int:
    col, row = to_pixel(default_camera(SIZE, SIZE), np.array(avatar.rig.pivots.mouth_centre))
    crop = image[row - 12 : row + 20, col - 20 : col + 20]
    return int((crop.max(axis=-1) < 0.2).sum())


def test_lips_open_on_vowels_and_close_on_bilabials(
    avatar: Avatar, animator: Animator, rasterizer: Rasterizer
) -> None:
    dark = {
        v: mouth_dark_pixels(avatar, render(animator, rasterizer, Pose(visemes={v: 1.0})))
        for v in ("aa", "oh", "PP", "sil")
    }
    assert dark["aa"] > 120, dark
    assert dark["PP"] <= 5 and dark["sil"] <= 5, dark
    assert dark["aa"] > dark["oh"] > dark["PP"] + 20, dark
    # The audio envelope path opens the jaw too.
    loud = render(animator, rasterizer, Pose(jaw_open=0.7))
    assert mouth_dark_pixels(avatar, loud) > 80


def eye_crop(avatar: Avatar, image: np.ndarray, side: str) -> np.ndarray:
    front = np.array(avatar.rig.eyes[side].centre) + np.array([0.0, 0.0, 0.02])
    col, row = to_pixel(default_camera(SIZE, SIZE), front)
    return image[row - 2 : row + 3, col - 9 : col + 10]


def skin_like(crop: np.ndarray) -> np.ndarray:
    r, g, b = crop[..., 0], crop[..., 1], crop[..., 2]
    return (r > 0.5) & (r > g) & (g > b) & (r - b > 0.15)


def test_blink_covers_the_eye_with_skin(
    avatar: Avatar, animator: Animator, rasterizer: Rasterizer
) -> None:
    open_img = render(animator, rasterizer, Pose())
    closed = render(animator, rasterizer, Pose(blink_left=1.0, blink_right=1.0))
    for side in ("left", "right"):
        eye = eye_crop(avatar, open_img, side)
        assert (eye.min(axis=-1) > 0.75).sum() >= 4, side  # white of the eye
        assert (eye.max(axis=-1) < 0.25).sum() >= 4, side  # pupil
        assert skin_like(eye).mean() < 0.5
        lid = eye_crop(avatar, closed, side)
        assert skin_like(lid).mean() > 0.95, side
    # One eye at a time.
    wink = render(animator, rasterizer, Pose(blink_left=1.0))
    assert skin_like(eye_crop(avatar, wink, "left")).mean() > 0.95
    assert skin_like(eye_crop(avatar, wink, "right")).mean() < 0.5


def test_deform_moves_only_what_the_pose_asks(avatar: Avatar, animator: Animator) -> None:
    base = avatar.cloud
    rest = animator.deform(Pose())
    lids = np.concatenate([avatar.rig.regions[f"{s}_eyelid"].indices for s in ("left", "right")])
    still = np.setdiff1d(np.arange(base.num), lids)
    assert torch.equal(rest.means[still], base.means[still])
    assert not torch.equal(rest.means[lids], base.means[lids])  # authored closed, now open
    assert torch.equal(animator.deform(Pose(blink_left=1, blink_right=1)).means, base.means)

    # Yaw turns the face (nose tip) towards the avatar's left (+x); pitch looks down.
    nose = int(base.means[:, 2].argmax())
    turned = animator.deform(Pose(yaw=0.1))
    assert float(turned.means[nose, 0] - rest.means[nose, 0]) > 0.005
    down = animator.deform(Pose(pitch=0.1))
    assert float(down.means[nose, 1] - rest.means[nose, 1]) < -0.005
    torch.testing.assert_close(turned.quats.norm(dim=1), torch.ones(base.num))
    # Shoulders do not turn with the head.
    torso = np.setdiff1d(np.arange(base.num), avatar.rig.regions["head"].indices)
    assert torch.equal(turned.means[torso], rest.means[torso])
    # The jaw drops the chin.
    chin = avatar.rig.regions["jaw"].indices[avatar.rig.regions["jaw"].weights > 0.99]
    opened = animator.deform(Pose(visemes={"aa": 1.0}))
    assert float((opened.means[chin, 1] - rest.means[chin, 1]).max()) < -0.005


def test_head_turn_is_rigid_and_turns_the_splats_with_it(
    avatar: Avatar, animator: Animator
) -> None:
    # Lids closed, as authored, so that only the head moves.
    rest = animator.deform(Pose(blink_left=1.0, blink_right=1.0))
    moved = animator.deform(
        Pose(
            yaw=0.2,
            pitch=-0.1,
            roll=0.05,
            translation=(0.001, 0.0, -0.002),
            blink_left=1.0,
            blink_right=1.0,
        )
    )
    head = avatar.rig.regions["head"]
    rigid = torch.as_tensor(head.indices[head.weights == 1.0])
    old_rot, new_rot = quat_to_rotmat(rest.quats[rigid]), quat_to_rotmat(moved.quats[rigid])
    turn = new_rot[0] @ old_rot[0].T
    torch.testing.assert_close(new_rot, turn @ old_rot, atol=1e-5, rtol=0)
    a, b = rigid[:-1], rigid[1:]
    torch.testing.assert_close(
        moved.means[a] - moved.means[b], (rest.means[a] - rest.means[b]) @ turn.T, atol=1e-6, rtol=0
    )
    expected = torch.as_tensor(
        np.array(
            [
                [math.cos(0.2), 0.0, math.sin(0.2)],
                [0.0, 1.0, 0.0],
                [-math.sin(0.2), 0.0, math.cos(0.2)],
            ]
        ),
        dtype=torch.float32,
    )
    # Yaw alone is a rotation about y by the yaw angle.
    yawed = animator.deform(Pose(yaw=0.2, blink_left=1.0, blink_right=1.0))
    turn_yaw = quat_to_rotmat(yawed.quats[rigid[:1]])[0] @ old_rot[0].T
    torch.testing.assert_close(turn_yaw, expected, atol=1e-5, rtol=0)
    # The neck blends: its Gaussians move, but less than the head's.
    neck = torch.as_tensor(head.indices[(head.weights > 0.2) & (head.weights < 0.8)])
    shift = (yawed.means - rest.means).norm(dim=1)
    assert 0 < float(shift[neck].mean()) < float(shift[rigid].mean())


def test_head_motion_stays_within_its_bound_for_a_minute() -> None:
    motion = HeadMotion(seed=3, listening_deg=1.2, speaking_deg=1.8)
    assert motion.bound_deg <= 2.0 and HeadMotion().bound_deg <= 2.0
    fps = 30
    poses = [motion.at(i / fps, speaking=(i // (5 * fps)) % 2 == 1) for i in range(60 * fps)]
    angles = np.degrees([[p.yaw, p.pitch, p.roll] for p in poses])
    assert np.abs(angles).max() <= 1.8 + 1e-9
    assert np.abs(angles[:, 0]).max() > 0.3  # it does move
    # Smooth: no jumps when speaking starts or stops (every 5 s here).
    assert np.abs(np.diff(angles, axis=0)).max() < 0.05
    shift = np.array([p.translation for p in poses])
    assert np.abs(shift).max() <= 0.001 + 1e-12


def test_blinks_are_seeded_spaced_and_short() -> None:
    blinks = BlinkScheduler(seed=1)
    starts = blinks.blink_starts(60.0)
    gaps = np.diff(starts)
    assert len(starts) >= 10 and gaps.min() >= 2.0 and gaps.max() <= 6.0
    assert starts == BlinkScheduler(seed=1).blink_starts(60.0)
    assert starts != BlinkScheduler(seed=2).blink_starts(60.0)
    s = starts[2]
    assert blinks.value_at(s - 0.01) == 0.0 and blinks.value_at(s + 0.16) == 0.0
    assert blinks.value_at(s + 0.06) == pytest.approx(1.0)


def test_viseme_track_crossfades_and_streams() -> None:
    sr = 16_000
    ms = sr // 1000
    track = VisemeTrack(
        sr, [Phoneme("p", "PP", 0, 100 * ms), Phoneme("ɑ", "aa", 100 * ms, 200 * ms)]
    )
    assert track.weights_at(0.03) == {"PP": pytest.approx(1.0)}
    assert track.weights_at(0.2) == {"aa": pytest.approx(1.0)}
    at_boundary = track.weights_at(0.1)
    assert at_boundary["PP"] == pytest.approx(0.5) and at_boundary["aa"] == pytest.approx(0.5)
    assert track.weights_at(1.0) == {"sil": 1.0}
    # The next TTS chunk arrives with sample positions relative to its own start.
    track.extend([Phoneme("u", "ou", 0, 100 * ms)], offset_samples=300 * ms)
    assert track.weights_at(0.35) == {"ou": pytest.approx(1.0)}
    for t in np.arange(-0.1, 0.5, 0.007):
        assert sum(track.weights_at(float(t)).values()) == pytest.approx(1.0)


def test_envelope_track_follows_loudness_and_streams() -> None:
    sr = 16_000
    t = np.arange(sr) / sr
    audio = np.where(t >= 0.5, 0.3 * np.sin(2 * math.pi * 220 * t), 0.0).astype(np.float32)
    whole = EnvelopeTrack(sr)
    whole.extend(audio)
    pieces = EnvelopeTrack(sr)
    for chunk in np.array_split(audio, 7):
        pieces.extend(chunk)
    assert whole.jaw_open_at(0.3) == pytest.approx(0.0, abs=1e-6)
    assert whole.jaw_open_at(0.8) > 0.4
    for q in np.arange(0.0, 1.0, 0.013):
        assert pieces.jaw_open_at(float(q)) == pytest.approx(whole.jaw_open_at(float(q)))
    # int16 input gives the same envelope.
    ints = EnvelopeTrack(sr)
    ints.extend((audio * 32767).astype(np.int16))
    assert ints.jaw_open_at(0.8) == pytest.approx(whole.jaw_open_at(0.8), abs=1e-3)


def test_pose_driver_and_resampled_avatar(avatar: Avatar) -> None:
    small = resample_avatar(avatar, 5_000)
    big = resample_avatar(avatar, avatar.cloud.num + 1_000)
    assert small.cloud.num == 5_000 and big.cloud.num == avatar.cloud.num + 1_000
    pose = PoseDriver(seed=0).pose_at(1.0, {"aa": 1.0}, speaking=True)
    assert abs(math.degrees(pose.yaw)) <= 2.0
    for candidate in (small, big):
        cloud = Animator(candidate).deform(pose)
        assert cloud.num == candidate.cloud.num and bool(torch.isfinite(cloud.means).all())


def test_bench_render_reports_its_fields() -> None:
    result = bench_render(size=64, gaussians=3_000, seconds=0.2)
    assert result["frames"] >= 10 and result["fps"] > 0
    assert result["ms_p95"] >= result["ms_p50"] > 0
    expected = result["fps"] / 30 / result["threads"]
    assert result["streams_per_core_at_30fps"] == pytest.approx(expected, rel=0.05, abs=1e-3)
