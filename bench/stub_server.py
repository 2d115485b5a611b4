"""The HTTP layer alone: the real app (routes, middleware, uvicorn) over an engine that answers at once.

    python bench/stub_server.py --port 8005 &            # uvicorn's access log on, as `chatbot serve`
    python bench/http_load.py http://127.0.0.1:8005 --strategies greedy --requests 200
    python bench/stub_server.py --port 8006 --no-access-log &

Every request still goes through tokenisation, validation, the API's middleware and the
response model; the engine's `submit` resolves at once with a fixed 8-token reply, so no
torch runs. Requests/s and the server's CPU time per request are then what HTTP costs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import common  # noqa: F401 -- puts the repository on sys.path
import uvicorn

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
        return _Answered(Completion([hyp], len(source), 0.0, 0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8005)
    p.add_argument("--no-access-log", action="store_true")
    args = p.parse_args()
    engine = InstantEngine(load_checkpoint(shipped_checkpoint_path()))
    app = create_app(Settings(), engine=engine)
    # log level info, as `chatbot serve` runs: the access log then writes a line a request
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info", access_log=not args.no_access_log)


if __name__ == "__main__":
    main()
