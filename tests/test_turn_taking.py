"""Turn-taking in the live conversation, on the real models, in real time.

Speculation (a reply started on a pause's words, released or dropped), backchannels
over the avatar, and the bad inputs a microphone produces: silence, noise, clipped
audio, a talker who never stops, two voices at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
from parley import clock
from parley.audio import resample
from parley.visemes import Phoneme, phonemes_from

from loadtest.replay import word_error_rate
from services.render.config import RenderConfig
from services.render.engine import RenderEngine
from services.sessions.conversation import (
    AvatarAudioEvent,
    AvatarTextEvent,
    Conversation,
    ConversationEvent,
    Engines,
    TurnDoneEvent,
)
from services.sessions.trace import TurnTrace
from services.tts.engine import TtsEngine
from services.turn.detector import ParleyTurnConfig

SR = 16_000
FRAME = 320


async def user_says(tts: TtsEngine, text: str) -> np.ndarray:
    speech = await tts.synthesize(text)
    return resample(speech.samples, speech.sample_rate, SR)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


class Driver:
    """Feeds a conversation in real time and keeps every event it emits."""

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.events: list[ConversationEvent] = []
        self._start = clock.now()
        self._sent = 0

    async def push(self, audio: np.ndarray) -> None:
        for i in range(0, len(audio), FRAME):
            frame = audio[i : i + FRAME]
            self._sent += len(frame)
            await asyncio.sleep(max(0.0, self._start + self._sent / SR - clock.now()))
            await self.conv.push_audio(frame)
            self._collect()

    def _collect(self) -> None:
        while not self.conv.events.empty():
            self.events.append(self.conv.events.get_nowait())

    async def quiet_until(self, condition: object, limit_s: float) -> bool:
        deadline = clock.now() + limit_s
        while not condition():  # type: ignore[operator]
            if clock.now() > deadline:
                return False
            await self.push(silence(FRAME / SR))
        return True

    def traces(self) -> list[TurnTrace]:
        return [e.trace for e in self.events if isinstance(e, TurnDoneEvent)]

    def avatar_audio(self, turn: int | None = None) -> list[AvatarAudioEvent]:
        return [
            e
            for e in self.events
            if isinstance(e, AvatarAudioEvent) and (turn is None or e.turn == turn)
        ]


async def test_speculation_answers_a_complete_question_early(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    # Smart Turn's fast path may end a turn before its words are out of the ASR (then
    # there is nothing to speculate on); here the words decide.
    conv = Conversation(engines, turn_config=replace(ParleyTurnConfig(), fast_audio_p=None))
    drive = Driver(conv)
    await drive.push(silence(0.25))
    await drive.push(await user_says(tts_engine, "What is the capital of France?"))
    assert await drive.quiet_until(lambda: drive.traces(), 30)
    (trace,) = drive.traces()
    assert conv.speculation.started >= 1 and conv.speculation.hits == 1
    assert trace.extra.get("speculated") == 1.0
    wer = word_error_rate("What is the capital of France?", trace.user_text)
    assert wer is not None and wer <= 0.2
    # The reply was under way before the turn was known to be over, and was held back.
    assert trace.llm_first_token > 0 and trace.first_output >= trace.end_of_turn
    texts = "".join(e.text for e in drive.events if isinstance(e, AvatarTextEvent))
    assert texts.split() == trace.reply_text.split() or texts.strip()
    await conv.close()


async def test_speculation_is_dropped_when_the_user_goes_on(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    # The pause in "I would like to book a flight to ... Paris" starts a reply on its
    # words, which must be dropped when the user goes on. Without Smart Turn's fast
    # path: TTS audio sounds finished to it, and on a slow box it decides before the
    # words are out of the ASR (then no speculation starts at all).
    conv = Conversation(engines, turn_config=replace(ParleyTurnConfig(), fast_audio_p=None))
    drive = Driver(conv)
    await drive.push(silence(0.25))
    await drive.push(await user_says(tts_engine, "I would like to book a flight to"))
    await drive.push(silence(0.9))
    await drive.push(await user_says(tts_engine, "Paris, please."))
    assert await drive.quiet_until(lambda: drive.traces(), 30)
    assert conv.speculation.misses >= 1, conv.speculation
    assert conv.speculation.wasted_tokens >= 0
    trace = drive.traces()[-1]
    assert "paris" in trace.user_text.lower() and "flight" in trace.user_text.lower()
    # Nothing of a dropped speculation reached the client: every avatar word and
    # sample belongs to the reply that was spoken.
    replies = {t.turn for t in drive.traces()}
    assert {e.turn for e in drive.events if isinstance(e, AvatarTextEvent)} <= replies
    assert {e.turn for e in drive.avatar_audio()} <= replies
    await conv.close()


async def test_backchannel_pauses_the_avatar_and_it_goes_on(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    # With an avatar: the rest of the paused clause goes back on its timeline.
    render = RenderEngine(RenderConfig(width=64, height=64))
    await render.start()
    conv = Conversation(
        replace(engines, render=render), "You are a storyteller. Tell long stories."
    )
    drive = Driver(conv)
    await drive.push(silence(0.25))
    await drive.push(await user_says(tts_engine, "Tell me a long story about a dragon."))
    assert await drive.quiet_until(lambda: drive.avatar_audio(), 30)
    turn = drive.avatar_audio()[0].turn
    await drive.push(silence(0.6))  # the avatar talks a little
    assert conv.replying
    said_before = len(drive.avatar_audio(turn))
    await drive.push(await user_says(tts_engine, "Okay."))
    assert await drive.quiet_until(lambda: conv.backchannels >= 1 or drive.traces(), 5)
    assert conv.backchannels == 1
    # The avatar went on with the same reply after the backchannel.
    assert await drive.quiet_until(lambda: len(drive.avatar_audio(turn)) > said_before + 25, 10)
    await conv.wait_idle()
    drive._collect()
    trace = next(t for t in drive.traces() if t.turn == turn)
    assert not trace.interrupted and trace.extra.get("resumed") == 1.0
    # "Okay" was nobody's turn: it is not answered and not glued to the next question.
    await drive.push(await user_says(tts_engine, "What is the capital of France?"))
    assert await drive.quiet_until(lambda: len(drive.traces()) >= 2, 30)
    assert "okay" not in drive.traces()[-1].user_text.lower()
    avatar = conv.avatar
    assert avatar is not None and avatar.speech_end_s > 0
    await conv.close()
    await render.close()


async def test_silence_and_noise_start_no_turn(engines: Engines) -> None:
    conv = Conversation(engines)
    drive = Driver(conv)
    rng = np.random.default_rng(7)
    await drive.push(silence(2.0))
    await drive.push((0.05 * rng.standard_normal(3 * SR)).astype(np.float32))  # hiss
    hum = 0.3 * np.sin(2 * np.pi * 50 * np.arange(2 * SR) / SR)  # mains hum
    await drive.push(hum.astype(np.float32))
    await drive.push(silence(2.0))
    await conv.wait_idle()
    assert not drive.traces() and not drive.avatar_audio()
    assert conv.speculation.started == conv.speculation.misses  # any started were dropped
    await conv.close()


async def test_clipped_speech_is_still_understood(engines: Engines, tts_engine: TtsEngine) -> None:
    conv = Conversation(engines)
    drive = Driver(conv)
    speech = await user_says(tts_engine, "What is the capital of France?")
    clipped = np.clip(speech * 12.0, -1.0, 1.0).astype(np.float32)
    assert np.mean(np.abs(clipped) >= 1.0) > 0.05  # hard clipping, not just loud
    await drive.push(silence(0.25))
    await drive.push(clipped)
    assert await drive.quiet_until(lambda: drive.traces(), 30)
    wer = word_error_rate("What is the capital of France?", drive.traces()[0].user_text)
    assert wer is not None and wer <= 0.34
    await conv.close()


async def test_talker_who_never_stops_is_capped_and_the_session_recovers(
    engines: Engines, tts_engine: TtsEngine
) -> None:
    """Two voices over each other for 14 s (never a pause), then a plain question."""
    conv = Conversation(engines, turn_config=replace(ParleyTurnConfig(), max_turn_s=6.0))
    drive = Driver(conv)
    story = await user_says(tts_engine, "and then we walked along the river to the old mill")
    other = await user_says(tts_engine, "the weather was lovely all week long in the mountains")
    voice_a = np.resize(story, 14 * SR)
    voice_b = np.roll(np.resize(other, 14 * SR), SR // 3)
    babble = np.clip(0.7 * voice_a + 0.7 * voice_b, -1, 1).astype(np.float32)
    await drive.push(silence(0.25))
    await drive.push(babble)
    # Beyond silence_cap_s: the babble's tail (cut mid-sentence) is decided before the question.
    await drive.push(silence(ParleyTurnConfig().silence_cap_s + 0.5))
    await conv.wait_idle()
    drive._collect()
    capped = [t for t in drive.traces() if t.end_of_turn_reason == "max_turn"]
    assert capped, [t.end_of_turn_reason for t in drive.traces()]
    before = len(drive.traces())
    await drive.push(await user_says(tts_engine, "What is the capital of France?"))
    assert await drive.quiet_until(lambda: len(drive.traces()) > before, 30)
    assert "capital" in drive.traces()[-1].user_text.lower()
    await conv.close()


def test_phonemes_from_keeps_the_rest_of_a_clause() -> None:
    ph = [Phoneme("h", "kk", 0, 100), Phoneme("e", "E", 100, 100), Phoneme("l", "nn", 200, 50)]
    rest = phonemes_from(ph, 150)
    assert rest == [Phoneme("e", "E", 0, 50), Phoneme("l", "nn", 50, 50)]
    assert phonemes_from(ph, 0) == ph and phonemes_from(ph, 250) == []
