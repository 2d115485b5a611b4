"""Memory of `chatbot serve`: each process's resident set when ready and after mixed requests.

    python bench/memory.py             # the shipped model, 200 mixed requests, 8 clients
    python bench/memory.py --quick     # 20 requests
    python bench/memory.py --quantize bf16   # CHATBOT_QUANTIZE for the server (int8, bf16)

The server runs as in production (`chatbot serve`, the model worker on by default; a
second run with `--in-process` measures CHATBOT_MODEL_PROCESS=false). Requests mix
/api/chat greedy, beam 5 (the default), 16 samples, and OpenAI plain and streamed.
VmRSS is read from /proc for the HTTP process and for its model worker. The server is started
without this shell's CHATBOT_* variables (bench/soak.py's Server): set the quantization with
`--quantize`, not CHATBOT_QUANTIZE.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx
from common import machine_line
from soak import PROMPTS, Server, children, rss_mib

from model.checkpoint_meta import shipped_checkpoint_path

BODIES = [
    ("/api/chat", {"strategy": "greedy"}), ("/api/chat", {}), ("/api/chat", {"strategy": "sample"}),
    ("/v1/chat/completions", {"model": "m"}), ("/v1/chat/completions", {"model": "m", "stream": True}),
]


async def load(url: str, requests: int, clients: int) -> int:
    """Send `requests` mixed requests from `clients` at once; how many answered 200."""
    ok = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal ok
        for i in counter:
            path, extra = BODIES[i % len(BODIES)]
            prompt = PROMPTS[i % len(PROMPTS)]
            body = ({"message": prompt, **extra} if path == "/api/chat" else
                    {**extra, "messages": [{"role": "user", "content": prompt}]})
            r = await http.post(path, json=body)
            ok += r.status_code == 200

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return ok


def measure(checkpoint: Path, requests: int, clients: int, model_process: bool,
            quantize: str = "none") -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(checkpoint, Path(tmp) / "server.log", model_process=str(model_process).lower(),
                        quantize=quantize)
        try:
            server.wait_ready()
            procs = {"HTTP": server.proc.pid}
            for child in children(server.proc.pid):  # none with the engine in-process
                procs["model worker"] = child
            before = {name: rss_mib(pid) for name, pid in procs.items()}
            ok = asyncio.run(load(server.url, requests, clients))
            after = {name: rss_mib(pid) for name, pid in procs.items()}
        finally:
            server.stop()
    label = ("worker process" if model_process else "in-process") + \
        ("" if quantize == "none" else f", {quantize}")
    rows = [[label, name, f"{before[name]:.0f}", f"{after[name]:.0f}"] for name in procs]
    rows.append([label, "together", f"{sum(before.values()):.0f}", f"{sum(after.values()):.0f}"])
    print(f"{label}: {ok}/{requests} answered 200")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 requests")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--checkpoint", type=Path, default=shipped_checkpoint_path())
    ap.add_argument("--in-process", action="store_true", help="also measure CHATBOT_MODEL_PROCESS=false")
    ap.add_argument("--quantize", choices=("none", "int8", "bf16"), default="none",
                    help="the server's CHATBOT_QUANTIZE")
    args = ap.parse_args()
    requests = 20 if args.quick else args.requests
    rows = measure(args.checkpoint, requests, args.clients, True, args.quantize)
    if args.in_process:
        rows += measure(args.checkpoint, requests, args.clients, False, args.quantize)
    print(f"\n| serving | process | RSS MiB ready | RSS MiB after {requests} requests |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n# {machine_line()}")


if __name__ == "__main__":
    main()
