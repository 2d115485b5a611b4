"""The engine in a model worker process (app/remote_engine.py, app/model_worker.py): the same
answers as in-process, its metrics, streaming, deadlines, cancelling, a worker that dies or
cannot start, and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.errors import DeadlineExceeded, NotReady, Overloaded
from app.factory import build_engine
from app.main import create_app
from app.remote_engine import RemoteEngine
from model.checkpoint import Checkpoint
from model.decoding import DecodeOptions
from tests.api.conftest import PROMPTS, make_settings, reference, serving
from tests.reliability.conftest import ROOT, free_port, subprocess_env, wait_ready

pytestmark = pytest.mark.anyio

# Loaded by the worker at start-up through PYTHONPATH (the test process has started already):
# while the file TEST_GATE exists, every decoder step but a worker's first two (its warm-up decode of
# max_length 2, so that a restarted worker gets ready) waits (and says so in TEST_GATE.waiting);
# with TEST_FAIL_WORKER set, the worker cannot build its engine.
HOOK = """
import os, time
import app.batching as batching
import app.factory
real = batching.default_step
def gated(model):
    step = real(model)
    gate = os.environ["TEST_GATE"]
    calls = [0]
    def run(tokens, rows):
        calls[0] += 1
        while calls[0] > 2 and os.path.exists(gate):
            open(gate + ".waiting", "w").close()
            time.sleep(0.005)
        return step(tokens, rows)
    return run
batching.default_step = gated
if os.environ.get("TEST_FAIL_WORKER"):
    def broken(*args, **kwargs):
        raise RuntimeError("the test broke this worker")
    app.factory.load_engine = broken
"""


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The path whose existence holds the worker's decoder steps (workers started from now on)."""
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH"))
                                                     if p))
    path = tmp_path / "gate"
    monkeypatch.setenv("TEST_GATE", str(path))
    return path


@pytest.fixture
async def remote(tiny_checkpoint: Path, gate: Path) -> AsyncIterator[RemoteEngine]:
    engine = build_engine(make_settings(tiny_checkpoint, model_process=True, fast_decoder=False,
                                        request_timeout_s=2.0))
    assert isinstance(engine, RemoteEngine)
    engine.start()
    await engine.wait_ready()
    try:
        yield engine
    finally:
        gate.unlink(missing_ok=True)
        await engine.aclose(timeout=5)


async def _held(gate: Path) -> None:
    """Wait until a decoder step waits at the gate."""
    waiting = gate.with_name(gate.name + ".waiting")
    waiting.unlink(missing_ok=True)
    deadline = time.monotonic() + 20
    while not waiting.exists():
        assert time.monotonic() < deadline, "no decoder step reached the gate"
        await asyncio.sleep(0.01)


