"""Checkpoints: identical round trips, atomic writes, and refusal of anything unsafe or broken."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from model.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from model.inference import collate_sources


def logits(model, src_ids):
    src, lens = collate_sources(src_ids)
    tgt = torch.tensor([[1, 7, 8, 9]] * len(src_ids))
    with torch.no_grad():
        return model(src, lens, tgt)


def test_round_trip_gives_identical_logits(tiny_model, tiny_tokenizer, tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer, metrics={"val_loss": 1.0})
    ck = load_checkpoint(tmp_path / "ck")
    srcs = [[5, 6, 7], [8, 9]]
    assert torch.equal(logits(tiny_model, srcs), logits(ck.model, srcs))
    assert ck.metrics == {"val_loss": 1.0}
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "metrics.json", "model.safetensors", "tokenizer.json"]


def test_half_precision_checkpoint_loads_as_float32(tiny_model, tiny_tokenizer, tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer, half=True)
    ck = load_checkpoint(tmp_path / "ck")
    assert all(p.dtype == torch.float32 for p in ck.model.parameters())
    assert torch.allclose(logits(tiny_model, [[5, 6]]), logits(ck.model, [[5, 6]]), atol=5e-2)


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_posing_as_weights_is_refused_without_running_it(tiny_model, tiny_tokenizer, tmp_path,
                                                                  monkeypatch, how) -> None:
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer)
    weights = tmp_path / "ck" / "model.safetensors"
    if how == "pickle":
        weights.write_bytes(pickle.dumps(Boom()))
    else:
        torch.save({"w": Boom()}, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as err:
        load_checkpoint(tmp_path / "ck")
    assert "pickle" in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_weights_are_refused_naming_the_file(tiny_model, tiny_tokenizer, tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("broken,match", [
    ("missing_config", "config.json: missing"),
    ("bad_json", "config.json: not valid JSON"),
    ("wrong_shape", "shape"),
    ("missing_tokenizer", "tokenizer.json: missing"),
    ("nan", "NaN"),
])
def test_broken_checkpoints_are_refused_with_the_file_and_problem(tiny_model, tiny_tokenizer, tmp_path,
                                                                  broken, match) -> None:
    ck = tmp_path / "ck"
    save_checkpoint(ck, tiny_model, tiny_tokenizer)
    config = json.loads((ck / "config.json").read_text())
    if broken == "missing_config":
        (ck / "config.json").unlink()
    elif broken == "bad_json":
        (ck / "config.json").write_text("{nope")
    elif broken == "wrong_shape":
        config["model"]["hidden_size"] = 64
        (ck / "config.json").write_text(json.dumps(config))
    elif broken == "missing_tokenizer":
        (ck / "tokenizer.json").unlink()
    elif broken == "nan":
        with torch.no_grad():
            tiny_model.attn.weight[0, 0] = float("nan")
        save_checkpoint(ck, tiny_model, tiny_tokenizer)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ck)


def test_missing_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, '{"old": true}')

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"half')
        raise OSError("disk full")

    from model.checkpoint import atomic_write
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_reverse_model_is_checked_at_once_and_read_on_first_use(tiny_checkpoint_with_reverse,
                                                                     tmp_path) -> None:
    ck = load_checkpoint(tiny_checkpoint_with_reverse)
    assert ck.reverse is not None and not ck.reverse.loaded
    want = load_checkpoint(tiny_checkpoint_with_reverse / "reverse").model
    assert ck.reverse.num_parameters == want.num_parameters() and ck.reverse.cfg == want.cfg
    assert not ck.reverse.loaded  # describing it reads no weights
    got = ck.reverse.model
    assert ck.reverse.loaded and ck.reverse.model is got
    for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a forward model where the reverse one should be, or another tokenizer: refused at load
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint_with_reverse, bad)
    config = json.loads((bad / "reverse" / "config.json").read_text())
    config["training"].pop("reverse")
    (bad / "reverse" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a reverse model"):
        load_checkpoint(bad)
    config["training"]["reverse"] = True
    (bad / "reverse" / "config.json").write_text(json.dumps(config))
    tok = json.loads((bad / "reverse" / "tokenizer.json").read_text())
    (bad / "reverse" / "tokenizer.json").write_text(json.dumps(tok, indent=1))  # same JSON, other bytes
    assert load_checkpoint(bad).reverse is not None
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another tokenizer
    (bad / "reverse" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="not the forward model's tokenizer"):
        load_checkpoint(bad)


def test_a_deferred_tokenizer_is_built_on_first_use_and_tokenises_the_same(tiny_checkpoint) -> None:
    ck = load_checkpoint(tiny_checkpoint, defer_tokenizer=True)
    assert not ck.tokenizer.built  # a model worker that never tokenises never builds it
    eager = load_checkpoint(tiny_checkpoint).tokenizer
    assert eager.built
    text = "hello there, how are you?"
    assert ck.tokenizer.encode(text) == eager.encode(text) and ck.tokenizer.built
    assert ck.tokenizer.decode(eager.encode(text)) == eager.decode(eager.encode(text))
    assert ck.tokenizer.vocab_size == eager.vocab_size == ck.model.cfg.vocab_size
