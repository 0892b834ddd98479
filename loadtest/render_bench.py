"""`parley bench render`: frames per second of one animated avatar stream on this machine.

Prints and writes JSON (fps, ms/frame p50/p95, memory per stream, real-time 30 fps
streams per core) and, next to it, a PNG with a few rendered frames and the
frame-time distribution.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
from parley.errors import InvalidInput
from rich.console import Console

from services.render.animation import Animator, Pose
from services.render.bench import bench_render, resample_avatar
from services.render.default_avatar import build_default_avatar, default_camera
from services.render.rasterizer import Rasterizer, RasterSettings

#: Mouth shapes shown in the picture.
SHOWN = ("sil", "aa", "PP", "ou", "E")


def _frames(size: int, gaussians: int) -> list[np.ndarray]:
    avatar = resample_avatar(build_default_avatar(), gaussians)
    animator, camera = Animator(avatar), default_camera(size, size)
    rasterizer = Rasterizer(RasterSettings(background=(0.93, 0.93, 0.95)))
    out = []
    for viseme in SHOWN:
        image = rasterizer.render(animator.deform(Pose(visemes={viseme: 1.0})), camera)
        out.append(np.asarray(image.to_uint8()))
    return out


def _plot(path: Path, result: dict[str, Any], frames: list[np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 5))
    for i, (viseme, image) in enumerate(zip(SHOWN, frames, strict=True)):
        ax = fig.add_subplot(2, len(SHOWN), i + 1)
        ax.imshow(image)
        ax.set_title(viseme)
        ax.axis("off")
    ax = fig.add_subplot(2, 1, 2)
    ax.hist(result["frame_ms"], bins=40, color="#4477aa")
    ax.axvline(1000 / 30, color="red", linestyle="--", label="30 fps budget")
    ax.set_xlabel("ms per frame (animation + rasterisation)")
    ax.set_ylabel("frames")
    ax.legend()
    fig.suptitle(
        f"{result['size']}×{result['size']}, {result['gaussians']:,} Gaussians,"
        f" {result['threads']} thread(s): {result['fps']:.1f} fps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_render_bench(
    size: int, gaussians: int, seconds: float, threads: int | None, json_path: Path
) -> dict[str, Any]:
    if not 16 <= size <= 2048:
        raise InvalidInput("--size must be within [16, 2048]")
    if not 1 <= gaussians <= 2_000_000:
        raise InvalidInput("--gaussians must be within [1, 2000000]")
    if not 0.5 <= seconds <= 3600:
        raise InvalidInput("--seconds must be within [0.5, 3600]")
    if threads is not None and not 1 <= threads <= 256:
        raise InvalidInput("--threads must be within [1, 256]")
    console = Console(stderr=True)
    with console.status(f"rendering {size}×{size} with {gaussians:,} Gaussians for {seconds} s"):
        result = bench_render(size, gaussians, seconds, threads)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "device": "cpu",
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with console.status("drawing frames"):
        _plot(json_path.with_suffix(".png"), result, _frames(size, gaussians))
    json_path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "frame_ms"}, indent=2))
    return result
