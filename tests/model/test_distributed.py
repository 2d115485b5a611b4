"""Data-parallel training: `chatbot train` under torchrun, 2 CPU processes with gloo over loopback.

The launched runs are small (a 1-layer model on the toy corpus) but real: torchrun starts two
workers, they rendezvous on 127.0.0.1, train with DistributedDataParallel and report a digest of
their weights at the end (the `replicas` field of the printed result).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from model.distributed import DistContext, init_from_env
from model.runs import run_training
from model.training import LOG_FILE, STATE_FILE, TrainingError, load_state
from tests.conftest import toy_conversations, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
STEPS = 120
BATCH = 8  # per process; the single-process comparison uses 2 x BATCH

CONFIG = f"""
[model]
embedding_dim = 32
hidden_size = 48
num_layers = 1
dropout = 0.1
max_source_len = 32
max_target_len = 16

[tokenizer]
vocab_size = 300
min_frequency = 1

[train]
batch_size = {BATCH}
max_steps = {STEPS}
learning_rate = 0.01
warmup_steps = 10
eval_every = 40
log_every = 10
checkpoint_every = 20
num_threads = 1
seed = 5
valid_fraction = 0.1
precision = "fp32"  # "auto" times both precisions at start: two runs could choose differently
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_cmd(corpus: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "app.cli", "train", "--corpus", str(corpus), "--out", str(out),
            "--config", str(config), "--no-progress", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # loopback only, one thread per worker (2 cores), CPU even where a GPU is present
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT))
    return env


def _launch(cmd: list[str], logs: Path) -> subprocess.Popen[bytes]:
    # files, not pipes: nobody reads while the test waits, and a full pipe would stall the workers
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=open(logs.with_suffix(".out"), "wb"),
                            stderr=open(logs.with_suffix(".err"), "wb"))


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM (a SIGKILL would orphan them)
        proc.wait(timeout=60)
        raise


def _finish(proc: subprocess.Popen[bytes], logs: Path, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    rc = _wait(proc, timeout)
    stdout = logs.with_suffix(".out").read_text()
    stderr = logs.with_suffix(".err").read_text()
    start = stdout.find("{")
    assert start >= 0, f"no result printed (rc {rc}):\n{stdout}\n{stderr[-3000:]}"
    return rc, json.loads(stdout[start:])


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / LOG_FILE).read_text().splitlines() if line.strip()]


def _assert_one_checkpoint(out: Path) -> None:
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    for name in ("config.json", "tokenizer.json", "metrics.json", STATE_FILE, LOG_FILE):
        assert (out / name).is_file(), name
    steps = _log_steps(out)
    assert steps == sorted(set(steps)), f"duplicated or unordered steps in log.jsonl: {steps}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_jsonl(root / "toy.jsonl", toy_conversations(200, seed=3))
    (root / "tiny.toml").write_text(CONFIG, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ddp_run(workdir: Path) -> dict[str, Any]:
    """One uninterrupted 2-process run to STEPS."""
    out = workdir / "ddp"
    proc = _launch(_torchrun_cmd(workdir / "toy.jsonl", out, workdir / "tiny.toml"), workdir / "ddp")
    rc, result = _finish(proc, workdir / "ddp")
    assert rc == 0, (workdir / "ddp.err").read_text()[-3000:]
    return result


# -- no processes needed ------------------------------------------------------------

def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                       device=torch.device("cpu"), backend="gloo")


def test_shard_splits_each_global_batch_into_one_slice_per_rank() -> None:
    batches = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16]]
    shards = [_ctx(r, 3).shard(batches) for r in range(3)]
    # same number of steps everywhere; a batch too small to give every rank a pair is skipped
    assert shards == [[[0, 1], [6, 7], [14]], [[2, 3], [8, 9], [15]], [[4, 5], [10, 11, 12], [16]]]
    kept = [batches[0], batches[1], batches[3]]
    for step in range(3):  # the slices of a step make up its global batch, with no pair twice
        assert sorted(i for s in shards for i in s[step]) == kept[step]


def test_shard_refuses_a_corpus_too_small_for_the_processes() -> None:
    with pytest.raises(TrainingError, match="each of the 4 processes"):
        _ctx(0, 4).shard([[0, 1, 2], [3]])


def test_a_plain_run_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is None


def test_world_size_without_torchrun_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(TrainingError, match="torchrun"):
        init_from_env()


