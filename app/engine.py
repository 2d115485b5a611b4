"""The inference engine: one worker thread owns the model; requests share its batch.

The event loop never runs torch. A request is tokenised on the loop (cheap), put on
a bounded queue (full: Overloaded -> 429) and answered through an asyncio future
that the worker resolves with `loop.call_soon_threadsafe`. The worker runs
`RunningBatch` (app/batching.py): between two decoder steps it admits queued
requests up to `max_batch_size` rows, so a request that arrives while others decode
joins them at the next step, and one that finishes leaves at once (continuous
batching). Requests past their deadline, or whose client went away, are dropped
from the batch before the next step.

Streaming (greedy and sampling with one row per request): each chosen token is put
on the request's asyncio queue as the step that chose it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions, Hypothesis

from .batching import BatchItem, RunningBatch, StepFn
from .errors import DeadlineExceeded, EngineFailure, NotReady, Overloaded, ServiceError
from .metrics import Metrics

log = logging.getLogger("chatbot.engine")

_END = object()  # end of a token stream


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 128  # decoder rows per step
    max_queue: int = 512  # requests waiting to be admitted
    num_threads: int = 0  # torch threads on the worker; 0 leaves torch's default
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be > 0")
        if self.max_queue < 1:
            raise ValueError("max_queue must be > 0")
        if self.num_threads < 0:
            raise ValueError("num_threads must be >= 0")


@dataclass
class Completion:
    hypotheses: list[Hypothesis]  # best first
    prompt_tokens: int
    queued_s: float
    decode_s: float


@dataclass(eq=False)
class _Job:
    id: int
    source: list[int]
    opts: DecodeOptions
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    deadline: float | None
    queue: asyncio.Queue[Any] | None = None
    submitted: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    cancelled: bool = False  # set from the event loop; read by the worker

    @property
    def rows(self) -> int:
        return self.opts.rows_per_item


class Ticket:
    """The caller's handle on a submitted request."""

    def __init__(self, engine: ChatEngine, job: _Job) -> None:
        self._engine = engine
        self._job = job

    @property
    def prompt_tokens(self) -> int:
        return len(self._job.source)

    def _remaining(self) -> float | None:
        if self._job.deadline is None:
            return None
        return max(self._job.deadline - time.monotonic(), 0.0)

    def cancel(self) -> None:
        """Drop the request (queued or decoding); safe to call more than once."""
        future = self._job.future
        if not future.done():
            self._job.cancelled = True
            future.cancel()
            self._engine._wake()
        elif not future.cancelled():
            # The worker failed it (e.g. its deadline) just before the caller gave up on it:
            # mark the error read, or asyncio logs "Future exception was never retrieved".
            future.exception()

    async def result(self) -> Completion:
        try:
            return await asyncio.wait_for(asyncio.shield(self._job.future), self._remaining())
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded("the request took longer than the server's deadline") from None
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def tokens(self) -> AsyncIterator[int]:
        """Token ids as they are decoded (streamed requests); then `result()` holds the rest."""
        assert self._job.queue is not None, "submit(stream=True) for tokens()"
        while True:
            try:
                item = await asyncio.wait_for(self._job.queue.get(), self._remaining())
            except TimeoutError:
                self.cancel()
                raise DeadlineExceeded("the request took longer than the server's deadline") from None
            except asyncio.CancelledError:
                self.cancel()
                raise
            if item is _END:
                return
            yield item


class ChatEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, *,
                 step: StepFn | None = None, metrics: Metrics | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model.eval()
        self.tokenizer = checkpoint.tokenizer
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.device = next(self.model.parameters()).device
        self._step = step
        self._cond = threading.Condition()
        self._inbox: deque[_Job] = deque()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = False  # no new requests; finish what is queued and decoding
        self._abort = False  # drop everything now
        self._startup_error: BaseException | None = None
        self._active = 0  # requests decoding (read by metrics and tests)
        self._active_rows = 0

    # -- what the routes read -----------------------------------------------------
    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def ready(self) -> bool:
        return (self._ready.is_set() and self._startup_error is None and not self._closing
                and self._thread is not None and self._thread.is_alive())

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def active_requests(self) -> int:
        return self._active

    def encode_turns(self, turns: Sequence[str]) -> list[int]:
        """The last `context_turns` turns joined by <sep>, left-truncated to max_source_len."""
        cfg = self.model.cfg
        return self.tokenizer.encode_context(list(turns)[-cfg.context_turns:], cfg.max_source_len)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        training = {k: v for k, v in self.checkpoint.config.items()
                    if k not in ("model", "tokenizer", "format")}
        return {
            "name": self.name, "parameters": self.model.num_parameters(),
            "vocab_size": self.tokenizer.vocab_size, "architecture": {
                "type": "LSTM encoder-decoder (bidirectional encoder, Luong attention)",
                **cfg.__dict__},
            "training": training, "metrics": dict(self.checkpoint.metrics),
            "device": str(self.device),
            "engine": {"max_batch_size": self.config.max_batch_size,
                       "max_queue": self.config.max_queue,
                       "num_threads": self.config.num_threads or torch.get_num_threads()},
        }

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="chatbot-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        ok = await asyncio.to_thread(self._ready.wait, timeout)
        if self._startup_error is not None:
            raise RuntimeError(f"engine failed to start: {self._startup_error}") \
                from self._startup_error
        if not ok:
            raise RuntimeError(f"engine not ready after {timeout} s")

    async def aclose(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let queued and decoding ones finish (up to `timeout`)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            log.warning("engine still busy after %.0f s; dropping the requests left", timeout)
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            await asyncio.to_thread(thread.join, 10.0)

    # -- submitting -------------------------------------------------------------------------
    def submit(self, source: list[int], opts: DecodeOptions, *, stream: bool = False,
               timeout: float | None = None) -> Ticket:
        """Queue a request; raises Overloaded when the queue is full, NotReady before start
        and while shutting down. Call from the event loop."""
        loop = asyncio.get_running_loop()
        job = _Job(id=next(self._ids), source=list(source), opts=opts, loop=loop,
                   future=loop.create_future(),
                   deadline=None if timeout is None else time.monotonic() + timeout,
                   queue=asyncio.Queue() if stream else None)
        with self._cond:
            if self._closing or not self._ready.is_set():
                raise NotReady("the server is shutting down" if self._closing else
                               "the model is not loaded yet", headers={"Retry-After": "1"})
            if len(self._inbox) >= self.config.max_queue:
                if self.metrics:
                    self.metrics.rejected.labels(reason="queue_full").inc()
                raise Overloaded(f"the queue is full ({self.config.max_queue} requests waiting); "
                                 "retry later", headers={"Retry-After": "1"})
            self._inbox.append(job)
            self._cond.notify()
        return Ticket(self, job)

    async def generate(self, source: list[int], opts: DecodeOptions, *,
                       timeout: float | None = None) -> Completion:
        return await self.submit(source, opts, timeout=timeout).result()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        generator = torch.Generator(device=self.device)
        if self.config.seed is not None:
            generator.manual_seed(self.config.seed)
        else:
            generator.seed()
        try:
            with torch.inference_mode():
                batch = RunningBatch(self.model, step=self._step, generator=generator)
                self._warm_up(batch)
        except BaseException as exc:  # reported by wait_ready
            log.exception("engine failed to start")
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        log.info("engine ready: %s on %s, %d threads, batch %d rows, queue %d", self.name,
                 self.device, torch.get_num_threads(), self.config.max_batch_size,
                 self.config.max_queue)
        jobs: dict[int, _Job] = {}
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._inbox and not jobs and not self._closing and not self._abort:
                        self._cond.wait()
                    if self._abort or (self._closing and not self._inbox and not jobs):
                        break
                    admitted = self._take(batch)
                try:
                    self._iterate(batch, jobs, admitted)
                except Exception:  # a failing step fails its batch, not the server
                    log.exception("decoder step failed; failing %d requests", len(jobs) + len(admitted))
                    for job in [*jobs.values(), *admitted]:
                        self._fail(job, EngineFailure("the model failed on this batch"))
                    jobs.clear()
                    batch = RunningBatch(self.model, step=self._step, generator=generator)
                self._active = len(jobs)
                self._active_rows = batch.num_rows
        for job in [*jobs.values(), *self._inbox]:
            self._fail(job, NotReady("the server is shutting down"))
        self._inbox.clear()
        self._active = 0

    def _warm_up(self, batch: RunningBatch) -> None:
        """One short decode, so the first request does not pay for lazy initialisation."""
        batch.add([BatchItem(id="warmup", source=[5, 6], opts=DecodeOptions(max_length=2))])
        while len(batch):
            batch.step()

    def _take(self, batch: RunningBatch) -> list[_Job]:
        """Pop queued jobs while their rows fit (called with the lock held)."""
        taken: list[_Job] = []
        rows = batch.num_rows
        now = time.monotonic()
        while self._inbox:
            job = self._inbox[0]
            if job.cancelled:
                self._inbox.popleft()
                continue
            if job.deadline is not None and now > job.deadline:
                self._inbox.popleft()
                self._fail(job, DeadlineExceeded("the request waited past the server's deadline"))
                continue
            if rows and rows + job.rows > self.config.max_batch_size:
                break
            taken.append(self._inbox.popleft())
            rows += job.rows
        return taken

    def _iterate(self, batch: RunningBatch, jobs: dict[int, _Job], admitted: list[_Job]) -> None:
        now = time.monotonic()
        gone = {j.id for j in jobs.values()
                if j.cancelled or (j.deadline is not None and now > j.deadline)}
        if gone:
            batch.drop(gone)
            for i in gone:
                job = jobs.pop(i)
                self._fail(job, DeadlineExceeded("the request took longer than the server's deadline"))
        if admitted:
            for job in admitted:
                job.admitted = now
                jobs[job.id] = job
                if self.metrics:
                    self.metrics.queue_wait.observe(now - job.submitted)
            batch.add([BatchItem(id=j.id, source=j.source, opts=j.opts, stream=j.queue is not None)
                       for j in admitted])
        if not len(batch):
            return
        out = batch.step()
        if self.metrics:
            self.metrics.batch_rows.observe(out.rows)
            self.metrics.batch_requests.observe(out.items)
        for item_id, tok in out.tokens:
            job = jobs[item_id]  # type: ignore[index]
            assert job.queue is not None
            self._call(job, job.queue.put_nowait, tok)
        for item_id, hyps in out.finished:
            job = jobs.pop(item_id)  # type: ignore[arg-type]
            done = time.monotonic()
            if self.metrics:
                self.metrics.tokens.inc(sum(len(h.tokens) for h in hyps))
            self._resolve(job, Completion(hypotheses=hyps, prompt_tokens=len(job.source),
                                          queued_s=job.admitted - job.submitted,
                                          decode_s=done - job.admitted))

    # -- handing results to the event loop --------------------------------------------------------
    @staticmethod
    def _call(job: _Job, fn: Any, *args: Any) -> None:
        # RuntimeError: the loop is closed, nobody waits for this job any more
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(fn, *args)

    def _resolve(self, job: _Job, result: Completion) -> None:
        def deliver() -> None:
            if not job.future.done():
                job.future.set_result(result)
            if job.queue is not None:
                job.queue.put_nowait(_END)
        self._call(job, deliver)

    def _fail(self, job: _Job, error: ServiceError) -> None:
        def deliver() -> None:
            if not job.future.done():
                job.future.set_exception(error)
            if job.queue is not None:
                job.queue.put_nowait(_END)
        self._call(job, deliver)
