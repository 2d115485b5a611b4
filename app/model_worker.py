"""The model worker process: a ChatEngine of its own, driven over the wire (app/wire.py).

`chatbot serve` runs the model here and HTTP in the parent process (app/remote_engine.py):
the event loop, uvicorn, FastAPI and pydantic then never hold the GIL that the decoder
thread needs between its torch calls, nor slow its steps. The worker's own event loop
only moves small frames: it submits each request to the engine and writes back its
tokens, its completion or its error.

The worker ignores SIGINT and SIGTERM (Ctrl-C and `docker stop` reach the whole process
group): the parent decides when it stops, by sending "close" after its own graceful
shutdown. If the parent dies, the socket closes and the worker drops its work and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from prometheus_client import generate_latest

from . import wire
from .engine import ChatEngine, Ticket
from .errors import EngineFailure, ServiceError
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("chatbot.worker")


def main(argv: list[str] | None = None) -> None:
    """`python -m app.model_worker FD`: FD is this end of the socket pair; the first frame on it
    carries the Settings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = int((argv if argv is not None else sys.argv[1:])[0])
    import uvloop

    uvloop.run(_connect(socket.socket(fileno=fd)))


async def _connect(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    settings = await wire.read(reader)
    if not isinstance(settings, Settings):
        raise SystemExit("app.model_worker: the first frame must be the Settings")
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    await _Worker(settings, writer).serve(reader)


class _Worker:
    def __init__(self, settings: Settings, writer: asyncio.StreamWriter) -> None:
        self.settings = settings
        self.writer = writer
        self.metrics = Metrics(http=False)
        self.engine: ChatEngine | None = None
        self.tickets: dict[int, Ticket] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, message: tuple[Any, ...]) -> None:
        engine = self.engine
        stats = (engine.queue_depth, engine.active_requests) if engine is not None else (0, 0)
        if not self.writer.is_closing():
            self.writer.write(wire.frame((*stats, message)))

    async def serve(self, reader: asyncio.StreamReader) -> None:
        from .main import build_local_engine

        try:
            engine = await asyncio.to_thread(build_local_engine, self.settings, self.metrics)
            engine.start()
            await engine.wait_ready()
        except BaseException as exc:  # reported to the parent, which stops serving
            log.exception("the model worker failed to start")
            self.send(("failed", str(exc) or type(exc).__name__))
            await self.writer.drain()
            return
        self.engine = engine  # its start() registered the queue and active-request gauges
        self.send(("ready", os.getpid()))
        close_timeout: float | None = None
        while True:
            try:
                message = await wire.read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("the HTTP process has gone; dropping the requests left")
                close_timeout = 0.0
                break
            if message[0] == "close":
                close_timeout = message[1]
                break
            self.handle(message)
        await engine.aclose(timeout=close_timeout)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        self.send(("closed",))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "submit":
            task = asyncio.get_running_loop().create_task(self.run(*message[1:]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif kind == "cancel":
            ticket = self.tickets.get(message[1])
            if ticket is not None:
                ticket.cancel()
        elif kind == "metrics":
            self.send(("metrics", message[1], generate_latest(self.metrics.registry)))
        else:
            log.error("unknown message %r", kind)

    async def run(self, rid: int, source: list[int], opts: Any, stream: bool,
                  timeout: float | None) -> None:
        assert self.engine is not None
        try:
            ticket = self.engine.submit(source, opts, stream=stream, timeout=timeout)
        except ServiceError as exc:
            self.send(wire.error_message(rid, exc))
            return
        self.tickets[rid] = ticket
        try:
            if stream:
                async for token in ticket.tokens():
                    self.send(("token", rid, token))
            completion = await ticket.result()
            completion.hypotheses = wire.plain_hypotheses(completion.hypotheses)
            self.send(("done", rid, completion))
        except asyncio.CancelledError:  # the HTTP side cancelled it: nobody waits for an answer
            pass
        except ServiceError as exc:
            self.send(wire.error_message(rid, exc))
        except Exception:  # logged here; the client gets a plain 500 without the details
            log.exception("request %d failed", rid)
            self.send(wire.error_message(rid, EngineFailure("the model failed on this request")))
        finally:
            self.tickets.pop(rid, None)


if __name__ == "__main__":
    main()
