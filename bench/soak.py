"""Soak test: a real `chatbot serve` under heavy concurrency for minutes, loopback only.

    python bench/soak.py                         # 3 minutes, 200 clients, a tiny checkpoint made here
    python bench/soak.py --minutes 10 --checkpoint model/pretrained/chitchat
    python bench/soak.py --minutes 0.5 --clients 50   # a quick look
    python bench/soak.py --quick      # a smoke test: the shipped model, 16 clients, 2 s + 1.5 s phases

It starts the server as a subprocess on 127.0.0.1 and a free port, with a small queue
(`--queue`, CHATBOT_MAX_QUEUE) so that overload is real, and runs three phases:

1. burst: `--clients` heavy requests (beam search, long replies) sent at the same moment;
2. soak: `--clients` clients, each sending requests back to back (a mix of greedy, beam,
   sampled, OpenAI and streamed OpenAI requests) until the time or `--max-requests` runs out;
   after a 429 or 503 a client pauses `--backoff-s` and goes on;
3. deadline: a second server with CHATBOT_REQUEST_TIMEOUT_S=`--deadline-s` takes the same
   load for `--deadline-phase-s`, so that requests outlive their deadline at scale.

Every request must end in 200, 429 or 503 (504 too in the deadline phase); any other
status, a transport error, a client timeout or a stream that does not end in
`data: [DONE]` counts as lost, and the script exits 1. The server's resident memory
(VmRSS from /proc, its model worker process's included) is read when it is ready, every
few seconds, and at the end; the server is then stopped with SIGTERM and must exit
cleanly without a traceback in its log.
Latency is measured at the client, from sending to reading the whole reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, free_port, machine_line, table

PROMPTS = ("hello", "how are you", "what is your name", "do you like cats", "good morning",
           "what is the weather", "do you like music", "see you later", "do you like pizza",
           "i am so tired today", "tell me about your family", "what music do you listen to")
OK = {200, 429, 503}


# -- the server -----------------------------------------------------------------------------------
def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:  # fields: state, ppid, ...
                found.append(int(stat.parent.name))
    return found


def server_rss_mib(pid: int) -> float:
    """The server's resident memory with its model worker process's (when it runs one)."""
    total = rss_mib(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):
            total += rss_mib(child)
    return total


class Server:
    def __init__(self, checkpoint: Path, log: Path, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBOT_")}
        env.update({f"CHATBOT_{k.upper()}": str(v) for k, v in settings.items()})
        env.update(CHATBOT_LOG_LEVEL="warning", PYTHONPATH=str(ROOT))
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
             "--port", str(self.port)], env=env, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.rss: list[float] = []

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        self.sample()

    def sample(self) -> None:
        self.rss.append(server_rss_mib(self.proc.pid))

    def stop(self) -> tuple[int, bool]:
        """SIGTERM; returns the exit status and whether the log is free of tracebacks."""
        self.sample()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log_file.close()
        text = self.log.read_text(errors="replace")
        return code, "Traceback" not in text and " ERROR " not in text


def tiny_checkpoint(workdir: Path) -> Path:
    """A small model trained here in about a minute (no download)."""
    from model.runs import run_training

    rng = random.Random(0)
    pairs = [("hello", "hi how are you"), ("how are you", "fine thanks and you"),
             ("what is your name", "my name is bot"), ("do you like cats", "yes i like cats"),
             ("good morning", "good morning to you"), ("see you later", "bye see you"),
             ("what is the weather", "sunny and warm today"), ("do you like music", "yes music is great")]
    corpus = workdir / "pairs.tsv"
    corpus.write_text("".join(f"{a}\t{b}\n" for a, b in (rng.choice(pairs) for _ in range(400))))
    config = workdir / "tiny.toml"
    config.write_text("[model]\nembedding_dim = 64\nhidden_size = 128\nnum_layers = 2\ndropout = 0.0\n"
                      "[tokenizer]\nvocab_size = 400\nmin_frequency = 1\n"
                      "[train]\nbatch_size = 32\nlearning_rate = 0.005\nmax_steps = 300\neval_every = 100\n"
                      "seed = 1\n")
    out = workdir / "soak-tiny"
    run_training(corpus=str(corpus), out=out, config=config, progress=False,
                 overrides={"train": {"num_threads": 1}})
    return out


# -- the clients ----------------------------------------------------------------------------------
@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds of 200s
    lost: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def request_for(kind: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    prompt = rng.choice(PROMPTS)
    if kind == "heavy":
        return "/api/chat", {"message": prompt, "strategy": "beam", "beam_size": 8, "n_best": 4,
                             "max_length": 64, "no_repeat_ngram_size": 0}
    if kind == "greedy":
        return "/api/chat", {"message": prompt, "history": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}
    if kind == "beam":
        return "/api/chat", {"message": prompt, "strategy": "beam", "beam_size": 4, "n_best": 2}
    if kind == "sample":
        return "/api/chat", {"message": prompt, "strategy": "sample", "n_best": 2, "top_p": 0.9}
    body = {"model": "soak", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40}
    return "/v1/chat/completions", {**body, "stream": kind == "stream"}


KINDS = ("greedy", "beam", "sample", "openai", "stream")


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally, ok: set[int]) -> int:
    path, body = request_for(kind, rng)
    start = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                text = (await r.aread()).decode()
            if r.status_code == 200 and not text.rstrip().endswith("data: [DONE]"):
                tally.lost.append(f"{kind}: stream cut short: {text[-200:]!r}")
                tally.statuses["bad stream"] += 1
                return -1
            if r.status_code == 200 and '"error"' in text:
                # The deadline passed mid-stream, after the 200: the error comes as an event.
                status = 504 if '"code": "504"' in text else -1
                tally.statuses["504" if status == 504 else "bad stream"] += 1
                if status not in ok:
                    tally.lost.append(f"{kind}: stream error: {text[-200:]!r}")
                return status
        else:
            r = await client.post(path, json=body)
            if r.status_code == 200:
                r.json()  # a whole JSON body
    except (httpx.HTTPError, ValueError) as exc:
        tally.lost.append(f"{kind}: {type(exc).__name__}: {exc}")
        tally.statuses["lost"] += 1
        return -1
    tally.statuses[str(r.status_code)] += 1
    if r.status_code not in ok:
        tally.lost.append(f"{kind}: {r.status_code} {r.text[:200]}")
    elif r.status_code == 200:
        tally.latencies.setdefault(kind, []).append(time.perf_counter() - start)
    return r.status_code


def client_for(url: str, clients: int) -> httpx.AsyncClient:
    # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive timeout closes them:
    # otherwise a request can be written into a connection the server is closing (a ReadError that
    # no server can prevent; clients retry such requests, this one counts them as lost).
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8,
                          keepalive_expiry=2.0)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(180.0, connect=60.0))


async def burst(url: str, clients: int) -> Tally:
    tally = Tally()
    rng = random.Random(1)
    async with client_for(url, clients) as client:
        await asyncio.gather(*(one(client, "heavy", rng, tally, OK) for _ in range(clients)))
    tally.ended = time.perf_counter()
    return tally


async def sustained(server: Server, clients: int, seconds: float, max_requests: int, backoff: float,
                    ok: set[int], seed: int) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    budget = [max_requests]

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            status = await one(client, rng.choice(KINDS), rng, tally, ok)
            if status in (429, 503):
                await asyncio.sleep(backoff)

    async def sampler() -> None:
        while time.monotonic() < stop_at and budget[0] > 0:
            await asyncio.sleep(5)
            server.sample()

    async with client_for(server.url, clients) as client:
        sampling = asyncio.ensure_future(sampler())
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
        sampling.cancel()
    tally.ended = time.perf_counter()
    return tally


# -- the report -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def status_row(name: str, tally: Tally) -> list[object]:
    s = tally.statuses
    other = tally.total - s["200"] - s["429"] - s["503"] - s["504"]
    secs = max(tally.ended - tally.started, 1e-9)
    return [name, tally.total, s["200"], s["429"], s["503"], s["504"], other, tally.total / secs,
            s["200"] / secs]


def latency_rows(name: str, tally: Tally) -> list[list[object]]:
    rows = []
    every = [x for v in tally.latencies.values() for x in v]
    for kind, values in [("all", every), *sorted(tally.latencies.items())]:
        ms = [v * 1000 for v in values]
        rows.append([name, kind, len(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99),
                     max(ms, default=float("nan"))])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: a tiny one trained here)")
    p.add_argument("--minutes", type=float, default=3.0, help="total time of the soak and deadline phases")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--max-requests", type=int, default=200_000, help="bound on the soak phase's requests")
    p.add_argument("--queue", type=int, default=64, help="CHATBOT_MAX_QUEUE of the server")
    p.add_argument("--batch", type=int, default=64, help="CHATBOT_MAX_BATCH_SIZE of the server")
    p.add_argument("--threads", type=int, default=1, help="CHATBOT_NUM_THREADS of the server")
    p.add_argument("--backoff-s", type=float, default=0.1, help="a client's pause after 429/503")
    p.add_argument("--deadline-s", type=float, default=0.05, help="request deadline in the deadline phase")
    p.add_argument("--deadline-phase-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of every phase: the shipped model (unless --checkpoint; training the "
                        "tiny one takes a minute) on the server's threads (CHATBOT_MODEL_PROCESS=false), "
                        "16 clients, a queue of 8, a 2 s soak and a 1.5 s deadline phase")
    args = p.parse_args()
    soak_s = max(args.minutes * 60 - args.deadline_phase_s, 10.0)
    if args.quick:
        from model.checkpoint import shipped_checkpoint_path

        args.checkpoint = args.checkpoint or shipped_checkpoint_path()
        args.clients, args.queue, args.batch, args.deadline_phase_s, soak_s = 16, 8, 16, 1.5, 2.0

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    checkpoint = args.checkpoint or tiny_checkpoint(workdir)
    print(machine_line())
    print(f"checkpoint {checkpoint}; {args.clients} clients; queue {args.queue}; batch {args.batch} rows; "
          f"{args.threads} server thread(s); logs in {workdir}", flush=True)
    common: dict[str, Any] = {"max_queue": args.queue, "max_batch_size": args.batch,
                              "num_threads": args.threads}
    if args.quick:  # the engine on the server's threads: ready in half the time, no worker to start
        common["model_process"] = "false"

    server = Server(checkpoint, workdir / "server.log", request_timeout_s=60, **common)
    try:
        server.wait_ready()
        start_rss = server.rss[-1]
        burst_tally = asyncio.run(burst(server.url, args.clients))
        print(f"burst done: {dict(burst_tally.statuses)}", flush=True)
        soak_tally = asyncio.run(sustained(server, args.clients, soak_s, args.max_requests, args.backoff_s,
                                           OK, args.seed))
        print(f"soak done: {dict(soak_tally.statuses)}", flush=True)
    finally:
        code, clean = server.stop()
    rss = server.rss

    late = Server(checkpoint, workdir / "deadline-server.log", request_timeout_s=args.deadline_s, **common)
    try:
        late.wait_ready()
        late_tally = asyncio.run(sustained(late, args.clients, args.deadline_phase_s, args.max_requests,
                                           args.backoff_s, OK | {504}, args.seed + 1))
        print(f"deadline phase done: {dict(late_tally.statuses)}", flush=True)
    finally:
        late_code, late_clean = late.stop()

    print()
    print(table(["phase", "requests", "200", "429", "503", "504", "lost/other", "req/s", "200/s"],
                [status_row("burst", burst_tally), status_row(f"soak {soak_s:.0f} s", soak_tally),
                 status_row(f"deadline {args.deadline_s} s", late_tally)]))
    print()
    print(table(["phase", "kind", "200s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                latency_rows("burst", burst_tally) + latency_rows("soak", soak_tally)))
    print()
    half = rss[len(rss) // 2:]  # samples 5 s apart: the growth rate over the second half of the soak
    slope = (half[-1] - half[0]) / max((len(half) - 1) * 5 / 60, 1e-9) if len(half) > 1 else float("nan")
    print(table(["server", "RSS ready MiB", "RSS peak MiB", "RSS end MiB", "MiB/min, 2nd half", "exit",
                 "log clean"],
                [["soak", start_rss, max(rss), rss[-1], slope, code, clean],
                 ["deadline", late.rss[0], max(late.rss), late.rss[-1], float("nan"), late_code,
                  late_clean]]))
    lost = burst_tally.lost + soak_tally.lost + late_tally.lost
    graceful = {0, -signal.SIGTERM}
    failed = bool(lost) or not (clean and late_clean) or code not in graceful or late_code not in graceful
    if lost:
        print(f"\nFAILED: {len(lost)} requests lost or answered outside {sorted(OK)}; first ones:")
        for line in lost[:10]:
            print("  " + line)
    print("\n" + ("FAILED" if failed else "OK: every request answered 200, 429 or 503 (504 when past the "
                                          "deadline); the servers stopped cleanly"))
    print(json.dumps({"burst": dict(burst_tally.statuses), "soak": dict(soak_tally.statuses),
                      "deadline": dict(late_tally.statuses), "rss_mib": [round(x, 1) for x in rss]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
