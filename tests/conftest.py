"""Shared fixtures: tiny corpora, a tiny tokenizer, model and checkpoint, all made here.

Nothing is downloaded. The tiny checkpoint is trained for a few seconds on a toy
dialogue corpus so that replies end with an end-of-sequence token like a real model's.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from model.checkpoint import Checkpoint, load_checkpoint
from model.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from model.network import Seq2Seq
from model.tokenizer import Tokenizer

WORDS = (
    "hello", "hi", "how", "are", "you", "fine", "thanks", "good", "morning", "evening", "what",
    "is", "your", "name", "my", "name", "bot", "do", "like", "cats", "dogs", "music", "movies",
    "food", "pizza", "tea", "coffee", "yes", "no", "maybe", "today", "weather", "sunny", "rain",
    "cold", "warm", "nice", "great", "bad", "day", "night", "see", "later", "bye",
)

GREETINGS = [
    ("hello", "hi how are you"), ("hi", "hello nice day"), ("how are you", "fine thanks and you"),
    ("what is your name", "my name is bot"), ("do you like cats", "yes i like cats"),
    ("do you like music", "yes music is great"), ("good morning", "good morning to you"),
    ("see you later", "bye see you"), ("what is the weather", "sunny and warm today"),
    ("do you like pizza", "pizza is my food"), ("good night", "good night see you"),
    ("do you like coffee", "no i like tea"),
]


def toy_conversations(n: int = 160, seed: int = 0) -> list[list[str]]:
    """Short multi-turn conversations built from a fixed list of exchanges."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        turns: list[str] = []
        for _ in range(rng.randint(1, 3)):
            q, a = rng.choice(GREETINGS)
            turns += [q, a]
        convs.append(turns)
    return convs


def write_jsonl(path: Path, conversations: list[list[str]]) -> Path:
    path.write_text("".join(json.dumps({"turns": c}) + "\n" for c in conversations), encoding="utf-8")
    return path


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return path


TINY_MODEL = ModelConfig(vocab_size=300, embedding_dim=32, hidden_size=48, num_layers=2, dropout=0.0,
                         context_turns=2, max_source_len=32, max_target_len=16)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    texts = [t for c in toy_conversations() for t in c] + [" ".join(WORDS)]
    return Tokenizer.train(texts, vocab_size=300, min_frequency=1)


@pytest.fixture()
def tiny_model(tiny_tokenizer: Tokenizer) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MODEL.__dict__, "vocab_size": tiny_tokenizer.vocab_size})
    return Seq2Seq(cfg).eval()


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "toy.jsonl", toy_conversations())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, toy_jsonl: Path) -> Path:
    """A checkpoint directory trained for a few seconds on the toy corpus."""
    from model.training import Trainer, prepare_corpus

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = RunConfig(model=TINY_MODEL, tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1),
                    train=TrainConfig(batch_size=16, max_steps=150, eval_every=150, checkpoint_every=1000,
                                      learning_rate=1e-2, warmup_steps=10, num_threads=1, seed=7))
    data = prepare_corpus(str(toy_jsonl), cfg)
    cfg = RunConfig(model=ModelConfig(**{**TINY_MODEL.__dict__, "vocab_size": data.tokenizer.vocab_size}),
                    tokenizer=cfg.tokenizer, train=cfg.train)
    Trainer(cfg, data, out, progress=False).train()
    torch.set_num_threads(os.cpu_count() or 1)
    return out


# Shared by the API and reliability tests.
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_chatbot_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; a CHATBOT_* variable in the shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("CHATBOT_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def ckpt(tiny_checkpoint: Path) -> Checkpoint:
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_checkpoint_with_reverse(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path,
                                 toy_jsonl: Path) -> Path:
    """The tiny checkpoint with a reverse model in reverse/ (`chatbot train --init ... --reverse`)."""
    import shutil

    from model.runs import run_training

    out = tmp_path_factory.mktemp("ckpt") / "tiny_mmi"
    shutil.copytree(tiny_checkpoint, out,
                    ignore=shutil.ignore_patterns("train_state.pt", "log.jsonl", "*.png"))
    train = {"reverse": True, "max_steps": 60, "eval_every": 60, "learning_rate": 1e-2, "warmup_steps": 5,
             "num_threads": 1, "precision": "fp32"}
    run_training(corpus=str(toy_jsonl), out=out / "reverse", init=tiny_checkpoint, progress=False,
                 overrides={"train": train})
    torch.set_num_threads(os.cpu_count() or 1)
    return out
