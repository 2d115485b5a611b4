"""The inference engine: two threads own the model; requests share its batch.

The event loop never runs torch. A request is tokenised on the loop (cheap), put on
a bounded queue (full: Overloaded -> 429) and answered through an asyncio future
that the engine resolves with `loop.call_soon_threadsafe`. Two threads do the work:

- the encoder thread takes queued requests, encodes their sources as one batch and
  hands the encoded rows over (it runs ahead of the decoder by at most one batch);
- the decoder thread runs `RunningBatch` (app/batching.py): between two decoder steps
  it admits encoded requests up to `max_batch_size` rows, so a request that arrives
  while others decode joins them at the next step, and one that finishes leaves at
  once (continuous batching). Requests past their deadline, or whose client went
  away, are dropped from the batch before the next step.

Encoding a source costs about as much as eight decoder steps; on the decoder thread
it stalled every running request each time new ones joined (under 32 clients, 44%
of that thread's time went to encoding). On its own thread it overlaps the steps:
torch releases the GIL inside its kernels, so the two threads use two cores.

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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions, Hypothesis
from model.inference import DecoderRows
from model.rerank import RerankItem, rerank

from .batching import BatchItem, EncodeFn, RunningBatch, StepFn, default_encode
from .errors import DeadlineExceeded, EngineFailure, InvalidRequest, NotReady, Overloaded, ServiceError
from .metrics import Metrics

log = logging.getLogger("chatbot.engine")

STREAM_END = object()  # end of a token stream


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 128  # decoder rows per step
    max_queue: int = 512  # requests waiting to be admitted
    num_threads: int = 0  # torch threads of the decoder thread; 0 leaves torch's default
    encoder_threads: int = 1  # torch threads of the encoder thread
    max_encode_batch: int = 32  # sources encoded in one call
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be > 0")
        if self.max_queue < 1:
            raise ValueError("max_queue must be > 0")
        if self.num_threads < 0:
            raise ValueError("num_threads must be >= 0")
        if self.encoder_threads < 1 or self.max_encode_batch < 1:
            raise ValueError("encoder_threads and max_encode_batch must be > 0")


@dataclass
class Completion:
    hypotheses: list[Hypothesis]  # best first
    prompt_tokens: int
    queued_s: float
    decode_s: float


@dataclass(eq=False)
class _Encoded:
    jobs: list[_Job]
    rows: DecoderRows  # one row per job, in order


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
    """The caller's handle on a submitted request: its future (and token queue when
    streamed), its deadline, and how to call the work off. The engine in another
    process (app/remote_engine.py) hands out the same handle."""

    def __init__(self, future: asyncio.Future[Completion], *, prompt_tokens: int,
                 deadline: float | None, on_cancel: Callable[[], None],
                 queue: asyncio.Queue[Any] | None = None) -> None:
        self._future = future
        self._queue = queue
        self._deadline = deadline
        self._on_cancel = on_cancel
        self.prompt_tokens = prompt_tokens

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def cancel(self) -> None:
        """Drop the request (queued or decoding); safe to call more than once."""
        future = self._future
        if not future.done():
            future.cancel()
            self._on_cancel()
        elif not future.cancelled():
            # The worker failed it (e.g. its deadline) just before the caller gave up on it:
            # mark the error read, or asyncio logs "Future exception was never retrieved".
            future.exception()

    async def result(self) -> Completion:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), self._remaining())
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded("the request took longer than the server's deadline") from None
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def tokens(self) -> AsyncIterator[int]:
        """Token ids as they are decoded (streamed requests); then `result()` holds the rest."""
        assert self._queue is not None, "submit(stream=True) for tokens()"
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), self._remaining())
            except TimeoutError:
                self.cancel()
                raise DeadlineExceeded("the request took longer than the server's deadline") from None
            except asyncio.CancelledError:
                self.cancel()
                raise
            if item is STREAM_END:
                return
            yield item


class ServedCheckpoint:
    """What both engines (ChatEngine here, RemoteEngine in app/remote_engine.py) tell of the
    checkpoint they serve, and its tokenizer both ways: the routes tokenise and decode with it."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer

    @property
    def name(self) -> str:
        return self.checkpoint.name

    def encode_turns(self, turns: Sequence[str]) -> list[int]:
        """The last `context_turns` turns joined by <sep>, left-truncated to max_source_len."""
        cfg = self.checkpoint.model.cfg
        return self.tokenizer.encode_context(list(turns)[-cfg.context_turns:], cfg.max_source_len)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def has_reverse(self) -> bool:
        return self.checkpoint.reverse is not None

    def check_options(self, opts: DecodeOptions) -> None:
        """Refuse (422) what this checkpoint cannot do; both engines call it on submit."""
        if opts.rerank == "mmi" and not self.has_reverse:
            raise InvalidRequest("rerank 'mmi' needs a reverse model, and this checkpoint has none "
                                 "(train one with `chatbot train --reverse`)", param="rerank")

    def _describe(self, device: str, engine: dict[str, Any]) -> dict[str, Any]:
        """GET /api/model: what is loaded and how the engine runs it."""
        ck = self.checkpoint
        training = {k: v for k, v in ck.config.items() if k not in ("model", "tokenizer", "format")}
        return {
            "name": ck.name, "parameters": ck.model.num_parameters(),
            "vocab_size": self.tokenizer.vocab_size, "architecture": {
                "type": "LSTM encoder-decoder (bidirectional encoder, Luong attention)",
                **ck.model.cfg.__dict__},
            "training": training, "metrics": dict(ck.metrics), "device": device, "engine": engine,
            "reverse": None if ck.reverse is None else {
                "name": ck.reverse.name, "parameters": ck.reverse.model.num_parameters(),
                "architecture": dict(ck.reverse.model.cfg.__dict__), "metrics": dict(ck.reverse.metrics),
                "purpose": "log p(message | reply) for rerank 'mmi'"},
        }


