"""Error hierarchy of the server, each mapped to one OpenAI error envelope.

Every error the HTTP layer answers with is an :class:`APIError`; its :meth:`APIError.envelope`
is the wire body ``{"error": {"message", "type", "param", "code"}}`` used by OpenAI's API.
Messages are written for the client: they never carry tracebacks, file paths or
exception texts from libraries.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error envelope.

    Args:
        message: Human-readable text for the client.
        param: The request parameter at fault (dotted path), if any.
        code: A machine-readable code (OpenAI's, e.g. ``model_not_found``), if any.
    """

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. ``Retry-After``)."""
        return {}


class InvalidRequestError(APIError):
    """400: the request is malformed or a parameter is out of range."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """400: prompt tokens plus ``max_tokens`` do not fit in the model's ``n_ctx``."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationError(APIError):
    """401: an API key is configured and the request's is missing or wrong."""

    status_code = 401
    error_type = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFoundError(APIError):
    """404: the requested model id is not served here."""

    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist or is not served here.",
            param="model",
            code="model_not_found",
        )


class NotFoundError(APIError):
    """404: no such route."""

    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowedError(APIError):
    """405: the route exists but not for this HTTP method."""

    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    """413: the request body exceeds ``max_request_bytes``."""

    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaTypeError(APIError):
    """415: the body is not declared as JSON."""

    status_code = 415
    error_type = "invalid_request_error"


class QueueFullError(APIError):
    """429: the model's request queue is full; the client should retry later.

    Args:
        retry_after_s: Seconds the client should wait, sent as ``Retry-After``.
    """

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int):
        super().__init__(message, code="queue_full")
        self.retry_after_s = max(1, int(retry_after_s))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ModelUnavailableError(APIError):
    """503: the model is still loading (``model_loading``), failed to load
    (``model_load_failed``), does not fit the memory budget (subclasses below), or the
    server is shutting down (``draining``)."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, code: str = "model_unavailable", retry_after_s: int = 5):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ModelTooLargeError(ModelUnavailableError):
    """503 ``model_too_large``: the model's memory estimate exceeds ``--max-memory`` on its
    own, so it can never load here (no ``Retry-After``: retrying cannot help)."""

    def __init__(self, message: str):
        super().__init__(message, code="model_too_large")

    def headers(self) -> dict[str, str]:
        return {}


class InsufficientMemoryError(ModelUnavailableError):
    """503 ``insufficient_memory``: the model fits the budget, but models busy with
    requests hold the rest of it; retry once they go idle."""

    def __init__(self, message: str, *, retry_after_s: int = 10):
        super().__init__(message, code="insufficient_memory", retry_after_s=retry_after_s)


class InternalServerError(APIError):
    """500: an unexpected failure; the message carries only a request id for the logs."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, request_id: str):
        super().__init__(
            f"The server had an error while processing your request (request id {request_id}).",
            code="internal_error",
        )
