"""The machine at hand: which device the model runs on, how many CPU cores this process may use.

One rule each, for training, evaluation, serving (app/settings.py) and the benches.
torch is imported only where a device is picked: the service's settings read the cores
in the HTTP process too.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when CUDA has one, else the CPU; `cpu` and `cuda` as named."""
    import torch

    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), which
    can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
