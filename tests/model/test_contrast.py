"""The contrastive term of fine-tuning (model/contrast.py): which replies are negatives, and the
loss it adds, against a reference that scores every (question, reply) pair on its own."""

from __future__ import annotations

import random

import pytest
import torch

from model.contrast import hinge, mean_logprobs, pick_negatives, reply_keys
from model.data import collate
from model.evaluation import batch_loss
from tests.model.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

# four own pairs: 0 and 1 share the own word 50, 2 has none, 3 repeats 2's reply
OWN = [([10, 11], [50, 20, 2]), ([12], [21, 50, 22, 2]), ([13, 14, 15], [23, 24, 2]), ([16], [23, 24, 2])]
REPLAY = [([17, 18], [25, 26, 27, 2]), ([19], [28, 2])]


def own_mask(*ids: int) -> torch.Tensor:
    mask = torch.zeros(120, dtype=torch.bool)
    mask[list(ids)] = True
    return mask


def test_a_negative_never_shares_an_own_word_nor_is_the_same_reply() -> None:
    keys = reply_keys(OWN, own_mask(50))
    assert keys[0] == ((50, 20, 2), frozenset({50})) and keys[2][1] == frozenset()
    for seed in range(20):
        pairs = pick_negatives(keys, random.Random(seed))
        allowed = {0: {2, 3}, 1: {2, 3}, 2: {0, 1}, 3: {0, 1}}
        assert [i for i, _ in pairs] == [0, 1, 2, 3]  # rows in order, each once
        assert all(j in allowed[i] for i, j in pairs)
    drawn = {j for seed in range(20) for i, j in pick_negatives(keys, random.Random(seed)) if i == 0}
    assert drawn == {2, 3}  # drawn among all that are allowed
    assert pick_negatives(keys, random.Random(7)) == pick_negatives(keys, random.Random(7))


def test_rows_without_an_allowed_negative_are_left_out() -> None:
    keys = reply_keys(OWN[:2], own_mask(50))  # the two share their own word
    assert pick_negatives(keys, random.Random(0)) == []
    keys = reply_keys(OWN[:2], None)  # no own words: any other reply will do
    assert sorted(pick_negatives(keys, random.Random(0))) == [(0, 1), (1, 0)]
    assert pick_negatives(reply_keys(OWN[2:], None), random.Random(0)) == []  # the same reply


def test_mean_logprobs_is_each_rows_mean_over_its_own_tokens() -> None:
    torch.manual_seed(0)
    target = torch.tensor([[3, 4, 0], [5, 0, 0]])
    keep = target != 0
    logits = torch.randn(3, 9)
    logp = torch.log_softmax(logits, dim=-1)
    got = mean_logprobs(logits, target, keep)
    torch.testing.assert_close(got, torch.stack([(logp[0, 3] + logp[1, 4]) / 2, logp[2, 5]]))
    assert float(hinge(torch.tensor([0.0, -1.0]), torch.tensor([-3.0, -1.5]), 1.0)) == pytest.approx(0.5)


def pair_logprob(net, src: list[int], tgt: list[int]) -> torch.Tensor:
    """log p(tgt | src) per token, one pair on its own (the reference)."""
    b = collate([(src, tgt)])
    logp = torch.log_softmax(net(b.src, b.src_lens, b.tgt_in), dim=-1)[0]
    return logp.gather(1, b.tgt_out[0][:, None])[:, 0].mean()


@pytest.mark.parametrize("weight, margin", [(1.0, 1.0), (0.5, 3.0)])
def test_batch_loss_adds_the_weighted_mean_hinge_of_the_pairs(weight, margin) -> None:
    net = random_model(5, dropout=0.0)
    pairs = [(0, 2), (1, 3), (2, 1), (3, 0)]
    batch = collate(OWN + REPLAY, replay_from=len(OWN), negatives=pairs)
    with torch.no_grad():
        loss, n = batch_loss(net, batch, contrast_weight=weight, contrast_margin=margin)
        plain, n_plain = batch_loss(net, collate(OWN + REPLAY, replay_from=len(OWN)))
        gaps = [pair_logprob(net, OWN[i][0], OWN[i][1]) - pair_logprob(net, OWN[i][0], OWN[j][1])
                for i, j in pairs]
    mean_hinge = sum(max(0.0, margin - float(g)) for g in gaps) / len(pairs)
    assert n == n_plain == batch.num_tokens
    assert mean_hinge > 0
    assert float(loss) == pytest.approx(float(plain) + weight * n * mean_hinge, rel=1e-5)
    with torch.no_grad():
        padded, _ = batch_loss(net, batch.pad_rows(16), contrast_weight=weight, contrast_margin=margin)
        off, _ = batch_loss(net, batch)  # weight 0: off
    assert float(padded) == pytest.approx(float(loss), rel=1e-5)
    assert float(off) == pytest.approx(float(plain), rel=1e-6)


def test_the_hinge_pushes_the_own_reply_up_and_the_negative_down_until_the_margin() -> None:
    net = random_model(6, dropout=0.0)
    batch = collate(OWN[:1] + OWN[2:3], negatives=[(0, 1)])
    with torch.no_grad():
        gap = float(pair_logprob(net, OWN[0][0], OWN[0][1]) - pair_logprob(net, OWN[0][0], OWN[2][1]))
    with_term = batch_loss(net, batch, contrast_weight=1.0, contrast_margin=gap + 1.0)[0]
    (with_term - batch_loss(net, batch)[0]).backward()
    step = {name: -0.05 * p.grad for name, p in net.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for name, p in net.named_parameters():
            p += step.get(name, 0)
        after = float(pair_logprob(net, OWN[0][0], OWN[0][1]) - pair_logprob(net, OWN[0][0], OWN[2][1]))
    assert after > gap  # one step of the term alone widens the gap
    net.zero_grad()
    with torch.no_grad():
        satisfied = batch_loss(net, batch, contrast_weight=1.0, contrast_margin=after - 0.5)[0]
        plain = batch_loss(net, batch)[0]
    assert float(satisfied) == pytest.approx(float(plain), rel=1e-6)  # apart by the margin: nothing
