"""Fixtures for the browser tests: a live server on a tiny checkpoint and Debian's Chromium.

The server is the real app (create_app) run by uvicorn in a background thread on a free
127.0.0.1 port. Chromium is driven by Playwright; Playwright's own browser download is not
used, so the system binary must exist (apt-get install -y chromium). When it is missing the
tests fail with that instruction instead of skipping: a browser suite that silently skips
proves nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHATBOT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}


@dataclass(frozen=True)
class LiveServer:
    url: str


def _make_app(checkpoint: Path, **overrides: Any) -> Any:
    from app.main import create_app
    from app.settings import Settings

    with pytest.MonkeyPatch.context() as mp:  # a CHATBOT_* variable in the shell must not leak in
        for name in list(os.environ):
            if name.startswith("CHATBOT_"):
                mp.delenv(name)
        # One torch thread leaves the other core to the browser.
        settings = Settings(checkpoint=checkpoint, num_threads=1, request_timeout_s=30.0,
                            shutdown_timeout_s=2.0, **overrides)
    return create_app(settings)


@contextmanager
def serve(app: Any) -> Iterator[LiveServer]:
    """Run the app under uvicorn (lifespan on) on a free 127.0.0.1 port in a background thread."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive():
                pytest.fail("the live server thread died during startup (see the log above)")
            if time.monotonic() > deadline:
                pytest.fail("the live server did not start within 60 s")
            time.sleep(0.05)
        yield LiveServer(url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="package")  # Playwright's sync loop must end with this package
def live_server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    """The real app on the tiny checkpoint, open (no API key)."""
    with serve(_make_app(tiny_checkpoint)) as server:
        yield server


API_KEY = "s3cret-key"


@pytest.fixture(scope="package")  # Playwright's sync loop must end with this package
def keyed_server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    """The real app with CHATBOT_API_KEY set: chat and model endpoints answer 401 without it."""
    with serve(_make_app(tiny_checkpoint, api_key=API_KEY)) as server:
        yield server


@pytest.fixture(scope="package")  # Playwright's sync loop must end with this package
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}. The browser tests drive Debian's Chromium: install it "
            "with `apt-get update && apt-get install -y chromium` (or point CHATBOT_CHROMIUM at a "
            "Chromium binary).",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class PageProblems:
    """What the page complained about: uncaught errors and Content-Security-Policy violations."""

    errors: list[str]
    csp: list[str]


@pytest.fixture()
def page_problems() -> PageProblems:
    return PageProblems(errors=[], csp=[])


def new_page(browser: Any, server: LiveServer, problems: PageProblems, **context_options: Any) -> Any:
    """A page in a fresh browser context (empty localStorage unless storage_state is given)."""
    options = {"viewport": DESKTOP, **context_options}
    context = browser.new_context(base_url=server.url, **options)
    context.set_default_timeout(15_000)
    pg = context.new_page()
    pg.on("pageerror", lambda exc: problems.errors.append(str(exc)))
    pg.on("console", lambda msg: problems.csp.append(msg.text)
          if "Content Security Policy" in msg.text else None)
    return pg


def open_chat(pg: Any) -> None:
    pg.goto("/")
    pg.wait_for_selector("html[data-ready='true']")


@pytest.fixture()
def page(browser: Any, live_server: LiveServer, page_problems: PageProblems) -> Iterator[Any]:
    """The chat page on the live server, loaded and ready, in a fresh context.

    After the test: no uncaught script error and no Content-Security-Policy violation happened.
    """
    pg = new_page(browser, live_server, page_problems)
    open_chat(pg)
    yield pg
    pg.context.close()
    assert page_problems.errors == [], f"uncaught errors in the page: {page_problems.errors}"
    assert page_problems.csp == [], f"Content-Security-Policy violations: {page_problems.csp}"
