"""Starting a run from a trained checkpoint (`chatbot train --init DIR|shipped`).

The run keeps the init's tokenizer and `[model]` config (its weights only fit those) and
starts from its weights with a fresh optimiser and schedule. A config that asks for
another `[model]` or `[tokenizer]` is refused with the keys that differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, shipped_checkpoint_path
from .config import RunConfig, load_run_config, read_toml
from .training import TrainingError

SHIPPED = "shipped"
# [model] keys a run started with --init may change: they shape no weight (dropout only
# regularises training; how many turns the encoder sees and the length limits only change the
# sequences it reads and writes), so the init's weights still fit.
ADJUSTABLE_MODEL_KEYS = frozenset({"dropout", "context_turns", "max_source_len", "max_target_len"})
# [train] defaults of a run started with --init, where its config and flags do not say: a lower
# learning rate than from scratch, a short warmup, frequent validation on the user's split and
# early stopping, half of every batch from the init's own corpus (replay): measured against a
# quarter on the persona example (docs/FINETUNE.md), it kept more chat and more facts.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-4, "warmup_steps": 30, "max_steps": 400, "eval_every": 50, "patience": 3,
    "checkpoint_every": 50, "log_every": 10, "replay_ratio": 0.5,
}

# a forward run that replays: half of the embedding's change kept, but all of it in the rows of the
# corpus's own words (10 times as frequent as in the replay corpus), and half of each replayed
# target the init's own distribution; measured on the persona (docs/FINETUNE.md)
FORWARD_REPLAY_DEFAULTS: dict[str, Any] = {"embedding_blend": 0.5, "embedding_own_words": 10.0,
                                           "replay_distill": 0.5}


class InitError(TrainingError):
    """An init checkpoint that cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class InitWeights:
    state: dict[str, torch.Tensor] | None  # None when a resumed run's state holds the weights
    source: dict[str, Any]  # what the run started from, recorded in its config.json


def init_path(init: str | Path) -> Path:
    return shipped_checkpoint_path() if str(init) == SHIPPED else Path(init)


def load_init(init: str | Path) -> Checkpoint:
    try:
        return load_checkpoint(init_path(init))
    except CheckpointError as exc:
        raise InitError(f"--init {init}: {exc}") from None


def init_description(ckpt: Checkpoint, init: str | Path) -> dict[str, Any]:
    corpus = ckpt.config.get("corpus") or {}
    return {"checkpoint": SHIPPED if str(init) == SHIPPED else str(Path(init).resolve()),
            "name": ckpt.name, "corpus": corpus.get("spec"),
            "metrics": {k: ckpt.metrics[k] for k in ("step", "val_word_perplexity") if k in ckpt.metrics}}


def config_from_init(ckpt: Checkpoint, config: Path | None,
                     overrides: dict[str, dict[str, Any]] | None) -> RunConfig:
    """The run's config: [model] and [tokenizer] are the init's (but for the keys in
    ADJUSTABLE_MODEL_KEYS); [train] is the user's."""
    model = asdict(ckpt.model.cfg)
    tokenizer = {"vocab_size": ckpt.tokenizer.vocab_size, "lowercase": ckpt.tokenizer.lowercase}
    raw = read_toml(config)
    asked = {"model": {**raw.get("model", {}), **(overrides or {}).get("model", {})},
             "tokenizer": {**raw.get("tokenizer", {}), **(overrides or {}).get("tokenizer", {})}}
    changed = [f"[{section}] {k} ({have.get(k)!r} in the init, {v!r} asked)"
               for section, have in (("model", model), ("tokenizer", tokenizer))
               for k, v in asked[section].items()
               if v is not None and have.get(k, v) != v
               and not (section == "model" and k in ADJUSTABLE_MODEL_KEYS)]
    if changed:
        raise InitError("a run started with --init keeps the init checkpoint's model and tokenizer; "
                        "this config changes " + "; ".join(changed))
    asked_train = {**raw.get("train", {}),
                   **{k: v for k, v in (overrides or {}).get("train", {}).items() if v is not None}}
    train = {k: v for k, v in FINETUNE_DEFAULTS.items() if k not in asked_train}
    corpus = (ckpt.config.get("corpus") or {}).get("spec")
    if "replay_corpus" not in asked_train and corpus:
        train["replay_corpus"] = corpus  # the init's own corpus, so that it keeps its chat
    replays = asked_train.get("replay_ratio", train.get("replay_ratio", 0.0)) > 0
    if replays and not asked_train.get("reverse"):
        # a run that learns new dialogue while replaying the old keeps less of what drifts from the
        # init (measured on the persona, docs/FINETUNE.md: half the chat's loss, the facts kept);
        # a reverse model only scores, and a run on the init's own corpus (replay 0) is not a blend
        train.update({k: v for k, v in FORWARD_REPLAY_DEFAULTS.items() if k not in asked_train})
    model.update({k: v for k, v in asked["model"].items()
                  if k in ADJUSTABLE_MODEL_KEYS and v is not None})
    merged = {**(overrides or {}), "model": model,
              "tokenizer": {"lowercase": tokenizer["lowercase"], "vocab_size": tokenizer["vocab_size"]},
              "train": {**train, **{k: v for k, v in (overrides or {}).get("train", {}).items()
                                    if v is not None}}}
    return load_run_config(config, merged)
