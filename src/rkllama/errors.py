"""Errors that reach clients. Each carries its HTTP status and a message that says what
was wrong; each dialect renders them in its own error shape in one place."""

from __future__ import annotations


class RkllamaError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the error response carries besides its body."""
        return {}


class BadRequest(RkllamaError):
    status_code = 400


class NotFound(RkllamaError):
    status_code = 404


class ModelNotFound(NotFound):
    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"Model {name} not found in the models directory.")
        self.name = name


class Conflict(RkllamaError):
    status_code = 409


class Unauthorized(RkllamaError):
    status_code = 401


class ServerBusy(RkllamaError):
    """Too much is waiting already: the client may retry after `retry_after` seconds."""

    status_code = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ModelLoadError(BadRequest):
    """The model could not be loaded (bad file, missing runtime library, ...)."""


class ModelTooLarge(BadRequest):
    """The model can never fit in the memory budget, even with every other model unloaded."""


class RunnerError(RkllamaError):
    """The runner failed mid-request (crashed, or its engine reported an error).

    502: the server itself is fine, the model process behind it is not."""

    status_code = 502


class RunnerTimeout(RunnerError):
    """The runner made no progress for too long (hung) and was killed: 504, as a gateway
    whose upstream timed out."""

    status_code = 504


class ModelUnloading(RkllamaError):
    """The model is being unloaded: it takes no new requests (they may be sent again)."""

    status_code = 503


class ServerShuttingDown(RkllamaError):
    status_code = 503

    def __init__(self) -> None:
        super().__init__("The server is shutting down; this request was stopped. Retry once it is back.")
