"""The fast encoder computes what `Seq2Seq.encode` computes, for any mix of source lengths."""

from __future__ import annotations

import pytest
import torch

from model.fast_encoder import FastEncoder
from model.inference import encode_sources

from .conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layers, embedding, hidden", [(1, 20, 32), (2, 20, 32), (3, 16, 48)])
def test_fast_encoder_matches_the_model(layers: int, embedding: int, hidden: int) -> None:
    model = random_model(layers, num_layers=layers, embedding_dim=embedding, hidden_size=hidden)
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 9, 3, 17, 0, 5, 17, 2]  # 0: an empty source, which collate turns into one PAD
    sources = [torch.randint(5, 90, (n,), generator=gen).tolist() for n in lengths]
    ref = encode_sources(model, sources)
    fast = FastEncoder(model).encode(sources)
    S = max(max(lengths), 1)
    assert fast.enc.memory.shape == ref.enc.memory.shape == (len(sources), S, hidden)
    assert torch.equal(fast.enc.mask, ref.enc.mask)
    for name, a, b in [("memory", fast.enc.memory, ref.enc.memory), ("keys", fast.enc.keys, ref.enc.keys),
                       ("h", fast.state[0], ref.state[0]), ("c", fast.state[1], ref.state[1])]:
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name
    # a real position never sees padding: each row alone gives the same states
    for i, src in enumerate(sources):
        alone = FastEncoder(model).encode([src])
        n = max(len(src), 1)
        assert torch.allclose(alone.enc.memory[0, :n], fast.enc.memory[i, :n], atol=1e-5, rtol=0)
        assert torch.allclose(alone.state[0][:, 0], fast.state[0][:, i], atol=1e-5, rtol=0)


def test_fast_encoder_ignores_training_mode_dropout() -> None:
    model = random_model(3).train()  # dropout 0.3 would change every call in training mode
    sources = [[5, 6, 7, 8], [9, 10]]
    first = FastEncoder(model).encode(sources)
    again = FastEncoder(model).encode(sources)
    assert torch.equal(first.enc.memory, again.enc.memory)
    ref = encode_sources(model.eval(), sources)
    assert torch.allclose(first.enc.memory, ref.enc.memory, atol=1e-5, rtol=0)
