"""Session lifecycle (in memory for now; tenants, API keys and Redis come with the platform API)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from parley.errors import InvalidInput

from services.sessions.conversation import Conversation, Engines

MAX_PERSONA_CHARS = 4000


class SessionNotFound(LookupError):
    pass


@dataclass(slots=True)
class SessionRecord:
    session_id: str
    avatar_id: str
    persona_prompt: str
    voice: str
    created_at: float
    ended_at: float = 0.0
    conversation: Conversation | None = None
    streaming: bool = False

    @property
    def active(self) -> bool:
        return not self.ended_at


class SessionRegistry:
    def __init__(self, engines: Engines, max_sessions: int = 64) -> None:
        self.engines = engines
        self.max_sessions = max_sessions
        self._sessions: dict[str, SessionRecord] = {}

    def create(self, avatar_id: str, persona_prompt: str, voice: str) -> SessionRecord:
        if len(persona_prompt) > MAX_PERSONA_CHARS:
            raise InvalidInput(f"persona_prompt is too long (limit {MAX_PERSONA_CHARS} characters)")
        if voice and voice != self.engines.tts.config.voice:
            raise InvalidInput(
                f"unknown voice {voice!r}; this deployment serves {self.engines.tts.config.voice!r}"
            )
        if sum(s.active for s in self._sessions.values()) >= self.max_sessions:
            raise InvalidInput(f"at most {self.max_sessions} active sessions")
        record = SessionRecord(
            session_id=uuid.uuid4().hex,
            avatar_id=avatar_id or "default",
            persona_prompt=persona_prompt,
            voice=voice or self.engines.tts.config.voice,
            created_at=time.time(),
        )
        record.conversation = Conversation(self.engines, persona_prompt)
        record.conversation.prepare()
        self._sessions[record.session_id] = record
        return record

    def get(self, session_id: str) -> SessionRecord:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def list(self) -> list[SessionRecord]:
        return list(self._sessions.values())

    async def end(self, session_id: str) -> SessionRecord:
        record = self.get(session_id)
        if record.active:
            record.ended_at = time.time()
            if record.conversation is not None:
                await record.conversation.close()
        return record
