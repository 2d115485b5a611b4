"""The service's one JSON error shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`,
so that OpenAI clients show the message. `install_error_handlers` maps the domain errors of
app/errors.py (by its ERRORS table) and FastAPI's own validation and HTTP errors onto it. A
response never carries a stack trace.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from .errors import ServiceError, status_of
from .schemas import ErrorDetail, ErrorResponse, FieldError

log = logging.getLogger("chatbot.errors")


STATUS_TEXT = {
    400: "The body is not valid JSON or not UTF-8",
    401: "API key missing or wrong (only when CHATBOT_API_KEY is set)",
    404: "Not found",
    413: "Request body larger than CHATBOT_MAX_BODY_BYTES",
    415: "Content-Type is not application/json",
    422: "A field is missing, has the wrong type or is out of bounds (see error.param)",
    429: "The engine's queue is full (CHATBOT_MAX_QUEUE); retry later",
    500: "Internal error",
    503: "No model is loaded yet, or the server is shutting down",
    504: "The request outlived CHATBOT_REQUEST_TIMEOUT_S",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error statuses a route can answer."""
    return {s: {"model": ErrorResponse, "description": STATUS_TEXT[s]} for s in statuses}


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None,
               details: list[FieldError] | None = None) -> dict[str, Any]:
    """The one error shape: `{"error": {"message", "type", "param", "code"}}`."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code,
                                           details=details)).model_dump(exclude_none=True)


def error_json(status: int, message: str, type_: str, *, param: str | None = None,
               code: str | None = None, details: list[FieldError] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param=param, code=code, details=details),
                        status_code=status, headers=headers)


async def send_error(send: Send, status: int, message: str, type_: str, code: str,
                     headers: dict[str, str]) -> None:
    """The same error from an ASGI middleware, before any route runs."""
    payload = json.dumps(error_body(message, type_, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
    await send({"type": "http.response.body", "body": payload})


def _field(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "content", "constrained-str") -> "messages.0.content".

    Pydantic puts the union member tried (a type name) into the location; the
    fields of this API are snake_case identifiers, so anything else is dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    kept = [str(p) for p in parts if isinstance(p, int) or (
        str(p).isidentifier() and str(p) == str(p).lower() and str(p) not in _TYPE_TAGS)]
    return ".".join(kept) or "body"


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status, type_ = status_of(exc)
    if status >= 500 and status != 503:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    return error_json(status, exc.message, type_, param=exc.param, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        pos = next(e["loc"][-1] for e in errors if e.get("type") == "json_invalid")
        return error_json(400, f"the body is not valid JSON (at character {pos})",
                          "invalid_request_error", code="invalid_json")
    by_field: dict[str, list[str]] = {}
    for e in errors:
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") not in ("missing", "extra_forbidden") and "input" in e:
            msg = f"{msg} (got {_short(e['input'])})"
        messages = by_field.setdefault(_field(tuple(e.get("loc", ()))), [])
        if msg not in messages:
            messages.append(msg)
    # a value that fits no member of a union fails once per member: one entry, "... or ..."
    details = [FieldError(param=f, message=" or ".join(m)) for f, m in by_field.items()]
    first = details[0]
    message = f"{first.param}: {first.message}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more)"
    return error_json(422, message, "invalid_request_error", param=first.param,
                      code="invalid_value", details=details)


_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 400 and message == "There was an error parsing the body":
        message = "the body could not be parsed as JSON"
    type_ = _HTTP_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else
                            "invalid_request_error")
    return error_json(exc.status_code, message, type_, headers=dict(exc.headers or {}))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_json(500, "internal server error", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
