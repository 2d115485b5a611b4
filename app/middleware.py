"""Request body checks, before any route runs (pure ASGI: no BaseHTTPMiddleware).

A body with content is read here in full, up to `max_body_bytes`: a Content-Length
over the limit is refused at once, a body that grows past it while streaming in
(chunked uploads) as soon as it does, both with 413. A body that is not UTF-8 gets
400 and a Content-Type other than JSON 415, each with a JSON error that says so.
The route then reads the buffered body; later `receive()` calls pass through, so
the routes can still hear the client disconnect.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import error_responses

BODY_METHODS = {"POST", "PUT", "PATCH"}


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    await error_responses.send_error(send, status, message, "invalid_request_error", code,
                                     {"Connection": "close"})


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await send_error(send, 400, "invalid Content-Length header", "invalid_header")
                return
            if int(length) > limit:
                await send_error(send, 413, f"the body is {length} bytes; the limit is {limit}",
                                 "body_too_large")
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(send, 413, f"the body is over the limit of {limit} bytes",
                                 "body_too_large")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body:
            if not _is_json(headers.get("content-type")):
                await send_error(send, 415, "send the body as JSON with Content-Type: application/json",
                                 "unsupported_media_type")
                return
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                await send_error(send, 400, f"the body is not valid UTF-8 (byte {exc.start})",
                                 "invalid_utf8")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
