"""The serving engine alone, without HTTP: requests/s and latency at 1 and 32 callers.

    python bench/engine_load.py                      # the shipped model, the server's defaults
    CHATBOT_QUANTIZE=int8 python bench/engine_load.py

The same engine `chatbot serve` builds (from the same CHATBOT_* settings), driven by
coroutines in this process that call `engine.generate` one request after another with
the prompts and decoding options of bench/http_load.py. Set beside http_load.py's table
for the same server, the difference is what the HTTP layer (uvicorn, FastAPI, pydantic,
the event loop sharing the GIL with the engine's threads) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from common import machine_line, table
from http_load import PROMPTS

from app.main import build_engine
from app.routes.chat import decode_options
from app.schemas import ChatRequest
from app.settings import Settings


async def run(clients: int, requests: int, engine, opts) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []

    async def client(offset: int) -> None:
        for i in range(requests):
            source = engine.encode_turns([PROMPTS[(offset + i) % len(PROMPTS)]])
            start = time.perf_counter()
            await engine.generate(source, opts)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - start, sorted(latencies)


async def main_async(args: argparse.Namespace) -> int:
    engine = await asyncio.to_thread(build_engine, Settings())
    engine.start()
    await engine.wait_ready()
    print(f"# engine alone: model {engine.name!r}, {engine.info()['engine']}")
    print(f"# {machine_line()}\n")
    rows = []
    for strategy in args.strategies.split(","):
        opts = decode_options(ChatRequest(message="x", strategy=strategy))
        single = None
        for clients in (1, 32):
            await run(clients, 1, engine, opts)  # warm up
            wall, lat = await run(clients, args.requests, engine, opts)
            rps = len(lat) / wall
            p50, p95 = 1e3 * lat[len(lat) // 2], 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.95))]
            single = single or (rps, p50)
            rows.append([strategy, clients, rps, p50, p95, rps / single[0], p95 / single[1]])
    await engine.aclose()
    headers = ["strategy", "callers", "req/s", "p50 ms", "p95 ms", "req/s vs 1", "p95 / 1-caller p50"]
    print(table(headers, rows))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=40, help="requests per caller")
    p.add_argument("--strategies", default="greedy,beam")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
