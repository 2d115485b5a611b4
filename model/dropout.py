"""Dropout whose mask is drawn fast on a CPU.

`nn.Dropout` on a CPU draws one float per element through `bernoulli_`, 7% of a bf16
training step at the shipped size. Here the mask comes from 15-bit random integers (one
cheap draw each, from the same torch generator, so seeds and resumes behave as before)
compared with a threshold: an element is kept with probability 1 - p, to within 1/32768
of p, and kept elements are scaled by the exact inverse of that probability, so the
expectation is unchanged. Same maths as `nn.Dropout`; other devices use `F.dropout`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 32768  # int16 random_() draws from [0, 2**15)


class _ApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    threshold = round(p * LEVELS)
    keep = torch.empty(x.shape, dtype=torch.int16).random_() >= threshold
    mask = keep.to(x.dtype).mul_(LEVELS / (LEVELS - threshold))  # kept ones scaled 1 / P(keep)
    return _ApplyMask.apply(x, mask)


class Dropout(nn.Module):
    """`nn.Dropout(p)` with the fast CPU mask (no parameters: state dicts are unchanged)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
