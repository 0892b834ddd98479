"""The fast tile rasterizer against the per-Gaussian reference, and the default avatar."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.render.assets import GaussianCloud
from services.render.default_avatar import build_default_avatar, default_camera
from services.render.rasterizer import (
    SH_C0,
    Camera,
    Rasterizer,
    RasterSettings,
    eval_sh,
    project,
    reference_render,
    render,
)

BG = (0.2, 0.3, 0.4)


def random_scene(n: int, seed: int, degree: int = 0) -> GaussianCloud:
    g = torch.Generator().manual_seed(seed)
    quats = torch.randn(n, 4, generator=g)
    return GaussianCloud(
        means=(torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([1.6, 1.6, 1.0]),
        quats=quats / quats.norm(dim=1, keepdim=True),
        log_scales=torch.log(torch.rand(n, 3, generator=g) * 0.12 + 0.004),
        opacity_logits=torch.randn(n, generator=g) * 2.5,
        sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g) * 0.6,
    )


def nasty_scene() -> GaussianCloud:
    """Behind the camera, off screen, huge, needle-thin and rotated, nearly transparent."""
    base = random_scene(60, seed=99)
    extra_means = torch.tensor(
        [[0.0, 0.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.1, 0.1, 0.2], [0.0, -0.2, 0.1]]
    )
    extra_scales = torch.log(
        torch.tensor(
            [[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [2.0, 2.0, 0.01], [0.8, 0.0005, 0.0005], [0.1] * 3]
        )
    )
    angle = math.radians(35) / 2
    extra_quats = torch.tensor(
        [[1.0, 0, 0, 0]] * 3 + [[math.cos(angle), 0, 0, math.sin(angle)]] * 2
    )
    extra_opacity = torch.tensor([3.0, 3.0, -1.0, 4.0, math.log(1 / 600)])
    return GaussianCloud(
        torch.cat([base.means, extra_means]),
        torch.cat([base.quats, extra_quats]),
        torch.cat([base.log_scales, extra_scales]),
        torch.cat([base.opacity_logits, extra_opacity]),
        torch.cat([base.sh, torch.rand(5, 1, 3)]),
    )


def assert_close_to_reference(cloud: GaussianCloud, camera: Camera, tile_size: int) -> None:
    fast = render(cloud, camera, RasterSettings(background=BG, tile_size=tile_size, chunk=8))
    ref = reference_render(cloud, camera, BG)
    err = np.abs(fast.image.numpy().astype(np.float64) - ref)
    assert fast.image.shape == (camera.height, camera.width, 3)
    assert err.mean() < 0.25 / 255, err.mean() * 255
    assert err.max() < 2.0 / 255, err.max() * 255


@pytest.mark.parametrize("tile_size", [8, 16])
@pytest.mark.parametrize(("seed", "degree"), [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3)])
def test_fast_matches_reference(seed: int, degree: int, tile_size: int) -> None:
    camera = Camera.look_at((0.3, -0.2, 2.5), (0.0, 0.0, 0.0), 40.0, 64, 48)
    assert_close_to_reference(random_scene(150, seed, degree), camera, tile_size)


def test_fast_matches_reference_on_awkward_gaussians() -> None:
    camera = Camera.look_at((0.0, 0.0, 2.0), (0.0, 0.0, 0.0), 50.0, 72, 56)
    assert_close_to_reference(nasty_scene(), camera, 8)


def test_dense_scene_reaches_early_termination() -> None:
    # 200 opaque Gaussians piled in front of each other: tiles finish early and the
    # result still matches the reference.
    g = torch.Generator().manual_seed(5)
    cloud = GaussianCloud(
        means=torch.rand(200, 3, generator=g) * torch.tensor([0.4, 0.4, 1.0]) - 0.2,
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(200, 1),
        log_scales=torch.full((200, 3), math.log(0.25)),
        opacity_logits=torch.full((200,), 5.0),
        sh=torch.rand(200, 1, 3, generator=g),
    )
    camera = Camera.look_at((0.0, 0.0, 3.0), (0.0, 0.0, 0.0), 30.0, 64, 64)
    rasterizer = Rasterizer(RasterSettings(background=BG, chunk=8))
    fast = rasterizer.render(cloud, camera)
    assert rasterizer.last_stats["evaluations"] < rasterizer.last_stats["pairs"] * 64
    err = np.abs(fast.image.numpy() - reference_render(cloud, camera, BG))
    assert err.max() < 2.0 / 255


def test_camera_conventions() -> None:
    # A small red Gaussian right of and above the target lands in the upper right.
    cloud = GaussianCloud(
        means=torch.tensor([[0.3, 0.2, 0.0]]),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        log_scales=torch.full((1, 3), math.log(0.03)),
        opacity_logits=torch.tensor([6.0]),
        sh=((torch.tensor([[[1.0, 0.0, 0.0]]]) - 0.5) / SH_C0),
    )
    camera = Camera.look_at((0.0, 0.0, 2.0), (0.0, 0.0, 0.0), 45.0, 64, 64)
    out = render(cloud, camera)
    red = out.image[..., 0] - out.image[..., 1]
    row, col = divmod(int(red.argmax()), 64)
    assert row < 32 < col
    u = camera.fx * 0.3 / 2.0 + camera.cx
    v = -camera.fy * 0.2 / 2.0 + camera.cy
    assert abs(col + 0.5 - u) <= 1 and abs(row + 0.5 - v) <= 1
    assert out.image[row, col, 0] > 0.95 and out.alpha[row, col] > 0.98
    assert torch.allclose(out.image[0, 0], torch.zeros(3))  # black default background


def test_nothing_visible_gives_background() -> None:
    cloud = random_scene(20, seed=3)
    camera = Camera.look_at((0.0, 0.0, -5.0), (0.0, 0.0, -10.0), 40.0, 40, 30)
    out = render(cloud, camera, RasterSettings(background=BG))
    assert project(cloud, camera).ids.numel() == 0
    assert torch.allclose(out.image, torch.tensor(BG).expand(30, 40, 3))
    assert float(out.alpha.abs().max()) == 0.0


def test_sh_degree_one_depends_on_view_direction() -> None:
    sh = torch.zeros(1, 4, 3)
    sh[0, 3] = 2.0  # the x-aligned band: 3DGS uses -C1 * x
    left, right = eval_sh(sh.expand(2, 4, 3), torch.tensor([[-1.0, 0, 0], [1.0, 0, 0]]))
    assert torch.allclose(left, torch.full((3,), 0.5 + 2 * 0.4886025119029199))
    assert torch.allclose(right, torch.zeros(3))  # clamped at 0


def test_gsplat_backend_is_refused_off_cuda() -> None:
    with pytest.raises(RuntimeError, match="gsplat"):
        render(random_scene(5, 0), default_camera(32, 32), RasterSettings(backend="gsplat"))


def test_default_avatar_renders_a_face() -> None:
    avatar = build_default_avatar()
    camera = default_camera(128, 128)
    out = render(avatar.cloud, camera, RasterSettings(background=(1.0, 1.0, 1.0)))
    img = out.image.numpy()
    assert img.std() > 0.1  # not uniform
    # Cheeks (below and beside the eyes) are skin: red > green > blue, fairly bright.
    for col in (50, 78):
        r, g, b = img[66, col]
        assert r > 0.55 and r > g > b and r - b > 0.15, (col, img[66, col])
    # Hair at the top of the head is dark brown, the corners are background.
    assert img[22, 64].max() < 0.4
    assert np.allclose(img[2, 2], 1.0, atol=1e-3)
    # The head is wider than tall in the frame's middle band and centred.
    rows = np.nonzero((out.alpha.numpy() > 0.5)[:, 64])[0]
    assert rows.min() < 25 and rows.max() == 127
