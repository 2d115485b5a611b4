"""Service errors and the one table that maps them to HTTP statuses.

The engine and the routes raise the plain exceptions below; app/error_responses.py turns
them (and FastAPI's own validation and HTTP errors) into the service's one JSON error
shape. Plain Python, so that the model worker process, which raises them too, imports
no web framework.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors the service answers with a 4xx/5xx status (see ERRORS)."""

    def __init__(self, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but a value is out of bounds."""


class Unauthorized(ServiceError):
    """An API key is configured and the request's is missing or wrong."""


class NotFound(ServiceError):
    """No such resource (e.g. an unknown model id)."""


class Overloaded(ServiceError):
    """The engine's queue is full."""


class NotReady(ServiceError):
    """No model is loaded yet, or the engine is shutting down."""


class DeadlineExceeded(ServiceError):
    """The request outlived CHATBOT_REQUEST_TIMEOUT_S; its work was dropped."""


class ClientGone(ServiceError):
    """The client disconnected; nobody reads the answer (logged as 499 like nginx)."""


class EngineFailure(ServiceError):
    """The model step raised; the requests in the batch fail, the engine carries on."""


# The one table: domain error -> (HTTP status, OpenAI-style error type).
ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    InvalidRequest: (422, "invalid_request_error"),
    Unauthorized: (401, "authentication_error"),
    NotFound: (404, "not_found_error"),
    Overloaded: (429, "overloaded_error"),
    NotReady: (503, "unavailable_error"),
    DeadlineExceeded: (504, "timeout_error"),
    ClientGone: (499, "client_closed_request"),
    EngineFailure: (500, "server_error"),
}


def status_of(exc: ServiceError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]  # type: ignore[index]
    return 500, "server_error"
