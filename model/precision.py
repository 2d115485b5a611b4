"""Which precision the trainer computes in, chosen on the machine at hand.

Master weights, optimiser state and the loss stay float32 in every mode; only the
forward and backward passes run under `torch.autocast`. On CUDA the trainer keeps its
mixed precision (bf16 where the GPU has it, float16 with a grad scaler elsewhere). On a
CPU, `auto` uses bf16 only where the processor has it natively (AVX512-BF16 or AMX,
as oneDNN reports) *and* a short timed check of the real training step on the first
batches measures it faster: bf16 GEMMs run several times float32 there, but the LSTM
recurrence's small matrices gain far less, and on some shapes the casts cost more than
the GEMMs save. Nothing is assumed from the processor's name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# bf16 must beat float32 by this much to be chosen: below it, timing noise decides
AUTO_MARGIN = 1.05
BF16_ROW_MULTIPLE = 16


def cpu_bf16_native() -> bool:
    """oneDNN runs bf16 natively here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: float32, no autocast
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def row_multiple(self) -> int:
        """Rows a training batch is padded to a multiple of (with rows the loss does not see).
        oneDNN's bf16 LSTM is tiled for AMX and erratic on other row counts: the shipped
        decoder's forward and backward (one thread) took 306 ms on 86 rows, 323 on 94, 184 on
        84 and 180 on 96; float32's time grows with the rows alone. Padding to 16 rows made
        the whole bf16 step 1.1-1.2x faster (as fast as 32, with less padding on small batches)."""
        return BF16_ROW_MULTIPLE if self.device_type == "cpu" and self.dtype == torch.bfloat16 else 1

    def autocast(self) -> AbstractContextManager[object]:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)


def choose_precision(mode: str, device: torch.device,
                     time_step: Callable[[Precision], float] | None = None) -> Precision:
    """The precision for `mode` ("auto", "fp32", "bf16") on `device`. For CPU "auto",
    `time_step(p)` returns the seconds of a few training steps in precision p (the
    caller restores whatever those steps change)."""
    kind = device.type
    fp32 = Precision(kind, None, f"{mode} asked")
    if mode == "fp32":
        return fp32
    if kind == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Precision(kind, dtype, "CUDA mixed precision")
    if mode == "bf16":
        if not cpu_bf16_native():
            log.warning("precision bf16 asked, but this CPU has no native bf16: it will be emulated (slow)")
        return Precision(kind, torch.bfloat16, "bf16 asked")
    if not cpu_bf16_native():
        return Precision(kind, None, "auto: this CPU has no native bf16")
    if time_step is None:
        return Precision(kind, None, "auto: no timing check possible")
    bf16 = Precision(kind, torch.bfloat16, "")
    t32, t16 = time_step(fp32), time_step(bf16)
    ratio = t32 / max(t16, 1e-9)
    chosen = torch.bfloat16 if ratio >= AUTO_MARGIN else None
    reason = (f"auto: a timed check of the training step ran bf16 at {ratio:.2f}x float32 "
              f"({t16 * 1000:.0f} ms against {t32 * 1000:.0f} ms)")
    return Precision(kind, chosen, reason)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` calls of fn, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
