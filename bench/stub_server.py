"""The HTTP layer alone: the real app (routes, middleware, uvicorn) over an engine that answers at once.

    python bench/stub_server.py --port 8005 &            # uvicorn's access log on, as `chatbot serve`
    python bench/http_load.py http://127.0.0.1:8005 --strategies greedy --requests 200
    python bench/stub_server.py --port 8006 --no-access-log &
    python bench/stub_server.py --quick    # a smoke test: serve on a free port, http_load.py --quick, stop

Every request still goes through tokenisation, validation, the API's middleware and the
response model; the engine's `submit` resolves at once with a fixed 8-token reply, so no
torch runs. Requests/s and the server's CPU time per request are then what HTTP costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import http_load
import uvicorn
from common import free_port

from app.engine import ChatEngine, Completion
from app.main import create_app
from app.settings import Settings
from model.checkpoint import load_checkpoint, shipped_checkpoint_path
from model.decoding import DecodeOptions, Hypothesis

REPLY = [100, 200, 300, 400, 500, 600, 700, 800]


class _Answered:
    def __init__(self, completion: Completion) -> None:
        self.prompt_tokens = completion.prompt_tokens
        self._completion = completion

    async def result(self) -> Completion:
        return self._completion

    def cancel(self) -> None:
        pass


class InstantEngine(ChatEngine):
    """A ChatEngine (tokenizer, name, info) whose requests are done the moment they arrive."""

    def start(self) -> None:
        self._ready.set()

    @property
    def ready(self) -> bool:
        return True

    async def wait_ready(self, timeout: float = 0.0) -> None:
        return None

    async def aclose(self, timeout: float = 0.0) -> None:
        return None

    def submit(self, source: Sequence[int], opts: DecodeOptions, *, stream: bool = False,  # type: ignore[override]
               timeout: float | None = None) -> Any:
        hyp = Hypothesis(tokens=list(REPLY), score=-1.0, logprob=-2.0)
        return _Answered(Completion(hypotheses=[hyp], prompt_tokens=len(source)))


def quick(app: Any) -> int:
    """Serve on a free port in a thread, run http_load.py's quick levels against it, stop."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the stub server did not start")
        time.sleep(0.05)
    try:
        load = argparse.Namespace(url=f"http://127.0.0.1:{port}", api_key=None, quick=True, concurrency="",
                                  requests=0, strategies="greedy", beam_size=5, max_length=None, timeout=30.0)
        return asyncio.run(http_load.main_async(load))
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8005)
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="serve on a free port, measure with http_load.py --quick, stop")
    args = p.parse_args()
    engine = InstantEngine(load_checkpoint(shipped_checkpoint_path()))
    app = create_app(Settings(), engine=engine)
    if args.quick:
        return quick(app)
    # log level info, as `chatbot serve` runs: the access log then writes a line a request
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info", access_log=not args.no_access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
