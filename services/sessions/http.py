"""HTTP API of the sessions gateway: REST for the session lifecycle, a WebSocket per stream.

`create_app(registry)` serves the same `SessionRegistry` as the gRPC servicer (the
Converse relay is shared through `services.sessions.gateway`); `server_config` runs it
under uvicorn with the WebSocket message limit this protocol expects.

    POST   /v1/sessions                     create (JSON body, all fields optional) → 201
    GET    /v1/sessions                     the caller's sessions
    GET    /v1/sessions/{id}                one session
    DELETE /v1/sessions/{id}                end it (repeatable) → the ended session
    WS     /v1/sessions/{id}/converse       the conversation stream (?video=jpeg|h264|none)
    GET    /openapi.json, /docs             the REST contract
    GET    /                                a page to talk to the avatar (microphone, video)

Auth: `Authorization: Bearer <key>` or `X-API-Key: <key>`. Browsers cannot set headers on
a WebSocket, so it also takes the key as a subprotocol: offer `["parley.v1",
"parley.key.<key>"]` and the server selects `parley.v1`. Keys never go in the query
string, which proxies and access logs record.

Errors are `{"error": {"code": <gRPC status name>, "message": ...}}` with the HTTP status
(401 + `WWW-Authenticate`, 404, 409, 422 for a body that fails validation, 429 +
`Retry-After` when a retry time is known, 503). On the WebSocket an error is the same
object with `"type": "error"`, then a close with code 4000 + the HTTP status (4400, 4401,
4404, 4409, 4429, 4503); the session itself stays usable (for a new stream).

The stream's video: the query parameter `video` is `jpeg` (the default: each frame a
JPEG, what a browser draws most simply), `h264` (Annex-B, the stream's first frame a
keyframe; for WebCodecs or other H.264 decoders) or `none`.

WebSocket messages:
  client → server  binary: 16 kHz mono PCM16 little-endian, ≤ 1 s (32,000 bytes) each,
                   an even byte count; 20 ms (640 bytes) recommended, in real time.
                   text: {"type": "end"} — no more audio; the reply in progress
                   finishes, then the server closes with 1000.
  server → client  text (JSON), by "type":
                   ready            {session_id, audio_in: {sample_rate, channels, encoding, max_bytes},
                                     video_out: {encoding, width, height, fps} | null}
                   user_transcript  {text, is_final, turn}
                   avatar_text      {text, turn}
                   avatar_speech    {turn, sample_rate, start_sample, num_samples, encoding,
                                     pts_s, phonemes: [{phoneme, viseme, start_sample, num_samples}]},
                                    followed at once by one binary message: its PCM16 audio
                   avatar_video     {index, pts_s, width, height, encoding, key}, followed at
                                    once by one binary message: the encoded frame
                   latency          {turn, asr_final_s, end_of_turn_s, llm_first_token_s,
                                     tts_first_audio_s, first_output_s, first_frame_s} (null: not reached)
                   error            {code, message}, then the close

`pts_s` of avatar_speech (where its first sample plays) and of avatar_video (when the
frame shows) are seconds on one timeline, the avatar's: play audio gaplessly, and show
the frame of pts p when the audio of pts p plays (`services/sessions/web/app.js` does).
Frames come in real time (~40 ms ahead); a client that reads slowly gets fewer frames.
"""

import contextlib
import html
import json
import logging
import math
from collections.abc import AsyncIterator, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request, Security, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from parley.audio import ASR_SAMPLE_RATE, float_to_pcm16, pcm16_to_float
from parley.errors import InvalidInput, ModelUnavailable, RequestRefused
from parley.tenancy import X_API_KEY, LimitExceeded, Principal, api_key_from_headers
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from services.sessions import gateway
from services.sessions.conversation import (
    AvatarAudioEvent,
    AvatarTextEvent,
    ConversationEvent,
    TurnDoneEvent,
    UserTranscriptEvent,
)
from services.sessions.registry import (
    MAX_PERSONA_CHARS,
    MAX_VOICE_CHARS,
    SessionRecord,
    SessionRegistry,
)
from services.sessions.video import AvatarVideoEvent, check_encoding

log = logging.getLogger(__name__)