def test_per_step_seeds_differ_by_rank_and_step() -> None:
    import random

    def draw(rank: int, step: int) -> tuple[float, float]:
        rng = random.Random(0)
        _ctx(rank, 2).seed_step(5, step, rng)
        return float(torch.rand(1)), rng.random()

    with torch.random.fork_rng():  # leave the session's generator as it was
        assert draw(0, 3) == draw(0, 3)
        assert len({draw(0, 3), draw(1, 3), draw(0, 4)}) == 3


# -- launched under torchrun ----------------------------------------------------------
# Each launch takes about 10 s on an idle 2-core machine; the timeouts are generous because a
# machine shared with other jobs can be many times slower, and they only exist to catch a hang.

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_write_one_checkpoint_and_end_with_identical_replicas(
        ddp_run: dict[str, Any], workdir: Path) -> None:
    out = workdir / "ddp"
    assert ddp_run["world_size"] == 2 and ddp_run["step"] == STEPS and not ddp_run["interrupted"]
    replicas = ddp_run["replicas"]
    assert replicas["identical"] and replicas["max_abs_diff"] == 0.0
    assert len(replicas["digests"]) == 2 and len(set(replicas["digests"])) == 1
    _assert_one_checkpoint(out)
    # rank 0 alone logged: every logged step exactly once
    assert _log_steps(out) == list(range(10, STEPS + 1, 10))
    assert load_state(out)["step"] == STEPS
    assert (workdir / "ddp.out").read_text().count('"replicas"') == 1  # rank 0 alone printed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_validation_loss_is_close_to_one_process_over_the_same_global_batch(
        ddp_run: dict[str, Any], workdir: Path) -> None:
    threads = torch.get_num_threads()
    try:
        single = run_training(corpus=str(workdir / "toy.jsonl"), out=workdir / "single",
                              config=workdir / "tiny.toml", progress=False,
                              overrides={"train": {"batch_size": 2 * BATCH}})
    finally:
        torch.set_num_threads(threads)
    ddp_val, single_val = ddp_run["last"]["val_loss"], single["last"]["val_loss"]
    assert single["step"] == ddp_run["step"] == STEPS
    assert abs(ddp_val - single_val) / single_val < 0.05, (ddp_val, single_val)
    # and both learned something: far below the loss of a uniform guess over the vocabulary
    assert ddp_val < 0.6 * torch.log(torch.tensor(300.0)).item()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sigterm_saves_once_and_resume_continues_bit_for_bit(ddp_run: dict[str, Any], workdir: Path) -> None:
    out = workdir / "killed"
    # the same run as ddp_run, stopped by SIGTERM as soon as it has logged its first steps
    proc = _launch(_torchrun_cmd(workdir / "toy.jsonl", out, workdir / "tiny.toml"), workdir / "killed")
    deadline = time.monotonic() + 600
    logged = False
    while not logged and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        logged = (out / LOG_FILE).is_file() and bool((out / LOG_FILE).read_text().strip())
    assert proc.poll() is None, (workdir / "killed.err").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, stopped = _finish(proc, workdir / "killed", timeout=120)
    assert logged, "the run logged no step in time"
    saved = load_state(out)["step"]
    assert stopped["interrupted"] and stopped["step"] == saved
    assert stopped["replicas"]["identical"]
    assert 10 <= saved < STEPS, f"the signal landed at step {saved}; the test needs it before {STEPS}"
    assert max(_log_steps(out)) <= saved

    proc = _launch(_torchrun_cmd(workdir / "toy.jsonl", out, workdir / "tiny.toml", "--resume"),
                   workdir / "resumed")
    rc, resumed = _finish(proc, workdir / "resumed")
    assert rc == 0, (workdir / "resumed.err").read_text()[-3000:]
    assert resumed["step"] == STEPS
    _assert_one_checkpoint(out)
    steps = _log_steps(out)
    assert steps[-1] == STEPS and [s for s in steps if s > saved] == list(range(saved // 10 * 10 + 10,
                                                                                STEPS + 1, 10))
    # same data position, optimiser state and per-rank random streams: the same weights as never stopped
    assert resumed["replicas"]["identical"]
    assert resumed["replicas"]["digests"] == ddp_run["replicas"]["digests"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_setup_error_on_rank_0_stops_every_rank_with_its_message(workdir: Path) -> None:
    out = workdir / "nothing-to-resume"
    proc = _launch(_torchrun_cmd(workdir / "toy.jsonl", out, workdir / "tiny.toml", "--resume"),
                   workdir / "error")
    rc = _wait(proc, 600)
    err = (workdir / "error.err").read_text()
    assert rc != 0
    assert err.count("no training state to resume from") >= 2, err[-3000:]  # both ranks say why
