"""Training precision: chosen on the machine at hand, kept on resume, and learning alike."""

from __future__ import annotations

import pytest
import torch

import model.precision as precision
from model.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from model.precision import Precision, choose_precision
from model.training import Trainer, prepare_corpus
from tests.conftest import toy_conversations, write_jsonl

CPU = torch.device("cpu")


def test_fp32_and_bf16_are_taken_as_asked() -> None:
    assert choose_precision("fp32", CPU).dtype is None
    assert choose_precision("bf16", CPU).dtype is torch.bfloat16


@pytest.mark.parametrize(("fp32_s", "bf16_s", "chosen"), [(1.0, 0.5, torch.bfloat16), (1.0, 0.99, None),
                                                         (1.0, 2.0, None)])
def test_auto_takes_bf16_only_where_it_measured_faster(monkeypatch, fp32_s, bf16_s, chosen) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    timed: list[str] = []

    def time_step(p: Precision) -> float:
        timed.append(p.name)
        return bf16_s if p.dtype is torch.bfloat16 else fp32_s

    got = choose_precision("auto", CPU, time_step)
    assert got.dtype is chosen and sorted(timed) == ["bf16", "fp32"]
    assert "timed check" in got.reason


def test_auto_without_native_bf16_is_fp32_and_times_nothing(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    got = choose_precision("auto", CPU, lambda p: pytest.fail("timed on a CPU without bf16"))
    assert got.dtype is None and "no native bf16" in got.reason


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def _trainer(tmp_path, mode: str, steps: int = 60, state=None) -> Trainer:
    corpus = write_jsonl(tmp_path / "toy.jsonl", toy_conversations(120, seed=5))
    cfg = RunConfig(model=ModelConfig(vocab_size=200, embedding_dim=32, hidden_size=64, num_layers=1,
                                      dropout=0.0, max_source_len=24, max_target_len=12),
                    tokenizer=TokenizerConfig(vocab_size=200, min_frequency=1),
                    train=TrainConfig(batch_size=16, max_steps=steps, eval_every=steps, learning_rate=5e-3,
                                      warmup_steps=5, num_threads=1, seed=11, precision=mode))
    data = prepare_corpus(str(corpus), cfg)
    cfg = RunConfig(model=ModelConfig(**{**cfg.model.__dict__, "vocab_size": data.tokenizer.vocab_size}),
                    tokenizer=cfg.tokenizer, train=cfg.train)
    return Trainer(cfg, data, tmp_path / mode, progress=False, state=state)


def test_the_timing_check_changes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    b = _trainer(tmp_path, "fp32")  # no check
    rng_after_plain = torch.get_rng_state()
    a = _trainer(tmp_path, "auto")  # forward and backward passes in both precisions
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # dropout draws restored
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in a.model.parameters())


def test_a_resumed_auto_run_keeps_the_precision_it_chose(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    first = _trainer(tmp_path, "bf16", steps=4)
    first.train()
    state = first.state_dict()
    assert state["precision"] == "bf16"
    monkeypatch.setattr(precision, "choose_precision", lambda *a, **k: pytest.fail("measured again"))
    again = _trainer(tmp_path, "auto", steps=8, state=state)
    assert again.precision.name == "bf16" and "kept" in again.precision.reason


def test_bf16_and_fp32_learn_alike(tmp_path) -> None:
    results = {}
    for mode in ("fp32", "bf16"):
        trainer = _trainer(tmp_path, mode)
        trainer.train()
        results[mode] = trainer.best_val
    assert results["bf16"] == pytest.approx(results["fp32"], rel=0.02), results
