"""Python client of the sessions API (`parley.v1.Sessions` over gRPC, asyncio).

    import numpy as np
    from parley.client import AvatarSpeech, AvatarText, ParleyClient, TurnLatency, UserTranscript

    async with ParleyClient("grpc://127.0.0.1:9000", api_key) as client:
        session = await client.create_session(persona_prompt="You are terse.")
        async for event in client.converse(session.session_id, audio_16k_mono_float32):
            if isinstance(event, UserTranscript) and event.is_final:
                print("you:", event.text)
            elif isinstance(event, AvatarText):
                print(event.text, end="")
            elif isinstance(event, AvatarSpeech):
                play(event.samples, event.sample_rate)
            elif isinstance(event, AvatarVideo):  # H.264 Annex-B by default (`video=`)
                decode(event.data)  # show it when the audio of pts `event.pts_s` plays
        await client.end_session(session.session_id)

Every call carries the API key as `authorization: Bearer <key>`. Failed calls raise a
`ParleyError` subclass that keeps the gRPC status code and the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import grpc
import numpy as np

from parley import clock, wire
from parley.audio import ASR_SAMPLE_RATE, FRAME_MS
from parley.errors import InvalidInput
from parley.v1 import sessions_pb2, sessions_pb2_grpc
from parley.visemes import Phoneme

if TYPE_CHECKING:
    from parley.v1.sessions_pb2_grpc import SessionsAsyncStub

#: Rate of the user audio `converse` sends (16 kHz mono).
INPUT_SAMPLE_RATE = ASR_SAMPLE_RATE
#: Samples per audio message: 20 ms, as a live microphone delivers them.
FRAME_SAMPLES = INPUT_SAMPLE_RATE * FRAME_MS // 1000
#: Default deadline of the unary calls (create, get, list, end); `converse` has none.
DEFAULT_TIMEOUT_S = 30.0

# --------------------------------------------------------------------------- errors


class ParleyError(Exception):
    """A call to the server failed. `code` is the gRPC status, `details` the server's message."""

    def __init__(
        self, code: grpc.StatusCode, details: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        #: When a retry can succeed (the server's `retry-after` trailer), if it said.
        self.retry_after_s = retry_after_s


class AuthenticationError(ParleyError):
    """UNAUTHENTICATED: the API key is missing, malformed, unknown or revoked."""


class PermissionDeniedError(ParleyError):
    """PERMISSION_DENIED: the key may not do this."""


class NotFoundError(ParleyError):
    """NOT_FOUND: no such session (or another tenant's, which reads the same)."""


class InvalidArgumentError(ParleyError):
    """INVALID_ARGUMENT: the server refused a value or a message (audio, persona, voice, ...)."""


class ResourceExhaustedError(ParleyError):
    """RESOURCE_EXHAUSTED: a tenant or gateway limit (see `retry_after_s`), or a message too big."""


class ConflictError(ParleyError):
    """ALREADY_EXISTS / FAILED_PRECONDITION: the session has ended or already has a stream."""


class UnavailableError(ParleyError):
    """UNAVAILABLE: the server cannot be reached, or cannot serve now (Redis down, shutting down)."""


class DeadlineExceededError(ParleyError):
    """DEADLINE_EXCEEDED: the server did not answer within the call's timeout."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[ParleyError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def error_from_rpc(err: grpc.aio.AioRpcError) -> ParleyError:
    """The `ParleyError` subclass for a failed call's status, with its message and retry hint."""
    return error_from_status(err.code(), err.details() or "", err.trailing_metadata())


def error_from_status(code: grpc.StatusCode, details: str, trailers: Any) -> ParleyError:
    retry_after_s = None
    for key, value in trailers or ():  # aio Metadata, or (key, value) pairs
        if key == "retry-after":
            with contextlib.suppress(TypeError, ValueError):
                retry_after_s = float(value)
    cls = _ERROR_CLASSES.get(code, ParleyError)
    return cls(code, details, retry_after_s=retry_after_s)


#: What grpc.aio reports when one of our writes fails because the call just ended.
_CORE_INTERNAL_DETAILS = "Internal error from Core"


class FirstStatus:
    """The first status a streaming call ends with, kept for `error` (a call done-callback).

    When the server ends a stream (say NOT_FOUND) while one of our writes is in flight,
    grpc.aio replaces the status it has just received with INTERNAL "Internal error from
    Core" as the write fails, and the server's status and message are lost. grpc runs the
    done-callbacks each time it sets a status, so the first call here sees the server's.
    """

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str, Any] | None = None

    def __call__(self, call: Any) -> None:
        if self.status is not None:
            return
        try:  # the status is set: these coroutines finish without suspending
            self.status = (_now(call.code()), _now(call.details()), _now(call.trailing_metadata()))
        except Exception:  # not set after all (a grpc change): keep what the call says
            self.status = None

    def error(self, err: grpc.aio.AioRpcError) -> ParleyError:
        """The error for a failed stream: the server's status if a failed write hid it."""
        if (
            err.code() == grpc.StatusCode.INTERNAL
            and err.details() == _CORE_INTERNAL_DETAILS
            and self.status is not None
            and self.status[0] not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL)
        ):
            return error_from_status(*self.status)
        return error_from_rpc(err)


