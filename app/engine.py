"""The inference engine: two threads own the model; requests share its batch.

A chat request's path under `chatbot serve`:
1. the HTTP process's route tokenises it and hands RemoteEngine (app/remote_engine.py) token ids;
2. a frame carries them to the model worker (app/model_worker.py), which calls `submit_job`;
3. here the encoder thread encodes it with others, and the decoder thread joins it to the batch;
4. when its search ends, its job's sink posts the completion to the worker's loop, the one writer;
5. a frame carries it back, RemoteEngine settles the request's future, the route decodes the reply.
With CHATBOT_MODEL_PROCESS=false, steps 2 and 5 vanish: `submit` gives a LoopSink (app/jobs.py).

The event loop never runs torch. A full queue refuses at once (Overloaded -> 429). The
decoder thread runs `RunningBatch` (app/batching.py): between two decoder steps it admits
encoded requests up to `max_batch_size` rows, so a request that arrives while others
decode joins them at the next step, and one that finishes leaves at once (continuous
batching). A job past its deadline, or whose caller went away, leaves before the next
step (`Job.leaves`, the one rule for waiting and decoding jobs).

Encoding a source costs about as much as eight decoder steps; on the decoder thread
it stalled every running request each time new ones joined (under 32 clients, 44%
of that thread's time went to encoding). On its own thread it overlaps the steps:
torch releases the GIL inside its kernels, so the two threads use two cores.

Streaming (greedy and sampling with one row per request): each chosen token goes to the
job's sink as the step that chose it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions
from model.rerank import RerankItem, rerank

from . import allocator
from .batching import BatchItem, EncodeFn, RunningBatch, StepFn, Waiting, default_encode, gather_rows
from .errors import DeadlineExceeded, EngineFailure, NotReady, Overloaded, ServiceError
from .jobs import Completion, EngineConfig, JobSink, LoopSink, Ticket
from .metrics import Metrics
from .served import ServedModel

log = logging.getLogger("chatbot.engine")


def describe(ck: Checkpoint) -> dict[str, Any]:
    """GET /api/model's account of a checkpoint (its engine adds the device and its settings)."""
    training = {k: v for k, v in ck.config.items() if k not in ("model", "tokenizer", "format")}
    return {
        "name": ck.name, "parameters": ck.model.num_parameters(),
        "vocab_size": ck.model.cfg.vocab_size, "architecture": {
            "type": "LSTM encoder-decoder (bidirectional encoder, Luong attention)",
            **ck.model.cfg.__dict__},
        "training": training, "metrics": dict(ck.metrics),
        "reverse": None if ck.reverse is None else {
            "name": ck.reverse.name, "parameters": ck.reverse.num_parameters,
            "architecture": dict(ck.reverse.cfg.__dict__), "metrics": dict(ck.reverse.metrics),
            "purpose": "log p(message | reply) for rerank 'mmi'"},
    }


@dataclass(eq=False)
class Job:
    """One request inside the engine. Its sink hears of it exactly once (done or failed);
    `cancel` may come from any thread."""

    id: int
    source: list[int]
    opts: DecodeOptions
    sink: JobSink
    deadline: float | None
    stream: bool = False
    wake: Callable[[], None] | None = None  # tells the engine's threads to look again
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    settled: bool = False

    @property
    def rows(self) -> int:
        return self.opts.rows_per_item

    def cancel(self) -> None:
        """The caller has gone: the job leaves at the engine's next look, unanswered."""
        self.cancelled = True
        if self.wake is not None:
            self.wake()

    def leaves(self, now: float) -> bool:
        """Whether the job leaves unserved: cancelled by its caller, or past its deadline (then
        failed with 504). The one deadline rule, for waiting and decoding jobs alike."""
        if self.cancelled:
            return True
        if self.deadline is not None and now > self.deadline:
            self.fail(DeadlineExceeded("the request took longer than the server's deadline"))
            return True
        return False

    def finish(self, completion: Completion) -> None:
        if not self.settled:
            self.settled = True
            self.sink.done(completion)

    def fail(self, error: ServiceError) -> None:
        if not self.settled:
            self.settled = True
            self.sink.failed(error)