async def test_the_worker_answers_as_the_model_does_alone(tiny_checkpoint: Path, ckpt: Checkpoint) -> None:
    app = create_app(make_settings(tiny_checkpoint, model_process=True))
    greedy = DecodeOptions(strategy="greedy", beam_size=1, n_best=1, max_length=20, min_length=2,
                           no_repeat_ngram_size=3)
    beam = DecodeOptions(strategy="beam", beam_size=4, n_best=4, max_length=20, min_length=2,
                         no_repeat_ngram_size=3)
    async with serving(app) as client:
        assert isinstance(app.state.engine, RemoteEngine)
        for opts in (greedy, beam):
            bodies = [{"message": p, "strategy": opts.strategy, "beam_size": 4, "max_length": 20,
                       "no_repeat_ngram_size": 3} for p in PROMPTS[:6]]
            answers = await asyncio.gather(*(client.post("/api/chat", json=b) for b in bodies))
            assert [r.status_code for r in answers] == [200] * len(bodies)
            assert [r.json()["reply"] for r in answers] == \
                [reference(ckpt, [p], opts)[0] for p in PROMPTS[:6]], opts.strategy
        # a streamed reply arrives in pieces that add up to the same reply
        body = {"model": "m", "stream": True, "max_tokens": 20, "no_repeat_ngram_size": 3,
                "messages": [{"role": "user", "content": PROMPTS[0]}]}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"error"' not in "".join(events)
        pieces = [e for e in events if '"content": "' in e]
        assert len(pieces) > 2
        text = "".join(httpx.Response(200, content=e[6:]).json()["choices"][0]["delta"].get("content", "")
                       for e in events[:-1])
        assert text == reference(ckpt, [PROMPTS[0]], greedy)[0]

        # /metrics joins the HTTP process's families and the worker's, each once
        metrics = (await client.get("/metrics")).text
        types = [line for line in metrics.splitlines() if line.startswith("# TYPE")]
        assert len(types) == len(set(types))
        samples = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
                   if line and not line.startswith("#")}
        assert samples["chatbot_step_seconds_count"] > 0 and samples["chatbot_generated_tokens_total"] > 0
        assert samples['chatbot_requests_total{method="POST",route="/api/chat",status="200"}'] == 12
        assert samples["chatbot_active_requests"] == 0
        info = (await client.get("/api/model")).json()
        assert info["engine"]["model_process"] is True and info["engine"]["worker_pid"] != os.getpid()


async def test_deadlines_and_cancels_reach_the_worker(remote: RemoteEngine, gate: Path) -> None:
    opts = DecodeOptions(max_length=10)
    gate.touch()
    late = remote.submit([5, 6, 7], opts, timeout=0.3)
    await _held(gate)
    with pytest.raises(DeadlineExceeded):  # on time, though the worker is stuck in a step
        await asyncio.wait_for(late.result(), 1.5)
    dropped = remote.submit([5, 6, 8], opts, stream=True, timeout=30)
    await asyncio.sleep(0.2)
    dropped.cancel()
    gate.unlink()
    answered = await remote.submit([5, 6, 9], opts, timeout=30).result()
    assert answered.hypotheses and answered.prompt_tokens == 3
    deadline = time.monotonic() + 5
    while b"chatbot_active_requests 0.0" not in await remote.exposition():
        assert time.monotonic() < deadline, "the cancelled request stayed in the worker's batch"
        await asyncio.sleep(0.05)
    assert remote.queue_depth == 0


async def test_a_killed_worker_loses_no_request(remote: RemoteEngine, gate: Path) -> None:
    """What the dead worker held goes to the next one, once; what arrives meanwhile waits for it."""
    first = remote.worker_pid
    assert first is not None
    opts = DecodeOptions(max_length=10)
    alone = await remote.submit([5, 6, 7], opts, timeout=30).result()
    gate.touch()
    held = [remote.submit([5, 6, 7], opts, timeout=30), remote.submit([5, 6, 8], opts, timeout=30)]
    await _held(gate)
    os.kill(first, signal.SIGKILL)
    while remote.ready:
        await asyncio.sleep(0.01)
    during = remote.submit([5, 6, 7], opts, timeout=30)  # no worker now: it waits for the next
    assert remote.queue_depth >= 1
    gate.unlink()
    results = await asyncio.wait_for(asyncio.gather(*(t.result() for t in [*held, during])), 60)
    assert [r.hypotheses[0].tokens for r in results[::2]] == [alone.hypotheses[0].tokens] * 2
    assert results[1].hypotheses
    assert remote.worker_pid not in (None, first) and remote.restarts == 1 and remote.ready


