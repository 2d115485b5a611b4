"""`chatbot train --init`: start from a checkpoint's weights, keep its tokenizer and [model]."""

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
from model.runs import run_training
from tests.conftest import GREETINGS, write_tsv


@pytest.fixture()
def persona(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "persona.tsv", [("what is your name", "my name is bot"),
                                                ("where do you live", "i live in good weather")] * 20
                     + GREETINGS * 3)


def test_init_starts_from_the_weights_and_keeps_the_tokenizer_byte_for_byte(tiny_checkpoint, persona,
                                                                            tmp_path) -> None:
    out = tmp_path / "ft"
    result = run_training(corpus=str(persona), out=out, init=tiny_checkpoint, progress=False,
                          overrides={"train": {"max_steps": 0 + 1, "eval_every": 1, "num_threads": 1,
                                               "learning_rate": 1e-9, "warmup_steps": 0,
                                               "precision": "fp32"}})
    assert result["step"] == 1
    assert (out / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for k in before:  # one step at a learning rate of 1e-9: still the init's weights
        assert torch.allclose(before[k], after[k], atol=1e-6), k
    ck = load_checkpoint(out)
    assert ck.model.cfg == load_checkpoint(tiny_checkpoint).model.cfg
    assert ck.config["init"]["checkpoint"] == str(tiny_checkpoint.resolve())
    assert ck.config["init"]["name"] == "tiny"


def test_init_refuses_a_config_that_changes_the_model_and_names_the_keys(tiny_checkpoint, persona,
                                                                         tmp_path, capsys) -> None:
    cfg = tmp_path / "other.toml"
    cfg.write_text("[model]\nhidden_size = 64\nnum_layers = 2\n[tokenizer]\nvocab_size = 123\n")
    assert main(["train", "--init", str(tiny_checkpoint), "--corpus", str(persona), "--config", str(cfg),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "[model] hidden_size (48 in the init, 64 asked)" in err
    assert "[tokenizer] vocab_size" in err and "num_layers" not in err  # 2 is the init's own
    assert not (tmp_path / "x" / "train_state.pt").exists()


def test_init_from_a_missing_checkpoint_names_it(tmp_path, persona, capsys) -> None:
    assert main(["train", "--init", str(tmp_path / "nowhere"), "--corpus", str(persona),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_killed_fine_tuning_run_resumes_and_matches_an_unbroken_one(tiny_checkpoint, persona,
                                                                      tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = ["--init", str(tiny_checkpoint), "--max-steps", "60", "--threads", "1", "--precision", "fp32",
            "--checkpoint-every", "5", "--eval-every", "20"]

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "app.cli", "train", "--corpus", str(persona), "--out", str(out),
                "--no-progress", *args, *extra]

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(cmd(straight), check=True, env=env, capture_output=True, timeout=240)
    proc = subprocess.Popen(cmd(broken), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        state = broken / "train_state.pt"
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 15:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(broken / "train_state.pt", weights_only=True)["step"]
    assert 5 <= saved < 60, "the kill should land mid-run"
    done = subprocess.run(cmd(broken, "--resume"), env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    a = torch.load(straight / "train_state.pt", weights_only=True)
    b = torch.load(broken / "train_state.pt", weights_only=True)
    assert b["step"] == 60
    for name, tensor in a["model"].items():  # bit for bit on one thread
        assert torch.equal(tensor, b["model"][name]), name
    assert json.loads((broken / "config.json").read_text())["init"]["name"] == "tiny"
    assert (broken / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()


def test_replay_mixes_the_init_corpus_in_at_the_ratio_asked(tiny_checkpoint, persona, toy_jsonl,
                                                            tmp_path, monkeypatch) -> None:
    from model.training import Trainer

    seen: list[int] = []
    replay_ids: set[int] = set()
    original = Trainer._with_replay

    def counting(self, examples):  # type: ignore[no-untyped-def]
        replay_ids.update(id(e) for e in self.corpus.replay)
        out = original(self, examples)
        seen.append(sum(id(e) in replay_ids for e in out))
        seen.append(len(out))
        return out

    monkeypatch.setattr(Trainer, "_with_replay", counting)
    result = run_training(corpus=str(persona), out=tmp_path / "ft", init=tiny_checkpoint, progress=False,
                          overrides={"train": {"replay_corpus": str(toy_jsonl), "replay_ratio": 0.4,
                                               "max_steps": 12, "num_threads": 1, "precision": "fp32"}})
    replayed, total = sum(seen[0::2]), sum(seen[1::2])
    assert replay_ids and total > 0
    assert replayed / total == pytest.approx(0.4, abs=0.03)
    assert result["corpus"]["replay"] == {"spec": str(toy_jsonl), "pairs": len(replay_ids), "ratio": 0.4}


def test_fine_tuning_defaults_apply_where_the_config_is_silent(tiny_checkpoint, persona, tmp_path) -> None:
    from model.checkpoint import load_checkpoint as load
    from model.finetune import FINETUNE_DEFAULTS, config_from_init

    cfg_file = tmp_path / "ft.toml"
    cfg_file.write_text("[train]\nlearning_rate = 0.001\n")
    cfg = config_from_init(load(tiny_checkpoint), cfg_file, {"train": {"max_steps": 77, "patience": None}})
    assert cfg.train.learning_rate == 0.001 and cfg.train.max_steps == 77  # asked: kept
    assert cfg.train.warmup_steps == FINETUNE_DEFAULTS["warmup_steps"]
    assert cfg.train.patience == FINETUNE_DEFAULTS["patience"] and cfg.train.replay_ratio == 0.5
    assert cfg.train.replay_corpus == load(tiny_checkpoint).config["corpus"]["spec"]


def test_init_may_change_the_keys_that_shape_no_weight(tiny_checkpoint, persona, tmp_path) -> None:
    init = load_checkpoint(tiny_checkpoint).model.cfg
    cfg = tmp_path / "more_context.toml"
    cfg.write_text(f"[model]\ndropout = 0.35\ncontext_turns = {init.context_turns + 2}\n"
                   f"max_source_len = {init.max_source_len + 8}\n[train]\nmax_steps = 2\neval_every = 2\n")
    assert main(["train", "--init", str(tiny_checkpoint), "--corpus", str(persona), "--config", str(cfg),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 0
    ck = load_checkpoint(tmp_path / "x")
    assert ck.model.cfg.dropout == 0.35
    assert ck.model.cfg.context_turns == init.context_turns + 2
    assert ck.model.cfg.max_source_len == init.max_source_len + 8
    assert ck.config["corpus"]["context_turns"] == init.context_turns + 2  # the pairs were made with it
    assert ck.model.cfg.hidden_size == init.hidden_size


def test_a_reverse_run_starts_from_the_inits_own_reverse_model(tiny_checkpoint_with_reverse, persona,
                                                               tmp_path) -> None:
    init = tiny_checkpoint_with_reverse
    out = tmp_path / "ft" / "reverse"  # beside a fine-tuned forward model, as its MMI partner
    run_training(corpus=str(persona), out=out, init=init, progress=False,
                 overrides={"train": {"reverse": True, "max_steps": 1, "eval_every": 1, "num_threads": 1,
                                      "learning_rate": 1e-9, "warmup_steps": 0, "precision": "fp32"}})
    reverse = load_file(init / "reverse" / "model.safetensors")
    forward = load_file(init / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert all(torch.allclose(reverse[k], after[k], atol=1e-6) for k in reverse)
    assert not all(torch.allclose(forward[k], after[k], atol=1e-6) for k in forward)
    ck = load_checkpoint(out)
    assert ck.config["init"]["checkpoint"] == str((init / "reverse").resolve())
    assert ck.config["training"]["reverse"] is True
    assert ck.config["corpus"]["pairs"]["train"] > 0


def test_a_saved_checkpoint_keeps_the_embedding_blend_of_its_change_but_the_own_words_rows_all(
        tiny_checkpoint, persona, tmp_path) -> None:
    from model.blend import own_words
    from model.finetune import FORWARD_REPLAY_DEFAULTS, config_from_init
    from model.training import prepare_corpus

    out = tmp_path / "ft"
    train = {"max_steps": 6, "eval_every": 6, "learning_rate": 1e-2, "warmup_steps": 0, "num_threads": 1,
             "precision": "fp32"}
    run_training(corpus=str(persona), out=out, init=tiny_checkpoint, progress=False,
                 overrides={"train": train})
    kept = load_checkpoint(out).config["training"]
    assert {k: kept[k] for k in FORWARD_REPLAY_DEFAULTS} == FORWARD_REPLAY_DEFAULTS
    b = FORWARD_REPLAY_DEFAULTS["embedding_blend"]
    assert 0 < b < 1
    cfg = config_from_init(load_checkpoint(tiny_checkpoint), None, {"train": train})
    data = prepare_corpus(str(persona), cfg, load_checkpoint(tiny_checkpoint).tokenizer)
    spared = own_words(data.train, data.replay, cfg.model.vocab_size, kept["embedding_own_words"])
    assert 0 < int(spared.sum()) < cfg.model.vocab_size
    init = load_file(tiny_checkpoint / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    trained = torch.load(out / "train_state.pt", weights_only=True)["model"]
    emb = "embedding.weight"
    assert not torch.equal(trained[emb][~spared], init[emb][~spared])
    assert torch.allclose(saved[emb][~spared], (1 - b) * init[emb][~spared] + b * trained[emb][~spared],
                          atol=1e-6)
    assert torch.equal(saved[emb][spared], trained[emb][spared])  # the corpus's own words: as trained
    for k in saved:  # everything else as trained
        if k != emb:
            assert torch.equal(saved[k], trained[k]), k


def test_own_words_are_the_tokens_far_more_frequent_in_the_runs_corpus_than_in_the_replay() -> None:
    from model.blend import own_words, row_blend

    own = [([5, 5], [6, 2]), ([5], [2])]  # 5: half of the tokens; 6: a sixth; 2: a third
    replay = [([6] * 50, [7] * 49 + [2])] * 2  # 6: half; 7: 49%; 2: 1%; 5 never
    spared = own_words(own, replay, 10, ratio=10.0)
    assert spared.nonzero().flatten().tolist() == [2, 5]  # 2: 1/3 > 10 x (2 + 1) / 201
    assert own_words(own, replay, 10, ratio=40.0).nonzero().flatten().tolist() == [5]
    assert row_blend(0.5, spared, 10).tolist() == [0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert row_blend(0.25, None, 3).tolist() == [0.25] * 3


def test_embedding_blend_is_off_for_reverse_runs_runs_without_replay_and_runs_from_scratch(
        tiny_checkpoint, persona, tmp_path, capsys) -> None:
    from model.checkpoint import load_checkpoint as load
    from model.finetune import config_from_init

    init = load(tiny_checkpoint)
    assert config_from_init(init, None, {"train": {"reverse": True}}).train.embedding_blend == 1.0
    assert config_from_init(init, None, {"train": {"replay_ratio": 0.0}}).train.embedding_blend == 1.0
    assert config_from_init(init, None, None).train.embedding_blend == 0.5
    for off in ({"reverse": True}, {"replay_ratio": 0.0}):  # nor the own words, distillation, contrast
        cfg = config_from_init(init, None, {"train": off}).train
        assert cfg.embedding_own_words == 0.0 and cfg.replay_distill == 0.0 and cfg.contrast_weight == 0.0
    cfg = tmp_path / "blend.toml"
    cfg.write_text("[train]\nembedding_blend = 0.5\nmax_steps = 2\n")
    assert main(["train", "--corpus", str(persona), "--config", str(cfg), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "embedding_blend" in capsys.readouterr().err


def test_replay_distill_scores_the_replayed_rows_against_the_frozen_init(tiny_checkpoint, persona,
                                                                        tmp_path, monkeypatch) -> None:
    import model.training
    from model.evaluation import batch_loss

    taught: list[tuple[int, int]] = []

    def spying(net, batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("teacher") is not None and batch.replay_from is not None:
            taught.append((batch.replay_from, int(batch.src.shape[0])))
        return batch_loss(net, batch, *args, **kwargs)

    monkeypatch.setattr(model.training, "batch_loss", spying)
    out = tmp_path / "ft"
    run_training(corpus=str(persona), out=out, init=tiny_checkpoint, progress=False,
                 overrides={"train": {"max_steps": 6, "eval_every": 6, "learning_rate": 1e-2,
                                      "warmup_steps": 0, "num_threads": 1, "precision": "fp32",
                                      "replay_distill": 1.0, "embedding_blend": 1.0}})
    assert len(taught) == 6 and all(0 < r < rows for r, rows in taught)  # every step, replayed rows only
    state = torch.load(out / "train_state.pt", weights_only=True)
    init = load_file(tiny_checkpoint / "model.safetensors")
    for k, v in init.items():  # the teacher is the init and learns nothing
        assert torch.equal(state["teacher"][k], v.float()), k
    assert not torch.equal(state["model"]["embedding.weight"], init["embedding.weight"].float())
    assert load_checkpoint(out).config["training"]["replay_distill"] == 1.0


def test_replay_distill_needs_replay_and_an_init_and_a_resume_keeps_it(tiny_checkpoint, persona,
                                                                      tmp_path, capsys) -> None:
    from model.training import TrainingError

    with pytest.raises(ValueError, match="replay_ratio"):
        run_training(corpus=str(persona), out=tmp_path / "a", init=tiny_checkpoint, progress=False,
                     overrides={"train": {"replay_ratio": 0.0, "replay_distill": 0.5}})
    cfg = tmp_path / "kd.toml"
    cfg.write_text(f"[train]\nreplay_ratio = 0.5\nreplay_corpus = \"{persona}\"\nreplay_distill = 0.5\n"
                   "max_steps = 2\n")
    assert main(["train", "--corpus", str(persona), "--config", str(cfg), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 2
    assert "replay_distill" in capsys.readouterr().err
    out = tmp_path / "c"
    train = {"max_steps": 2, "eval_every": 2, "num_threads": 1, "precision": "fp32", "replay_distill": 0.0}
    run_training(corpus=str(persona), out=out, init=tiny_checkpoint, progress=False,
                 overrides={"train": train})
    with pytest.raises(TrainingError, match="replay_distill"):
        run_training(corpus=str(persona), out=out, init=tiny_checkpoint, progress=False, resume=True,
                     overrides={"train": {**train, "max_steps": 4, "replay_distill": 0.5}})


def test_contrast_pairs_every_steps_own_rows_with_negatives_drawn_from_seed_and_step(
        tiny_checkpoint, persona, tmp_path, monkeypatch) -> None:
    import model.training
    from model.evaluation import batch_loss

    seen: list[tuple[int | None, list[list[int]], torch.Tensor]] = []

    def spying(net, batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        if batch.negatives is not None:
            assert kwargs["contrast_weight"] == 1.0
            seen.append((batch.replay_from, batch.negatives.tolist(), batch.tgt_out.clone()))
        return batch_loss(net, batch, *args, **kwargs)

    monkeypatch.setattr(model.training, "batch_loss", spying)
    train = {"max_steps": 6, "eval_every": 6, "num_threads": 1, "precision": "fp32", "contrast_weight": 1.0}
    runs = []
    for name in ("a", "b"):
        run_training(corpus=str(persona), out=tmp_path / name, init=tiny_checkpoint, progress=False,
                     overrides={"train": train})
        runs.append([pairs for _, pairs, _ in seen])
        if name == "a":
            first = list(seen)
        seen.clear()
    assert len(first) == 6 and runs[0] == runs[1]  # every step; the same draws from the same seed
    for replay_from, pairs, tgt in first:
        assert replay_from is not None and pairs
        assert [i for i, _ in pairs] == sorted({i for i, _ in pairs})
        for i, j in pairs:  # own rows only, never its own reply
            assert i < replay_from and j < replay_from and not torch.equal(tgt[i], tgt[j])
    assert load_checkpoint(tmp_path / "a").config["training"]["contrast_weight"] == 1.0
