"""RemoteEngine: the engine in a model worker process, seen from the HTTP process.

`chatbot serve` runs the model in a child process (app/model_worker.py) and HTTP here:
the event loop, uvicorn, FastAPI and pydantic then do not share a GIL with the decoder
thread (docs/PERFORMANCE.md). The routes see the same surface as ChatEngine
(app/jobs.py, `Engine`). This process holds no weights and never imports torch: it
reads the checkpoint's config.json and tokenizer.json (requests are tokenised and
replies decoded here), tells the worker only a ModelSpec (app/spec.py; the API key
stays here) and hands it token ids over a socket pair (app/wire.py). The worker
describes the model (/api/model) when it is ready.

The worker is supervised. If it dies (killed, out of memory), a new one starts (after
1 s, doubling up to 30 s while it keeps dying young) and no request is lost on the
way: generating a reply has no side effects, so each request the dead worker held is
sent again, once, to the new one, and requests that arrive meanwhile wait for it, all
within their deadlines. What cannot be answered in time (its deadline passes before a
worker is ready, or it dies with a second worker) fails with 503 and Retry-After; so
does a streamed reply whose first tokens have gone out already. /ready answers 503
while no worker runs. On shutdown the worker finishes what is queued and decoding,
then exits; if this process dies, the worker sees its socket close and exits too.
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

from model.checkpoint_meta import read_meta
from model.options import DecodeOptions

from . import wire
from .errors import NotReady, Overloaded
from .jobs import LoopSink, Ticket
from .metrics import Metrics
from .served import ServedModel
from .spec import ModelSpec

log = logging.getLogger("chatbot.remote")

# The worker fails a request past its deadline between two steps, and this side one that waits
# for a restarted worker; the ticket gives up this much later in any case (a stuck worker).
DEADLINE_GRACE_S = 0.25
RESTART_DELAY_S = (1.0, 30.0)  # first and longest wait before restarting a dead worker
YOUNG_S = 60.0  # a worker that dies younger than this doubles the next wait
RETRY_AFTER = {"Retry-After": "1"}


@dataclass(eq=False)
class _Pending:
    sink: LoopSink
    source: list[int]
    opts: DecodeOptions
    stream: bool
    deadline: float | None  # the request's own (time.monotonic)
    sent: bool = False  # to the worker that runs now
    resent: bool = False  # sent to a second worker after the first died with it
    streamed: bool = False  # tokens have gone to the client

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class RemoteEngine(ServedModel):
    def __init__(self, spec: ModelSpec, *, request_timeout_s: float | None = None,
                 metrics: Metrics | None = None) -> None:
        meta = read_meta(spec.checkpoint)  # CheckpointError here, before anything starts
        super().__init__(meta.name, meta.tokenizer, meta.cfg)
        self.spec = spec
        self.metrics = metrics or Metrics(engine=False)  # the worker records the engine's own
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        # The worker refuses what its queue cannot hold (429); this bounds what waits here if
        # it stops reading or while it restarts.
        self._max_pending = spec.engine.max_queue + spec.engine.max_batch_size
        self._scrapes: dict[int, asyncio.Future[bytes]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._worker_pid: int | None = None
        self._device = spec.device
        self._engine_info: dict[str, Any] = {}
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
    def accepting(self) -> bool:
        """Ready, or restarting a worker that was: requests then wait for the next one."""
        return (not self._closing and self._started is not None and self._started.is_set()
                and self._startup_error is None)

    @property
    def queue_depth(self) -> int:
        """As the worker last reported it (it reports with every message it sends), plus what
        waits here for a worker."""
        return self._queue_depth + sum(not p.sent for p in self._pending.values())

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def startup_error(self) -> str | None:
        """Why the first worker could not start (e.g. a checkpoint whose weights do not load)."""
        return self._startup_error

    @property
    def worker_pid(self) -> int | None:
        return self._worker_pid

    def info(self) -> dict[str, Any]:
        return self._describe(self._device, {
            **self._engine_info, "model_process": True, "worker_pid": self._worker_pid,
            "worker_restarts": self.restarts})

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
        """Send a request to the worker, or keep it until a restarted worker is ready. NotReady
        before the first worker is ready and while shutting down; the worker's refusals (a full
        queue: Overloaded) come back through the ticket."""
        if not self.accepting:
            raise NotReady("the server is shutting down" if self._closing else
                           "the model is not loaded yet", headers=RETRY_AFTER)
        self.check_options(opts)
        if len(self._pending) >= self._max_pending:  # the worker is not keeping up, or stuck
            raise Overloaded(f"{len(self._pending)} requests are waiting for the model; retry later",
                             headers=RETRY_AFTER)
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = _Pending(LoopSink(loop, stream=stream), list(source), opts, stream, deadline)
        self._pending[rid] = pending
        if self._ready:
            self._submit(rid, pending)
        else:
            self._wait_for_worker(rid, pending)
        return Ticket(pending.sink, prompt_tokens=len(source), on_cancel=lambda: self._cancel(rid),
                      deadline=None if deadline is None else deadline + DEADLINE_GRACE_S)

    def _submit(self, rid: int, pending: _Pending) -> None:
        left = pending.remaining()
        pending.sent = True
        self._send(("submit", rid, pending.source, pending.opts, pending.stream,
                    None if left is None else max(left, 0.001)))

    def _wait_for_worker(self, rid: int, pending: _Pending) -> None:
        """Keep a request until a worker is ready; 503 if its deadline comes first."""
        pending.sent = False
        left = pending.remaining()
        if left is not None:
            asyncio.get_running_loop().call_later(max(left, 0.0), self._expire_unsent, rid)

    def _expire_unsent(self, rid: int) -> None:
        pending = self._pending.get(rid)
        if pending is not None and not pending.sent:
            self._settle(rid, error=NotReady("the model process stopped and is being restarted; "
                                             "no worker was ready within the request's deadline",
                                             headers=RETRY_AFTER))

    def _cancel(self, rid: int) -> None:
        pending = self._pending.pop(rid, None)
        if pending is not None and pending.sent:
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
            self._hold_for_next_worker()
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

    def _hold_for_next_worker(self) -> None:
        """The worker died with these requests: each goes to the next worker once, unless its
        tokens have been streamed already or it has been sent again before."""
        for rid, pending in list(self._pending.items()):
            if not pending.sent:
                continue
            if pending.resent or pending.streamed:
                self._settle(rid, error=NotReady("the model process stopped; it is being restarted",
                                                 headers=RETRY_AFTER))
            else:
                pending.resent = True
                self._wait_for_worker(rid, pending)
        self._release_scrapes()

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
        writer.write(wire.frame(self.spec))
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
            if pending is not None and pending.sink.queue is not None:
                pending.streamed = True
                pending.sink.queue.put_nowait(message[2])
        elif kind == "done":
            self._settle(message[1], result=message[2])
        elif kind == "error":
            self._settle(message[1], error=wire.rebuild_error(*message[2:]))
        elif kind == "metrics":
            scrape = self._scrapes.get(message[1])
            if scrape is not None and not scrape.done():
                scrape.set_result(message[2])
        elif kind == "ready":
            self._worker_pid, self.description, self._device, self._engine_info = message[1:]
            self._ready = True
            log.info("model worker %d ready", self._worker_pid)
            for rid, pending in list(self._pending.items()):  # those that waited for it
                if not pending.sent:
                    self._submit(rid, pending)
            assert self._started is not None
            self._started.set()
        elif kind == "failed":
            log.error("the model worker failed to start: %s", message[1])
            assert self._started is not None
            if not self._started.is_set():  # a restarted worker's failure: the supervisor retries
                self._startup_error = message[1]
        elif kind != "closed":
            log.error("unknown message from the model worker: %r", kind)

    def _settle(self, rid: int, *, result: Any = None, error: BaseException | None = None) -> None:
        pending = self._pending.pop(rid, None)
        if pending is not None:  # else cancelled here meanwhile
            pending.sink.settle(result, error)

    def _fail_all(self, why: str) -> None:
        for rid in list(self._pending):
            self._settle(rid, error=NotReady(why, headers=RETRY_AFTER))
        self._release_scrapes()

    def _release_scrapes(self) -> None:
        """Metrics scrapes waiting for a worker that has gone get empty text."""
        for scrape in self._scrapes.values():
            if not scrape.done():
                scrape.set_result(b"")

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
