"""Typed options of the render service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

#: Frame sizes a stream may ask for (pixels, each side).
MIN_SIZE = 16
MAX_SIZE = 1024
#: Frame rates a stream may ask for.
MIN_FPS = 1
MAX_FPS = 60


class RenderConfig(BaseModel):
    #: Defaults for streams that leave width, height or fps at 0. Even sizes, so that
    #: H.264 (4:2:0 chroma) can encode them.
    width: int = Field(default=256, ge=MIN_SIZE, le=MAX_SIZE)
    height: int = Field(default=256, ge=MIN_SIZE, le=MAX_SIZE)
    fps: int = Field(default=25, ge=MIN_FPS, le=MAX_FPS)
    #: torch intra-op threads (process-wide; each stream renders on its own worker
    #: thread). 1 is the right choice on a busy CPU box: two threads spin-wait on each
    #: other and stall when another stage holds the second core.
    threads: int = Field(default=1, ge=1, le=64)
    #: Frames one render replica rasterizes at once for the sessions gateway (each on its
    #: own thread with `threads` torch threads). On a GPU, concurrent frames overlap.
    workers: int = Field(default=2, ge=1, le=64)
    #: "auto": CUDA when torch sees a GPU (then gsplat rasterizes, if installed).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Idle head motion: bound of the yaw angle (degrees) while listening and while
    #: speaking; pitch and roll use 0.8 and 0.5 of it. Users dislike a busy head.
    listening_motion_deg: float = Field(default=1.2, ge=0.0, le=10.0)
    speaking_motion_deg: float = Field(default=1.8, ge=0.0, le=10.0)
    #: Directory of avatar assets: ``<id>.ply`` + ``<id>.rig.json`` per avatar. Empty:
    #: only the built-in "default" avatar (a file pair named "default" replaces it).
    avatars_dir: str = ""
    #: Frames are rendered and sent up to this long before their presentation time (the
    #: client's jitter buffer). Speech must arrive at least this early to be seen on
    #: time; the conversation sends its audio with a 40 ms lead.
    max_lead_s: float = Field(default=0.04, ge=0.0, le=1.0)
    #: Speech may be queued at most this far ahead of the video (bounds memory).
    max_queued_speech_s: float = Field(default=120.0, ge=1.0)
    #: After the client half-closes, frames continue this long past the end of the
    #: queued speech, so the mouth closes on screen.
    tail_s: float = Field(default=0.2, ge=0.0, le=5.0)
    #: Background colour (RGB in [0, 1]).
    background: tuple[float, float, float] = (0.93, 0.93, 0.95)
    #: Seed of blinks and head motion.
    seed: int = 0

    @field_validator("background")
    @classmethod
    def _unit_colour(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 <= c <= 1.0 for c in v):
            raise ValueError("background components must lie in [0, 1]")
        return v

    @model_validator(mode="after")
    def _even_defaults(self) -> RenderConfig:
        if self.width % 2 or self.height % 2:
            raise ValueError("default width and height must be even (H.264 needs them)")
        return self