def _now(coro: Any) -> Any:
    """The result of a coroutine that completes without waiting (RuntimeError if it would)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine would wait")


# --------------------------------------------------------------------------- targets


_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")


def parse_target(target: str) -> tuple[str, bool]:
    """The gRPC address of `grpc://host:port`, `grpcs://host:port` (TLS), `host:port` or
    `unix:PATH`, and whether the scheme asks for TLS. InvalidInput for anything else."""
    given = target
    target = target.strip()
    tls = False
    if target.startswith("unix:"):
        if len(target) == len("unix:"):
            raise InvalidInput("target unix: needs a socket path, e.g. unix:/run/parley.sock")
        return target, False
    scheme, sep, rest = target.partition("://")
    if sep:
        if scheme.lower() not in ("grpc", "grpcs"):
            raise InvalidInput(
                f"target {given!r}: use grpc://host:port, grpcs://host:port or host:port"
            )
        tls = scheme.lower() == "grpcs"
        target = rest.rstrip("/")
    match = _HOST_PORT.fullmatch(target)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise InvalidInput(
            f"target {given!r} is not host:port (e.g. grpc://127.0.0.1:9000); "
            "the port must be within [1, 65535]"
        )
    return target, tls


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    avatar_id: str
    persona_prompt: str
    voice: str
    state: Literal["active", "ended", "unspecified"]
    created_at: float  # Unix time
    ended_at: float | None  # None while active
    turns: int

    @property
    def active(self) -> bool:
        return self.state == "active"

    @classmethod
    def from_proto(cls, s: sessions_pb2.Session) -> Session:
        state: Literal["active", "ended", "unspecified"] = (
            "active"
            if s.state == sessions_pb2.Session.ACTIVE
            else "ended"
            if s.state == sessions_pb2.Session.ENDED
            else "unspecified"
        )
        return cls(
            session_id=s.session_id,
            avatar_id=s.avatar_id,
            persona_prompt=s.persona_prompt,
            voice=s.voice,
            state=state,
            created_at=s.created_at,
            ended_at=s.ended_at or None,
            turns=s.turns,
        )


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class UserTranscript:
    """What the server heard of the user this turn so far (partials, then a final)."""

    text: str
    is_final: bool
    turn: int


@dataclass(frozen=True, slots=True)
class AvatarText:
    """A piece of the avatar's reply text, as the LLM produces it."""

    text: str
    turn: int


@dataclass(frozen=True, slots=True)
class AvatarSpeech:
    """A piece of the avatar's voice: float32 mono samples at `sample_rate` (24 kHz),
    `start_sample` its place in the session's avatar audio stream, and the phonemes
    (positions in that same stream) that start in it. `pts_s`: where its first sample
    plays on the avatar's timeline, that of `AvatarVideo.pts_s` (None: no renderer)."""

    samples: np.ndarray
    sample_rate: int
    start_sample: int
    phonemes: list[Phoneme]
    turn: int
    pts_s: float | None = None

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True, slots=True)
class AvatarVideo:
    """A frame of the avatar's live video: `encoding` "h264" (Annex-B; a stream's first
    frame is a keyframe, so decoding can start there) or "jpeg", `pts_s` when it shows on
    the avatar's timeline (that of `AvatarSpeech.pts_s`), `index` = pts_s × fps (gaps:
    frames skipped because rendering fell behind or the client read slowly)."""

    data: bytes
    encoding: str
    width: int
    height: int
    pts_s: float
    index: int


