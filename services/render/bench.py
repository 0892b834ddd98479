"""Frames per second of one animated avatar stream on this machine."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import torch
from parley.visemes import VISEMES, Phoneme

from services.render.animation import Animator, PoseDriver, VisemeTrack
from services.render.assets import Avatar
from services.render.default_avatar import build_default_avatar, default_camera
from services.render.rasterizer import Rasterizer, RasterSettings

_SAMPLE_RATE = 16_000
_FPS = 30.0


def resample_avatar(avatar: Avatar, gaussians: int, seed: int = 0) -> Avatar:
    """The avatar with exactly ``gaussians`` Gaussians: a random subset, or all of them
    plus jittered duplicates (rig remapped either way)."""
    if gaussians < 1:
        raise ValueError("gaussians must be >= 1")
    n = avatar.cloud.num
    gen = torch.Generator().manual_seed(seed)
    if gaussians <= n:
        index = torch.randperm(n, generator=gen)[:gaussians].sort().values
        return avatar.select(index)
    extra = torch.randint(0, n, (gaussians - n,), generator=gen)
    bigger = avatar.select(torch.cat([torch.arange(n), extra]))
    # Move the copies by about half their size so they are not exact duplicates.
    cloud = bigger.cloud
    noise = torch.randn(gaussians - n, 3, generator=gen) * 0.5 * cloud.log_scales[n:].exp()
    means = torch.cat([cloud.means[:n], cloud.means[n:] + noise])
    return Avatar(avatar.avatar_id, cloud.with_means(means), bigger.rig)


def _speech_track() -> VisemeTrack:
    """Made-up speech cycling through every viseme, 90 ms each."""
    step = int(0.09 * _SAMPLE_RATE)
    return VisemeTrack(
        _SAMPLE_RATE, [Phoneme("x", v, i * step, step) for i, v in enumerate(VISEMES)]
    )


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bench_render(
    size: int = 256, gaussians: int = 20_000, seconds: float = 5.0, threads: int | None = None
) -> dict:
    """Render the default avatar at size x size with speech animation for ``seconds``.

    Returns fps, ms per frame (p50/p95, deformation + rasterisation), peak RSS growth
    during the run (MB; 0 if the process peaked earlier), torch threads and
    streams_per_core_at_30fps = fps / 30 / threads. ``threads`` sets torch's intra-op
    threads for the whole process (default: leave as configured).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    avatar = resample_avatar(build_default_avatar(), gaussians)
    animator = Animator(avatar)
    rasterizer = Rasterizer(RasterSettings(background=(0.93, 0.93, 0.95)))
    camera = default_camera(size, size)
    driver = PoseDriver(seed=0)
    track = _speech_track()
    period = track.end_s

    def frame(i: int) -> None:
        t = i / _FPS
        pose = driver.pose_at(t, track.weights_at(t % period), speaking=True)
        rasterizer.render(animator.deform(pose), camera)

    for i in range(3):  # warm-up: allocator, thread pool, cached constants
        frame(i)
    rss_before = _peak_rss_mb()
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        frame(i)
        times.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - start
    threads = torch.get_num_threads()
    fps = len(times) / elapsed
    ms = np.asarray(times) * 1e3
    return {
        "size": size,
        "gaussians": gaussians,
        "frames": len(times),
        "fps": round(fps, 2),
        "ms_p50": round(float(np.percentile(ms, 50)), 2),
        "ms_p95": round(float(np.percentile(ms, 95)), 2),
        "peak_rss_delta_mb": round(max(0.0, _peak_rss_mb() - rss_before), 1),
        "threads": threads,
        "streams_per_core_at_30fps": round(fps / _FPS / threads, 3),
        "pairs_last_frame": rasterizer.last_stats.get("pairs", 0),
        "frame_ms": [round(float(x), 2) for x in ms],
    }


if __name__ == "__main__":
    import json

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    for px in (256, 512):
        print(json.dumps(bench_render(px, 20_000, 5.0, threads)))
