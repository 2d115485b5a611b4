"""create_app: the FastAPI application (`uvicorn --factory app.main:create_app` works too)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .error_responses import error_responses, install_error_handlers
from .factory import build_engine
from .jobs import Engine
from .metrics import Metrics, MetricsMiddleware
from .middleware import BodyLimitMiddleware
from .ratelimit import RateLimiter, RateLimitMiddleware, document_rate_limit
from .reply_filter import ReplyFilter
from .routes import chat, health, openai, page
from .routes.common import api_key_check
from .settings import Settings

log = logging.getLogger("chatbot.app")


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    if engine is not None and engine.metrics is not None:
        metrics = engine.metrics
    else:  # a ChatEngine given without metrics records into the app's; a model worker has its own
        metrics = Metrics(engine=engine is not None or not settings.model_process)
        if engine is not None:  # before it starts (`chatbot serve` starts it before the app)
            engine.metrics = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served = engine
        if served is None:
            served = await asyncio.to_thread(build_engine, settings, metrics)
        served.start()
        await served.wait_ready()
        app.state.engine = served
        try:
            yield
        finally:
            # uvicorn has stopped taking connections and waited for the open ones;
            # let whatever is still queued or decoding finish, then stop the worker.
            await served.aclose(timeout=settings.shutdown_timeout_s)
            log.info("engine stopped")

    app = FastAPI(
        title="seq2seq chatbot", version="0.1.0", lifespan=lifespan,
        summary="An LSTM encoder-decoder chatbot: REST and OpenAI-compatible chat.",
        responses=error_responses(500),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.reply_filter = (ReplyFilter.standard(settings.blocklist, settings.fallback_reply)
                              if settings.reply_filter else None)
    install_error_handlers(app)

    key = settings.api_key.get_secret_value() if settings.api_key else None
    auth: dict[str, Any] = {}
    if key:
        auth = {"dependencies": [api_key_check(key)], "responses": error_responses(401)}
    app.include_router(health.router)
    app.include_router(health.protected, **auth)
    app.include_router(chat.router, **auth)
    app.include_router(openai.router, **auth)
    app.include_router(page.router)

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.rate_limit_per_minute:  # outside the body check, inside CORS and metrics
        app.add_middleware(RateLimitMiddleware, limiter=RateLimiter(settings.rate_limit_per_minute),
                           api_key=key)
        document_rate_limit(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _document_input_limit(app, settings.max_input_chars)
    return app


def _document_input_limit(app: FastAPI, limit: int) -> None:
    """Write the served CHATBOT_MAX_INPUT_CHARS into the schema's text fields."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()

            def visit(node: Any) -> None:
                if isinstance(node, dict):
                    if node.pop("x-input-text", False):
                        node["maxLength"] = limit
                    for value in node.values():
                        visit(value)
                elif isinstance(node, list):
                    for value in node:
                        visit(value)

            visit(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
