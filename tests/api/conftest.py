"""Fixtures for the API tests: apps over the tiny checkpoint, in-process or on a port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.batching import StepFn, default_step
from app.engine import ChatEngine
from app.jobs import EngineConfig
from app.main import create_app
from app.settings import Settings
from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions
from model.inference import decode_sources

PROMPTS = ["hello", "hi", "how are you", "what is your name", "do you like cats", "do you like music",
           "good morning", "see you later", "what is the weather", "do you like pizza", "good night",
           "do you like coffee", "hello how are you", "do you like dogs", "nice day", "bye"]


def reference(ckpt: Checkpoint, turns: list[str], opts: DecodeOptions) -> list[str]:
    """The replies model.inference.decode_sources gives for one conversation, alone."""
    cfg = ckpt.model.cfg
    src = ckpt.tokenizer.encode_context(turns[-cfg.context_turns:], cfg.max_source_len)
    return [ckpt.tokenizer.decode(h.tokens) for h in decode_sources(ckpt.model, [src], opts)[0]]


class Gate:
    """A decoder step that can be held shut, to fill the queue or pass a deadline."""

    def __init__(self, step: StepFn, delay: float = 0.0) -> None:
        self.step = step
        self.delay = delay
        self.opened = threading.Event()
        self.opened.set()
        self.waiting = threading.Event()
        self.calls = 0

    def __call__(self, tokens: Any, rows: Any) -> Any:
        self.calls += 1
        if not self.opened.is_set():
            self.waiting.set()
            self.opened.wait(10)
        if self.delay:
            time.sleep(self.delay)
        return self.step(tokens, rows)


async def complete(engine: Any, source: list[int], opts: DecodeOptions, timeout: float | None = None) -> Any:
    """Submit a request and wait for its Completion."""
    return await engine.submit(source, opts, timeout=timeout).result()


def make_settings(tiny_checkpoint: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"checkpoint": tiny_checkpoint, "num_threads": 1, "request_timeout_s": 30.0,
                              "shutdown_timeout_s": 5.0}
    return Settings(**{**values, **overrides})


def make_engine(ckpt: Checkpoint, settings: Settings, step: StepFn | None = None) -> ChatEngine:
    config = EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                          num_threads=1, seed=settings.seed)
    return ChatEngine(ckpt, config, step=step)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


@pytest.fixture
def make_app(tiny_checkpoint: Path, ckpt: Checkpoint):
    """make_app(step=None, **settings) -> (app, engine)."""
    def factory(step: StepFn | None = None, **overrides: Any) -> tuple[FastAPI, ChatEngine]:
        settings = make_settings(tiny_checkpoint, **overrides)
        engine = make_engine(ckpt, settings, step)
        return create_app(settings, engine=engine), engine
    return factory


@pytest.fixture
async def client(make_app) -> AsyncIterator[httpx.AsyncClient]:
    app, _ = make_app()
    async with serving(app) as c:
        yield c


@pytest.fixture
def gate(ckpt: Checkpoint) -> Gate:
    return Gate(default_step(ckpt.model))


@contextmanager
def on_a_port(app: FastAPI) -> Iterator[str]:
    """Run the app under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
