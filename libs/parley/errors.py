"""Errors that external input can cause. Servicers map them to gRPC statuses."""

from typing import ClassVar


class InvalidInput(ValueError):
    """Input from outside (audio, messages, config) that Parley cannot accept.

    The message is shown to the caller, so it says what was wrong and what is expected.
    """


class ModelUnavailable(RuntimeError):
    """A model or backend could not be loaded or reached."""


class RequestRefused(Exception):
    """A request refused for a reason other than malformed input: who is asking, a limit,
    the state of what it names. Transports answer with the status the class names.

    The message is shown to the caller.
    """

    #: A `grpc.StatusCode` name.
    grpc_status: ClassVar[str] = "UNKNOWN"
    http_status: ClassVar[int] = 500