#: REST bodies are small JSON objects (a persona prompt at most).
MAX_BODY_BYTES = 64 * 1024
#: Largest audio message a client may send: 1 s of 16 kHz PCM16.
MAX_AUDIO_MESSAGE_BYTES = ASR_SAMPLE_RATE * 2
#: Largest text message a client may send (control messages are a few bytes).
MAX_TEXT_MESSAGE_CHARS = 4096
#: The server's WebSocket frame limit (uvicorn closes with 1009 above it, before the app
#: sees the message); messages between the limits above and this one get an error message.
MAX_WS_MESSAGE_BYTES = 64 * 1024
WS_SUBPROTOCOL = "parley.v1"
WS_KEY_SUBPROTOCOL_PREFIX = "parley.key."
AUDIO_ENCODING = "pcm_s16le"
#: The stream's video when the client does not ask (`?video=`).
DEFAULT_VIDEO_ENCODING = "jpeg"
#: The browser page (static files, no build step).
WEB_DIR = Path(__file__).parent / "web"
#: The page loads only its own scripts and talks only to this server.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self'; media-src 'self' blob:; base-uri 'self'; frame-ancestors 'none'"
)
#: A WebSocket close reason may hold at most 123 bytes.
_MAX_CLOSE_REASON_BYTES = 123


# --------------------------------------------------------------------------- schemas


class CreateSessionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    avatar_id: str = Field(
        default="", max_length=64, description="Avatar to render; empty: default."
    )
    persona_prompt: str = Field(
        default="",
        max_length=MAX_PERSONA_CHARS,
        description="System prompt; empty: the default persona.",
    )
    voice: str = Field(
        default="",
        max_length=MAX_VOICE_CHARS,
        description="TTS voice; empty: the deployment's voice.",
    )


class SessionOut(BaseModel):
    session_id: str
    avatar_id: str
    persona_prompt: str
    voice: str
    state: Literal["active", "ended"]
    created_at: float = Field(description="Unix time, seconds.")
    ended_at: float | None = Field(description="Unix time, seconds; null while active.")
    turns: int


class SessionList(BaseModel):
    sessions: list[SessionOut]


class ErrorDetail(BaseModel):
    code: str = Field(description="The gRPC status name of the same error, e.g. NOT_FOUND.")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class EndOfAudio(BaseModel):
    """The client's text message saying it sends no more audio."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["end"]


def session_out(r: SessionRecord) -> SessionOut:
    return SessionOut(
        session_id=r.session_id,
        avatar_id=r.avatar_id,
        persona_prompt=r.persona_prompt,
        voice=r.voice,
        state="active" if r.active else "ended",
        created_at=r.created_at,
        ended_at=r.ended_at or None,
        turns=r.turns,
    )


# --------------------------------------------------------------------------- errors


def error_status(exc: Exception) -> tuple[int, str]:
    """(HTTP status, gRPC status name) of an error the caller may see."""
    if isinstance(exc, RequestRefused):
        return exc.http_status, exc.grpc_status
    if isinstance(exc, InvalidInput):
        return 400, "INVALID_ARGUMENT"
    if isinstance(exc, ModelUnavailable):
        return 503, "UNAVAILABLE"
    return 500, "INTERNAL"


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _refusal_headers(exc: Exception) -> dict[str, str]:
    headers = {}
    if isinstance(exc, RequestRefused) and exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="parley"'
    if isinstance(exc, LimitExceeded) and exc.retry_after_s:
        headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
    return headers


async def _on_known_error(request: Request, exc: Exception) -> JSONResponse:
    status, code = error_status(exc)
    return _error_response(status, code, str(exc), _refusal_headers(exc))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error_response(422, "INVALID_ARGUMENT", _describe_validation(exc.errors()))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        code = HTTPStatus(exc.status_code).name
    except ValueError:
        code = "UNKNOWN"
    return _error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


def _describe_validation(errors: Iterable[Any]) -> str:
    """`body.voice: String should have at most 64 characters; ...` (never echoing input)."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", ""))
    return "; ".join(parts) or "invalid request"


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413) and bodies of unstated length (411)
    before anything reads them: the API's bodies are small, so a large one is abuse."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            refusal: tuple[int, str] | None = None
            if length is None and b"transfer-encoding" in headers:
                refusal = (411, "send the request body with a Content-Length")
            elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                refusal = (413, f"request bodies are limited to {self.max_bytes} bytes")
            if refusal is not None:
                status, message = refusal
                response = _error_response(status, HTTPStatus(status).name, message)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- REST

# Declared for the OpenAPI document (its "Authorize" button); `caller` reads the headers
# itself, to refuse malformed ones with a message rather than treat them as absent.
_bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_scheme = APIKeyHeader(name="x-api-key", auto_error=False, description="X-API-Key: <key>")


def _registry(request: Request) -> SessionRegistry:
    registry: SessionRegistry = request.app.state.registry
    return registry


