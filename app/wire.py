"""The wire between the HTTP process and the model worker process.

app/remote_engine.py (the HTTP side) and app/model_worker.py (the model side) talk
over a socket pair that only the two of them hold: each message is a tuple, sent as
a length-prefixed pickle frame. Pickle is safe here because both ends are this
program and nothing that came from the network is ever unpickled as code: requests
cross as token ids, options and numbers, replies as token ids and scores.

HTTP side -> model side:
    Settings                              the first frame: what to load and how
    ("submit", rid, source, DecodeOptions, stream, timeout_s)
    ("cancel", rid)
    ("metrics", rid)                      the worker's Prometheus text, please
    ("close", timeout_s)                  finish what is queued and decoding, then exit
Model side -> HTTP side, each frame as (queue_depth, active_requests, message):
    ("ready", pid) or ("failed", reason)  once, after loading
    ("token", rid, token)                 streamed requests
    ("done", rid, Completion)
    ("error", rid, error_name, message, headers)
    ("metrics", rid, text)
    ("closed",)
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

from model.options import Hypothesis

from .errors import ERRORS, EngineFailure, ServiceError

_HEADER = struct.Struct("<I")
_ERRORS = {cls.__name__: cls for cls in ERRORS}


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message; asyncio.IncompleteReadError when the other side has gone."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


def error_message(rid: int, exc: ServiceError) -> tuple[Any, ...]:
    return ("error", rid, type(exc).__name__, exc.message, dict(exc.headers))


def rebuild_error(name: str, message: str, headers: dict[str, str]) -> ServiceError:
    return _ERRORS.get(name, EngineFailure)(message, headers=headers or None)


def plain_hypotheses(hyps: list[Hypothesis]) -> list[Hypothesis]:
    """Hypotheses of built-in types only (no tensor or NumPy scalar crosses the wire)."""
    return [Hypothesis(tokens=[int(t) for t in h.tokens], score=float(h.score),
                       logprob=float(h.logprob), finished=bool(h.finished)) for h in hyps]
