"""The training step's own kernels: the chunked loss, the fast dropout mask, padded rows.
Each must keep the maths of what it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.loss
from model.data import collate
from model.dropout import Dropout, dropout
from model.evaluation import batch_loss
from model.loss import cross_entropy_sum
from model.precision import Precision
from tests.model.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [([10, 11, 12], [20, 21, 2]), ([13, 14], [22, 23, 24, 25, 2]), ([15], [26, 2])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_equals_torch_in_value_and_gradient(dtype, smoothing, monkeypatch) -> None:
    monkeypatch.setattr(model.loss, "CHUNK_ROWS", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    base = torch.randn(40, 53) * 4
    target = torch.randint(0, 53, (40,))
    ours, ref = base.to(dtype).requires_grad_(), base.to(dtype).requires_grad_()
    loss = cross_entropy_sum(ours, target, smoothing)
    expected = F.cross_entropy(ref.float(), target, reduction="sum", label_smoothing=smoothing)
    (loss * 0.5).backward()
    (expected * 0.5).backward()
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert ours.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("distill", [0.3, 1.0])
def test_distilled_rows_take_the_mixed_target_and_the_others_the_reference(smoothing, distill,
                                                                           monkeypatch) -> None:
    monkeypatch.setattr(model.loss, "CHUNK_ROWS", 7)  # the first distilled row falls mid-chunk
    torch.manual_seed(1)
    N, M, V = 40, 19, 53
    base, teacher = torch.randn(N, V) * 3, torch.randn(M, V) * 3
    target = torch.randint(0, V, (N,))
    ours, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss = cross_entropy_sum(ours, target, smoothing, teacher=teacher, distill=distill)
    q = (1 - smoothing) * F.one_hot(target, V).float() + smoothing / V  # the reference, smoothed
    q[N - M:] = (1 - distill) * q[N - M:] + distill * torch.softmax(teacher, dim=-1)
    expected = -(q * torch.log_softmax(ref, dim=-1)).sum()
    loss.backward()
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-6)
    plain = cross_entropy_sum(base, target, smoothing, teacher=teacher, distill=0.0)
    assert float(plain) == pytest.approx(float(F.cross_entropy(base, target, reduction="sum",
                                                               label_smoothing=smoothing)), rel=1e-6)


def test_a_model_distilled_from_itself_gets_no_gradient_on_the_distilled_rows() -> None:
    torch.manual_seed(2)
    logits = (torch.randn(12, 30) * 2).requires_grad_()
    target = torch.randint(0, 30, (12,))
    cross_entropy_sum(logits, target, teacher=logits.detach()[5:], distill=1.0).backward()
    assert logits.grad[5:].abs().max() < 1e-6
    assert logits.grad[:5].abs().max() > 1e-2
    with pytest.raises(ValueError, match="teacher"):
        cross_entropy_sum(logits, target, teacher=torch.zeros(13, 30), distill=1.0)


def test_batch_loss_distils_the_replayed_rows_from_the_teacher_reading_the_same_reference() -> None:
    student, teacher = random_model(3, dropout=0.0), random_model(4, dropout=0.0)
    batch = collate(EXAMPLES, replay_from=1)  # the last two pairs are replayed
    with torch.no_grad():
        loss, n = batch_loss(student, batch, teacher=teacher, distill=1.0)
        padded, _ = batch_loss(student, batch.pad_rows(16), teacher=teacher, distill=1.0)
        plain, _ = batch_loss(student, collate(EXAMPLES))
        own = F.log_softmax(student(batch.src, batch.src_lens, batch.tgt_in), dim=-1)
        taught = F.softmax(teacher(batch.src[1:], batch.src_lens[1:], batch.tgt_in[1:]), dim=-1)
    keep = batch.tgt_out != 0
    expected = -own[0][keep[0]].gather(1, batch.tgt_out[0][keep[0], None]).sum()
    expected -= (taught[keep[1:]] * own[1:][keep[1:]]).sum()
    assert n == batch.num_tokens
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(padded) == pytest.approx(float(loss), rel=1e-5)
    assert float(plain) != pytest.approx(float(loss), rel=1e-3)
    assert float(batch_loss(student, batch)[0]) == pytest.approx(float(plain), rel=1e-6)  # no teacher


def test_chunked_cross_entropy_refuses_shapes_it_cannot_score() -> None:
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        cross_entropy_sum(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_keeps_1_minus_p_and_the_expectation(dtype) -> None:
    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype)
    y = dropout(x, 0.3, training=True)
    kept = (y != 0).float().mean()
    assert float(kept) == pytest.approx(0.7, abs=0.005)
    assert float(y.float().mean()) == pytest.approx(1.0, abs=0.01)
    values = torch.unique(y.float()).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=1e-2)


def test_fast_dropout_is_the_identity_in_eval_and_at_p_0_and_follows_the_seed() -> None:
    x = torch.randn(64, 32)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    torch.manual_seed(5)
    a = dropout(x, 0.3, training=True)
    torch.manual_seed(5)
    b = dropout(x, 0.3, training=True)
    assert torch.equal(a, b)
    layer = Dropout(0.3).eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_fast_dropout_passes_gradient_only_through_kept_elements_scaled() -> None:
    torch.manual_seed(1)
    x = torch.randn(1000, requires_grad=True)
    y = dropout(x, 0.5, training=True)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.all(x.grad[~kept] == 0)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 2.0))


def test_padded_rows_change_neither_the_loss_nor_any_gradient() -> None:
    batch = collate(EXAMPLES)
    padded = batch.pad_rows(8)
    assert padded.src.shape[0] == padded.tgt_out.shape[0] == padded.src_lens.shape[0] == 8
    assert padded.num_tokens == batch.num_tokens
    assert batch.pad_rows(3) is batch  # already a multiple
    grads = []
    for b in (batch, padded):
        net = random_model(3, dropout=0.0)
        loss, n = batch_loss(net, b)
        loss.backward()
        grads.append((float(loss), n, [p.grad.clone() for p in net.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = grads
    assert n1 == n2 == batch.num_tokens
    assert l2 == pytest.approx(l1, rel=1e-6)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_only_a_cpu_bf16_step_pads_its_rows() -> None:
    assert Precision("cpu", torch.bfloat16, "").row_multiple == 16
    assert Precision("cpu", None, "").row_multiple == 1
    assert Precision("cuda", torch.bfloat16, "").row_multiple == 1
