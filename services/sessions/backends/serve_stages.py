"""Stage backends that call the stage deployments through Ray Serve handles.

A conversation keeps its per-session state (the microphone's VAD, the turn
detector's frame-by-frame state, the clause chunker, the avatar timeline) in the
sessions replica, and sends only model calls to the stage deployments: one
utterance to decode, one turn's audio or transcript to score, one prompt to
generate from, one clause to speak, one pose to draw. Each call is a stateless request, so any
replica of a stage serves any session; Serve's autoscaling and a replica's loss
never strand a session's state.

The backends plug into the ordinary engines (`AsrEngine(backend=...)`,
`TurnEngine(smart_turn=..., semantic=...)`, ...), so the conversation code is the
same in one process and on Serve. The synchronous backends (`decode`,
`synthesize`, the turn models, a frame) are called on their engine's worker thread
(a frame: the conversation's render thread) and wait on the handle's response
there, never on the event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from parley.errors import InvalidInput, ModelUnavailable
from pydantic import BaseModel, Field

from services.asr.config import AsrConfig
from services.asr.engine import AsrEngine, Decoded
from services.llm.config import LlmConfig
from services.llm.engine import ChatMessage, GenerationParams, GenerationStats, LlmEngine
from services.render.animation import Pose
from services.render.config import RenderConfig
from services.render.engine import AvatarProfile, RenderEngine
from services.sessions.conversation import Engines
from services.sessions.video import LiveVideoConfig
from services.tts.config import TtsConfig
from services.tts.engine import Speech, TtsEngine
from services.turn.backends.smart_turn import WINDOW
from services.turn.config import TurnConfig
from services.turn.engine import TurnEngine
from services.turn.semantic import SemanticScore

#: How long a model call may take before the session gives up on it (a stuck replica).
CALL_TIMEOUT_S = 30.0
#: A frame not back after this long is given up: the live video has moved on to the
#: newest frame due by then.
FRAME_TIMEOUT_S = 2.0
#: Threads of the sessions replica's engines waiting on stage calls (they only wait).
REMOTE_WORKERS = 16


def _result(response: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """Wait for a handle call on this (worker) thread; cancel it if it takes too long."""
    try:
        return response.result(timeout_s=timeout_s)
    except TimeoutError:
        response.cancel()  # the stage replica stops working on a call nobody awaits
        raise


class StageApps(BaseModel):
    """Names of the Serve applications the sessions deployment calls (the Serve config's)."""

    model_config = {"extra": "forbid"}

    asr: str = Field(default="asr", min_length=1)
    turn: str = Field(default="turn", min_length=1)
    llm: str = Field(default="llm", min_length=1)
    tts: str = Field(default="tts", min_length=1)
    #: The avatar renderer of the sessions' live video; None: conversations are voice only.
    render: str | None = Field(default="render", min_length=1)


class ServeAsrBackend:
    """`AsrBackend` over the ASR deployment's `decode`."""

    name = "serve"
    remote = True  # the stage replica records the stage metrics

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def warm_up(self) -> None:
        """The deployment warmed its model before it took calls."""

    def decode(self, audio: np.ndarray) -> Decoded:
        result: Decoded = _result(self._handle.decode.remote(audio))
        return result


class ServeSmartTurn:
    """`AudioTurnModel` over the turn deployment's `audio_probability`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.last_ms = 0.0

    def probability(self, audio: np.ndarray) -> float:
        # The model hears only its last window: send no more than that.
        window = np.ascontiguousarray(audio[-WINDOW:], dtype=np.float32)
        return float(_result(self._handle.audio_probability.remote(window)))


class ServeTextTurnModel:
    """`TextTurnModel` over the turn deployment's `text_score`."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def score(self, text: str) -> SemanticScore:
        result: SemanticScore = _result(self._handle.text_score.remote(text))
        return result


class ServeLlmBackend:
    """`LlmBackend` over the LLM deployment's streaming `generate` and its `prefill`."""

    name = "serve"
    remote = True  # the stage replica records the stage metrics

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)

    async def start(self) -> None:
        """The deployment loaded and warmed its model before it took calls."""

    async def prefill(self, messages: list[ChatMessage]) -> int:
        # The prefix cache is the replica's: with several replicas this warms one of them.
        tokens: int = await self._handle.prefill.remote(messages)
        return tokens

    async def prefill_reply(self, messages: list[ChatMessage], words_only: bool = False) -> int:
        # Helps only if the reply lands on the same replica (one replica: always).
        tokens: int = await self._handle.prefill_reply.remote(messages, words_only)
        return tokens

    async def generate(
        self, messages: list[ChatMessage], params: GenerationParams, stats: GenerationStats
    ) -> AsyncIterator[str]:
        response = self._stream.generate.remote(messages, params.max_tokens, params.temperature)
        finished = False
        try:
            async for piece, prompt, cached, completion in response:
                stats.prompt_tokens, stats.cached_tokens = prompt, cached
                stats.completion_tokens = completion
                yield piece
            finished = True
        finally:
            if not finished:  # the caller stopped early (barge-in): stop the replica too
                response.cancel()

    async def close(self) -> None:
        pass


