"""Fixtures for the reliability tests: apps over the tiny checkpoint, clean error checks,
and helpers to run the real `chatbot` command in a subprocess."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.api.conftest import make_app, make_engine, make_settings  # noqa: F401 (make_app: a fixture)

ROOT = Path(__file__).resolve().parents[2]

# What must never show in a response body: a traceback, a source location, a local path.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/home/|/usr/|/tmp/|site-packages|\bline \d+")




def assert_clean_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """A JSON error with a message (and the field at fault), nothing internal in the body."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert not LEAKS.search(r.text), r.text[:500]
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"].strip()
    assert error["type"]
    if param is not None:
        assert error.get("param") == param, error
    return error  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
    return {**env, "PYTHONPATH": str(ROOT), "CHATBOT_NUM_THREADS": "1", **extra}


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)
