"""The trainer behind `chatbot train`.

AdamW with linear warmup and cosine decay, gradient clipping, length-bucketed
batches, periodic validation that keeps the best checkpoint current in the output
directory, early stopping, and a resumable state (weights, optimiser, scheduler,
step, RNGs, data position) saved atomically, on a schedule and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .blend import own_words, row_blend
from .checkpoint import atomic_write, atomic_write_text, save_checkpoint
from .config import RunConfig
from .contrast import pick_negatives, reply_keys
from .corpus import load_corpora, make_pairs, reverse_pairs, split_conversations
from .data import Batch, Example, collate, encode_pairs, make_batches
from .device import pick_device
from .evaluation import LossStats, batch_loss, evaluate_loss
from .network import Seq2Seq
from .precision import Precision, choose_precision, timed
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .distributed import DistContext
    from .finetune import InitWeights

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
CURVE_FILE = "loss_curve.png"
MIN_TRAIN_PAIRS = 8  # fewer: the corpus is too small to train on
PRECISION_CHECK_BATCHES = 3  # batches timed in each precision by precision = "auto"


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why."""


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    summary: dict[str, Any]
    replay: list[Example] = field(default_factory=list)  # `[train] replay_corpus`'s training pairs


def prepare_corpus(spec: str, cfg: RunConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """Load, split by conversation, train the tokenizer on the training split, encode."""
    convs = load_corpora(spec)
    t = cfg.train
    splits = split_conversations(convs, seed=t.seed, valid_fraction=t.valid_fraction,
                                 test_fraction=t.test_fraction)
    K = cfg.model.context_turns
    pairs = {name: make_pairs(getattr(splits, name), K) for name in ("train", "valid", "test")}
    if t.reverse:
        pairs = {name: reverse_pairs(p) for name, p in pairs.items()}
    if len(pairs["train"]) < MIN_TRAIN_PAIRS:
        raise TrainingError(f"corpus {spec!r} gives {len(pairs['train'])} training pairs (of "
                            f"{sum(map(len, pairs.values()))}, {len(convs)} conversations); at least "
                            f"{MIN_TRAIN_PAIRS} are needed to train on")
    if tokenizer is None:
        texts = [turn for conv in splits.train for turn in conv]
        tokenizer = Tokenizer.train(texts, vocab_size=cfg.tokenizer.vocab_size,
                                    min_frequency=cfg.tokenizer.min_frequency,
                                    lowercase=cfg.tokenizer.lowercase)
    enc = {name: encode_pairs(p, tokenizer, cfg.model) for name, p in pairs.items()}
    replay: list[Example] = []
    if t.replay_corpus and t.replay_ratio > 0:
        replay = prepare_corpus(t.replay_corpus, replace(cfg, train=replace(t, replay_corpus="")),
                                tokenizer).train
    total = sum(len(p) for p in pairs.values())
    kept = sum(len(e) for e in enc.values())
    summary = {
        "spec": spec, "conversations": len(convs),
        "split_conversations": {k: len(getattr(splits, k)) for k in ("train", "valid", "test")},
        "pairs": {k: len(v) for k, v in enc.items()}, "pairs_total": total,
        "pairs_kept_fraction": round(kept / max(total, 1), 4), "context_turns": K,
        **({"reverse": True} if t.reverse else {}),
        **({"replay": {"spec": t.replay_corpus, "pairs": len(replay), "ratio": t.replay_ratio}}
           if replay else {}),
    }
    return Corpus(tokenizer=tokenizer, train=enc["train"], valid=enc["valid"], test=enc["test"],
                  summary=summary, replay=replay)


def lr_factor(step: int, warmup: int, total: int, schedule: str, floor: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: RunConfig, corpus: Corpus, out: Path, *,
                 device: torch.device | None = None, progress: bool = True,
                 state: dict[str, Any] | None = None, dist: DistContext | None = None,
                 init: InitWeights | None = None) -> None:
        self.cfg = cfg
        self.corpus = corpus
        self.out = Path(out)
        self.device = device or pick_device()
        self.progress = progress
        # Under torchrun (model/distributed.py): rank 0 alone writes files and shows progress.
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        t = cfg.train
        if self.device.type == "cpu":
            torch.set_num_threads(t.num_threads or (dist.cpu_threads() if dist else os.cpu_count()) or 1)
        torch.manual_seed(t.seed)
        self.rng = random.Random(t.seed)
        self.model = Seq2Seq(cfg.model).to(self.device)
        self.init_source = init.source if init is not None else None
        if init is not None and init.state is not None:
            self.model.load_state_dict(init.state)
        # what a saved checkpoint's embedding blends back towards ([train] embedding_blend); a
        # resumed run has it from its state
        self.init_embedding: Tensor | None = None
        # the corpus's own words: its names and topics, as against the replay corpus (model/blend.py)
        spared = (own_words(corpus.train, corpus.replay, cfg.model.vocab_size, t.embedding_own_words)
                  if t.embedding_own_words > 0 and corpus.replay
                  and (t.embedding_blend < 1.0 or t.contrast_weight > 0) else None)
        if t.embedding_blend < 1.0:
            if init is None:
                raise TrainingError("[train] embedding_blend blends towards the init's embedding: "
                                    "it needs --init")
            if init.state is not None:
                start = init.state["embedding.weight"].detach()
                self.init_embedding = start.to(self.device, torch.float32).clone()
            if spared is not None:
                log.info("embedding blend %.2f; %d rows of the corpus's own words keep all their change",
                         t.embedding_blend, int(spared.sum()))
            self.row_blend = row_blend(t.embedding_blend, spared, cfg.model.vocab_size).to(self.device)
        # what decides each own pair's possible negatives ([train] contrast_weight, model/contrast.py)
        self.reply_keys = reply_keys(corpus.train, spared) if t.contrast_weight > 0 else None
        # the init model, frozen, whose distribution replayed pairs are distilled from
        # ([train] replay_distill; none without replayed pairs); a resumed run has its weights from
        # its state
        self.teacher: Seq2Seq | None = None
        if t.replay_distill > 0:
            if init is None:
                raise TrainingError("[train] replay_distill distils the init model: it needs --init")
            if corpus.replay:
                self.teacher = Seq2Seq(cfg.model).to(self.device).eval().requires_grad_(False)
                if init.state is not None:
                    self.teacher.load_state_dict(init.state)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or "embedding" in n]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=t.learning_rate, betas=(0.9, 0.98), eps=1e-8,
            fused=True,  # one kernel over all parameters instead of a dozen passes per tensor
        )
        self.batches_per_epoch = len(self._epoch_batches(0))
        self.total_steps = t.max_steps or t.epochs * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.schedule,
                                                t.min_lr_ratio))
        self.precision = self._choose_precision(state)
        log.info("training precision: %s (%s)", self.precision.name, self.precision.reason)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.dtype == torch.float16)
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
        # DDP only syncs gradients for work done inside its forward(), so the loss goes through it.
        self.ddp = dist.wrap(self.model, self._batch_loss) if dist is not None else None
        self._stop_signal: int | None = None
        self._stop_agreed = False  # under DDP: some rank was signalled, all stop at this step

    def _choose_precision(self, state: dict[str, Any] | None) -> Precision:
        mode = self.cfg.train.precision
        saved = (state or {}).get("precision")
        if mode == "auto" and saved in ("fp32", "bf16") and self.device.type == "cpu":
            # a resumed run keeps the precision it was measured into (resume stays bit for bit)
            return replace(choose_precision(saved, self.device), reason=f"auto: kept from the run ({saved})")
        time_step = self._time_precision
        if self.dist is not None:  # every rank must decide alike: the ranks' times summed decide
            dist = self.dist
            time_step = lambda p: dist.all_sum(self._time_precision(p))  # noqa: E731
        return choose_precision(mode, self.device, time_step)

    def _time_precision(self, precision: Precision) -> float:
        """Seconds of forward + backward over the first batches in `precision`; changes nothing
        (no update, gradients dropped, RNG states restored)."""
        sample = [collate([self.corpus.train[i] for i in idx]).to(self.device)
                  for idx in self._epoch_batches(0)[:PRECISION_CHECK_BATCHES]]
        torch_rng, py_rng = torch.get_rng_state(), self.rng.getstate()

        def run() -> None:
            for batch in sample:
                with precision.autocast():
                    loss_sum, n = self._batch_loss(self.model, batch.pad_rows(precision.row_multiple))
                (loss_sum / max(n, 1)).backward()
            self.model.zero_grad(set_to_none=True)

        try:
            return timed(run, repeats=2)
        finally:
            torch.set_rng_state(torch_rng)
            self.rng.setstate(py_rng)

    # -- data --------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        t = self.cfg.train
        # Under DDP the batches are global (N x batch_size pairs) and each rank trains on its slice.
        world = 1 if self.dist is None else self.dist.world_size
        batches = make_batches(self.corpus.train, batch_size=t.batch_size * world,
                               max_tokens=t.max_batch_tokens * world, seed=t.seed * 1000 + epoch)
        return batches if self.dist is None else self.dist.shard(batches)

    def _batches(self) -> Iterator[list[int]]:
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.batch_in_epoch < len(batches):
                idx = batches[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield idx
            self.epoch += 1
            self.batch_in_epoch = 0

    def _with_replay(self, examples: list[Example]) -> list[Example]:
        """The batch plus replayed pairs, so that they make `replay_ratio` of it. Which pairs is
        drawn from (seed, step) alone, so a resumed run replays what an unbroken one would."""
        ratio, pool = self.cfg.train.replay_ratio, self.corpus.replay
        if not pool or ratio <= 0:
            return examples
        k = round(len(examples) * ratio / (1 - ratio))
        rng = random.Random(self.cfg.train.seed * 1_000_003 + self.step)
        return examples + [pool[rng.randrange(len(pool))] for _ in range(k)]

    def _collate(self, indices: list[int]) -> Batch:
        """The step's batch: its own pairs, then the replayed ones (`replay_from` marks them)."""
        own = [self.corpus.train[i] for i in indices]
        examples = self._with_replay(own)
        negatives = (pick_negatives([self.reply_keys[i] for i in indices],
                                    random.Random(f"{self.cfg.train.seed}/negatives/{self.step}"))
                     if self.reply_keys is not None else [])
        return collate(examples, replay_from=len(own) if len(examples) > len(own) else None,
                       negatives=negatives)

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        extra = {} if self.dist is None else {"world_size": self.dist.world_size}
        return {
            **extra,
            "version": 1,
            "config": {"model": asdict(self.cfg.model), "tokenizer": asdict(self.cfg.tokenizer)},
            "train_config": asdict(self.cfg.train),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "precision": self.precision.name,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_val": self.best_val, "bad_evals": self.bad_evals,
            "elapsed": self.elapsed, "tokens_seen": self.tokens_seen,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": _rng_to_list(self.rng.getstate()),
            **({} if self.init_embedding is None else {"init_embedding": self.init_embedding}),
            **({} if self.teacher is None else {"teacher": self.teacher.state_dict()}),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.cfg.train.embedding_blend < 1.0:
            if "init_embedding" not in state:
                raise TrainingError(f"cannot resume {self.out}: [train] embedding_blend changed; "
                                    "train into a new --out directory instead")
            self.init_embedding = state["init_embedding"].to(self.device)
        if self.teacher is not None:
            if "teacher" not in state:
                raise TrainingError(f"cannot resume {self.out}: [train] replay_distill changed; "
                                    "train into a new --out directory instead")
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for k in ("step", "epoch", "batch_in_epoch", "best_val", "bad_evals", "elapsed", "tokens_seen"):
            setattr(self, k, state[k])
        saved_world, world = state.get("world_size", 1), self.dist.world_size if self.dist else 1
        if saved_world != world:  # keep the position in the epoch's global batch order
            self.batch_in_epoch = self.batch_in_epoch * saved_world // world
            log.warning("resuming a %d-process run on %d processes: effective batch size changes",
                        saved_world, world)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.rng.setstate(_rng_from_list(state["python_rng"]))

    def save_state(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))

    # -- logging -----------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        if not self.is_main:
            return
        try:
            write_curve(self.out / LOG_FILE, self.out / CURVE_FILE)
        except Exception as exc:  # a plotting failure must never stop training
            log.warning("could not draw the loss curve: %s", exc)

    # -- evaluation & checkpoints -----------------------------------------
    def validate(self) -> LossStats:
        if self.dist is not None:  # sharded over the ranks, summed with all_reduce
            return self.dist.evaluate_loss(self.model, self.corpus.tokenizer, self.valid_subset)
        return evaluate_loss(self.model, self.corpus.tokenizer, self.valid_subset)

    def save_best(self, stats: LossStats) -> None:
        if not self.is_main:
            return
        metrics = {"step": self.step, "val_loss": round(stats.loss, 5),
                   "val_perplexity": round(stats.perplexity, 3),
                   "val_word_perplexity": round(stats.word_perplexity, 3),
                   "val_pairs": stats.pairs, "train_seconds": round(self.elapsed, 1),
                   "train_tokens": self.tokens_seen}
        with self._blended_embedding():
            save_checkpoint(self.out, self.model, self.corpus.tokenizer, metrics=metrics,
                            extra_config={"name": self.out.name, "corpus": self.corpus.summary,
                                          "training": asdict(self.cfg.train),
                                          **({"init": self.init_source} if self.init_source else {})})

    @contextlib.contextmanager
    def _blended_embedding(self) -> Iterator[None]:
        """The model with only `embedding_blend` of its embedding's change from the init (what a
        checkpoint saves), then exactly as trained again. Validation and the early stop see the
        weights as trained."""
        if self.init_embedding is None:
            yield
            return
        weight = self.model.embedding.weight
        with torch.no_grad():
            trained = weight.detach().clone()
            weight.lerp_(self.init_embedding, (1.0 - self.row_blend)[:, None])
        try:
            yield
        finally:
            with torch.no_grad():
                weight.copy_(trained)

    def _evaluate(self) -> tuple[dict[str, Any], LossStats | None]:
        """The validation fields of the log record, and the stats to save a checkpoint with
        when they are the best so far (None otherwise)."""
        stats = self.validate()
        improved = stats.loss < self.best_val
        if improved:
            self.best_val = stats.loss
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return ({"val_loss": round(stats.loss, 5), "val_ppl": round(stats.perplexity, 3),
                 "val_word_ppl": round(stats.word_perplexity, 3), "best": improved},
                stats if improved else None)

    # -- the loop ----------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _stopping(self) -> bool:
        # Ranks must stop at the same step, or the others would wait forever in the next all_reduce.
        return self._stop_signal is not None if self.dist is None else self._stop_agreed

    def train(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        t = self.cfg.train
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        in_main = _is_main_thread()
        if in_main:
            for s in previous:
                signal.signal(s, self._on_signal)
        bar = _progress(self.total_steps, self.step, self.progress and self.is_main)
        self.model.train()
        batches = self._batches()
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        last_record: dict[str, Any] = {}
        stopped_early = False
        try:
            while self.step < self.total_steps and not self._stopping():
                start = time.perf_counter()
                batch = self._collate(next(batches)).to(self.device)
                if self.dist is None:
                    loss = self._train_step(batch)
                    loss_sum, num_tokens = loss * batch.num_tokens, batch.num_tokens
                else:  # the global batch's tokens (the loss's denominator) and any rank's stop signal
                    num_tokens, self._stop_agreed = self.dist.sync_step(batch.num_tokens,
                                                                        self._stop_signal is not None)
                    if self._stop_agreed and self._stop_signal is None:
                        self._stop_signal = signal.SIGTERM
                    share = num_tokens / self.dist.world_size
                    loss_sum = self._train_step(batch, share) * share  # this rank's part of the sum
                self.step += 1
                self.tokens_seen += num_tokens
                window_loss += loss_sum
                window_tokens += num_tokens
                self.elapsed += time.perf_counter() - start
                evaluate = self.step % t.eval_every == 0 or self.step == self.total_steps
                if self.step % t.log_every == 0 or evaluate:
                    if self.dist is not None:
                        window_loss = self.dist.all_sum(window_loss)
                    secs = time.perf_counter() - window_start
                    record = {"step": self.step, "epoch": self.epoch,
                              "loss": round(window_loss / max(window_tokens, 1), 5),
                              "lr": self.scheduler.get_last_lr()[0],
                              "tokens_per_s": round(window_tokens / max(secs, 1e-9), 1),
                              "elapsed_s": round(self.elapsed, 1)}
                    best = None
                    if evaluate:
                        fields, best = self._evaluate()
                        record.update(fields)
                    self._log(record)
                    if best is not None:  # after its log line: the kept checkpoint's step is always logged
                        self.save_best(best)
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
        missing = not (self.out / "model.safetensors").exists()
        if self.dist is not None:  # rank 0's directory decides (other nodes may not share it)
            missing = self.dist.broadcast_flag(missing)
        if missing:
            self.save_best(self.validate())  # a run shorter than one eval still leaves a checkpoint
        return {"step": self.step, "best_val_loss": self.best_val, "stopped_early": stopped_early,
                "interrupted": self._stop_signal is not None, "last": last_record}

    def _train_step(self, batch: Any, denominator: float | None = None) -> float:
        t = self.cfg.train
        batch = batch.pad_rows(self.precision.row_multiple)
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            if self.dist is not None and self.ddp is not None:
                # dropout and sampling streams from (seed, step, rank): a resume needs no per-rank RNG
                self.dist.seed_step(t.seed, self.step, self.rng)
                loss_sum, n = self.ddp(batch)
            else:
                loss_sum, n = self._batch_loss(self.model, batch)
        # One process: the batch's per-token mean. Under DDP the denominator is the global batch's
        # tokens / N; as DDP averages gradients over the N ranks, the step follows the gradient of
        # the global batch's per-token mean, as one process with N x batch_size pairs would.
        loss = loss_sum / max(n if denominator is None else denominator, 1)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def _batch_loss(self, model: Seq2Seq, batch: Any) -> tuple[torch.Tensor, int]:
        """`batch_loss` with this run's label smoothing and teacher forcing (DDP wraps this)."""
        t = self.cfg.train
        return batch_loss(model, batch, t.label_smoothing, teacher_forcing_ratio=t.teacher_forcing_ratio,
                          rng=self.rng, teacher=self.teacher, distill=t.replay_distill,
                          contrast_weight=t.contrast_weight, contrast_margin=t.contrast_margin)


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
