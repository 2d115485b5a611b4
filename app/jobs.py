"""What an engine and its callers share, without torch: the engine's config, a job's
result, how a job reports (a sink), and the caller's handle on it (a ticket).

An engine (ChatEngine in app/engine.py, on threads of this process) reports each job
through the `JobSink` given on submit: its tokens in order when streamed, then
exactly one of `done` or `failed`, called on the engine's threads. `LoopSink` hops
those calls to an asyncio loop, where a `Ticket` awaits them; the model worker
(app/model_worker.py) gives a sink that writes frames instead. RemoteEngine
(app/remote_engine.py) settles the same LoopSink from the frames it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from model.options import DecodeOptions, Hypothesis

from .errors import DeadlineExceeded, ServiceError
from .metrics import Metrics

STREAM_END = object()  # end of a token stream
T = TypeVar("T")


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


class JobSink(Protocol):
    """Where an engine reports one job (on its own threads)."""

    def token(self, token: int) -> None: ...
    def done(self, completion: Completion) -> None: ...
    def failed(self, error: ServiceError) -> None: ...


class LoopSink:
    """A job's result on an asyncio loop: a future, and a token queue when streamed. The
    JobSink methods may be called from any thread; `settle` runs on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, stream: bool) -> None:
        self.loop = loop
        self.future: asyncio.Future[Completion] = loop.create_future()
        self.queue: asyncio.Queue[Any] | None = asyncio.Queue() if stream else None

    def token(self, token: int) -> None:
        assert self.queue is not None
        self._call(self.queue.put_nowait, token)

    def done(self, completion: Completion) -> None:
        self._call(self.settle, completion, None)

    def failed(self, error: ServiceError) -> None:
        self._call(self.settle, None, error)

    def settle(self, result: Completion | None, error: BaseException | None) -> None:
        """On the loop: the first result or error wins; a cancelled future stays cancelled."""
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)  # type: ignore[arg-type]
        if self.queue is not None:
            self.queue.put_nowait(STREAM_END)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the loop is closed, nobody waits for this job any more
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)


class Ticket:
    """The caller's handle on a submitted request: its result (and tokens when streamed),
    and how to call the work off. The caller waits until `deadline` (time.monotonic) at
    most, even if the engine is stuck in a step; the engine drops the job's rows at its
    next look past the same deadline (Job.leaves in app/engine.py)."""

    def __init__(self, sink: LoopSink, *, prompt_tokens: int, on_cancel: Callable[[], None],
                 deadline: float | None = None) -> None:
        self._future = sink.future
        self._queue = sink.queue
        self._until = deadline
        self._on_cancel = on_cancel
        self.prompt_tokens = prompt_tokens

    def _remaining(self) -> float | None:
        return None if self._until is None else max(self._until - time.monotonic(), 0.0)

    def cancel(self) -> None:
        """Drop the request (queued or decoding); safe to call more than once."""
        future = self._future
        if not future.done():
            future.cancel()
            self._on_cancel()
        elif not future.cancelled():
            # The engine failed it (e.g. its deadline) just before the caller gave up on it:
            # mark the error read, or asyncio logs "Future exception was never retrieved".
            future.exception()

    async def result(self) -> Completion:
        return await self._wait(asyncio.shield(self._future))

    async def tokens(self) -> AsyncIterator[int]:
        """Token ids as they are decoded (streamed requests); then `result()` holds the rest."""
        assert self._queue is not None, "submit(stream=True) for tokens()"
        while (item := await self._wait(self._queue.get())) is not STREAM_END:
            yield item

    async def _wait(self, awaitable: Awaitable[T]) -> T:
        """Await until the deadline at most; a caller that gives up calls the work off."""
        try:
            return await asyncio.wait_for(awaitable, self._remaining())
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded("the request took longer than the server's deadline") from None
        except asyncio.CancelledError:
            self.cancel()
            raise


class Engine(Protocol):
    """What the routes and the app's lifespan use: ChatEngine (threads of this process) and
    RemoteEngine (app/remote_engine.py: a ChatEngine in a model worker process)."""

    metrics: Metrics | None

    @property
    def name(self) -> str: ...
    @property
    def ready(self) -> bool: ...  # GET /ready: serving now
    @property
    def accepting(self) -> bool: ...  # submit takes requests (an engine restarting holds them)
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
