"""Shared helpers for the bench scripts: timing, machine description, markdown tables.

Timings are the best of several repeats: on a shared machine the minimum is the
estimate least disturbed by other work (the `timeit` module's advice), and every
script prints the load average so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python bench/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from model.device import available_cores  # noqa: E402  (needs ROOT on sys.path)
from model.timing import best_time  # noqa: E402, F401  (the benchmarks' timer, from here too)


def calls_for(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of `fn` take about `seconds` (at least 1); runs `fn` once to find out."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(seconds / once))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a bench starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_flags() -> str:
    """The CPU flags that decide this project's fast paths (bf16 and int8 kernels)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "flags unknown"
    return " ".join(flag for flag in wanted if flag in have) or "none of " + " ".join(wanted)


def machine_line() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = available_cores()
    busy = "  BUSY: other work shares the CPU, figures are depressed" if load > cores + 0.5 else ""
    return (f"{cpu_model()} [{cpu_flags()}], {cores} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, load average {load:.1f}{busy}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats get a sensible number of digits."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "-"
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)