async def test_a_request_the_next_worker_cannot_answer_in_time_gets_503(remote: RemoteEngine,
                                                                         gate: Path) -> None:
    first = remote.worker_pid
    assert first is not None
    gate.touch()
    short = remote.submit([5, 6, 7], DecodeOptions(max_length=10), timeout=0.6)  # < restart time
    again = remote.submit([5, 6, 8], DecodeOptions(max_length=10), timeout=30)
    await _held(gate)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(NotReady) as refused:
        await asyncio.wait_for(short.result(), 5)
    assert refused.value.headers.get("Retry-After") and "restarted" in refused.value.message
    # killed a second time while it holds the request again: then it fails, with Retry-After
    deadline = time.monotonic() + 60
    while not remote.ready:
        assert time.monotonic() < deadline, "the worker did not come back"
        await asyncio.sleep(0.05)
    await _held(gate)
    assert remote.worker_pid is not None
    os.kill(remote.worker_pid, signal.SIGKILL)
    with pytest.raises(NotReady, match="restarted"):
        await asyncio.wait_for(again.result(), 10)
    gate.unlink()


async def test_a_worker_that_cannot_load_fails_the_start_with_its_reason(
        tiny_checkpoint: Path, gate: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_FAIL_WORKER", "1")
    engine = build_engine(make_settings(tiny_checkpoint, model_process=True, fast_decoder=False))
    engine.start()
    with pytest.raises(RuntimeError, match="the test broke this worker"):
        await engine.wait_ready(timeout=120)
    assert not engine.ready
    await engine.aclose(timeout=1)


async def test_shutdown_lets_the_worker_finish_what_it_holds(remote: RemoteEngine, gate: Path) -> None:
    gate.touch()
    tickets = [remote.submit([5, 6, i], DecodeOptions(max_length=8), timeout=30) for i in range(7, 11)]
    await _held(gate)
    closing = asyncio.ensure_future(remote.aclose(timeout=20))
    await asyncio.sleep(0.2)
    with pytest.raises(NotReady, match="shutting down"):
        remote.submit([5, 6], DecodeOptions(max_length=4))
    gate.unlink()
    results = await asyncio.gather(*(t.result() for t in tickets))
    assert all(r.hypotheses for r in results)
    await closing
    assert remote.worker_pid is not None and not _alive(remote.worker_pid)


def _alive(pid: int) -> bool:
    """Running (an exited process that nobody has reaped yet is a zombie: not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_worker_exits_when_the_server_is_killed(tiny_checkpoint: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                             "--port", str(port)], env=subprocess_env(CHATBOT_LOG_LEVEL="warning"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, url)
        worker = httpx.get(f"{url}/api/model", timeout=10).json()["engine"]["worker_pid"]
        assert worker != proc.pid
        assert _alive(worker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the server"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_a_stuck_worker_bounds_what_waits_for_it(tiny_checkpoint: Path, gate: Path) -> None:
    engine = build_engine(make_settings(tiny_checkpoint, model_process=True, fast_decoder=False,
                                        max_queue=2, max_batch_size=1))
    engine.start()
    await engine.wait_ready()
    try:
        gate.touch()
        held = [engine.submit([5, 6, 7], DecodeOptions(max_length=4), timeout=30)]
        await _held(gate)
        held += [engine.submit([5, 6, i], DecodeOptions(max_length=4), timeout=30) for i in (8, 9)]
        with pytest.raises(Overloaded):  # 2 queued + 1 decoding: no more may wait on this side
            engine.submit([5, 6], DecodeOptions(max_length=4), timeout=30)
        gate.unlink()
        assert all(r.hypotheses for r in await asyncio.gather(*(t.result() for t in held)))
        assert (await engine.submit([5, 6], DecodeOptions(max_length=4), timeout=30).result()).hypotheses
    finally:
        gate.unlink(missing_ok=True)
        await engine.aclose(timeout=5)


async def test_shutdown_while_the_worker_restarts_does_not_wait_for_it(remote: RemoteEngine) -> None:
    assert remote.worker_pid is not None
    os.kill(remote.worker_pid, signal.SIGKILL)
    while remote.ready:
        await asyncio.sleep(0.01)
    began = time.monotonic()
    await remote.aclose(timeout=5)
    assert time.monotonic() - began < 3 and remote.restarts <= 1 and not remote.ready