class ServeTtsBackend:
    """`TtsBackend` over the TTS deployment's `synthesize` (clauses are chunked locally)."""

    name = "serve"
    remote = True  # the stage replica records the stage metrics

    def __init__(self, handle: Any, sample_rate: int) -> None:
        self._handle = handle
        self.sample_rate = sample_rate

    def warm_up(self) -> None:
        """The deployment warmed its voice before it took calls."""

    def synthesize(self, text: str) -> Speech:
        result: Speech = _result(self._handle.synthesize.remote(text))
        return result


class ServeRenderBackend:
    """`RenderBackend` over the render deployment: each frame's pose goes to whichever
    replica is free, and its image comes back (the timeline stays in the session)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def warm_up(self) -> None:
        """The deployment warmed its renderer before it took calls."""

    def avatar_ids(self) -> list[str]:
        return list(_result(self._handle.avatar_ids.remote()))

    def profile(self, avatar_id: str) -> AvatarProfile:
        from ray.exceptions import RayError

        try:
            found = _result(self._handle.profile.remote(avatar_id))
        except (TimeoutError, RayError) as exc:  # the caller retries: UNAVAILABLE / 503
            raise ModelUnavailable(f"the render app did not answer: {exc}") from exc
        if isinstance(found, str):  # the replica's message: unknown or bad id
            raise InvalidInput(found)
        assert isinstance(found, AvatarProfile)
        return found

    def render(self, avatar_id: str, width: int, height: int, pose: Pose) -> np.ndarray:
        response = self._handle.render_pose.remote(avatar_id, width, height, pose)
        rgb: np.ndarray = _result(response, FRAME_TIMEOUT_S)
        return rgb


@dataclass(slots=True)
class StageConfigs:
    """The stage deployments' own configs, read from them so both sides agree."""

    asr: AsrConfig
    turn: TurnConfig
    llm: LlmConfig
    tts: TtsConfig
    tts_sample_rate: int


async def stage_configs(handles: dict[str, Any]) -> StageConfigs:
    asr, turn, llm, tts, rate = [
        await handles["asr"].config.remote(),
        await handles["turn"].config.remote(),
        await handles["llm"].config.remote(),
        await handles["tts"].config.remote(),
        await handles["tts"].sample_rate.remote(),
    ]
    return StageConfigs(
        asr=AsrConfig.model_validate(asr),
        turn=TurnConfig.model_validate(turn),
        llm=LlmConfig.model_validate(llm),
        tts=TtsConfig.model_validate(tts),
        tts_sample_rate=int(rate),
    )


async def serve_render(handle: Any) -> RenderEngine:
    """A render engine whose frames the render deployment draws, sized by its config."""
    config = RenderConfig.model_validate(await handle.config.remote())
    return RenderEngine(config, backend=ServeRenderBackend(handle))


async def serve_engines(apps: StageApps, video: LiveVideoConfig | None = None) -> Engines:
    """Engines whose models are the stage deployments (call inside a Serve replica)."""
    from ray import serve

    names = apps.model_dump(exclude={"render"})
    handles = {stage: serve.get_app_handle(name) for stage, name in names.items()}
    render = await serve_render(serve.get_app_handle(apps.render)) if apps.render else None
    configs = await stage_configs(handles)
    models = await handles["turn"].models.remote()
    engines = Engines(
        asr=AsrEngine(configs.asr, backend=ServeAsrBackend(handles["asr"]), workers=REMOTE_WORKERS),
        llm=LlmEngine(configs.llm, backend=ServeLlmBackend(handles["llm"])),
        tts=TtsEngine(
            configs.tts,
            backend=ServeTtsBackend(handles["tts"], configs.tts_sample_rate),
            workers=REMOTE_WORKERS,
        ),
        turn=TurnEngine(
            configs.turn,
            smart_turn=ServeSmartTurn(handles["turn"]) if models["audio"] else None,
            semantic=ServeTextTurnModel(handles["turn"]) if models["text"] else None,
            workers=REMOTE_WORKERS,
        ),
        render=render,
        video=video or LiveVideoConfig(),
    )
    try:
        await engines.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await engines.close()
        raise
    return engines
