"""HTTP load test of a running `chatbot serve`: requests/s and latency percentiles by concurrency.

    chatbot serve --port 8000 &                      # in another shell
    python bench/http_load.py http://127.0.0.1:8000  # 1, 8, 32, 128 clients; greedy then beam 5
    python bench/http_load.py http://127.0.0.1:8000 --quick
    python bench/http_load.py --quick     # no server given: starts bench/stub_server.py, then stops it

Each client is a coroutine with its own keep-alive connection (an aiohttp session
limited to one connection) that sends `--requests` POST /api/chat requests one after
another (a bounded number, so every level ends); all clients of a level start
together, after each has opened its connection. Latency is measured at the client,
from sending the request to reading the whole reply. The load generator shares the
machine with the server: the "client CPU %" column says how much of a core it used
(near 100%: the client, not the server, limits the figures). aiohttp, not httpx:
httpx cost this client about 1 ms of CPU a request, a sixth of a core at 150
requests/s taken from a 2-core server; aiohttp costs about a third of that.
Only loopback addresses are accepted: this is a benchmark, not a load generator for
other people's servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from common import free_port, machine_line, table

PROMPTS = (
    "hi, how are you?", "what do you do for a living?", "do you have any pets?",
    "what is your favorite food?", "where are you from?", "what did you do this weekend?",
    "i love watching movies", "do you like sports?", "what music do you listen to?",
    "i am so tired today", "tell me about your family", "what are you reading these days?",
)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Level:
    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    # seconds per reply token (end of sequence counted) of each successful request: a reply of 40
    # tokens needs 40 decoder steps whatever the scheduler does, so this, not the latency, says
    # whether a request waited longer than its share ("nobody starves")
    per_token: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    wall: float = 0.0
    client_cpu: float = 0.0  # CPU seconds this process (the load generator) spent on the level

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float, per_token: bool = False) -> float:
        """Nearest-rank percentile in milliseconds (of the latency, or of its share per reply token)."""
        values = self.per_token if per_token else self.latencies
        if not values:
            return math.nan
        ordered = sorted(values)
        return 1e3 * ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall else math.nan


async def one_client(client: aiohttp.ClientSession, url: str, body: dict, n: int, offset: int,
                     level: Level) -> None:
    for i in range(n):
        payload = {**body, "message": PROMPTS[(offset + i) % len(PROMPTS)]}
        start = time.perf_counter()
        try:
            async with client.post(url, json=payload) as r:
                status = r.status
                data = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            key = type(exc).__name__
            level.errors[key] = level.errors.get(key, 0) + 1
            continue
        elapsed = time.perf_counter() - start
        if status == 200:
            tokens = int(json.loads(data).get("usage", {}).get("completion_tokens", 0))
            level.latencies.append(elapsed)
            level.per_token.append(elapsed / (tokens + 1))
            level.completion_tokens += tokens
        else:
            key = str(status)
            level.errors[key] = level.errors.get(key, 0) + 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(base: str, clients: int, n: int, body: dict, headers: dict, timeout: float) -> Level:
    """Every client has its own session and keep-alive connection, as separate users would."""
    level = Level(clients)
    url = f"{base}/api/chat"
    pool = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=headers,
                                  timeout=aiohttp.ClientTimeout(total=timeout)) for _ in range(clients)]
    try:
        # open every connection (and warm the server) before the clock starts
        await asyncio.gather(*(one_client(c, url, body, 1, 0, Level(1)) for c in pool))
        start, cpu = time.perf_counter(), _cpu_seconds()
        await asyncio.gather(*(one_client(c, url, body, n, i, level) for i, c in enumerate(pool)))
        level.wall = time.perf_counter() - start
        level.client_cpu = _cpu_seconds() - cpu
    finally:
        await asyncio.gather(*(c.close() for c in pool))
    return level


async def main_async(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as probe:
        try:
            async with probe.get(f"{base}/api/model") as r:
                info = json.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            print(f"cannot reach {base}/api/model: {exc}", file=sys.stderr)
            return 1
    levels = [1, 8] if args.quick else [int(c) for c in args.concurrency.split(",")]
    n = 3 if args.quick else args.requests
    print(f"# HTTP load: {base}, model {info.get('name')!r} ({info.get('parameters')} parameters), "
          f"{n} requests per client")
    print(f"# client machine: {machine_line()}\n")
    summary = {}
    failed = 0
    for strategy in args.strategies.split(","):
        body: dict = {"strategy": strategy}
        if strategy == "beam":
            body["beam_size"] = args.beam_size
        if args.max_length:
            body["max_length"] = args.max_length
        results = []
        for c in levels:
            level = await run_level(base, c, n, body, headers, args.timeout)
            results.append(level)
            failed += sum(level.errors.values()) + (level.ok == 0)
            print(f"  {strategy} {c:4d} clients: {level.ok} ok, {sum(level.errors.values())} failed, "
                  f"{level.rps:.1f} req/s", flush=True)
        one = results[0]
        print(f"\n{strategy}{' ' + str(args.beam_size) if strategy == 'beam' else ''}:\n")
        print(table(["clients", "ok", "errors", "req/s", "reply tok/s", "p50 ms", "p95 ms", "p99 ms",
                     "req/s vs 1 client", "p95 / 1-client p50", "client CPU %"], [
            [lv.clients, lv.ok, ",".join(f"{k}:{v}" for k, v in lv.errors.items()) or 0, lv.rps,
             lv.completion_tokens / lv.wall if lv.wall else math.nan, lv.percentile(50),
             lv.percentile(95), lv.percentile(99), _ratio(lv.rps, one.rps),
             _ratio(lv.percentile(95), one.percentile(50)),
             100 * lv.client_cpu / lv.wall if lv.wall else math.nan]
            for lv in results]))
        print("\nper reply token (latency / (reply tokens + 1)): "
              "whether a request waited more than its share\n")
        print(table(["clients", "p50 ms/token", "p99 ms/token", "p99 / p50 per token", "p99 / p50 latency"], [
            [lv.clients, lv.percentile(50, True), lv.percentile(99, True),
             _ratio(lv.percentile(99, True), lv.percentile(50, True)),
             _ratio(lv.percentile(99), lv.percentile(50))] for lv in results]))
        print()
        summary[strategy] = one.percentile(50)
    if "greedy" in summary and "beam" in summary:
        cost = _ratio(summary["beam"], summary["greedy"])
        print(f"single-client p50: beam {args.beam_size} costs {cost:.2f}x greedy per reply\n")
    print(f"# finished {time.strftime('%Y-%m-%d %H:%M')}")
    if args.quick and failed:  # a smoke test: every request must succeed
        print(f"FAILED: {failed} requests (or levels) did not get a reply", file=sys.stderr)
        return 1
    return 0


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


@contextlib.contextmanager
def stub_server(timeout: float = 60.0) -> Iterator[str]:
    """bench/stub_server.py (the real app over an engine that answers at once) on a free port."""
    port = free_port()
    script = Path(__file__).with_name("stub_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--no-access-log"],
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_wait_ready(url, proc, timeout))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probe:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bench/stub_server.py exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with probe.get(f"{url}/ready") as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise SystemExit("bench/stub_server.py did not become ready")
            await asyncio.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?",
                   help="the server, e.g. http://127.0.0.1:8000 (loopback only); --quick without one "
                        "starts bench/stub_server.py")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--strategies", default="greedy,beam")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-length", type=int, help="reply tokens at most (default: the server's)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--api-key", help="when the server has CHATBOT_API_KEY set")
    p.add_argument("--quick", action="store_true", help="1 and 8 clients, 3 requests each")
    args = p.parse_args()
    if args.url is None:
        if not args.quick:
            p.error("the server's URL is required (but for --quick)")
        with stub_server() as args.url:
            return asyncio.run(main_async(args))
    if not is_loopback(args.url):
        print(f"refusing {args.url}: only loopback servers (127.0.0.1, ::1, localhost)", file=sys.stderr)
        return 2
    if args.requests < 1:
        print("--requests must be >= 1", file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
