"""The network: shapes, padding that never leaks into real positions, one-call teacher forcing."""

from __future__ import annotations

import random

import torch

from model.config import ModelConfig
from model.inference import collate_sources
from model.network import Seq2Seq


def test_padding_does_not_change_a_sequence_encoding(tiny_model: Seq2Seq) -> None:
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13, 14]
    alone = tiny_model.encode(*collate_sources([short]))
    together = tiny_model.encode(*collate_sources([long, short]))
    assert torch.allclose(alone.memory[0], together.memory[1, :3], atol=1e-6)
    assert torch.allclose(alone.state[0][:, 0], together.state[0][:, 1], atol=1e-6)
    assert together.mask[1].tolist() == [True] * 3 + [False] * 4


def test_teacher_forced_logits_equal_step_by_step_decoding(tiny_model: Seq2Seq) -> None:
    src, lens = collate_sources([[5, 6, 7, 8], [9, 10]])
    tgt_in = torch.tensor([[1, 11, 12, 13], [1, 14, 15, 16]])
    with torch.no_grad():
        full = torch.log_softmax(tiny_model(src, lens, tgt_in), -1)  # (B, T, V)
        enc = tiny_model.encode(src, lens)
        state = enc.state
        for t in range(tgt_in.shape[1]):
            logp, state = tiny_model.step(tgt_in[:, t], state, enc)
            assert torch.allclose(logp, full[:, t], atol=1e-5)


def test_scheduled_sampling_path_runs_and_matches_full_teacher_forcing_at_ratio_one(tiny_model) -> None:
    src, lens = collate_sources([[5, 6, 7]])
    tgt_in = torch.tensor([[1, 8, 9]])
    with torch.no_grad():
        enc = tiny_model.encode(src, lens)
        fused = tiny_model.decode_features(tgt_in, enc)
        looped = tiny_model.decode_features_sampled(tgt_in, enc, 1.0, random.Random(0))
    assert torch.allclose(fused, looped, atol=1e-5)


def test_untied_model_and_parameter_count() -> None:
    cfg = ModelConfig(vocab_size=50, embedding_dim=8, hidden_size=16, num_layers=1, tie_embeddings=False)
    model = Seq2Seq(cfg)
    assert model.out is not None and model.num_parameters() > 0
    src, lens = collate_sources([[5, 6]])
    assert model(src, lens, torch.tensor([[1, 7, 8]])).shape == (1, 3, 50)
