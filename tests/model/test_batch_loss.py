"""`batch_loss`, the one loss of training and evaluation, and the device rule they share."""

from __future__ import annotations

import os
import random

import pytest
import torch

from model.data import collate
from model.device import available_cores, pick_device
from model.evaluation import batch_loss
from tests.model.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [([10, 11, 12], [20, 21, 2]), ([13, 14], [22, 23, 24, 25, 2]), ([15], [26, 2])]


class _AlwaysTeacher(random.Random):
    def random(self) -> float:
        return 0.0  # below any ratio: every step reads the reference token


def test_a_teacher_forcing_ratio_below_1_that_always_draws_the_reference_is_plain_teacher_forcing() -> None:
    model = random_model(1, dropout=0.0)
    batch = collate(EXAMPLES)
    with torch.no_grad():
        fused, n = batch_loss(model, batch, 0.1)
        stepwise, m = batch_loss(model, batch, 0.1, teacher_forcing_ratio=0.5, rng=_AlwaysTeacher())
    assert n == m == sum(len(t) for _, t in EXAMPLES)
    assert float(stepwise) == pytest.approx(float(fused), rel=1e-5)


def test_a_teacher_forcing_ratio_below_1_feeds_back_predictions_and_needs_an_rng() -> None:
    model = random_model(2, dropout=0.0)
    batch = collate(EXAMPLES)
    with torch.no_grad():
        fused, _ = batch_loss(model, batch)
        own, n = batch_loss(model, batch, teacher_forcing_ratio=0.01, rng=random.Random(0))
        assert n == batch.num_tokens and torch.isfinite(own)
        assert float(own) != pytest.approx(float(fused), rel=1e-5)  # its own tokens, another loss
        with pytest.raises(ValueError, match="rng"):
            batch_loss(model, batch, teacher_forcing_ratio=0.5)


def test_pick_device_takes_the_named_device_and_auto_prefers_cuda() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        pick_device("tpu")
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
