"""Errors that external input can cause. Servicers map them to gRPC statuses."""


class InvalidInput(ValueError):
    """Input from outside (audio, messages, config) that Parley cannot accept.

    The message is shown to the caller, so it says what was wrong and what is expected.
    """


class ModelUnavailable(RuntimeError):
    """A model or backend could not be loaded or reached."""
