"""RemoteEngine: the engine in a model worker process, seen from the HTTP process.

`chatbot serve` runs the model in a child process (app/model_worker.py) and HTTP here:
on a 2-core machine this answers 32 concurrent clients with about a quarter more
requests/s than the same engine on threads of the HTTP process, whose event loop,
uvicorn, FastAPI and pydantic share the GIL with the decoder thread
(docs/PERFORMANCE.md). The routes see the same surface as ChatEngine (app/engine.py,
`Engine`): this process keeps the tokenizer (requests are tokenised and replies
decoded here) and hands token ids to the worker over a socket pair (app/wire.py).

The worker is supervised: if it dies (killed, out of memory), the requests it held
fail with 503, /ready answers 503, and a new worker starts (after 1 s, doubling up
to 30 s while it keeps dying young). On shutdown the worker finishes what is queued
and decoding, then exits; if this process dies, the worker sees its socket close
and exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions

from . import wire
from .engine import STREAM_END, Completion, ServedCheckpoint, Ticket
from .errors import NotReady, Overloaded
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("chatbot.remote")

DEADLINE_GRACE_S = 5.0  # the worker enforces deadlines; this side gives up this much later
RESTART_DELAY_S = (1.0, 30.0)  # first and longest wait before restarting a dead worker
YOUNG_S = 60.0  # a worker that dies younger than this doubles the next wait


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[Completion]
    queue: asyncio.Queue[Any] | None


class RemoteEngine(ServedCheckpoint):
    def __init__(self, checkpoint: Checkpoint, settings: Settings, *,
                 metrics: Metrics | None = None) -> None:
        super().__init__(checkpoint)
        self.settings = settings
        self.metrics = metrics or Metrics(engine=False)  # the worker records the engine's own
        self._device = settings.resolved_device()
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        # The worker refuses what its queue cannot hold (429); this bounds what waits here if
        # it stops reading.
        self._max_pending = settings.max_queue + settings.max_batch_size
        self._scrapes: dict[int, asyncio.Future[bytes]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._worker_pid: int | None = None
        self._ready = False
        self._closing = False
        self._queue_depth = 0
        self._active = 0
        self._started: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._startup_error: str | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0

    # -- what the routes read -----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready and not self._closing

    @property
    def queue_depth(self) -> int:
        """As the worker last reported it (it reports with every message it sends)."""
        return self._queue_depth

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def worker_pid(self) -> int | None:
        return self._worker_pid

    def info(self) -> dict[str, Any]:
        s = self.settings
        return self._describe(self._device, {
            "max_batch_size": s.max_batch_size, "max_queue": s.max_queue,
            "num_threads": s.threads(), "encoder_threads": s.encoder_threads,
            "model_process": True, "worker_pid": self._worker_pid, "worker_restarts": self.restarts})

    async def exposition(self) -> bytes:
        """The worker's Prometheus text (empty while no worker runs)."""
        if not self.ready:
            return b""
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._scrapes[rid] = future
        self._send(("metrics", rid))
        try:
            return await asyncio.wait_for(future, 5.0)
        except TimeoutError:
            log.warning("the model worker did not answer a metrics scrape within 5 s")
            return b""
        finally:
            self._scrapes.pop(rid, None)

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, source: list[int], opts: DecodeOptions, *, stream: bool = False,
               timeout: float | None = None) -> Ticket:
        """Send a request to the worker. NotReady while no worker runs and while shutting down;
        the worker's refusals (a full queue: Overloaded) come back through the ticket."""
        if not self.ready:
            raise NotReady("the server is shutting down" if self._closing else
                           "the model is not loaded yet", headers={"Retry-After": "1"})
        self.check_options(opts)
        if len(self._pending) >= self._max_pending:  # the worker is not keeping up, or stuck
            raise Overloaded(f"{len(self._pending)} requests are waiting for the model; retry later",
                             headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        pending = _Pending(loop.create_future(), asyncio.Queue() if stream else None)
        self._pending[rid] = pending
        self._send(("submit", rid, list(source), opts, stream, timeout))
        deadline = None if timeout is None else time.monotonic() + timeout + DEADLINE_GRACE_S
        return Ticket(pending.future, prompt_tokens=len(source), deadline=deadline,
                      on_cancel=lambda: self._cancel(rid), queue=pending.queue)

    def _cancel(self, rid: int) -> None:
        if self._pending.pop(rid, None) is not None:
            self._send(("cancel", rid))

    def _send(self, message: tuple[Any, ...]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(wire.frame(message))

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (call on the event loop); `wait_ready` waits for its model."""
        if self._supervisor is not None:
            return
        self._started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_ready(self, timeout: float = 120.0) -> None:
        assert self._started is not None, "start() first"
        try:
            await asyncio.wait_for(self._started.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"the model worker was not ready after {timeout} s") from None
        if self._startup_error is not None:
            raise RuntimeError(f"engine failed to start: {self._startup_error}")

    async def aclose(self, timeout: float = 30.0) -> None:
        """Stop taking requests; the worker finishes what it holds (up to `timeout`), then exits."""
        self._closing = True
        if self._stopping is not None:
            self._stopping.set()
        supervisor = self._supervisor
        if supervisor is None:
            return
        self._send(("close", timeout))
        done, _ = await asyncio.wait({supervisor}, timeout=timeout + 15.0)
        if not done:
            log.warning("the model worker did not stop; killing it")
            self._kill()
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        self._fail_all("the server is shutting down")

    # -- the worker -----------------------------------------------------------------------------
    async def _supervise(self) -> None:
        assert self._started is not None
        delay = RESTART_DELAY_S[0]
        while True:
            began = time.monotonic()
            code = await self._run_worker()
            if self._closing:
                return
            if not self._started.is_set():  # the first worker never got ready: stop here
                self._startup_error = self._startup_error or f"the model worker exited ({code})"
                self._started.set()
                return
            self._fail_all("the model process stopped; it is being restarted")
            if time.monotonic() - began >= YOUNG_S:
                delay = RESTART_DELAY_S[0]
            log.error("the model worker exited (%s); restarting it in %.0f s", code, delay)
            self.restarts += 1
            assert self._stopping is not None
            with contextlib.suppress(TimeoutError):  # aclose() ends the wait
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, RESTART_DELAY_S[1])
            if self._closing:
                return

    async def _run_worker(self) -> int | None:
        """Spawn a worker and relay its messages until it goes; its exit status."""
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        try:
            process = subprocess.Popen([sys.executable, "-m", "app.model_worker", str(theirs.fileno())],
                                       pass_fds=(theirs.fileno(),), env=env)
        finally:
            theirs.close()
        self._process = process
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(wire.frame(self.settings))
        self._writer = writer
        try:
            while True:
                try:
                    depth, active, message = await wire.read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self._queue_depth, self._active = depth, active
                self._dispatch(message)
        finally:
            self._ready = False
            self._writer = None
            writer.close()
            self._queue_depth = self._active = 0
        try:
            return await asyncio.to_thread(process.wait, 10.0)
        except subprocess.TimeoutExpired:
            self._kill()
            return await asyncio.to_thread(process.wait)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "token":
            pending = self._pending.get(message[1])
            if pending is not None and pending.queue is not None:
                pending.queue.put_nowait(message[2])
        elif kind == "done":
            self._settle(message[1], result=message[2])
        elif kind == "error":
            self._settle(message[1], error=wire.rebuild_error(*message[2:]))
        elif kind == "metrics":
            scrape = self._scrapes.get(message[1])
            if scrape is not None and not scrape.done():
                scrape.set_result(message[2])
        elif kind == "ready":
            self._worker_pid = message[1]
            self._ready = True
            log.info("model worker %d ready", self._worker_pid)
            assert self._started is not None
            self._started.set()
        elif kind == "failed":
            log.error("the model worker failed to start: %s", message[1])
            self._startup_error = message[1]
        elif kind != "closed":
            log.error("unknown message from the model worker: %r", kind)

    def _settle(self, rid: int, *, result: Completion | None = None,
                error: BaseException | None = None) -> None:
        pending = self._pending.pop(rid, None)
        if pending is None:  # cancelled here meanwhile
            return
        if not pending.future.done():
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(result)  # type: ignore[arg-type]
        if pending.queue is not None:
            pending.queue.put_nowait(STREAM_END)

    def _fail_all(self, why: str) -> None:
        for rid in list(self._pending):
            self._settle(rid, error=NotReady(why, headers={"Retry-After": "1"}))
        for scrape in self._scrapes.values():
            if not scrape.done():
                scrape.set_result(b"")

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
