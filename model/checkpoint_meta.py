"""What a checkpoint directory says of itself, read without torch: config.json, tokenizer.json
and metrics.json (model/checkpoint.py loads the weights beside them). The HTTP process of
`chatbot serve` needs no more than this: it tokenises, and the model worker holds the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig, from_dict
from .tokenizer import Tokenizer

FORMAT = "seq2seq-chatbot/1"
FILES = ("config.json", "tokenizer.json", "model.safetensors", "metrics.json")
REVERSE_DIR = "reverse"  # a checkpoint's reverse model, for MMI reranking


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class CheckpointMeta:
    config: dict[str, Any]
    cfg: ModelConfig
    tokenizer: Tokenizer
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        return checkpoint_name(self.config, self.path)


def checkpoint_name(config: dict[str, Any], path: Path | None) -> str:
    return str(config.get("name") or (path.name if path else "seq2seq"))


def read_meta(directory: Path | str, *, defer_tokenizer: bool = False) -> CheckpointMeta:
    """config.json (its format and model section), tokenizer.json (matching the vocabulary),
    metrics.json if there, and that model.safetensors is there and no pickle (its tensors are
    checked where they load); CheckpointError names the file at fault. `defer_tokenizer`: the
    tokenizer is built on first use (`Tokenizer.deferred`), for a process that never tokenises
    and whose checkpoint another has read in full (the model worker: the HTTP process did)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config = read_json(directory / "config.json")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{directory / 'config.json'}: unknown format {config.get('format')!r}")
    try:
        cfg = from_dict(ModelConfig, dict(config.get("model") or {}), section="model")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: bad model config ({exc})") from None
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path}: missing")
    lowercase = bool(config.get("tokenizer", {}).get("lowercase"))
    try:
        text = tok_path.read_text(encoding="utf-8")
        tokenizer = (Tokenizer.deferred(text, lowercase=lowercase) if defer_tokenizer
                     else Tokenizer.from_str(text, lowercase=lowercase))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise CheckpointError(f"{tok_path}: not a valid tokenizer ({exc})") from None
    if not defer_tokenizer and tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{tok_path}: vocabulary of {tokenizer.vocab_size} tokens, "
                              f"but config.json says {cfg.vocab_size}")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    _refuse_pickle(weights)
    metrics_path = directory / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.exists() else {}
    return CheckpointMeta(config=config, cfg=cfg, tokenizer=tokenizer, metrics=metrics, path=directory)


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path}: looks like a pickle or torch.save archive, not safetensors; "
            "refusing to load it (pickles can run code)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def shipped_checkpoint_path() -> Path:
    """The pretrained checkpoint inside the package."""
    return Path(__file__).resolve().parent / "pretrained" / "chitchat"