class Engine(Protocol):
    """What the routes and the app's lifespan use: ChatEngine (threads of this process) and
    RemoteEngine (app/remote_engine.py: a ChatEngine in a model worker process)."""

    metrics: Metrics | None

    @property
    def name(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def active_requests(self) -> int: ...
    def encode_turns(self, turns: Sequence[str]) -> list[int]: ...
    def decode(self, tokens: Sequence[int]) -> str: ...
    @property
    def has_reverse(self) -> bool: ...
    def info(self) -> dict[str, Any]: ...
    async def exposition(self) -> bytes: ...
    def start(self) -> None: ...
    async def wait_ready(self, timeout: float = 120.0) -> None: ...
    async def aclose(self, timeout: float = 30.0) -> None: ...
    def submit(self, source: list[int], opts: DecodeOptions, *, stream: bool = False,
               timeout: float | None = None) -> Ticket: ...


class ChatEngine(ServedCheckpoint):
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, *,
                 step: StepFn | None = None, encode: EncodeFn | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(checkpoint)
        self.model = checkpoint.model.eval()
        self.reverse = checkpoint.reverse.model.eval() if checkpoint.reverse is not None else None
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.device = next(self.model.parameters()).device
        self._step = step
        self._encode = encode or default_encode(self.model)
        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._inbox: deque[_Job] = deque()  # submitted, not encoded yet
        self._encoding = 0  # jobs the encoder thread is encoding now
        self._encoded: deque[_Encoded] = deque()  # encoded, waiting to join the batch
        self._encoded_jobs = 0
        self._encoded_rows = 0
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._encoder: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = False  # no new requests; finish what is queued and decoding
        self._abort = False  # drop everything now
        self._startup_error: BaseException | None = None
        self._active = 0  # requests decoding (read by metrics and tests)
        self._active_rows = 0

    # -- what the routes read -----------------------------------------------------
    @property
    def ready(self) -> bool:
        return (self._ready.is_set() and self._startup_error is None and not self._closing
                and self._thread is not None and self._thread.is_alive()
                and self._encoder is not None and self._encoder.is_alive())

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not decoding yet (queued, being encoded, or encoded)."""
        return len(self._inbox) + self._encoding + self._encoded_jobs

    @property
    def active_requests(self) -> int:
        return self._active

    def info(self) -> dict[str, Any]:
        return self._describe(str(self.device), {
            "max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue,
            "num_threads": self.config.num_threads or torch.get_num_threads(),
            "encoder_threads": self.config.encoder_threads, "model_process": False})

    async def exposition(self) -> bytes:
        """Prometheus text kept outside the app's registry: none, this engine records into the
        Metrics it was given (the engine in a worker process answers with the worker's)."""
        return b""

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.metrics:
            self.metrics.watch(lambda: self.queue_depth, lambda: self.active_requests)
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
        self.check_options(opts)
        loop = asyncio.get_running_loop()
        job = _Job(id=next(self._ids), source=list(source), opts=opts, loop=loop,
                   future=loop.create_future(),
                   deadline=None if timeout is None else time.monotonic() + timeout,
                   queue=asyncio.Queue() if stream else None)
        with self._cond:
            if self._closing or not self._ready.is_set():
                raise NotReady("the server is shutting down" if self._closing else
                               "the model is not loaded yet", headers={"Retry-After": "1"})
            if self.queue_depth >= self.config.max_queue:
                if self.metrics:
                    self.metrics.rejected.labels(reason="queue_full").inc()
                raise Overloaded(f"the queue is full ({self.config.max_queue} requests waiting); "
                                 "retry later", headers={"Retry-After": "1"})
            self._inbox.append(job)
            self._cond.notify_all()  # the encoder thread waits on this condition, and so does the decoder
        return Ticket(job.future, prompt_tokens=len(job.source), deadline=job.deadline,
                      on_cancel=lambda: self._cancel(job), queue=job.queue)

    async def generate(self, source: list[int], opts: DecodeOptions, *,
                       timeout: float | None = None) -> Completion:
        return await self.submit(source, opts, timeout=timeout).result()

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        with self._cond:
            self._cond.notify_all()

    # -- the decoder thread -----------------------------------------------------------------
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
                batch = self._new_batch(generator)
                self._warm_up(batch)
            self._start_encoder()
        except BaseException as exc:  # reported by wait_ready
            log.exception("engine failed to start")
            self._startup_error = exc
            self._ready.set()
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            return
        self._ready.set()
        log.info("engine ready: %s on %s, %d decoder + %d encoder threads, batch %d rows, queue %d",
                 self.name, self.device, torch.get_num_threads(), self.config.encoder_threads,
                 self.config.max_batch_size, self.config.max_queue)
        jobs: dict[int, _Job] = {}
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._encoded and not jobs and not self._abort and not self._drained():
                        self._cond.wait()
                    if self._abort or (not jobs and self._drained()):
                        break
                    waiting = self._encoded_jobs
                    admitted = self._take_encoded(batch.num_rows)
                    if self._encoded_jobs != waiting:  # admitted, or dropped (cancelled, expired):
                        self._cond.notify_all()  # room for the encoder to run ahead again
                try:
                    self._iterate(batch, jobs, admitted)
                except Exception:  # a failing step fails its batch, not the server
                    failing = [*jobs.values(), *(j for e in admitted for j in e.jobs)]
                    log.exception("decoder step failed; failing %d requests", len(failing))
                    for job in failing:
                        self._fail(job, EngineFailure("the model failed on this batch"))
                    jobs.clear()
                    batch = self._new_batch(generator)
                self._active = len(jobs)
                self._active_rows = batch.num_rows
        with self._cond:
            self._abort = True  # the encoder thread stops too
            self._cond.notify_all()
            left = [*jobs.values(), *self._inbox, *(j for e in self._encoded for j in e.jobs)]
            self._inbox.clear()
            self._encoded.clear()
            self._encoded_jobs = self._encoded_rows = 0
        for job in left:
            self._fail(job, NotReady("the server is shutting down"))
        self._active = 0
        if self._encoder is not None:
            self._encoder.join(10.0)

    def _new_batch(self, generator: torch.Generator) -> RunningBatch:
        return RunningBatch(self.model, step=self._step, encode=self._encode, generator=generator)

    def _drained(self) -> bool:
        """Closing, and nothing is left before the batch (called with the lock held)."""
        return self._closing and not self._inbox and not self._encoding and not self._encoded

    def _warm_up(self, batch: RunningBatch) -> None:
        """One short decode, so the first request does not pay for lazy initialisation."""
        batch.add([BatchItem(id="warmup", source=[5, 6], opts=DecodeOptions(max_length=2))])
        while len(batch):
            batch.step()

    def _take_encoded(self, rows: int) -> list[_Encoded]:
        """Pop encoded jobs while their rows fit next to `rows` live ones (lock held).
        Cancelled jobs are dropped, expired ones failed, on the way."""
        taken: list[_Encoded] = []
        now = time.monotonic()
        while self._encoded:
            group = self._encoded[0]
            picked: list[int] = []
            full = False
            for i, job in enumerate(group.jobs):
                if rows and rows + job.rows > self.config.max_batch_size:
                    full = True
                    break
                self._encoded_jobs -= 1
                self._encoded_rows -= job.rows
                if self._dropped(job, now):
                    continue
                picked.append(i)
                rows += job.rows
            used = i if full else len(group.jobs)
            if picked:
                index = torch.tensor(picked, device=self.device)
                taken.append(_Encoded([group.jobs[i] for i in picked],
                                      group.rows if len(picked) == len(group.jobs)
                                      else group.rows.index_select(index)))
            if not full:
                self._encoded.popleft()
                continue
            rest = torch.arange(used, len(group.jobs), device=self.device)
            self._encoded[0] = _Encoded(group.jobs[used:], group.rows.index_select(rest))
            break
        return taken

    def _iterate(self, batch: RunningBatch, jobs: dict[int, _Job], admitted: list[_Encoded]) -> None:
        now = time.monotonic()
        gone = {j.id for j in jobs.values()
                if j.cancelled or (j.deadline is not None and now > j.deadline)}
        if gone:
            batch.drop(gone)
            for i in gone:
                job = jobs.pop(i)
                self._fail(job, DeadlineExceeded("the request took longer than the server's deadline"))
        if admitted:
            joining = [j for e in admitted for j in e.jobs]
            for job in joining:
                job.admitted = now
                jobs[job.id] = job
                if self.metrics:
                    self.metrics.queue_wait.observe(now - job.submitted)
            rows = admitted[0].rows if len(admitted) == 1 else \
                DecoderRows.concatenate([e.rows for e in admitted])
            batch.join([BatchItem(id=j.id, source=j.source, opts=j.opts, stream=j.queue is not None)
                        for j in joining], rows)
        if not len(batch):
            return
        start = time.perf_counter()
        out = batch.step()
        if self.metrics:
            self.metrics.step_time.observe(time.perf_counter() - start)
            self.metrics.batch_rows.observe(out.rows)
            self.metrics.batch_requests.observe(out.items)
        for item_id, tok in out.tokens:
            job = jobs[item_id]  # type: ignore[index]
            assert job.queue is not None
            self._call(job, job.queue.put_nowait, tok)
        if not out.finished:
            return
        finished = [jobs.pop(item_id) for item_id, _ in out.finished]  # type: ignore[arg-type]
        # one reverse-model pass for every candidate of every request this step finished
        ranked = rerank([RerankItem(job.source, hyps, job.opts)
                         for job, (_, hyps) in zip(finished, out.finished, strict=True)], self.reverse)
        for job, hyps in zip(finished, ranked, strict=True):
            done = time.monotonic()
            if self.metrics:
                self.metrics.tokens.inc(sum(len(h.tokens) for h in hyps))
            self._resolve(job, Completion(hypotheses=hyps, prompt_tokens=len(job.source),
                                          queued_s=job.admitted - job.submitted,
                                          decode_s=done - job.admitted))

    # -- the encoder thread ------------------------------------------------------------------
    def _start_encoder(self) -> None:
        """Start the encoder thread and wait until its first (warm-up) encode is done."""
        warm = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            torch.set_num_threads(self.config.encoder_threads)
            try:
                with torch.inference_mode():
                    self._encode([[5, 6]])
            except BaseException as exc:
                errors.append(exc)
                return
            finally:
                warm.set()
            self._encode_loop()

        self._encoder = threading.Thread(target=run, name="chatbot-encoder", daemon=True)
        self._encoder.start()
        warm.wait()
        if errors:
            raise errors[0]

    def _encode_loop(self) -> None:
        limit = self.config.max_batch_size  # rows encoded ahead of the batch, at most
        while True:
            with self._cond:
                while not self._abort and not (self._inbox and self._encoded_rows < limit) \
                        and not (self._closing and not self._inbox):
                    self._cond.wait()
                if self._abort or (self._closing and not self._inbox):
                    return
                taken = self._take_queued(limit - self._encoded_rows)
                self._encoding = len(taken)
            rows = None
            if taken:
                try:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        rows = self._encode([j.source for j in taken])
                    if self.metrics:
                        self.metrics.encode_time.observe(time.perf_counter() - start)
                except Exception:
                    log.exception("encoder failed; failing %d requests", len(taken))
                    for job in taken:
                        self._fail(job, EngineFailure("the model failed to encode this request"))
            with self._cond:
                if rows is not None and self._abort:  # the decoder has gone: nobody takes them
                    for job in taken:
                        self._fail(job, NotReady("the server is shutting down"))
                elif rows is not None:
                    self._encoded.append(_Encoded(taken, rows))
                    self._encoded_jobs += len(taken)
                    self._encoded_rows += sum(j.rows for j in taken)
                self._encoding = 0
                self._cond.notify_all()

    def _dropped(self, job: _Job, now: float) -> bool:
        """Whether a waiting job leaves unserved: cancelled by its caller, or past its deadline
        (then failed with 504). Called with the lock held, by either thread."""
        if job.cancelled:
            return True
        if job.deadline is not None and now > job.deadline:
            self._fail(job, DeadlineExceeded("the request waited past the server's deadline"))
            return True
        return False

    def _take_queued(self, room: int) -> list[_Job]:
        """Pop queued jobs to encode, up to `room` rows and `max_encode_batch` jobs (lock held)."""
        taken: list[_Job] = []
        rows = 0
        now = time.monotonic()
        while self._inbox and len(taken) < self.config.max_encode_batch:
            job = self._inbox[0]
            if self._dropped(job, now):
                self._inbox.popleft()
                continue
            if taken and rows + job.rows > room:
                break
            taken.append(self._inbox.popleft())
            rows += job.rows
        return taken

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
                job.queue.put_nowait(STREAM_END)
        self._call(job, deliver)

    def _fail(self, job: _Job, error: ServiceError) -> None:
        def deliver() -> None:
            if not job.future.done():
                job.future.set_exception(error)
            if job.queue is not None:
                job.queue.put_nowait(STREAM_END)
        self._call(job, deliver)
