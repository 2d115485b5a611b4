"""The model worker process: a ChatEngine of its own, driven over the wire (app/wire.py).

`chatbot serve` runs the model here and HTTP in the parent process (app/remote_engine.py):
the event loop, uvicorn, FastAPI and pydantic then never hold the GIL that the decoder
thread needs between its torch calls, nor slow its steps. The worker's own event loop
only moves small frames: it submits each request to the engine with a sink that posts
the request's tokens, its completion or its error back to this loop, the one writer.

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

from model.checkpoint_meta import CheckpointError

from . import wire
from .engine import ChatEngine, Job
from .errors import ServiceError
from .factory import load_engine
from .jobs import Completion
from .metrics import Metrics
from .spec import ModelSpec

log = logging.getLogger("chatbot.worker")


def main(argv: list[str] | None = None) -> None:
    """`python -m app.model_worker FD`: FD is this end of the socket pair; the first frame on it
    carries the ModelSpec."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = int((argv if argv is not None else sys.argv[1:])[0])
    import uvloop

    uvloop.run(_connect(socket.socket(fileno=fd)))


async def _connect(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    spec = await wire.read(reader)
    if not isinstance(spec, ModelSpec):
        raise SystemExit("app.model_worker: the first frame must be the ModelSpec")
    logging.basicConfig(level=spec.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    await _Worker(spec, writer).serve(reader)


class _FrameSink:
    """A job's reports as frames to the HTTP process (called on the engine's threads)."""

    def __init__(self, worker: _Worker, rid: int) -> None:
        self.worker = worker
        self.rid = rid

    def token(self, token: int) -> None:
        self.worker.post(("token", self.rid, token))

    def done(self, completion: Completion) -> None:
        completion.hypotheses = wire.plain_hypotheses(completion.hypotheses)
        self.worker.post(("done", self.rid, completion))

    def failed(self, error: ServiceError) -> None:
        self.worker.post(wire.error_message(self.rid, error))


class _Worker:
    def __init__(self, spec: ModelSpec, writer: asyncio.StreamWriter) -> None:
        self.spec = spec
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.metrics = Metrics(http=False)
        self.engine: ChatEngine | None = None
        self.jobs: dict[int, Job] = {}  # by the HTTP process's request id, until settled

    def send(self, message: tuple[Any, ...]) -> None:
        """Write a frame (on this loop), with the engine's queue depth and active requests."""
        if message[0] in ("done", "error"):
            self.jobs.pop(message[1], None)
        engine = self.engine
        stats = (engine.queue_depth, engine.active_requests) if engine is not None else (0, 0)
        if not self.writer.is_closing():
            self.writer.write(wire.frame((*stats, message)))

    def post(self, message: tuple[Any, ...]) -> None:
        """`send` from any thread: the one writer is this loop."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody reads any more
            self.loop.call_soon_threadsafe(self.send, message)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        try:
            engine = await asyncio.to_thread(load_engine, self.spec, self.metrics, defer_tokenizer=True)
            engine.start()
            await engine.wait_ready()
        except BaseException as exc:  # reported to the parent, which stops serving
            if isinstance(exc, CheckpointError):  # said in full by the message: no traceback
                log.error("cannot load the checkpoint: %s", exc)
            else:
                log.exception("the model worker failed to start")
            self.send(("failed", str(exc) or type(exc).__name__))
            await self.writer.drain()
            return
        self.engine = engine  # its start() registered the queue and active-request gauges
        self.send(("ready", os.getpid(), engine.description, str(engine.device), engine.engine_info()))
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
        await asyncio.sleep(0)  # the frames the engine posted while closing go out first
        self.send(("closed",))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def handle(self, message: tuple[Any, ...]) -> None:
        assert self.engine is not None
        kind = message[0]
        if kind == "submit":
            rid, source, opts, stream, timeout = message[1:]
            try:
                self.jobs[rid] = self.engine.submit_job(source, opts, _FrameSink(self, rid),
                                                        stream=stream, timeout=timeout)
            except ServiceError as exc:
                self.send(wire.error_message(rid, exc))
        elif kind == "cancel":
            job = self.jobs.pop(message[1], None)
            if job is not None:
                job.cancel()
        elif kind == "metrics":
            self.send(("metrics", message[1], generate_latest(self.metrics.registry)))
        else:
            log.error("unknown message %r", kind)


if __name__ == "__main__":
    main()
