"""Checkpoints: a directory of config.json, tokenizer.json, model.safetensors, metrics.json.

Nothing executable: weights are safetensors (never unpickled), the rest is JSON.
Every file is written under a temporary name and renamed into place, so a crash
leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .checkpoint_meta import (  # noqa: F401  (CheckpointError, FILES, shipped_checkpoint_path: this module's API too)
    FILES,
    FORMAT,
    REVERSE_DIR,
    CheckpointError,
    checkpoint_name,
    read_meta,
    shipped_checkpoint_path,
)
from .config import ModelConfig
from .network import Seq2Seq
from .tokenizer import Tokenizer


@dataclass
class Checkpoint:
    model: Seq2Seq
    tokenizer: Tokenizer
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reverse: Reverse | None = None  # the reverse model MMI reranking scores with, if shipped

    @property
    def name(self) -> str:
        return checkpoint_name(self.config, self.path)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is read by other users (containers)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not isinstance(exc, Exception):
            raise
        # torch.save and safetensors report a full disk without the file (torch not even
        # as an OSError): say which file could not be written, as an OSError.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = OSError(f"cannot write {path}: {reason}")
        error.errno = exc.errno if isinstance(exc, OSError) else None
        raise error from exc


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_checkpoint(directory: Path, model: Seq2Seq, tokenizer: Tokenizer, *,
                    extra_config: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, half: bool = False) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        tensors.pop("out.weight", None)
    config = {"format": FORMAT, **(extra_config or {}), "model": asdict(model.cfg),
              "tokenizer": {"lowercase": tokenizer.lowercase, "vocab_size": tokenizer.vocab_size},
              "weights_dtype": str(dtype).removeprefix("torch.")}
    # Weights first: config.json is the last word on what the directory holds.
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_text(directory / "tokenizer.json", tokenizer.to_str())
    atomic_write_text(directory / "metrics.json", json.dumps(metrics or {}, indent=2))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2))


def load_checkpoint(directory: Path | str, device: torch.device | str = "cpu", *,
                    defer_tokenizer: bool = False) -> Checkpoint:
    """The model, its tokenizer (`defer_tokenizer`: built on first use, see `read_meta`) and
    its reverse model's files; CheckpointError names the file at fault."""
    meta = read_meta(directory, defer_tokenizer=defer_tokenizer)
    directory, cfg, tokenizer = Path(directory), meta.cfg, meta.tokenizer
    weights = directory / "model.safetensors"  # there, and no pickle: read_meta checked
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    model = Seq2Seq(cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("out.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match the config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{weights}: {k} has shape {tuple(v.shape)}, "
                                  f"config implies {tuple(expected[k].shape)}")
        if not torch.isfinite(v.float()).all():
            raise CheckpointError(f"{weights}: {k} holds NaN or infinite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.to(device).eval()
    reverse = Reverse(directory, device) if (directory / REVERSE_DIR).is_dir() else None
    return Checkpoint(model=model, tokenizer=tokenizer, config=meta.config, metrics=meta.metrics,
                      path=directory, reverse=reverse)


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two checkpoints' tokenizer.json hold the same tokenizer: the same bytes (as
    training writes it, `--init` and `--reverse` included) or the same JSON."""
    ta, tb = (d / "tokenizer.json" for d in (a, b))
    if ta.read_bytes() == tb.read_bytes():
        return True
    try:
        return json.loads(ta.read_text(encoding="utf-8")) == json.loads(tb.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


class Reverse:
    """A checkpoint's reverse model (`directory/reverse/`, trained with `--reverse` on the same
    tokenizer: its scores are of the forward model's token ids). Its files are checked at once;
    its weights are read on first use of `model`: it only scores candidates for rerank "mmi", so
    a server that never reranks by MMI never holds them (39 MiB for the shipped model's)."""

    def __init__(self, directory: Path, device: torch.device | str) -> None:
        path = directory / REVERSE_DIR
        meta = read_meta(path, defer_tokenizer=True)  # it only scores ids: compared, never used
        if (path / REVERSE_DIR).is_dir():
            raise CheckpointError(f"{path}: a reverse model cannot hold a reverse model of its own")
        if not (meta.config.get("training") or {}).get("reverse"):
            raise CheckpointError(f"{path / 'config.json'}: not a reverse model (trained without --reverse)")
        if not _same_tokenizer(path, directory):
            raise CheckpointError(f"{path / 'tokenizer.json'}: not the forward model's tokenizer")
        self.path, self.device, self.meta = path, device, meta
        self._checkpoint: Checkpoint | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.metrics

    @property
    def cfg(self) -> ModelConfig:
        return self.meta.cfg

    @property
    def num_parameters(self) -> int:
        """Counted from the weight file's header: no tensor read (a model built on the "meta"
        device would do too, but that first use imports 60 MiB of torch)."""
        with safe_open(self.path / "model.safetensors", framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118

    @property
    def loaded(self) -> bool:
        return self._checkpoint is not None

    @property
    def model(self) -> Seq2Seq:
        """The weights, read (and checked) on the first call from any thread."""
        with self._lock:
            if self._checkpoint is None:
                self._checkpoint = load_checkpoint(self.path, self.device)
        return self._checkpoint.model
