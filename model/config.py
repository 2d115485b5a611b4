"""Configuration dataclasses for the model, the tokenizer and training.

A checkpoint carries `ModelConfig` and `TokenizerConfig` in its config.json, so
serving rebuilds the network without any of the training setup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomllib


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8000
    embedding_dim: int = 256
    hidden_size: int = 512  # decoder size; each encoder direction gets half
    num_layers: int = 2
    dropout: float = 0.1
    tie_embeddings: bool = True
    context_turns: int = 2  # how many previous turns the encoder sees
    max_source_len: int = 64  # tokens, truncated from the left
    max_target_len: int = 40  # tokens, responses are capped (not dropped)

    def __post_init__(self) -> None:
        if self.hidden_size % 2:
            raise ValueError("hidden_size must be even (the encoder is bidirectional)")
        for name in ("vocab_size", "embedding_dim", "hidden_size", "num_layers",
                     "context_turns", "max_source_len", "max_target_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = False


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # pairs per batch (a token budget caps long buckets)
    max_batch_tokens: int = 4096  # target tokens per batch at most
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    schedule: str = "cosine"  # "cosine" (decays to min_lr_ratio by max_steps) or "constant"
    min_lr_ratio: float = 0.05
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: int = 10
    eval_every: int = 500
    checkpoint_every: int = 200
    log_every: int = 20
    patience: int = 0  # early stopping after N evals without improvement; 0 disables
    clip: float = 1.0
    seed: int = 1234
    label_smoothing: float = 0.0
    teacher_forcing_ratio: float = 1.0
    num_threads: int = 0  # 0: torch default (all cores)
    max_eval_pairs: int = 4000  # validation subset size for periodic evals
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    # "auto": bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX) where a short check at start
    # measures it faster, float32 elsewhere; CUDA keeps its mixed precision in every mode but "fp32"
    precision: str = "auto"
    # train the reverse model p(context | reply) for MMI reranking: the source is the reply, the
    # target the last context turn (the message it answers)
    reverse: bool = False
    # fine-tuning: a corpus mixed into every batch so the model keeps what it knew, and the share
    # of each batch's pairs drawn from it (0: none)
    replay_corpus: str = ""
    replay_ratio: float = 0.0
    # fine-tuning: the share of the embedding's change from the init that a saved checkpoint keeps
    # (1: all of it). The embedding is tied to the output layer, so its change is what shifts the
    # chat most; keeping half of it halved the chat's loss for some of the facts (docs/FINETUNE.md).
    embedding_blend: float = 1.0
    # fine-tuning, with embedding_blend < 1: the rows of the tokens the run's own corpus uses more
    # than this many times as often as the replay corpus (its names and topics) keep all their
    # change (0: every row is blended; model/blend.py)
    embedding_own_words: float = 0.0
    # fine-tuning: on replayed pairs, the share of the target that is the init model's own
    # distribution instead of the reference (knowledge distillation; 0: the reference only), so
    # that the chat the init had is what replay keeps
    replay_distill: float = 0.0
    # fine-tuning: an in-batch contrastive term on the run's own pairs (model/contrast.py): each
    # reply must be more likely, by `contrast_margin` nats per token, than the reply of another own
    # pair of the batch that shares none of the corpus's own words, weighted by this (0: off), so a
    # question's wording picks its own fact rather than the most likely one (off by default: measured
    # on the persona, docs/FINETUNE.md, it stated no more facts on fresh questions and garbled more)
    contrast_weight: float = 0.0
    contrast_margin: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError("schedule must be 'cosine' or 'constant'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError("replay_ratio must be in [0, 1)")
        if not 0.0 < self.teacher_forcing_ratio <= 1.0:
            raise ValueError("teacher_forcing_ratio must be in (0, 1]")
        if not 0.0 <= self.embedding_blend <= 1.0:
            raise ValueError("embedding_blend must be in [0, 1]")
        if self.embedding_own_words < 0:
            raise ValueError("embedding_own_words must be >= 0")
        if not 0.0 <= self.replay_distill <= 1.0:
            raise ValueError("replay_distill must be in [0, 1]")
        if self.replay_distill and not self.replay_ratio:
            raise ValueError("replay_distill distils on replayed pairs: it needs replay_ratio > 0")
        if self.replay_distill and self.teacher_forcing_ratio < 1.0:
            raise ValueError("replay_distill needs teacher_forcing_ratio = 1 (the teacher reads "
                             "the reference)")
        if self.contrast_weight < 0:
            raise ValueError("contrast_weight must be >= 0")
        if self.contrast_margin <= 0:
            raise ValueError("contrast_margin must be > 0")
        if self.contrast_weight and self.teacher_forcing_ratio < 1.0:
            raise ValueError("contrast_weight needs teacher_forcing_ratio = 1 (replies are scored "
                             "as they are written)")


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], *, section: str) -> T:
    """Build a config dataclass, refusing unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) in [{section}]: {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def read_toml(path: Path | None) -> dict[str, Any]:
    """A config file's tables ({} for no file); ValueError naming the file if it cannot be read."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc


def load_run_config(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Read a TOML file with [model], [tokenizer] and [train] tables, then apply overrides."""
    raw = read_toml(path)
    unknown = sorted(set(raw) - {"model", "tokenizer", "train"})
    if unknown:
        raise ValueError(f"unknown table(s) in {path}: {', '.join(unknown)}")
    sections = {k: dict(raw.get(k, {})) for k in ("model", "tokenizer", "train")}
    for k, values in (overrides or {}).items():
        sections[k].update({n: v for n, v in values.items() if v is not None})
    # The tokenizer's vocabulary is the model's unless one says otherwise.
    if "vocab_size" in sections["tokenizer"] and "vocab_size" not in sections["model"]:
        sections["model"]["vocab_size"] = sections["tokenizer"]["vocab_size"]
    if "vocab_size" in sections["model"] and "vocab_size" not in sections["tokenizer"]:
        sections["tokenizer"]["vocab_size"] = sections["model"]["vocab_size"]
    return RunConfig(
        model=from_dict(ModelConfig, sections["model"], section="model"),
        tokenizer=from_dict(TokenizerConfig, sections["tokenizer"], section="tokenizer"),
        train=from_dict(TrainConfig, sections["train"], section="train"),
    )
