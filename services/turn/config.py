"""Typed options of the turn service (validated; the Serve config and the CLI fill them)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, Field, model_validator

from services.turn.detector import ParleyTurnConfig

_DEFAULTS = ParleyTurnConfig()


class TurnConfig(BaseModel):
    #: Smart Turn v3.2 on the audio (the pipecat-ai wheel's ONNX file, or `smart_turn_path`).
    smart_turn: bool = True
    smart_turn_path: str = ""
    #: The SmolLM2 end-of-utterance model on the transcript (or a GGUF at `semantic_model_path`).
    semantic: bool = True
    semantic_model_path: str = ""
    #: Silence before the VAD reports a speech stop.
    vad_stop_ms: int = Field(default=_DEFAULTS.vad_stop_ms, ge=32, le=2000)
    #: Silence (from where it began) a turn needs when it reads complete ...
    min_silence_s: float = Field(default=_DEFAULTS.min_silence_s, ge=0.0, le=5.0)
    #: ... and mid-sentence ("I'd like to book… um… a flight to").
    max_silence_s: float = Field(default=_DEFAULTS.max_silence_s, ge=0.1, le=10.0)
    #: This much silence always ends a turn.
    silence_cap_s: float = Field(default=_DEFAULTS.silence_cap_s, ge=0.2, le=10.0)
    #: A user who never stops is cut off (their turn ends) after this long.
    max_turn_s: float = Field(default=_DEFAULTS.max_turn_s, ge=2.0, le=600.0)
    #: Raise SPECULATE with the words of each pause, so a reply can start early.
    speculate: bool = True
    #: A transcript decoded at the energy dip covers a pause Silero heard up to this
    #: much later (0: it must reach Silero's silence; keep as `asr.quiet_lag_s`).
    quiet_lag_s: float = Field(default=_DEFAULTS.quiet_lag_s, ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _ordered(self) -> TurnConfig:
        if self.min_silence_s > self.max_silence_s:
            raise ValueError("min_silence_s must not exceed max_silence_s")
        if self.max_silence_s > self.silence_cap_s:
            raise ValueError("max_silence_s must not exceed silence_cap_s")
        return self

    def detector_config(self) -> ParleyTurnConfig:
        config = replace(
            _DEFAULTS,
            vad_stop_ms=self.vad_stop_ms,
            min_silence_s=self.min_silence_s,
            max_silence_s=self.max_silence_s,
            silence_cap_s=self.silence_cap_s,
            max_turn_s=self.max_turn_s,
            speculate=self.speculate,
            quiet_lag_s=self.quiet_lag_s,
        )
        if not self.smart_turn:  # no audio model: no fast path, the words alone decide
            config = replace(config, fast_audio_p=None, bias=0.0, w_audio=0.0, w_text=1.0)
        return config
