"""Int8 weights for CPU serving: dynamic quantization (weights int8 once, activations per call).

`Int8Linear` is what the fast decoder uses (`FastDecoder(model, quantize="int8")`):
each weight row (output channel) gets its own scale, symmetric, zero point 0; the
activations are quantized per call by PyTorch's `quantized::linear_dynamic` (fbgemm
on x86), which accumulates in int32 and returns float32. It covers every matrix of
the decoder step, the tied output layer included, which is the biggest one.

`quantize_dynamic_int8(model)` is the stock route, `torch.ao.quantization.quantize_dynamic`
over the model's `nn.Linear` and `nn.LSTM` modules (encoder included); it returns a
model that works with the reference path (`decode_sources`, `evaluate_loss`) but leaves
the tied output layer in float32, because that is a function of the embedding, not
an `nn.Linear`.

Both APIs print deprecation warnings in torch 2.13 (quantized tensors are moving to
the torchao package); the ops themselves are there and are what torchao's own
dynamic int8 calls on CPU. The warnings are silenced here, once, at build time.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .network import Seq2Seq


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products that accumulate in int32).

    Without it fbgemm sums u8*s8 pairs in int16 and can saturate, so activations are
    then quantized to 7 bits (reduce_range), as torch.ao does on such machines."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in text or " avx_vnni" in text


class Int8Linear:
    """y = x @ W^T + b with W stored int8, one scale per output row."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        weight = weight.detach().float().cpu()  # (out, in)
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # an all-zero row (PAD) still packs
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(
                qweight, None if bias is None else bias.detach().float().cpu().contiguous())
        self.reduce_range = not has_vnni()
        self.out_features, self.in_features = weight.shape
        self.has_bias = bias is not None

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

    @property
    def nbytes(self) -> int:
        """Weights (1 byte each), per-row scales and the float bias."""
        return self.out_features * (self.in_features + 4 + (4 if self.has_bias else 0))


def quantize_dynamic_int8(model: Seq2Seq) -> Seq2Seq:
    """A CPU copy of `model` with int8 dynamic quantization of its Linear and LSTM layers."""
    quantized = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(quantized, {nn.Linear, nn.LSTM}, dtype=torch.qint8,
                                               inplace=True)
    return quantized
