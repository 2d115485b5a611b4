"""The serving engine alone, without HTTP: requests/s and latency at 1 and 32 callers.

    python bench/engine_load.py                      # the shipped model, the server's defaults
    python bench/engine_load.py --engine local       # the engine on threads of this process
    CHATBOT_QUANTIZE=int8 python bench/engine_load.py
    python bench/engine_load.py --quick [--engine local|worker]   # a smoke test in seconds

The engine `chatbot serve` builds from the same CHATBOT_* settings: `--engine worker` the
model worker process (`RemoteEngine`, CHATBOT_MODEL_PROCESS=true, the default), `--engine
local` the engine on threads of this process (`ChatEngine`). Coroutines in this process
submit requests one after another (`engine.submit(...)` then `await ticket.result()`, which
both engines have) with the prompts and decoding options of bench/http_load.py. Set beside
http_load.py's table for the same server, the difference is what the HTTP layer (uvicorn,
FastAPI, pydantic, the event loop sharing the GIL with the engine's threads) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TYPE_CHECKING

from common import machine_line, table
from http_load import PROMPTS

from app.factory import build_engine
from app.routes.chat import decode_options
from app.schemas import ChatRequest
from app.settings import Settings
from model.decoding import DecodeOptions

if TYPE_CHECKING:
    from app.jobs import Engine  # ChatEngine or RemoteEngine

ENGINES = ("worker", "local")


async def run(clients: int, requests: int, engine: Engine, opts: DecodeOptions,
              timeout: float) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def client(offset: int) -> None:
        for i in range(requests):
            source = engine.encode_turns([PROMPTS[(offset + i) % len(PROMPTS)]])
            start = time.perf_counter()
            await engine.submit(source, opts, timeout=timeout).result()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - start, sorted(latencies)


async def main_async(args: argparse.Namespace) -> int:
    overrides = {} if args.engine is None else {"model_process": args.engine == "worker"}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    engine = await asyncio.to_thread(build_engine, settings)
    engine.start()
    try:
        await engine.wait_ready()
        kind = "worker" if settings.model_process else "local"
        print(f"# engine alone ({kind}): model {engine.name!r}, {engine.info()['engine']}")
        print(f"# {machine_line()}\n")
        rows = await measure(args, engine, settings.request_timeout_s)
    finally:
        await engine.aclose()
    headers = ["strategy", "callers", "req/s", "p50 ms", "p95 ms", "req/s vs 1", "p95 / 1-caller p50"]
    print(table(headers, rows))
    return 0


async def measure(args: argparse.Namespace, engine: Engine, timeout: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for strategy in args.strategies.split(","):
        opts = decode_options(ChatRequest(message="x", strategy=strategy))  # type: ignore[call-arg]
        single: tuple[float, float] | None = None
        for clients in args.callers:
            await run(clients, 1, engine, opts, timeout)  # warm up
            wall, lat = await run(clients, args.requests, engine, opts, timeout)
            rps = len(lat) / wall
            p50, p95 = 1e3 * lat[len(lat) // 2], 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.95))]
            single = single or (rps, p50)
            rows.append([strategy, clients, rps, p50, p95, rps / single[0], p95 / single[1]])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=ENGINES,
                   help="worker: the model worker process; local: threads of this process "
                        "(default: as CHATBOT_MODEL_PROCESS says, worker unless set)")
    p.add_argument("--requests", type=int, default=40, help="requests per caller")
    p.add_argument("--strategies", default="greedy,beam")
    p.add_argument("--quick", action="store_true", help="a smoke test: 1 and 4 callers, 3 requests each")
    args = p.parse_args()
    args.callers = (1, 4) if args.quick else (1, 32)
    if args.quick:
        args.requests = 3
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
