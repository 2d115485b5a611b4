"""Whole runs: a training run and an evaluation run as functions (`chatbot train` and `chatbot eval`
are thin parsers over them, in app/cli.py), and the half-precision export of a checkpoint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint, shipped_checkpoint_path
from .config import RunConfig, load_run_config
from .decoding import DecodeOptions
from .device import pick_device
from .distributed import init_from_env
from .evaluation import evaluate_loss, generation_metrics, named_settings, sample_replies, setting_metrics
from .finetune import InitWeights, config_from_init, init_description, load_init
from .tokenizer import Tokenizer
from .training import (
    STATE_FILE,
    Corpus,
    Trainer,
    TrainingError,
    check_resumable,
    load_state,
    prepare_corpus,
    truncate_log,
)

log = logging.getLogger(__name__)


def run_training(*, corpus: str, out: Path, config: Path | None = None, resume: bool = False,
                 overrides: dict[str, dict[str, Any]] | None = None, progress: bool = True,
                 init: str | Path | None = None) -> dict[str, Any]:
    """`init`: a checkpoint directory, or "shipped", to start from (its tokenizer, its [model]
    config and its weights, with a fresh optimiser)."""
    out = Path(out)
    dist = init_from_env()  # None unless launched by torchrun with WORLD_SIZE > 1
    try:
        started = time.perf_counter()
        if dist is None:
            cfg, data, state, start = _prepare(corpus, out, config, overrides, resume, init)
        else:  # rank 0 reads the files and trains the tokenizer; the others receive the result
            cfg, data, state, start = dist.share_setup(
                lambda: _prepare(corpus, out, config, overrides, resume, init))
        trainer = Trainer(cfg, data, out, progress=progress, state=state,
                          device=dist.device if dist else None, dist=dist, init=start)
        trained_before = trainer.elapsed  # a resumed run's elapsed time includes its earlier runs'
        result = trainer.train()
        trained = trainer.elapsed - trained_before
        result["setup_seconds"] = round(time.perf_counter() - started - trained, 1)
        result["corpus"] = data.summary
        if dist is not None:
            result.update(rank=dist.rank, world_size=dist.world_size,
                          replicas=dist.compare_replicas(trainer.model))
            dist.barrier()  # nobody exits (which makes torchrun stop the rest) before rank 0 is done
        return result
    finally:
        if dist is not None:
            dist.close()


def _prepare(corpus: str, out: Path, config: Path | None, overrides: dict[str, dict[str, Any]] | None,
             resume: bool, init: str | Path | None = None,
             ) -> tuple[RunConfig, Corpus, dict[str, Any] | None, InitWeights | None]:
    """Read the config, check the output directory, read the state to resume, load the corpus and
    train the tokenizer (or take the init checkpoint's)."""
    start = None
    tokenizer = None
    if init is not None:
        ckpt = load_init(init)
        cfg = config_from_init(ckpt, config, overrides)
        if cfg.train.reverse and ckpt.reverse is not None:
            # a reverse run starts from the init's own reverse model (the forward model's
            # weights predict replies, not messages): `--init DIR --reverse --out OUT/reverse`
            # makes the fine-tuned forward model's MMI partner
            init = ckpt.reverse.path
            ckpt = load_init(init)
            cfg = config_from_init(ckpt, config, overrides)
        tokenizer = ckpt.tokenizer
        start = InitWeights(state=ckpt.model.state_dict(), source=init_description(ckpt, init))
    else:
        cfg = load_run_config(config, overrides)
    state = None
    if resume:
        state = load_state(out)
        check_resumable(state, cfg, out)
        tok_path = out / "tokenizer.json"
        if not tok_path.is_file():
            raise TrainingError(f"{tok_path}: missing; cannot resume without the run's tokenizer")
        tokenizer = Tokenizer.from_str(tok_path.read_text(encoding="utf-8"),
                                       lowercase=cfg.tokenizer.lowercase)
        truncate_log(out, int(state["step"]))
    elif (out / STATE_FILE).exists():
        raise TrainingError(f"{out} already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not out.is_dir() or not _writable(out):
        raise TrainingError(f"{out}: output directory is not writable")
    data = prepare_corpus(corpus, cfg, tokenizer)
    log.info("corpus %s: %s", corpus, json.dumps(data.summary))
    if start is not None and not resume:  # the init's tokenizer, byte for byte
        atomic_write_text(out / "tokenizer.json", (ckpt.path / "tokenizer.json").read_text(encoding="utf-8"))
    elif tokenizer is None:
        data.tokenizer.save(out / "tokenizer.json")
    if data.tokenizer.vocab_size != cfg.model.vocab_size:
        # A small corpus can give fewer merges than asked for: size the model to the tokenizer.
        cfg = RunConfig(model=type(cfg.model)(**{**asdict(cfg.model),
                                                 "vocab_size": data.tokenizer.vocab_size}),
                        tokenizer=cfg.tokenizer, train=cfg.train)
        if state is not None:
            check_resumable(state, cfg, out)
    if resume and start is not None:
        start = replace(start, state=None)  # the saved state holds the weights
    return cfg, data, state, start


def _writable(path: Path) -> bool:
    probe = path / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def run_eval(*, checkpoint: Path | None = None, corpus: str = "chitchat", split: str = "test",
             max_generate: int = 1000, samples: bool = True, setting_pairs: int = 200,
             ) -> dict[str, Any]:
    """Loss-based scores on the split, BLEU and distinct-n of greedy replies to `max_generate`
    pairs, and reply_stats of every decoding setting (named_settings) on `setting_pairs`."""
    path = Path(checkpoint) if checkpoint else shipped_checkpoint_path()
    ckpt = load_checkpoint(path, device=pick_device())
    train_cfg = ckpt.config.get("training") or {}
    cfg = load_run_config(None, {"model": asdict(ckpt.model.cfg), "train": {
        k: train_cfg[k] for k in ("seed", "valid_fraction", "test_fraction") if k in train_cfg}})
    data = prepare_corpus(corpus, cfg, ckpt.tokenizer)
    examples = {"train": data.train, "valid": data.valid, "test": data.test}[split]
    if not examples:
        raise TrainingError(f"corpus {corpus!r} has no {split} pairs")
    stats = evaluate_loss(ckpt.model, ckpt.tokenizer, examples)
    gen = generation_metrics(ckpt.model, ckpt.tokenizer, examples[:max_generate],
                             DecodeOptions(strategy="greedy", max_length=ckpt.model.cfg.max_target_len))
    result: dict[str, Any] = {
        "checkpoint": str(path), "corpus": corpus, "split": split,
        "perplexity": round(stats.perplexity, 3), "word_perplexity": round(stats.word_perplexity, 3),
        "loss": round(stats.loss, 5), "num_pairs": stats.pairs, "num_tokens": stats.tokens,
        "num_words": stats.words, **gen,
    }
    if setting_pairs:
        reverse = ckpt.reverse.model if ckpt.reverse is not None else None
        sources = [src for src, _ in examples[:: max(1, len(examples) // setting_pairs)][:setting_pairs]]
        result["settings"] = setting_metrics(ckpt.model, ckpt.tokenizer, sources,
                                             named_settings(reverse is not None,
                                                            ckpt.model.cfg.max_target_len),
                                             reverse=reverse)
    if samples:
        result["samples"] = sample_replies(ckpt.model, ckpt.tokenizer)
    return result


def export_half(src: Path, dst: Path) -> None:
    """Copy a checkpoint with float16 weights (how the shipped model is packaged)."""
    ckpt = load_checkpoint(src)
    extra = {k: v for k, v in ckpt.config.items()
             if k not in ("format", "model", "tokenizer", "weights_dtype")}
    save_checkpoint(dst, ckpt.model, ckpt.tokenizer, extra_config=extra, metrics=ckpt.metrics,
                    half=True)
