"""Per-turn latency trace: wall-clock milestones from the end of the user's speech."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from parley import metrics

MILESTONES = (
    "asr_final",
    "end_of_turn",
    "llm_first_token",
    "tts_first_audio",
    "first_output",
    "first_frame",
)


@dataclass(slots=True)
class TurnTrace:
    turn: int
    #: wall clock (parley.clock) of the end of user speech, as the VAD placed it
    speech_end: float = 0.0
    #: wall clock of each milestone (0 = not reached)
    asr_final: float = 0.0
    end_of_turn: float = 0.0
    llm_first_token: float = 0.0
    tts_first_audio: float = 0.0
    first_output: float = 0.0
    #: the avatar's video frame shown with the first audio is rendered (with a renderer)
    first_frame: float = 0.0
    #: why the detector ended the turn (confident, silence, fast_audio, silence_cap, max_turn)
    end_of_turn_reason: str = ""
    user_text: str = ""
    reply_text: str = ""
    interrupted: bool = False
    #: seconds from detected user speech to the avatar going quiet, when interrupted
    interruption_stop_s: float = 0.0
    #: wall clock at which the interrupted reply was cancelled (no audio leaves after it)
    interrupted_at: float = 0.0
    llm_prompt_tokens: int = 0
    llm_cached_tokens: int = 0
    asr_decode_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def latencies(self, reference: float | None = None) -> dict[str, float | None]:
        """Seconds from `reference` (default: the VAD's speech end) to each milestone."""
        ref = self.speech_end if reference is None else reference
        return {m: (getattr(self, m) - ref) if getattr(self, m) else None for m in MILESTONES}

    def observe(self) -> None:
        for name, value in self.latencies().items():
            if value is not None:
                metrics.TURN_LATENCY.labels(name).observe(max(value, 0.0))

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["latency_s"] = self.latencies()
        return d
