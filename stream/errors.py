"""The exception tree. Everything the project raises on purpose derives from StreamError."""

from __future__ import annotations


class StreamError(Exception):
    """Root of this project's exceptions."""


class ConfigError(StreamError):
    """Invalid configuration: fatal at start-up, the message names the setting."""


class CompatError(StreamError):
    """The installed Faust/mode/aiokafka code the seam (stream.faustx) depends on differs
    from the code it was tested with: fatal at start-up, the message names each function."""


class StackError(StreamError):
    """The local stack (Kafka, Redis, Prometheus) could not be started or reached."""


class StoreUnavailable(StreamError):
    """Redis could not be reached; ``retry_after`` says when to try again (seconds)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
