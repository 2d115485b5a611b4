"""The trainer behind `chatbot train`.

AdamW with linear warmup and cosine decay, gradient clipping, length-bucketed
batches, periodic validation that keeps the best checkpoint current in the output
directory, early stopping, and a resumable state (weights, optimiser, scheduler,
step, RNGs, data position) saved atomically, on a schedule and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write, atomic_write_text, save_checkpoint
from .config import RunConfig
from .corpus import load_corpora, make_pairs, split_conversations
from .data import Example, collate, encode_pairs, make_batches
from .evaluation import LossStats, batch_loss, evaluate_loss
from .network import Seq2Seq
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
CURVE_FILE = "loss_curve.png"


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why."""


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    summary: dict[str, Any]


def prepare_corpus(spec: str, cfg: RunConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """Load, split by conversation, train the tokenizer on the training split, encode."""
    convs = load_corpora(spec)
    t = cfg.train
    splits = split_conversations(convs, seed=t.seed, valid_fraction=t.valid_fraction,
                                 test_fraction=t.test_fraction)
    K = cfg.model.context_turns
    pairs = {name: make_pairs(getattr(splits, name), K) for name in ("train", "valid", "test")}
    if not pairs["train"]:
        raise TrainingError(f"corpus {spec!r} gives no training pair")
    if tokenizer is None:
        texts = [turn for conv in splits.train for turn in conv]
        tokenizer = Tokenizer.train(texts, vocab_size=cfg.tokenizer.vocab_size,
                                    min_frequency=cfg.tokenizer.min_frequency,
                                    lowercase=cfg.tokenizer.lowercase)
    enc = {name: encode_pairs(p, tokenizer, cfg.model) for name, p in pairs.items()}
    total = sum(len(p) for p in pairs.values())
    kept = sum(len(e) for e in enc.values())
    summary = {
        "spec": spec, "conversations": len(convs),
        "split_conversations": {k: len(getattr(splits, k)) for k in ("train", "valid", "test")},
        "pairs": {k: len(v) for k, v in enc.items()}, "pairs_total": total,
        "pairs_kept_fraction": round(kept / max(total, 1), 4), "context_turns": K,
    }
    return Corpus(tokenizer=tokenizer, train=enc["train"], valid=enc["valid"], test=enc["test"],
                  summary=summary)


def lr_factor(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    def __init__(self, cfg: RunConfig, corpus: Corpus, out: Path, *,
                 device: torch.device | None = None, progress: bool = True,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.corpus = corpus
        self.out = Path(out)
        self.device = device or pick_device()
        self.progress = progress
        t = cfg.train
        if self.device.type == "cpu":
            torch.set_num_threads(t.num_threads or os.cpu_count() or 1)
        torch.manual_seed(t.seed)
        self.rng = random.Random(t.seed)
        self.model = Seq2Seq(cfg.model).to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or "embedding" in n]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=t.learning_rate, betas=(0.9, 0.98), eps=1e-8,
        )
        self.batches_per_epoch = len(self._epoch_batches(0))
        self.total_steps = t.max_steps or t.epochs * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.schedule,
                                                t.min_lr_ratio))
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and not torch.cuda.is_bf16_supported())
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_val = math.inf
        self.bad_evals = 0
        self.elapsed = 0.0
        self.tokens_seen = 0
        rng = random.Random(t.seed + 1)  # a fixed validation subset, the same on every resume
        self.valid_subset = (rng.sample(corpus.valid, t.max_eval_pairs)
                             if len(corpus.valid) > t.max_eval_pairs else corpus.valid)
        if state is not None:
            self._load_state(state)
        self._stop_signal: int | None = None

    # -- data --------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        t = self.cfg.train
        return make_batches(self.corpus.train, batch_size=t.batch_size, max_tokens=t.max_batch_tokens,
                            seed=t.seed * 1000 + epoch)

    def _batches(self) -> Iterator[list[int]]:
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches):
                idx = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield idx
            self.epoch += 1
            self.batch_in_epoch = 0

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "config": {"model": asdict(self.cfg.model), "tokenizer": asdict(self.cfg.tokenizer)},
            "train_config": asdict(self.cfg.train),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_val": self.best_val, "bad_evals": self.bad_evals,
            "elapsed": self.elapsed, "tokens_seen": self.tokens_seen,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": _rng_to_list(self.rng.getstate()),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for k in ("step", "epoch", "batch_in_epoch", "best_val", "bad_evals", "elapsed", "tokens_seen"):
            setattr(self, k, state[k])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.rng.setstate(_rng_from_list(state["python_rng"]))

    def save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))

    # -- logging -----------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        try:
            write_curve(self.out / LOG_FILE, self.out / CURVE_FILE)
        except Exception as exc:  # a plotting failure must never stop training
            log.warning("could not draw the loss curve: %s", exc)

    # -- evaluation & checkpoints -----------------------------------------
    def validate(self) -> LossStats:
        return evaluate_loss(self.model, self.corpus.tokenizer, self.valid_subset)

    def save_best(self, stats: LossStats) -> None:
        metrics = {"step": self.step, "val_loss": round(stats.loss, 5),
                   "val_perplexity": round(stats.perplexity, 3),
                   "val_word_perplexity": round(stats.word_perplexity, 3),
                   "val_pairs": stats.pairs, "train_seconds": round(self.elapsed, 1),
                   "train_tokens": self.tokens_seen}
        save_checkpoint(self.out, self.model, self.corpus.tokenizer, metrics=metrics,
                        extra_config={"name": self.out.name, "corpus": self.corpus.summary,
                                      "training": asdict(self.cfg.train)})

    def _evaluate_and_keep_best(self, train_loss: float | None) -> dict[str, Any]:
        stats = self.validate()
        improved = stats.loss < self.best_val
        if improved:
            self.best_val = stats.loss
            self.bad_evals = 0
            self.save_best(stats)
        else:
            self.bad_evals += 1
        return {"val_loss": round(stats.loss, 5), "val_ppl": round(stats.perplexity, 3),
                "val_word_ppl": round(stats.word_perplexity, 3), "best": improved}

    # -- the loop ----------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def train(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        in_main = _is_main_thread()
        if in_main:
            for s in previous:
                signal.signal(s, self._on_signal)
        bar = _progress(self.total_steps, self.step, self.progress)
        self.model.train()
        batches = self._batches()
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        last_record: dict[str, Any] = {}
        stopped_early = False
        try:
            while self.step < self.total_steps and self._stop_signal is None:
                start = time.perf_counter()
                batch = collate([self.corpus.train[i] for i in next(batches)]).to(self.device)
                loss = self._train_step(batch)
                self.step += 1
                self.tokens_seen += batch.num_tokens
                window_loss += loss * batch.num_tokens
                window_tokens += batch.num_tokens
                self.elapsed += time.perf_counter() - start
                evaluate = self.step % t.eval_every == 0 or self.step == self.total_steps
                if self.step % t.log_every == 0 or evaluate:
                    secs = time.perf_counter() - window_start
                    record = {"step": self.step, "epoch": self.epoch,
                              "loss": round(window_loss / max(window_tokens, 1), 5),
                              "lr": self.scheduler.get_last_lr()[0],
                              "tokens_per_s": round(window_tokens / max(secs, 1e-9), 1),
                              "elapsed_s": round(self.elapsed, 1)}
                    if evaluate:
                        record.update(self._evaluate_and_keep_best(record["loss"]))
                    self._log(record)
                    last_record = record
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    **({"val": f"{record['val_loss']:.3f}"} if evaluate else {}))
                    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
                    if evaluate:
                        self._plot()
                bar.update(1)
                if self.step % t.checkpoint_every == 0:
                    self.save_state()
                if on_step is not None:
                    on_step(self.step)
                if t.patience and self.bad_evals >= t.patience:
                    stopped_early = True
                    break
        finally:
            bar.close()
            self.save_state()
            if in_main:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if not (self.out / "model.safetensors").exists():
            self.save_best(self.validate())  # a run shorter than one eval still leaves a checkpoint
        return {"step": self.step, "best_val_loss": self.best_val, "stopped_early": stopped_early,
                "interrupted": self._stop_signal is not None, "last": last_record}

    def _train_step(self, batch: Any) -> float:
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.use_amp):
            if t.teacher_forcing_ratio < 1.0:
                enc = self.model.encode(batch.src, batch.src_lens)
                feats = self.model.decode_features_sampled(batch.tgt_in, enc, t.teacher_forcing_ratio,
                                                           self.rng)
                keep = batch.tgt_out != 0
                logits = self.model.project(feats[keep])
                loss_sum = torch.nn.functional.cross_entropy(
                    logits.float(), batch.tgt_out[keep], reduction="sum",
                    label_smoothing=t.label_smoothing)
                n = int(keep.sum())
            else:
                loss_sum, n = batch_loss(self.model, batch, t.label_smoothing)
        loss = loss_sum / max(n, 1)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _rng_to_list(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_list(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.05)


def write_curve(log_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def load_state(out: Path) -> dict[str, Any]:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: no training state to resume from")
    try:
        # weights_only: tensors and plain containers only, never arbitrary objects
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: unreadable training state ({exc})") from None


def truncate_log(out: Path, step: int) -> None:
    """Drop log lines written after the state we resume from."""
    path = Path(out) / LOG_FILE
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def check_resumable(state: dict[str, Any], cfg: RunConfig, out: Path) -> None:
    saved = state["config"]
    now = {"model": asdict(cfg.model), "tokenizer": asdict(cfg.tokenizer)}
    for section in ("model", "tokenizer"):
        # the model's vocabulary follows the saved tokenizer, so it is not compared here
        diff = {k: (saved[section].get(k), v) for k, v in now[section].items()
                if saved[section].get(k) != v and (section, k) != ("model", "vocab_size")}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TrainingError(f"cannot resume {out}: the [{section}] config changed ({changes}); "
                                "train into a new --out directory instead")
