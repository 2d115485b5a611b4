"""What the model tests share: tiny random models and one torch thread for tiny tensors."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.network import Seq2Seq


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and on a busy machine, waits
    for a core). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed: int, **overrides: object) -> Seq2Seq:
    """A small randomly initialised model in eval mode; `overrides` are ModelConfig fields."""
    torch.manual_seed(seed)
    cfg = {"vocab_size": 120, "embedding_dim": 24, "hidden_size": 32, "num_layers": 2, "dropout": 0.2,
           **overrides}
    return Seq2Seq(ModelConfig(**cfg)).eval()  # type: ignore[arg-type]