@dataclass(frozen=True, slots=True)
class TurnLatency:
    """A turn's milestones in seconds from the end of the user's speech (None: not reached)."""

    turn: int
    asr_final_s: float | None
    end_of_turn_s: float | None
    llm_first_token_s: float | None
    tts_first_audio_s: float | None
    first_output_s: float | None
    first_frame_s: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "asr_final_s": self.asr_final_s,
            "end_of_turn_s": self.end_of_turn_s,
            "llm_first_token_s": self.llm_first_token_s,
            "tts_first_audio_s": self.tts_first_audio_s,
            "first_output_s": self.first_output_s,
            "first_frame_s": self.first_frame_s,
        }


@dataclass(frozen=True, slots=True)
class Interruption:
    """The user talked over the avatar, which stopped `stop_latency_s` after they started."""

    turn: int
    stop_latency_s: float


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The avatar finished speaking its reply for `turn`."""

    turn: int


Event = (
    UserTranscript
    | AvatarText
    | AvatarSpeech
    | AvatarVideo
    | TurnLatency
    | Interruption
    | ReplyDone
)


def _reached(seconds: float) -> float | None:
    return seconds or None  # the wire's 0: not reached


def event_from_proto(ev: sessions_pb2.ServerEvent) -> Event | None:
    """The typed event of a `ServerEvent`; None for a kind this client does not know.

    InvalidInput when the server sent malformed audio or phoneme timings.
    """
    kind = ev.WhichOneof("event")
    if kind == "user_transcript":
        t = ev.user_transcript
        return UserTranscript(t.text, t.is_final, t.turn)
    if kind == "avatar_text":
        return AvatarText(ev.avatar_text.text, ev.avatar_text.turn)
    if kind == "avatar_speech":
        s = ev.avatar_speech
        if s.audio.sample_rate <= 0:
            raise InvalidInput(f"avatar audio with sample_rate={s.audio.sample_rate}")
        return AvatarSpeech(
            samples=wire.audio_from_proto(s.audio, expected_rate=s.audio.sample_rate),
            sample_rate=s.audio.sample_rate,
            start_sample=s.audio.start_sample,
            phonemes=wire.phonemes_from_proto(s.phonemes),
            turn=s.turn,
            pts_s=s.pts_s or None,
        )
    if kind == "avatar_video":
        v = ev.avatar_video
        return AvatarVideo(v.data, v.encoding, v.width, v.height, v.pts_s, v.index)
    if kind == "latency":
        lat = ev.latency
        return TurnLatency(
            turn=lat.turn,
            asr_final_s=_reached(lat.asr_final_s),
            end_of_turn_s=_reached(lat.end_of_turn_s),
            llm_first_token_s=_reached(lat.llm_first_token_s),
            tts_first_audio_s=_reached(lat.tts_first_audio_s),
            first_output_s=_reached(lat.first_output_s),
            first_frame_s=_reached(lat.first_frame_s),
        )
    if kind == "interruption":
        return Interruption(ev.interruption.turn, ev.interruption.stop_latency_s)
    if kind == "reply_done_turn":
        return ReplyDone(ev.reply_done_turn)
    return None


# --------------------------------------------------------------------------- audio in


def as_input_samples(chunk: np.ndarray) -> np.ndarray:
    """User audio as 1-D float32 in [-1, 1]: float arrays are taken as they are, int16 as PCM.

    InvalidInput for other shapes or types (resample and mix down first: 16 kHz mono).
    """
    chunk = np.asarray(chunk)
    if chunk.ndim != 1:
        raise InvalidInput(
            f"user audio must be 1-D (16 kHz mono samples), got an array of shape {chunk.shape}"
        )
    if chunk.dtype == np.int16:
        return chunk.astype(np.float32) / 32768.0
    if not np.issubdtype(chunk.dtype, np.floating):
        raise InvalidInput(
            f"user audio must be float samples in [-1, 1] or int16, not {chunk.dtype}"
        )
    samples = chunk.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise InvalidInput("user audio holds NaN or infinite samples")
    return samples


async def _chunks(audio: AsyncIterable[np.ndarray] | np.ndarray) -> AsyncIterator[np.ndarray]:
    if isinstance(audio, np.ndarray):
        yield audio
        return
    if not isinstance(audio, AsyncIterable):
        raise InvalidInput(
            f"audio must be a numpy array or an async iterable of arrays, not {type(audio).__name__}"
        )
    async for chunk in audio:
        yield chunk


async def paced_frames(
    audio: AsyncIterable[np.ndarray] | np.ndarray, *, realtime: bool = True
) -> AsyncIterator[np.ndarray]:
    """`audio` cut into 20 ms frames (the last piece of each chunk may be shorter).

    With `realtime`, a frame goes out no sooner than a microphone would have delivered
    it: frame k once (k + 1) x 20 ms have passed since the start. A live source that is
    already real time is not slowed further.
    """
    start = clock.now()
    sent = 0
    async for chunk in _chunks(audio):
        samples = as_input_samples(chunk)
        for i in range(0, len(samples), FRAME_SAMPLES):
            frame = samples[i : i + FRAME_SAMPLES]
            sent += len(frame)
            if realtime:
                delay = start + sent / INPUT_SAMPLE_RATE - clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield frame


# --------------------------------------------------------------------------- client


class ParleyClient:
    """An asyncio client of one Parley sessions server; use it as an async context manager
    (or call `close`). `target` is `grpc://host:port`, `grpcs://host:port` (TLS),
    `host:port` or `unix:PATH`.

    `metadata` is sent with every call besides the API key (e.g. `(("application",
    "sessions"),)` behind Ray Serve's gRPC ingress). `timeout` bounds the unary calls;
    `root_certificates` (PEM) replaces the system roots when `secure`.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None,
        *,
        secure: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = DEFAULT_TIMEOUT_S,
        root_certificates: bytes | None = None,
    ) -> None:
        address, tls = parse_target(target)
        self.target = target
        self.address = address
        self.secure = secure or tls
        self.timeout = timeout
        self._root_certificates = root_certificates
        auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._metadata: tuple[tuple[str, str], ...] = (*auth, *metadata)
        self._channel: grpc.aio.Channel | None = None
        self._stub_: SessionsAsyncStub | None = None

    async def __aenter__(self) -> ParleyClient:
        self._stub()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled). The client can be used again."""
        channel, self._channel, self._stub_ = self._channel, None, None
        if channel is not None:
            await channel.close(None)

    def _stub(self) -> SessionsAsyncStub:
        # The channel is made on first use, inside the event loop that uses it.
        if self._stub_ is None:
            if self.secure:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._root_certificates
                )
                self._channel = grpc.aio.secure_channel(self.address, credentials)
            else:
                self._channel = grpc.aio.insecure_channel(self.address)
            self._stub_ = sessions_pb2_grpc.SessionsStub(self._channel)
        return self._stub_

    async def _unary(self, method: str, request: Any) -> Any:
        call = getattr(self._stub(), method)
        try:
            return await call(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    # -- lifecycle --------------------------------------------------------------------------

    async def create_session(
        self, avatar_id: str = "", persona_prompt: str = "", voice: str = ""
    ) -> Session:
        """A new session (empty values: the server's defaults)."""
        request = sessions_pb2.CreateSessionRequest(
            avatar_id=avatar_id, persona_prompt=persona_prompt, voice=voice
        )
        return Session.from_proto(await self._unary("CreateSession", request))

    async def get_session(self, session_id: str) -> Session:
        request = sessions_pb2.GetSessionRequest(session_id=session_id)
        return Session.from_proto(await self._unary("GetSession", request))

    async def list_sessions(self) -> list[Session]:
        """The caller's sessions (this tenant's only)."""
        reply = await self._unary("ListSessions", sessions_pb2.ListSessionsRequest())
        return [Session.from_proto(s) for s in reply.sessions]

    async def end_session(self, session_id: str) -> Session:
        """End a session (repeatable); returns it ended."""
        request = sessions_pb2.EndSessionRequest(session_id=session_id)
        return Session.from_proto(await self._unary("EndSession", request))

    # -- the conversation -------------------------------------------------------------------

    async def converse(
        self,
        session_id: str,
        audio: AsyncIterable[np.ndarray] | np.ndarray,
        *,
        realtime: bool = True,
        video: Literal["h264", "jpeg", "none"] = "h264",
    ) -> AsyncGenerator[Event, None]:
        """Stream the user's audio (16 kHz mono: float32 in [-1, 1] or int16) into the
        session; yield the server's events as they come.

        `video`: the encoding of the avatar's live video (`AvatarVideo` events; none
        from a server without a renderer), or "none" for voice only. Read the events
        promptly: a slow reader gets fewer video frames.

        Audio goes out in 20 ms frames, paced in real time with `realtime` (a WAV played
        like a microphone; a live source passes at its own pace). When `audio` ends the
        stream is half-closed: the reply in progress is finished and its events yielded,
        then the iteration ends. Stop early with `aclose()` (or `contextlib.aclosing`):
        the call is cancelled, the session stays usable for a new stream.

        Raises a `ParleyError` for a refused or failed stream (NotFoundError for an unknown
        session, ConflictError when it has ended or already streams, ...), and what
        `audio` raises (InvalidInput for samples of the wrong shape) after cancelling.
        """
        call = self._stub().Converse(None, metadata=self._metadata)
        send_error: BaseException | None = None
        server_status = FirstStatus()
        call.add_done_callback(server_status)

        async def send() -> None:
            nonlocal send_error
            try:
                await call.write(
                    sessions_pb2.ClientEvent(
                        start=sessions_pb2.ConverseStart(
                            session_id=session_id, video_encoding=video
                        )
                    )
                )
                position = 0
                async for frame in paced_frames(audio, realtime=realtime):
                    chunk = wire.audio_to_proto(frame, INPUT_SAMPLE_RATE, position)
                    await call.write(sessions_pb2.ClientEvent(audio=chunk))
                    position += len(frame)
                await call.done_writing()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if call.done():
                    return  # the server ended the call: the reader raises its status
                send_error = exc
                call.cancel()

        sender = asyncio.create_task(send())
        try:
            try:
                async for message in call:
                    try:
                        event = event_from_proto(message)
                    except InvalidInput as exc:
                        raise ParleyError(
                            grpc.StatusCode.INTERNAL, f"malformed event from the server: {exc}"
                        ) from None
                    if event is not None:
                        yield event
            except asyncio.CancelledError:
                if send_error is not None:  # we cancelled the call: the audio source failed
                    raise send_error from None
                raise
            except grpc.aio.AioRpcError as err:
                raise server_status.error(err) from None
        finally:
            if not call.done():
                call.cancel()
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


@dataclass(slots=True)
class Reply:
    """A helper that gathers a stream's events by kind (see `collect`)."""

    transcripts: list[UserTranscript] = field(default_factory=list)
    texts: list[AvatarText] = field(default_factory=list)
    speech: list[AvatarSpeech] = field(default_factory=list)
    video: list[AvatarVideo] = field(default_factory=list)
    latencies: list[TurnLatency] = field(default_factory=list)
    others: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if isinstance(event, UserTranscript):
            self.transcripts.append(event)
        elif isinstance(event, AvatarText):
            self.texts.append(event)
        elif isinstance(event, AvatarSpeech):
            self.speech.append(event)
        elif isinstance(event, AvatarVideo):
            self.video.append(event)
        elif isinstance(event, TurnLatency):
            self.latencies.append(event)
        else:
            self.others.append(event)

    @property
    def user_finals(self) -> list[str]:
        """The final transcript of each turn, in turn order."""
        finals: dict[int, str] = {}
        for t in self.transcripts:
            if t.is_final:
                finals[t.turn] = t.text  # a turn's later final holds its whole text
        return [finals[k] for k in sorted(finals)]

    @property
    def avatar_text(self) -> str:
        return "".join(t.text for t in self.texts)

    def avatar_audio(self) -> tuple[np.ndarray, int]:
        """The avatar's voice, its pieces joined in stream order, and its sample rate."""
        if not self.speech:
            return np.zeros(0, np.float32), 24_000
        ordered = sorted(self.speech, key=lambda s: s.start_sample)
        return np.concatenate([s.samples for s in ordered]), ordered[0].sample_rate


async def collect(events: AsyncGenerator[Event, None]) -> Reply:
    """Every event of a `converse` stream, gathered by kind."""
    reply = Reply()
    async with contextlib.aclosing(events):
        async for event in events:
            reply.add(event)
    return reply
