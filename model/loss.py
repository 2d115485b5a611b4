"""The trainer's loss: summed cross-entropy over the output layer's rows, computed in chunks.

`F.cross_entropy(logits.float(), ...)` makes a float32 copy of all the logits (N x V, some
80 MB for a batch of 2,500 tokens and 8,000 words), fills and scatters an N x V gradient of
the log-softmax, and walks that memory four times. Here each chunk of rows is read once in
float32 while it is in cache: the forward keeps only the log-sum-exp per row, the backward
writes softmax minus the (smoothed) target straight into the gradient in the logits' own
dtype. Same maths as `F.cross_entropy(..., reduction="sum", label_smoothing=eps)`, the
sums taken in float32 whatever the logits' dtype. On a GPU it is that call (one fused kernel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ROWS = 32  # 32 x 8,000 float32 = 1 MB: a chunk stays in a core's L2 cache


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float,
                teacher: Tensor | None, distill: float) -> Tensor:
        N = logits.shape[0]
        first = N - (0 if teacher is None else teacher.shape[0])  # the first distilled row
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, N, CHUNK_ROWS):
            x = logits[s:s + CHUNK_ROWS].float()
            m = x.amax(dim=-1, keepdim=True)
            row_lse = (x - m).exp_().sum(dim=-1).log_().add_(m[:, 0])
            lse[s:s + CHUNK_ROWS] = row_lse
            nll = row_lse - x.gather(1, target[s:s + CHUNK_ROWS, None])[:, 0]
            if smoothing:  # the uniform part: mean over the vocabulary of -log p
                nll = (1.0 - smoothing) * nll + smoothing * (row_lse - x.mean(dim=-1))
            a = max(s, first) - s  # this chunk's first distilled row
            if teacher is not None and a < x.shape[0]:  # -sum q log p with q the teacher's softmax
                q = torch.softmax(teacher[s + a - first:s + x.shape[0] - first].float(), dim=-1)
                soft = row_lse[a:] - (q * x[a:]).sum(dim=-1)
                nll[a:] = (1.0 - distill) * nll[a:] + distill * soft
            total += nll.sum()
        ctx.save_for_backward(logits, target, lse, *(() if teacher is None else (teacher,)))
        ctx.smoothing, ctx.distill, ctx.first = smoothing, distill, first
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        logits, target, lse, *rest = ctx.saved_tensors
        teacher = rest[0] if rest else None
        eps, d, first = ctx.smoothing, ctx.distill, ctx.first
        N, V = logits.shape
        grad = torch.empty_like(logits)
        g = grad_total.float()
        for s in range(0, N, CHUNK_ROWS):
            p = (logits[s:s + CHUNK_ROWS].float() - lse[s:s + CHUNK_ROWS, None]).exp_()
            rows = torch.arange(p.shape[0], device=p.device)
            # softmax minus the target distribution: the reference's (smoothed) one-hot, weighted
            # 1 - distill on distilled rows, plus distill times the teacher's softmax there
            a = max(s, first) - s
            hard = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
            if teacher is not None and a < p.shape[0]:
                hard[a:] = 1.0 - d
                p[a:] -= d * torch.softmax(teacher[s + a - first:s + p.shape[0] - first].float(), dim=-1)
            if eps:
                p -= (eps / V) * hard[:, None]
            p[rows, target[s:s + CHUNK_ROWS]] -= (1.0 - eps) * hard
            grad[s:s + CHUNK_ROWS] = p.mul_(g)
        return grad, None, None, None, None


def cross_entropy_sum(logits: Tensor, target: Tensor, label_smoothing: float = 0.0, *,
                      teacher: Tensor | None = None, distill: float = 0.0) -> Tensor:
    """Summed cross-entropy of logits (N, V), any float dtype, against target (N,), as a
    float32 scalar; `F.cross_entropy(logits.float(), target, reduction="sum",
    label_smoothing=label_smoothing)` without its full float32 copies.

    `teacher` (M, V): another model's logits for the last M rows (knowledge distillation, Hinton
    et al. 2015): there the target distribution is `(1 - distill)` times the (smoothed) one-hot
    plus `distill` times the teacher's softmax."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits (N, V) and target (N,) expected, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if teacher is not None and (teacher.dim() != 2 or teacher.shape[1] != logits.shape[1]
                                or teacher.shape[0] > logits.shape[0]):
        raise ValueError(f"teacher logits (M <= N, V) expected, got {tuple(teacher.shape)} "
                         f"for logits {tuple(logits.shape)}")
    if teacher is not None and not distill:
        teacher = None
    if logits.device.type != "cpu":  # a GPU's fused kernel beats a loop of small launches
        return _reference(logits, target, label_smoothing, teacher, distill)
    return _CrossEntropySum.apply(logits, target, float(label_smoothing),
                                  None if teacher is None else teacher.detach(), float(distill))


def _reference(logits: Tensor, target: Tensor, smoothing: float, teacher: Tensor | None,
               distill: float) -> Tensor:
    """The same loss in plain torch calls (the GPU's path, and what the chunked one must equal)."""
    if teacher is None:
        return F.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=smoothing)
    first = logits.shape[0] - teacher.shape[0]
    hard = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=smoothing)
    q = torch.softmax(teacher.detach().float(), dim=-1)
    soft = -(q * torch.log_softmax(logits[first:].float(), dim=-1)).sum(dim=-1)
    return hard[:first].sum() + ((1.0 - distill) * hard[first:] + distill * soft).sum()


def row_logprob_sums(logits: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """(B,) float32: each row's summed log-probability of its target tokens, from `logits` (N, V)
    at the positions where `keep` (B, T) is True (in row order) and `target` (B, T). What a
    teacher-forced pass scores a whole sequence by (MMI's reverse model, the contrastive term)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, target[keep][:, None])[:, 0]
    rows = torch.nonzero(keep)[:, 0]
    return torch.zeros(keep.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, logp)
