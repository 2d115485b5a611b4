"""`chatbot serve`: settings from CHATBOT_* (flags override), load, then run uvicorn.

The checkpoint is loaded before the server starts, so a missing or broken one ends
the command at once with a message that names the path. On SIGTERM (or Ctrl-C)
uvicorn stops accepting connections and waits up to CHATBOT_SHUTDOWN_TIMEOUT_S for
the requests in flight; the lifespan hook then lets the engine finish its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from model.checkpoint_meta import CheckpointError

from .settings import Settings

log = logging.getLogger("chatbot.server")


def _settings_error(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        name = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"CHATBOT_{name.upper()} / --{name.replace('_', '-')}: {e.get('msg')}")
    return "; ".join(parts)


def _graceful_server_class() -> type:
    import contextlib

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies
        "by signal". A drained, clean stop is a success for an operator: exit 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return GracefulServer


def serve(checkpoint: Path | None = None, host: str | None = None, port: int | None = None) -> int:
    import uvicorn

    from .factory import build_engine
    from .main import create_app

    flags = {"checkpoint": checkpoint, "host": host, "port": port}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        print(f"chatbot serve: error: bad setting: {_settings_error(exc)}", file=sys.stderr)
        return 2
    path = settings.checkpoint_path()
    try:
        engine = build_engine(settings)
    except CheckpointError as exc:
        hint = ""
        if settings.checkpoint is None:
            hint = " (the shipped model is missing: pass --checkpoint DIR or set CHATBOT_CHECKPOINT)"
        print(f"chatbot serve: error: cannot load checkpoint {path}: {exc}{hint}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a setting this machine cannot serve (e.g. bf16 without native bf16)
        print(f"chatbot serve: error: {exc}", file=sys.stderr)
        return 2
    log.info("serving %s from %s on http://%s:%d (API key %s)", engine.name, path, settings.host,
             settings.port, "required" if settings.api_key else "not set")
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
                            proxy_headers=False)
    server = _graceful_server_class()(config)

    async def run() -> int:
        # The model loads before uvicorn starts, on the loop it then serves on: a checkpoint
        # the worker cannot load is reported here, in one line, and no port ever opens.
        engine.start()
        try:
            await engine.wait_ready()
        except RuntimeError as exc:
            reason = getattr(engine, "startup_error", None) or exc
            print(f"chatbot serve: error: cannot load checkpoint {path}: {reason}", file=sys.stderr)
            await engine.aclose(timeout=0)
            return 2
        with contextlib.suppress(SystemExit):  # uvicorn exits (3) when the app's startup fails
            await server.serve()
        return 0 if server.started else 1

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        return runner.run(run())