class ChatEngine(ServedModel):
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, *,
                 step: StepFn | None = None, encode: EncodeFn | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(checkpoint.name, checkpoint.tokenizer, checkpoint.model.cfg, describe(checkpoint))
        self.model = checkpoint.model.eval()
        self.reverse = checkpoint.reverse  # its weights are read when the first MMI request ends
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.device = next(self.model.parameters()).device
        self._step = step
        self._encode = encode or default_encode(self.model)
        self._cond = threading.Condition()  # guards everything below that both threads touch
        self._inbox: deque[Job] = deque()  # submitted, not encoded yet
        self._encoding = 0  # jobs the encoder thread is encoding now
        self._encoded: deque[Waiting[Job]] = deque()  # encoded, waiting to join the batch
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
    def accepting(self) -> bool:
        return self.ready

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not decoding yet (queued, being encoded, or encoded)."""
        return len(self._inbox) + self._encoding + self._encoded_jobs

    @property
    def active_requests(self) -> int:
        return self._active

    def engine_info(self) -> dict[str, Any]:
        return {"max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue,
                "num_threads": self.config.num_threads or torch.get_num_threads(),
                "encoder_threads": self.config.encoder_threads}

    def info(self) -> dict[str, Any]:
        return self._describe(str(self.device), {**self.engine_info(), "model_process": False})

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
        """Queue a request, answered on this event loop (call from it)."""
        sink = LoopSink(asyncio.get_running_loop(), stream=stream)
        job = self.submit_job(source, opts, sink, stream=stream, timeout=timeout)
        return Ticket(sink, prompt_tokens=len(job.source), deadline=job.deadline, on_cancel=job.cancel)

    def submit_job(self, source: list[int], opts: DecodeOptions, sink: JobSink, *,
                   stream: bool = False, timeout: float | None = None) -> Job:
        """Queue a request reported through `sink` (on the engine's threads). Raises Overloaded
        when the queue is full, NotReady before start and while shutting down, InvalidRequest
        for what this checkpoint cannot do."""
        self.check_options(opts)
        job = Job(id=next(self._ids), source=list(source), opts=opts, sink=sink, stream=stream,
                  deadline=None if timeout is None else time.monotonic() + timeout, wake=self._wake)
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
        return job

    def _wake(self) -> None:
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
        jobs: dict[int, Job] = {}
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
                    failing = [*jobs.values(), *(j for w in admitted for j in w.items)]
                    log.exception("decoder step failed; failing %d requests", len(failing))
                    for job in failing:
                        job.fail(EngineFailure("the model failed on this batch"))
                    jobs.clear()
                    batch = self._new_batch(generator)
                self._active = len(jobs)
                self._active_rows = batch.num_rows
        with self._cond:
            self._abort = True  # the encoder thread stops too
            self._cond.notify_all()
            left = [*jobs.values(), *self._inbox, *(j for w in self._encoded for j in w.items)]
            self._inbox.clear()
            self._encoded.clear()
            self._encoded_jobs = self._encoded_rows = 0
        for job in left:
            job.fail(NotReady("the server is shutting down"))
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
        allocator.trim()  # what loading the weights left free in the heap goes back

    def _take_encoded(self, rows: int) -> list[Waiting[Job]]:
        """Pop encoded jobs while their rows fit next to `rows` live ones (lock held; lists only,
        the rows are gathered outside the lock). Jobs that leave (Job.leaves) go on the way."""
        taken: list[Waiting[Job]] = []
        now = time.monotonic()
        while self._encoded:
            group = self._encoded[0]
            picked: list[int] = []
            used = len(group.items)
            for i, job in enumerate(group.items):
                if rows and rows + job.rows > self.config.max_batch_size:
                    used = i
                    break
                self._encoded_jobs -= 1
                self._encoded_rows -= job.rows
                if not job.leaves(now):
                    picked.append(i)
                    rows += job.rows
            if picked:
                taken.append(group.pick(picked))
            if used == len(group.items):
                self._encoded.popleft()
                continue
            self._encoded[0] = group.rest(used)
            break
        return taken

    def _iterate(self, batch: RunningBatch, jobs: dict[int, Job], admitted: list[Waiting[Job]]) -> None:
        now = time.monotonic()
        gone = {job.id for job in jobs.values() if job.leaves(now)}
        if gone:
            batch.drop(gone)
            for job_id in gone:
                del jobs[job_id]
        if admitted:
            joining = [j for w in admitted for j in w.items]
            for job in joining:
                jobs[job.id] = job
                if self.metrics:
                    self.metrics.queue_wait.observe(now - job.submitted)
            batch.join([BatchItem(id=j.id, source=j.source, opts=j.opts, stream=j.stream)
                        for j in joining], gather_rows(admitted))
        if not len(batch):
            return
        start = time.perf_counter()
        out = batch.step()
        if self.metrics:
            self.metrics.step_time.observe(time.perf_counter() - start)
            self.metrics.batch_rows.observe(out.rows)
            self.metrics.batch_requests.observe(out.items)
        for job_id, tok in out.tokens:
            jobs[job_id].sink.token(tok)  # type: ignore[index]
        if not out.finished:
            return
        finished = [jobs.pop(job_id) for job_id, _ in out.finished]  # type: ignore[arg-type]
        # one reverse-model pass for every candidate of every request this step finished
        items = [RerankItem(job.source, hyps, job.opts)
                 for job, (_, hyps) in zip(finished, out.finished, strict=True)]
        mmi = self.reverse is not None and any(item.opts.rerank == "mmi" for item in items)
        ranked = rerank(items, self.reverse.model if mmi else None)  # type: ignore[union-attr]
        for job, hyps in zip(finished, ranked, strict=True):
            if self.metrics:
                self.metrics.tokens.inc(sum(len(h.tokens) for h in hyps))
            job.finish(Completion(hypotheses=hyps, prompt_tokens=len(job.source)))

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
                        job.fail(EngineFailure("the model failed to encode this request"))
            with self._cond:
                if rows is not None and self._abort:  # the decoder has gone: nobody takes them
                    for job in taken:
                        job.fail(NotReady("the server is shutting down"))
                elif rows is not None:
                    self._encoded.append(Waiting(taken, rows))
                    self._encoded_jobs += len(taken)
                    self._encoded_rows += sum(j.rows for j in taken)
                self._encoding = 0
                self._cond.notify_all()

    def _take_queued(self, room: int) -> list[Job]:
        """Pop queued jobs to encode, up to `room` rows and `max_encode_batch` jobs (lock held)."""
        taken: list[Job] = []
        rows = 0
        now = time.monotonic()
        while self._inbox and len(taken) < self.config.max_encode_batch:
            job = self._inbox[0]
            if job.leaves(now):
                self._inbox.popleft()
                continue
            if taken and rows + job.rows > room:
                break
            taken.append(self._inbox.popleft())
            rows += job.rows
        return taken
