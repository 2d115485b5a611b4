"""Prometheus metrics: one registry per app (so tests can build many apps), and a
pure ASGI middleware that counts requests by route template and status."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The HTTP families (recorded by MetricsMiddleware) and the engine's. When the model runs
    in its own process, each process registers its own half: `http=False` there,
    `engine=False` here, and /metrics joins the two texts."""

    def __init__(self, *, http: bool = True, engine: bool = True) -> None:
        self.registry = CollectorRegistry()
        if http:
            self._http_families()
        if engine:
            self._engine_families()

    def _http_families(self) -> None:
        r = self.registry
        self.requests = Counter("chatbot_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("chatbot_request_duration_seconds",
                                 "Time from request to the last byte of the response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)

    def _engine_families(self) -> None:
        r = self.registry
        self.queue_wait = Histogram("chatbot_queue_wait_seconds",
                                    "Time a request waited before joining the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("chatbot_batch_rows", "Decoder rows per model step",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("chatbot_batch_requests", "Requests decoding per model step",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.step_time = Histogram("chatbot_step_seconds", "One decoder step over the batch, "
                                   "search included", buckets=STEP_BUCKETS, registry=r)
        self.encode_time = Histogram("chatbot_encode_seconds", "One encoder call over the sources "
                                     "of the requests it admits", buckets=STEP_BUCKETS, registry=r)
        self.tokens = Counter("chatbot_generated_tokens", "Tokens in the replies returned",
                              registry=r)
        self.rejected = Counter("chatbot_rejected_requests", "Requests refused by the engine",
                                ["reason"], registry=r)
        self.queue_depth = Gauge("chatbot_queue_depth", "Requests waiting to join the batch",
                                 registry=r)
        self.active = Gauge("chatbot_active_requests", "Requests decoding now", registry=r)

    def watch(self, queue_depth: Callable[[], float], active: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.active.set_function(active)


class MetricsMiddleware:
    """Counts every HTTP request; the route label is the matched path template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=label, method=scope["method"], status=str(status)).inc()
            self.metrics.latency.labels(route=label).observe(time.perf_counter() - start)
