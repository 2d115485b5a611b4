"""Rate limiting per client: a token bucket per API key or client address (pure ASGI).

Off by default (CHATBOT_RATE_LIMIT_PER_MINUTE=0). When on, every client may make
`per_minute` requests to the API (`/api/...` and `/v1/...`) in a burst, and regains one
every 60 / per_minute seconds; past that it gets 429 with `Retry-After` (whole seconds
until the next request is allowed) and the service's JSON error. The probes (`/health`,
`/ready`), `/metrics` and the chat page are never limited.

Who is a client: the holder of the configured API key when the request presents it (all
holders of the one key share its bucket, as OpenAI's per-key limits do), otherwise the
TCP peer address. A wrong or made-up key counts against the address, so rotating keys
buys nothing. Forwarded-for headers are not trusted (the server runs with
proxy_headers off); behind a proxy, limit at the proxy. The key itself is never stored:
the bucket of the key holder is named "api-key".

The table of buckets is bounded (`max_clients`): when full, the least recently seen
client is forgotten, which can only give that client a fresh bucket.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .error_responses import send_error

LIMITED_PREFIXES = ("/api/", "/v1/")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets: `capacity` requests at once, refilled at `per_minute` a minute."""

    def __init__(self, per_minute: int, *, capacity: int | None = None, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be > 0")
        if max_clients < 1:
            raise ValueError("max_clients must be > 0")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = float(capacity or per_minute)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()  # the ASGI app may be driven from several threads in tests

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, client: str) -> float:
        """Take one token for `client`: 0.0 if allowed, else the seconds until it would be."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.pop(client, None)
            if bucket is None:
                bucket = _Bucket(tokens=self.capacity, updated=now)
            else:
                elapsed = max(now - bucket.updated, 0.0)
                bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.rate)
                bucket.updated = now
            self._buckets[client] = bucket  # most recently seen last
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate


def _bearer(headers: Headers) -> bytes | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip().encode("utf-8", "surrogateescape")


class RateLimitMiddleware:
    """429 + Retry-After for a client over its limit, before the body is read."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, api_key: str | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.api_key = api_key.encode() if api_key else None

    def client_of(self, scope: Scope) -> str:
        if self.api_key is not None:
            token = _bearer(Headers(scope=scope))
            if token is not None and hmac.compare_digest(token, self.api_key):
                return "api-key"
        peer = scope.get("client")
        return f"addr:{peer[0]}" if peer else "addr:unknown"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" \
                or not scope["path"].startswith(LIMITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        wait = self.limiter.acquire(self.client_of(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry = max(1, math.ceil(wait))
        message = f"rate limit exceeded ({self.limiter.per_minute} requests a minute); retry in {retry} s"
        await send_error(send, 429, message, "rate_limit_error", "rate_limited", {"Retry-After": str(retry)})


RATE_LIMITED = {"description": "Too many requests from this client (CHATBOT_RATE_LIMIT_PER_MINUTE), "
                               "or the engine's queue is full; see Retry-After",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def document_rate_limit(app: FastAPI) -> None:
    """Add 429 to every limited operation in the served OpenAPI schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            if path.startswith(LIMITED_PREFIXES):
                for operation in operations.values():
                    if isinstance(operation, dict) and "responses" in operation:
                        operation["responses"].setdefault("429", RATE_LIMITED)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
