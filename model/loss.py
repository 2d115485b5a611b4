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
    def forward(ctx: Any, logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
        N = logits.shape[0]
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
            total += nll.sum()
        ctx.save_for_backward(logits, target, lse)
        ctx.smoothing = smoothing
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor, None, None]:
        logits, target, lse = ctx.saved_tensors
        eps = ctx.smoothing
        N, V = logits.shape
        grad = torch.empty_like(logits)
        g = grad_total.float()
        for s in range(0, N, CHUNK_ROWS):
            p = (logits[s:s + CHUNK_ROWS].float() - lse[s:s + CHUNK_ROWS, None]).exp_()
            if eps:
                p -= eps / V
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, target[s:s + CHUNK_ROWS]] -= 1.0 - eps
            grad[s:s + CHUNK_ROWS] = p.mul_(g)
        return grad, None, None


def cross_entropy_sum(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy of logits (N, V), any float dtype, against target (N,), as a
    float32 scalar; `F.cross_entropy(logits.float(), target, reduction="sum",
    label_smoothing=label_smoothing)` without its full float32 copies."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits (N, V) and target (N,) expected, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if logits.device.type != "cpu":  # a GPU's fused kernel beats a loop of small launches
        return F.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=label_smoothing)
    return _CrossEntropySum.apply(logits, target, float(label_smoothing))