async def caller(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer_scheme)],
    _api_key: Annotated[str | None, Security(_api_key_scheme)],
) -> Principal:
    """The authenticated tenant of a REST call (401 if the key is missing or not valid)."""
    api_key = api_key_from_headers(request.headers.items())
    return await gateway.authenticate(_registry(request), api_key)


Caller = Annotated[Principal, Depends(caller)]
Registry = Annotated[SessionRegistry, Depends(_registry)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "Missing, malformed, unknown or revoked API key",
        404: "No such session for this tenant",
        429: "A tenant limit (concurrent sessions, sessions per minute) or gateway capacity",
        503: "The tenancy store is unreachable or the gateway is shutting down",
    }.items()
}

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], responses=_ERRORS)


@router.post(
    "",
    status_code=201,
    responses={400: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def create_session(
    who: Caller, registry: Registry, body: CreateSessionBody | None = None
) -> SessionOut:
    """Start a session; its conversation is ready for a Converse stream."""
    body = body or CreateSessionBody()
    record = await registry.create(who.tenant, body.avatar_id, body.persona_prompt, body.voice)
    return session_out(record)


@router.get("")
async def list_sessions(who: Caller, registry: Registry) -> SessionList:
    """The caller's sessions, active and recently ended, oldest first."""
    return SessionList(sessions=[session_out(r) for r in await registry.list(who.tenant)])


@router.get("/{session_id}")
async def get_session(session_id: str, who: Caller, registry: Registry) -> SessionOut:
    return session_out(await registry.get(who.tenant, session_id))


@router.delete("/{session_id}")
async def end_session(session_id: str, who: Caller, registry: Registry) -> SessionOut:
    """End the session (its stream, if any, stops); ending it again returns it unchanged."""
    return session_out(await registry.end(who.tenant, session_id))


# --------------------------------------------------------------------------- WebSocket


def ws_api_key(headers: Iterable[tuple[str, str]], subprotocols: Iterable[str]) -> str | None:
    """The key from the headers or from a `parley.key.<key>` subprotocol (browsers)."""
    offered = [
        (X_API_KEY, p.removeprefix(WS_KEY_SUBPROTOCOL_PREFIX))
        for p in subprotocols
        if p.startswith(WS_KEY_SUBPROTOCOL_PREFIX)
    ]
    return api_key_from_headers([*headers, *offered])


def decode_client_audio(data: bytes) -> np.ndarray:
    """A binary client message as float32 samples (InvalidInput when malformed)."""
    if len(data) > MAX_AUDIO_MESSAGE_BYTES:
        raise InvalidInput(
            f"audio message of {len(data)} bytes is too long: send at most 1 s"
            f" ({MAX_AUDIO_MESSAGE_BYTES} bytes) of 16 kHz mono PCM16 per message;"
            " 20 ms (640 bytes) is best"
        )
    return pcm16_to_float(data, ASR_SAMPLE_RATE, 1)


def parse_client_text(text: str) -> EndOfAudio:
    """A text client message; the only one is {"type": "end"} (InvalidInput otherwise)."""
    if len(text) > MAX_TEXT_MESSAGE_CHARS:
        raise InvalidInput(f"text messages are limited to {MAX_TEXT_MESSAGE_CHARS} characters")
    try:
        return EndOfAudio.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidInput(
            'text messages must be JSON: {"type": "end"} ends the audio; got '
            + _describe_validation(exc.errors())
        ) from None


def encode_event(ev: ConversationEvent | AvatarVideoEvent) -> list[str | bytes]:
    """A conversation event as WebSocket messages: JSON text, and audio or video as binary."""
    if isinstance(ev, AvatarVideoEvent):
        header = _json(
            type="avatar_video",
            index=ev.index,
            pts_s=round(ev.pts_s, 6),
            width=ev.width,
            height=ev.height,
            encoding=ev.encoding,
            key=ev.key,
        )
        return [header, ev.data]
    if isinstance(ev, UserTranscriptEvent):
        return [_json(type="user_transcript", text=ev.text, is_final=ev.is_final, turn=ev.turn)]
    if isinstance(ev, AvatarTextEvent):
        return [_json(type="avatar_text", text=ev.text, turn=ev.turn)]
    if isinstance(ev, AvatarAudioEvent):
        header = _json(
            type="avatar_speech",
            turn=ev.turn,
            sample_rate=ev.sample_rate,
            start_sample=ev.start_sample,
            num_samples=len(ev.samples),
            encoding=AUDIO_ENCODING,
            pts_s=None if ev.pts_s is None else round(ev.pts_s, 6),
            phonemes=[
                {
                    "phoneme": p.phoneme,
                    "viseme": p.viseme,
                    "start_sample": p.start_sample,
                    "num_samples": p.num_samples,
                }
                for p in ev.phonemes
            ],
        )
        return [header, float_to_pcm16(ev.samples)]
    assert isinstance(ev, TurnDoneEvent)
    latencies = {f"{name}_s": value for name, value in ev.trace.latencies().items()}
    return [_json(type="latency", turn=ev.trace.turn, **latencies)]


def _json(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"))


async def converse(websocket: WebSocket, session_id: str) -> None:
    registry: SessionRegistry = websocket.app.state.registry
    offered = list(websocket.scope.get("subprotocols") or [])
    subprotocol = WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None
    # Accept first, even to refuse: a browser sees no HTTP status of a refused upgrade,
    # but it does see an error message and a close code.
    await websocket.accept(subprotocol=subprotocol)
    client_left = False

    async def audio_in() -> AsyncIterator[np.ndarray]:
        nonlocal client_left
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                client_left = True
                return
            if message.get("bytes") is not None:
                yield decode_client_audio(message["bytes"])
            elif message.get("text") is not None:
                parse_client_text(message["text"])  # {"type": "end"}: no more audio
                return

    try:
        who = await gateway.authenticate(registry, ws_api_key(websocket.headers.items(), offered))
        video = check_encoding(websocket.query_params.get("video", DEFAULT_VIDEO_ENCODING))
        record = await registry.get(who.tenant, session_id)
        async with registry.stream(record) as conversation:
            avatar = conversation.avatar
            video_out = None
            if avatar is not None and video != "none":
                video_out = {
                    "encoding": video,
                    "width": avatar.width,
                    "height": avatar.height,
                    "fps": avatar.fps,
                }
            await websocket.send_text(
                _json(
                    type="ready",
                    session_id=record.session_id,
                    audio_in={
                        "sample_rate": ASR_SAMPLE_RATE,
                        "channels": 1,
                        "encoding": AUDIO_ENCODING,
                        "max_bytes": MAX_AUDIO_MESSAGE_BYTES,
                    },
                    video_out=video_out,
                )
            )
            events = gateway.relay(
                record,
                conversation,
                audio_in(),
                client_left=lambda: client_left,
                video=video,
                on_turn_done=lambda: registry.save_turn(record),
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    for message in encode_event(event):
                        if isinstance(message, bytes):
                            await websocket.send_bytes(message)
                        else:
                            await websocket.send_text(message)
    except WebSocketDisconnect:
        return
    except (InvalidInput, ModelUnavailable, RequestRefused) as exc:
        await _close_with_error(websocket, exc)
        return
    if not client_left:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # it may just have gone
            await websocket.close(1000, "stream ended")


async def _close_with_error(websocket: WebSocket, exc: Exception) -> None:
    status, code = error_status(exc)
    message = str(exc)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_text(_json(type="error", code=code, message=message))
        reason = message.encode()[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
        await websocket.close(4000 + status, reason)


# --------------------------------------------------------------------------- page


async def page(request: Request) -> HTMLResponse:
    """The talk page; its links resolve under the app's mount point (a proxy's prefix)."""
    base = request.scope.get("root_path", "").rstrip("/") + "/"
    text = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    text = text.replace("{{BASE}}", html.escape(base, quote=True))
    return HTMLResponse(
        text,
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


# --------------------------------------------------------------------------- app


def create_app(registry: SessionRegistry) -> FastAPI:
    """The HTTP API over `registry` (which the caller owns and closes)."""
    app = FastAPI(
        title="Parley sessions API",
        version="1",
        description=(
            "Sessions with a conversational avatar. REST for the lifecycle; the stream is a"
            " WebSocket at `/v1/sessions/{session_id}/converse` (not describable in OpenAPI):"
            " see `services/sessions/http.py`."
        ),
    )
    app.state.registry = registry
    app.include_router(router)
    app.add_api_websocket_route("/v1/sessions/{session_id}/converse", converse)
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.add_exception_handler(RequestRefused, _on_known_error)
    app.add_exception_handler(InvalidInput, _on_known_error)
    app.add_exception_handler(ModelUnavailable, _on_known_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    if registry.tenancy is None:
        log.warning("sessions HTTP API without a tenancy store: every caller is tenant 'local'")
    return app


def server_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8080) -> uvicorn.Config:
    """A uvicorn config for the app: loopback by default, WebSocket messages bounded."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ws_max_size=MAX_WS_MESSAGE_BYTES,
        lifespan="off",
        log_level="warning",
    )
