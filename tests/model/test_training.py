"""`chatbot train` and `chatbot eval` end to end, on tiny corpora and configs made here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.cli import main
from model.checkpoint import load_checkpoint
from tests.conftest import GREETINGS, toy_conversations, write_jsonl, write_tsv

TINY_TOML = """
[model]
embedding_dim = 16
hidden_size = 32
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
eval_every = 10
checkpoint_every = 5
log_every = 5
num_threads = 1
seed = 3
precision = "fp32"  # "auto" times both precisions at start: two runs could choose differently
"""


@pytest.fixture()
def tiny_toml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML, encoding="utf-8")
    return path


@pytest.fixture()
def user_tsv(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "mine.tsv", GREETINGS * 8)


def train_cmd(corpus: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "train", "--corpus", str(corpus), "--out", str(out),
            "--config", str(config), "--no-progress", *extra]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_training_writes_checkpoint_log_and_curve(tmp_path, tiny_toml, kind, capsys) -> None:
    corpus = (write_tsv(tmp_path / "c.tsv", GREETINGS * 6) if kind == "tsv"
              else write_jsonl(tmp_path / "c.jsonl", toy_conversations(60)))
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), "--config", str(tiny_toml),
                 "--max-steps", "20", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 20
    ck = load_checkpoint(out)  # serve and eval can use it
    assert ck.metrics["step"] in (10, 20) and ck.model.cfg.hidden_size == 32
    log = read_log(out)
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    assert all("loss" in r for r in log) and "val_loss" in log[1] and "val_loss" in log[3]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train_state.pt").is_file()


def test_a_killed_run_resumes_from_its_saved_step_and_matches_an_unbroken_run(tmp_path, tiny_toml,
                                                                              user_tsv) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(user_tsv, straight, tiny_toml, "--max-steps", "60"), check=True, env=env,
                   capture_output=True, timeout=240)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(train_cmd(user_tsv, broken, tiny_toml, "--max-steps", "60"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        log = broken / "log.jsonl"
        if log.exists() and any(r["step"] >= 15 for r in read_log(broken)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(broken / "train_state.pt", weights_only=True)["step"]
    assert 5 <= saved < 60, "the kill should land mid-run"

    done = subprocess.run(train_cmd(user_tsv, broken, tiny_toml, "--max-steps", "60", "--resume"),
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_log(broken)]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step logged twice, none lost
    a = torch.load(straight / "train_state.pt", weights_only=True)
    b = torch.load(broken / "train_state.pt", weights_only=True)
    assert b["step"] == 60
    for name, tensor in a["model"].items():  # bit for bit on one thread
        assert torch.equal(tensor, b["model"][name]), name
    assert load_file(straight / "model.safetensors").keys() == load_file(broken / "model.safetensors").keys()


def test_sigterm_saves_state_before_exiting(tmp_path, tiny_toml, user_tsv) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(user_tsv, out, tiny_toml, "--max-steps", "100000"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "log.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    result = json.loads(stdout)
    assert result["interrupted"] is True
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == result["step"]


def test_resume_with_a_changed_model_config_is_refused(tmp_path, tiny_toml, user_tsv, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(user_tsv), "--out", str(out), "--config", str(tiny_toml),
                 "--max-steps", "5", "--no-progress"]) == 0
    bigger = tmp_path / "bigger.toml"
    bigger.write_text(TINY_TOML.replace("hidden_size = 32", "hidden_size = 64"))
    capsys.readouterr()
    assert main(["train", "--corpus", str(user_tsv), "--out", str(out), "--config", str(bigger),
                 "--max-steps", "10", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "hidden_size: 32 -> 64" in err


def test_training_into_an_existing_run_without_resume_is_refused(tmp_path, tiny_toml, user_tsv,
                                                                 capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "--corpus", str(user_tsv), "--out", str(out), "--config", str(tiny_toml),
            "--max-steps", "5", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_malformed_corpus_lines_are_reported_by_the_cli(tmp_path, tiny_toml, capsys) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("hi\thello\nhow are you\tfine\tthanks\n", encoding="utf-8")
    assert main(["train", "--corpus", str(bad), "--out", str(tmp_path / "run"), "--config",
                 str(tiny_toml), "--no-progress"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_unknown_config_keys_are_refused(tmp_path, user_tsv, capsys) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[model]\nhiden_size = 12\n")
    assert main(["train", "--corpus", str(user_tsv), "--out", str(tmp_path / "run"), "--config",
                 str(cfg), "--no-progress"]) == 2
    assert "hiden_size" in capsys.readouterr().err


def test_eval_prints_the_documented_fields(tiny_checkpoint, toy_jsonl, capsys) -> None:
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--corpus", str(toy_jsonl),
                 "--split", "test", "--max-generate", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "word_perplexity", "bleu", "distinct_1", "distinct_2", "num_pairs"):
        assert isinstance(result[key], (int, float)), key
    assert result["num_pairs"] > 0 and result["perplexity"] > 1
    assert 0 <= result["distinct_1"] <= 1 and len(result["samples"]) == 10
    assert {"prompt", "greedy", "beam"} <= set(result["samples"][0])


def test_eval_of_a_missing_checkpoint_names_the_path(tmp_path, capsys) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
