"""Faults: clients that leave mid-stream, SIGTERM under load, broken or hostile checkpoints,
training killed with SIGKILL at random moments, a full disk while training."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.batching import default_step
from app.cli import main as chatbot_main
from model import checkpoint as checkpoint_module
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.tokenizer import EOS_ID
from model.training import STATE_FILE, TrainingError, load_state
from tests.api.conftest import on_a_port, serving
from tests.conftest import GREETINGS, write_tsv

from .conftest import ROOT, free_port, subprocess_env, wait_ready


# -- a client that leaves mid-stream ------------------------------------------------------------
class EndlessSlowStep:
    """The model's step with </s> forbidden and a pause: every reply runs to max_length."""

    def __init__(self, ckpt: Checkpoint, delay: float) -> None:
        self.step = default_step(ckpt.model)
        self.delay = delay
        self.calls = 0

    def __call__(self, tokens: Any, rows: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        logp, rows = self.step(tokens, rows)
        logp = logp.clone()
        logp[:, EOS_ID] = float("-inf")
        return logp, rows


def test_a_client_that_disconnects_mid_stream_frees_its_slot(make_app, ckpt: Checkpoint) -> None:
    step = EndlessSlowStep(ckpt, delay=0.04)
    app, engine = make_app(step=step, max_batch_size=1)  # one slot: the next request needs it
    body = {"model": "m", "stream": True, "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}]}
    with on_a_port(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]  # a few tokens in: the stream is running
                assert any('"content"' in line for line in got)
                assert engine.active_requests == 1
            # The client hung up 256 * 0.04 s = 10 s before the reply would have ended.
            left_at = step.calls
            start = time.monotonic()
            r = client.post("/api/chat", json={"message": "hello", "max_length": 3}, timeout=8)
            assert r.status_code == 200, r.text
            assert time.monotonic() - start < 8
        deadline = time.monotonic() + 5
        while engine.active_requests or engine.queue_depth:
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.02)
        assert step.calls - left_at < 60, "the abandoned stream kept decoding"
        assert engine._active_rows == 0


# -- SIGTERM under load ---------------------------------------------------------------------------
# Loaded at start-up by every Python process of the server (the HTTP process and the model
# worker it spawns) through PYTHONPATH: every decoder step takes 20 ms more, so that requests
# stay in flight.
SLOW_STEP = """
import time
import app.batching as batching
real = batching.default_step
def slow(model):
    step = real(model)
    def run(tokens, rows):
        time.sleep(0.02)
        return step(tokens, rows)
    return run
batching.default_step = slow
"""


def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    try:
        r = httpx.post(url + path, json=body, timeout=120)
        return r.status_code, r.text
    except httpx.HTTPError as exc:
        return -1, repr(exc)


@pytest.mark.parametrize("model_process", ["true", "false"])
def test_sigterm_under_load_finishes_every_request_in_flight(tiny_checkpoint: Path, tmp_path: Path,
                                                             model_process: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "sitecustomize.py").write_text(SLOW_STEP)
    # the reference step, which SLOW_STEP slows down (the fast step is the default)
    env = subprocess_env(CHATBOT_MAX_BATCH_SIZE="4", CHATBOT_LOG_LEVEL="warning",
                         CHATBOT_SHUTDOWN_TIMEOUT_S="60", CHATBOT_FAST_DECODER="false",
                         CHATBOT_MODEL_PROCESS=model_process)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                             "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(proc, url)
        bodies: list[tuple[str, dict[str, Any]]] = []
        for i in range(30):
            if i % 3 == 0:
                bodies.append(("/api/chat", {"message": f"do you like cats {i}", "strategy": "beam",
                                             "beam_size": 4, "max_length": 30}))
            elif i % 3 == 1:
                bodies.append(("/api/chat", {"message": f"hello {i}", "max_length": 30}))
            else:
                bodies.append(("/v1/chat/completions", {"model": "m", "max_tokens": 30, "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}]}))
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(_post, url, path, body) for path, body in bodies]
            deadline = time.monotonic() + 60
            while True:  # wait until every request has arrived and a queue waits behind the batch
                metrics = httpx.get(f"{url}/metrics", timeout=10).text
                gauges = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith(("chatbot_queue_depth ", "chatbot_active_requests "))}
                waiting = gauges["chatbot_queue_depth"] + gauges["chatbot_active_requests"]
                if waiting + sum(f.done() for f in futures) >= len(bodies) and gauges["chatbot_queue_depth"]:
                    break
                assert time.monotonic() < deadline and not all(f.done() for f in futures)
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        code = proc.wait(timeout=120)
        output = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [s for s, _ in results] == [200] * len(bodies), [r for r in results if r[0] != 200][:3]
    for (path, _), (_, text) in zip(bodies, results, strict=True):
        if path == "/v1/chat/completions":
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    # a drained, graceful stop exits 0 (app.server stops uvicorn re-raising the signal)
    assert code == 0, (code, output[-2000:])
    assert "Traceback" not in output and "ERROR" not in output, output[-2000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


# -- broken and hostile checkpoints -----------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_serve_refuses_missing_partial_corrupt_and_pickled_checkpoints(tiny_checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    cases: dict[str, tuple[Path, Path]] = {}  # name -> (checkpoint dir, the file the message names)
    cases["missing"] = (tmp_path / "nowhere", tmp_path / "nowhere")
    partial = _copy(tiny_checkpoint, tmp_path / "partial")
    (partial / "model.safetensors").unlink()
    cases["partial"] = (partial, partial / "model.safetensors")
    corrupt = _copy(tiny_checkpoint, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])  # cut off mid-write
    cases["corrupt"] = (corrupt, weights)
    pickled = _copy(tiny_checkpoint, tmp_path / "pickled")
    (pickled / "model.safetensors").write_bytes(pickle.dumps(Payload(marker), protocol=0))  # no \x80 head
    cases["pickled"] = (pickled, pickled / "model.safetensors")
    saved = _copy(tiny_checkpoint, tmp_path / "torch-saved")
    torch.save({"weights": Payload(marker)}, saved / "model.safetensors")
    cases["torch.save"] = (saved, saved / "model.safetensors")

    env = subprocess_env()
    procs = {name: subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(ck),
                                     "--host", "127.0.0.1", "--port", str(free_port())], env=env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (ck, _) in cases.items()}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            named = cases[name][1]
            assert proc.returncode == 2, (name, proc.returncode, err[-1500:])
            assert f"cannot load checkpoint {cases[name][0]}" in err and str(named) in err, (name, err)
            assert "Traceback" not in err + out, (name, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert not marker.exists(), "a checkpoint ran code"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_in_any_checkpoint_file_is_refused_and_never_run(tiny_checkpoint: Path, tmp_path: Path,
                                                                  protocol: int) -> None:
    marker = tmp_path / "PWNED"
    for name in ("config.json", "tokenizer.json", "model.safetensors", "metrics.json"):
        ck = _copy(tiny_checkpoint, tmp_path / f"ck-{name}")
        (ck / name).write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
        with pytest.raises(CheckpointError, match=re.escape(str(ck / name))):
            load_checkpoint(ck)
    # The resumable training state is read with weights_only: a pickle there is refused too.
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps({"step": Payload(marker)}, protocol=protocol))
    with pytest.raises(TrainingError, match=STATE_FILE):
        load_state(tmp_path)
    assert not marker.exists(), "a checkpoint ran code"


# -- training killed at random moments --------------------------------------------------------------
TINY_TOML = """
[model]
embedding_dim = 16
hidden_size = 24
num_layers = 1
dropout = 0.1
max_source_len = 24
max_target_len = 12

[tokenizer]
vocab_size = 200
min_frequency = 1

[train]
batch_size = 8
learning_rate = 0.01
warmup_steps = 5
eval_every = 5
checkpoint_every = 2
log_every = 1
seed = 3
"""
MAX_STEPS = 90


def _logged_steps(out: Path) -> list[int]:
    try:
        text = (out / "log.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
            steps.append(int(json.loads(line)["step"]))
    return steps


def _train(corpus: Path, out: Path, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "train", "--corpus", str(corpus),
                             "--out", str(out), "--config", str(config), "--max-steps", str(MAX_STEPS),
                             "--threads", "1", "--no-progress", *extra], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_training_killed_at_random_moments_always_resumes_to_the_end(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    corpus = write_tsv(tmp_path / "pairs.tsv", GREETINGS * 8)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML, encoding="utf-8")
    out = tmp_path / "run"
    for kill, (low, high) in enumerate([(8, 25), (35, 50), (60, 75)]):
        target = rng.randint(low, high)
        proc = _train(corpus, out, config, *(["--resume"] if kill else []))
        deadline = time.monotonic() + 240
        while max(_logged_steps(out), default=0) < target:
            assert proc.poll() is None, (seed, kill, proc.communicate()[1][-2000:])
            assert time.monotonic() < deadline, (seed, kill, "training made no progress")
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # anywhere in a step: mid-forward, mid-save, mid-log
        assert proc.poll() is None, (seed, kill, "the run ended before the kill")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        killed_at = max(_logged_steps(out))
        # What a SIGKILL leaves: a checkpoint that loads and a state to resume from.
        ck = load_checkpoint(out)
        assert ck.metrics["step"] <= killed_at and ck.model.cfg.hidden_size == 24
        state = load_state(out)
        assert 0 < state["step"] <= killed_at, (seed, kill, state["step"], killed_at)
    done = _train(corpus, out, config, "--resume")
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, (seed, stderr[-2000:])
    assert json.loads(stdout)["step"] == MAX_STEPS
    assert load_state(out)["step"] == MAX_STEPS
    assert _logged_steps(out) == list(range(1, MAX_STEPS + 1)), seed  # each step logged once, none lost
    ck = load_checkpoint(out)
    assert ck.metrics["step"] % 5 == 0 or ck.metrics["step"] == MAX_STEPS


# -- a full disk while training --------------------------------------------------------------------
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", STATE_FILE)


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _fill_the_disk(how: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make writing the checkpoint or state under `out` fail as a full disk does."""
    def ours(path: Any) -> bool:
        return Path(path).parent.resolve() == out.resolve() and Path(path).name in CHECKPOINT_FILES

    if how == "rename":
        real_replace = os.replace

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            if ours(dst):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_replace(src, dst, **kw)
        monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    else:  # the writers fail the way they really do on a full tmpfs
        from safetensors import SafetensorError

        def torch_save(*args: Any, **kw: Any) -> None:  # not even an OSError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        def save_file(*args: Any, **kw: Any) -> None:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(checkpoint_module, "save_file", save_file)


@pytest.mark.parametrize("how", ["rename", "write"])
def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path: Path, how: str,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    corpus = write_tsv(tmp_path / "pairs.tsv", GREETINGS * 4)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML, encoding="utf-8")
    out = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), "--out", str(out), "--config", str(config), "--threads", "1",
            "--no-progress"]
    assert chatbot_main([*args, "--max-steps", "10"]) == 0
    before = _tree(out)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _fill_the_disk(how, out, m)
        assert chatbot_main([*args, "--max-steps", "20", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"chatbot train: error: cannot write {out / STATE_FILE}: " in err, err
    assert "Traceback" not in err
    after = _tree(out)
    for name in CHECKPOINT_FILES:
        assert after[name] == before[name], name  # the previous checkpoint and state, untouched
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    assert load_checkpoint(out).metrics["step"] == 10 and load_state(out)["step"] == 10
    assert chatbot_main([*args, "--max-steps", "20", "--resume"]) == 0  # space again: it carries on
    assert load_state(out)["step"] == 20


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_keeps_the_old_one(
        ckpt: Checkpoint, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy(tiny_checkpoint, tmp_path / "ck")
    before = _tree(out)
    _fill_the_disk("write", out, monkeypatch)
    with pytest.raises(OSError, match=r"cannot write .*model\.safetensors: .*No space left on device"):
        checkpoint_module.save_checkpoint(out, ckpt.model, ckpt.tokenizer, metrics={"step": 1})
    assert _tree(out) == before
    assert load_checkpoint(out).metrics == ckpt.metrics


def test_an_output_path_under_a_file_fails_with_a_message_naming_it(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    corpus = write_tsv(tmp_path / "pairs.tsv", GREETINGS * 4)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory is expected")
    for out in (blocker / "run", blocker):
        code = chatbot_main(["train", "--corpus", str(corpus), "--out", str(out), "--max-steps", "2",
                             "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and str(blocker) in err and "Traceback" not in err, err
    assert blocker.read_text() == "a file where a directory is expected"


# -- deadlines at scale ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_requests_past_their_deadline_leave_no_error_behind(make_app, ckpt: Checkpoint,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Many requests racing a short deadline: each gets 200 or 504 (streams: an error event),
    and no failure is left unread for asyncio to log as "Future exception was never retrieved"."""
    step = default_step(ckpt.model)

    def slow(tokens: Any, rows: Any) -> Any:
        time.sleep(0.003)
        return step(tokens, rows)

    app, engine = make_app(step=slow, request_timeout_s=0.03, max_batch_size=8)
    bodies = [("/api/chat", {"message": "hello", "max_length": 20}),
              ("/v1/chat/completions", {"model": "m", "stream": True, "max_tokens": 20,
                                        "messages": [{"role": "user", "content": "hi"}]})]
    async with serving(app) as client:
        for _ in range(3):
            responses = await asyncio.gather(*(
                client.post(path, json=body) for _ in range(30) for path, body in bodies))
            assert {r.status_code for r in responses} <= {200, 504}
        while engine.active_requests or engine.queue_depth:
            await asyncio.sleep(0.01)
    assert any(r.status_code == 504 for r in responses)
    gc.collect()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:3]
