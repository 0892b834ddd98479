"""Measurements on rendered frames shared by the render tests."""

from __future__ import annotations

import numpy as np

from services.render.default_avatar import default_camera
from services.render.engine import RenderEngine


def mouth_dark_pixels(engine: RenderEngine, rgb: np.ndarray) -> int:
    """Pixels of the open mouth (near black) around the rig's mouth centre."""
    size = rgb.shape[0]
    camera = default_camera(rgb.shape[1], size)
    view = camera.view.double().numpy()
    point = np.array(engine.avatar("default").rig.pivots.mouth_centre)
    x, y, z = view[:3, :3] @ point + view[:3, 3]
    col, row = int(camera.fx * x / z + camera.cx), int(camera.fy * y / z + camera.cy)
    k = size / 256
    crop = rgb[row - round(12 * k) : row + round(20 * k), col - round(20 * k) : col + round(20 * k)]
    return int((crop.max(axis=-1) < 64).sum())
