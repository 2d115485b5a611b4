"""Every bench script runs in its `--quick` mode and prints its table: a bench that no longer works
fails here. The figures themselves are not checked (a test asserts behaviour, not speed); each
run takes seconds, on tiny sizes or the shipped model, and nothing is downloaded."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HELPERS = {"common.py", "tutorial.py"}  # imported by the scripts, never run

# script -> (extra arguments, patterns the output must hold: its table's header, a figure ...)
QUICK: dict[str, tuple[list[str], list[str]]] = {
    "decode_speed.py": ([], [r"greedy replies identical across tutorial / reference / fast: True",
                             r"\| path +\| ms/step +\|", r"\| fast-int8 +\| beam 3 +\|",
                             r"batch 4: GEMM bound \d+ tok/s"]),
    "train_speed.py": ([], [r"\| trainer +\| batches +\| seconds +\| target tok/s",
                            r"\| project fp32 \(fp32\) +\| \d+ +\|", r"\| tutorial fp32 +\| 4 +\|"]),
    "quant_quality.py": ([], [r"\| reference float32 +\| [\d.]+ +\|", r"\| torch\.ao int8 +\|",
                              r"greedy replies identical between float32 and int8: \d/8"]),
    "persona_recall.py": ([], [r"chitchat: \d/4 replies state the fact", r"\| question \| fact \|"]),
    "judge_replies.py": ([], [r"items for 4 prompts in", r"\| setting \| sensible \| specific \| SSA \|",
                              r"\| `greedy` \| 100% \| 0% \| 50% \| 4 \|"]),
    "http_load.py": ([], [r"\| clients \| ok +\| errors \| req/s", r"(?m)^\| 8 +\| 24 +\| 0 +\|",
                          r"\| clients \| p50 ms/token \| p99 ms/token \| p99 / p50 per token",
                          r"single-client p50: beam 5 costs"]),
    "stub_server.py": ([], [r"\| clients \| ok +\| errors \| req/s", r"(?m)^\| 8 +\| 24 +\| 0 +\|"]),
    "engine_load.py --engine local": (["--engine", "local"], [
        r"# engine alone \(local\)", r"\| strategy \| callers \| req/s", r"\| beam +\| 4 +\| [\d.]+ +\|"]),
    "engine_load.py --engine worker": (["--engine", "worker"], [
        r"# engine alone \(worker\)", r"\| strategy \| callers \| req/s", r"\| beam +\| 4 +\| [\d.]+ +\|"]),
    "memory.py": ([], [r"\| worker process \| HTTP \| \d+ \| \d+ \|", r"\| worker process \| model worker \|",
                       r"worker process: 20/20 answered 200"]),
    "soak.py": ([], [r"\| burst +\| 16 +\|", r"\| deadline 0\.05 s +\|",
                     r"OK: every request answered 200, 429 or 503"]),
}
TIMEOUT_S = 180  # each run takes seconds; a machine busy with other work can make it many times that
# One torch thread each: a smoke test, and two threads on a machine with a core busy elsewhere run
# small ops several times slower than one (the scripts that set their threads still do).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _script(name: str) -> str:
    return name.split()[0]


def _runnable_scripts() -> set[str]:
    return {p.name for p in BENCH.glob("*.py")
            if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8")}


def test_every_bench_script_has_a_quick_run_here() -> None:
    runnable = _runnable_scripts()
    assert runnable == {_script(k) for k in QUICK}, "list a new bench script (and its --quick) in QUICK"
    assert {p.name for p in BENCH.glob("*.py")} - runnable == HELPERS
    for name in runnable:
        assert '"--quick"' in (BENCH / name).read_text(encoding="utf-8"), f"{name} has no --quick"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK))
def test_bench_script_runs_quick_and_prints_its_figures(name: str) -> None:
    args, patterns = QUICK[name]
    run = subprocess.run([sys.executable, str(BENCH / _script(name)), "--quick", *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert run.returncode == 0, (f"{name} --quick exited {run.returncode}:\n"
                                 f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    for pattern in patterns:
        assert re.search(pattern, run.stdout), f"{name}: no {pattern!r} in its output:\n{run.stdout[-3000:]}"
