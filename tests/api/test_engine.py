"""ChatEngine: the worker thread, the queue, deadlines, cancellation, draining."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.batching import default_encode, default_step
from app.engine import ChatEngine
from app.errors import DeadlineExceeded, EngineFailure, NotReady, Overloaded
from app.jobs import EngineConfig
from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions

from .conftest import PROMPTS, Gate, complete, reference

pytestmark = pytest.mark.anyio
GREEDY = DecodeOptions(strategy="greedy", max_length=12, min_length=2, no_repeat_ngram_size=3)


async def _started(ckpt: Checkpoint, gate: Gate | None = None, **config: int) -> ChatEngine:
    engine = ChatEngine(ckpt, EngineConfig(num_threads=1, **config), step=gate)
    engine.start()
    await engine.wait_ready()
    return engine


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_bad_engine_settings_are_refused_early() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        EngineConfig(max_queue=0)


async def test_concurrent_requests_get_the_replies_they_get_alone(ckpt: Checkpoint) -> None:
    engine = await _started(ckpt, max_batch_size=64)
    beam = DecodeOptions(strategy="beam", beam_size=3, n_best=3, max_length=10, min_length=2)
    jobs = [(p, GREEDY if i % 3 else beam) for i, p in enumerate(PROMPTS)]
    results = await asyncio.gather(*(complete(engine, engine.encode_turns([p]), o) for p, o in jobs))
    await engine.aclose()
    for (prompt, opts), result in zip(jobs, results, strict=True):
        assert [engine.decode(h.tokens) for h in result.hypotheses] == reference(ckpt, [prompt], opts)


async def test_a_full_queue_refuses_with_overloaded(ckpt: Checkpoint, gate: Gate) -> None:
    engine = await _started(ckpt, gate, max_batch_size=1, max_queue=2)
    gate.opened.clear()
    first = asyncio.ensure_future(complete(engine, [5, 6], GREEDY))
    assert await asyncio.to_thread(gate.waiting.wait, 5)  # decoding, stuck in the step
    queued = [engine.submit([7], GREEDY), engine.submit([8], GREEDY)]
    assert engine.queue_depth == 2
    with pytest.raises(Overloaded, match="queue is full"):
        engine.submit([9], GREEDY)
    gate.opened.set()
    assert (await first).hypotheses
    for ticket in queued:
        assert (await ticket.result()).hypotheses
    await engine.aclose()


async def test_a_deadline_fails_the_request_and_drops_its_rows(ckpt: Checkpoint, gate: Gate) -> None:
    engine = await _started(ckpt, gate)
    gate.opened.clear()
    ticket = engine.submit([5, 6, 7], GREEDY, timeout=0.2)
    with pytest.raises(DeadlineExceeded):
        await ticket.result()
    gate.opened.set()
    await _until(lambda: engine.active_requests == 0 and engine._active_rows == 0)
    assert (await complete(engine, [5], GREEDY)).hypotheses  # the engine carries on
    await engine.aclose()


async def test_cancelling_the_caller_cancels_the_work(ckpt: Checkpoint) -> None:
    gate = Gate(default_step(ckpt.model), delay=0.02)
    engine = await _started(ckpt, gate)
    long = DecodeOptions(strategy="greedy", max_length=200, min_length=200)
    task = asyncio.ensure_future(complete(engine, [5, 6], long))
    await _until(lambda: engine.active_requests == 1)
    task.cancel()
    await _until(lambda: engine.active_requests == 0, timeout=2.0)
    calls = gate.calls
    await asyncio.sleep(0.1)
    assert gate.calls == calls  # no more steps for a request nobody waits for
    await engine.aclose()


async def test_close_finishes_work_in_flight_and_refuses_new_work(ckpt: Checkpoint) -> None:
    engine = await _started(ckpt, Gate(default_step(ckpt.model), delay=0.01))
    in_flight = [engine.submit(engine.encode_turns([p]), GREEDY) for p in PROMPTS[:4]]
    closing = asyncio.ensure_future(engine.aclose(timeout=10))
    await asyncio.sleep(0)
    with pytest.raises(NotReady, match="shutting down"):
        engine.submit([5], GREEDY)
    for ticket, prompt in zip(in_flight, PROMPTS, strict=False):
        reply = engine.decode((await ticket.result()).hypotheses[0].tokens)
        assert reply == reference(ckpt, [prompt], GREEDY)[0]
    await closing
    assert not engine.ready


async def test_a_failing_step_fails_its_batch_not_the_engine(ckpt: Checkpoint) -> None:
    base = default_step(ckpt.model)
    broken = {"on": False}

    def step(tokens, rows):  # type: ignore[no-untyped-def]
        if broken["on"]:
            raise RuntimeError("boom")
        return base(tokens, rows)

    engine = await _started(ckpt, step)  # type: ignore[arg-type]
    broken["on"] = True
    with pytest.raises(EngineFailure):
        await complete(engine, [5, 6], GREEDY)
    broken["on"] = False
    assert (await complete(engine, [5, 6], GREEDY)).hypotheses
    await engine.aclose()


async def test_submit_before_start_is_not_ready(ckpt: Checkpoint) -> None:
    engine = ChatEngine(ckpt, EngineConfig(num_threads=1))
    with pytest.raises(NotReady):
        engine.submit([5], GREEDY)
    assert not engine.ready


async def test_requests_are_encoded_while_the_decoder_steps(ckpt: Checkpoint, gate: Gate) -> None:
    """The encoder thread encodes new requests while the decoder thread is busy in a step."""
    encoded_on: list[str] = []
    base = default_encode(ckpt.model)

    def encode(sources):  # type: ignore[no-untyped-def]
        encoded_on.append(threading.current_thread().name)
        return base(sources)

    engine = ChatEngine(ckpt, EngineConfig(num_threads=1), step=gate, encode=encode)
    engine.start()
    await engine.wait_ready()
    gate.opened.clear()
    first = asyncio.ensure_future(complete(engine, [5, 6], GREEDY))
    assert await asyncio.to_thread(gate.waiting.wait, 5)  # the decoder is stuck in a step
    calls = len(encoded_on)
    second = engine.submit(engine.encode_turns([PROMPTS[0]]), GREEDY)
    await _until(lambda: len(encoded_on) > calls and engine._encoded_jobs == 1)
    assert encoded_on[-1] == "chatbot-encoder"
    assert engine.queue_depth == 1  # encoded, not decoding yet
    gate.opened.set()
    assert (await first).hypotheses
    reply = engine.decode((await second.result()).hypotheses[0].tokens)
    assert reply == reference(ckpt, [PROMPTS[0]], GREEDY)[0]
    await engine.aclose()


async def test_a_failing_encoder_fails_its_requests_not_the_engine(ckpt: Checkpoint) -> None:
    base = default_encode(ckpt.model)
    broken = {"on": False}

    def encode(sources):  # type: ignore[no-untyped-def]
        if broken["on"]:
            raise RuntimeError("boom")
        return base(sources)

    engine = ChatEngine(ckpt, EngineConfig(num_threads=1), encode=encode)
    engine.start()
    await engine.wait_ready()
    broken["on"] = True
    with pytest.raises(EngineFailure):
        await complete(engine, [5, 6], GREEDY)
    broken["on"] = False
    assert (await complete(engine, [5, 6], GREEDY)).hypotheses
    assert engine.ready
    await engine.aclose()


async def test_an_encoder_that_cannot_start_is_reported(ckpt: Checkpoint) -> None:
    def encode(sources):  # type: ignore[no-untyped-def]
        raise RuntimeError("no encoder here")

    engine = ChatEngine(ckpt, EngineConfig(num_threads=1), encode=encode)
    engine.start()
    with pytest.raises(RuntimeError, match="engine failed to start"):
        await engine.wait_ready()
    assert not engine.ready


async def test_a_cancelled_encoded_request_makes_room_for_the_next(ckpt: Checkpoint, gate: Gate) -> None:
    """The encoder runs at most max_batch_size rows ahead; when the decoder drops an encoded
    request that was cancelled meanwhile, the encoder must hear that there is room again."""
    engine = await _started(ckpt, gate, max_batch_size=1)
    gate.opened.clear()
    first = asyncio.ensure_future(complete(engine, [5, 6], GREEDY))
    assert await asyncio.to_thread(gate.waiting.wait, 5)  # decoding, stuck in the step
    dropped = engine.submit([7, 8], GREEDY)
    await _until(lambda: engine._encoded_jobs == 1)  # encoded: the encoder's one row ahead
    dropped.cancel()
    second = engine.submit(engine.encode_turns([PROMPTS[1]]), GREEDY)
    gate.opened.set()
    assert (await first).hypotheses
    result = await asyncio.wait_for(second.result(), 5)
    assert engine.decode(result.hypotheses[0].tokens) == reference(ckpt, [PROMPTS[1]], GREEDY)[0]
    await _until(lambda: engine.queue_depth == 0 and engine.active_requests == 0)
    await engine.aclose()


async def test_the_workers_engine_answers_token_ids_without_building_a_tokenizer(tiny_checkpoint,
                                                                                   ckpt) -> None:
    from app.factory import load_engine
    from app.spec import ModelSpec

    from .conftest import make_settings

    spec = ModelSpec.from_settings(make_settings(tiny_checkpoint))
    engine = load_engine(spec, defer_tokenizer=True)  # as app/model_worker.py loads it
    source = ckpt.tokenizer.encode_context(["hello there"], ckpt.model.cfg.max_source_len)
    engine.start()
    await engine.wait_ready()
    result = await complete(engine, source, GREEDY)
    await engine.aclose()
    replies = [ckpt.tokenizer.decode(h.tokens) for h in result.hypotheses]
    assert replies == reference(ckpt, ["hello there"], GREEDY)
    assert engine.info()["vocab_size"] == ckpt.tokenizer.vocab_size
    assert not engine.tokenizer.built  # ~8 MiB the worker never spends
