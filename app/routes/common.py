"""What the routers share: dependencies, the API key check, input limits, replies."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from model.options import DecodeOptions, Hypothesis

from ..errors import ClientGone, InvalidRequest, NotReady, Unauthorized
from ..jobs import Engine
from ..reply_filter import ReplyFilter
from ..schemas import MIN_TOP_P
from ..settings import Settings

T = TypeVar("T")


# The dependencies are `async def`: FastAPI runs a plain `def` in its thread pool, a
# thread hop per dependency per request (measured: most of the per-request overhead).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None or not engine.accepting:
        raise NotReady("the model is not loaded yet" if engine is None else "the engine is not running",
                       headers={"Retry-After": "1"})
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]

bearer = HTTPBearer(auto_error=False, description="The key set in CHATBOT_API_KEY")


def api_key_check(key: str) -> Depends:  # type: ignore[valid-type]
    """A dependency that wants `Authorization: Bearer <key>` (compared in constant time)."""
    expected = key.encode()

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not credentials or not hmac.compare_digest(given, expected):
            raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key>",
                               headers={"WWW-Authenticate": "Bearer"})

    return Depends(require_api_key)


def check_length(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise InvalidRequest(f"{param}: {len(text)} characters; the limit is {limit}", param=param)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only
    `http.disconnect` can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and so the engine's work) if the client leaves."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    raise ClientGone("the client disconnected")


@dataclass
class Reply:
    text: str
    score: float
    tokens: int
    finished: bool  # ended with end-of-sequence (else cut at max_length)
    fallback: bool = False  # the reply filter's fallback: every candidate was blocked


def search_options(strategy: str, *, max_length: int, length_penalty: float, no_repeat_ngram_size: int,
                   beam_size: int, n_best: int, samples: int, temperature: float, top_p: float,
                   rerank: dict[str, Any]) -> DecodeOptions:
    """The search a request asks for, for both APIs. Fields a strategy ignores are normalised,
    so that requests that decode alike share one search in the engine: beam search returns
    every finished beam (the route keeps the n best distinct ones), sampling at least n. Beam
    search settles the n best it is asked for and stops there (model/decoding.py BeamSearch),
    except for MMI, which reranks all the beams: it waits for every one to finish."""
    common = {"max_length": max_length, "min_length": min(2, max_length), "length_penalty": length_penalty,
              "no_repeat_ngram_size": no_repeat_ngram_size, **rerank}
    if strategy == "beam":
        width = max(beam_size, n_best)
        settle = width if rerank.get("rerank") == "mmi" else n_best
        return DecodeOptions(strategy="beam", beam_size=width, n_best=settle, **common)
    if strategy == "sample":
        return DecodeOptions(strategy="sample", beam_size=1, n_best=max(samples, n_best),
                             temperature=temperature, top_p=max(top_p, MIN_TOP_P), **common)
    return DecodeOptions(strategy="greedy", beam_size=1, n_best=1, **common)


def reranking(rerank: str | None, mmi_weight: float | None, settings: Settings,
              engine: Engine) -> dict[str, Any]:
    """DecodeOptions' reranking fields for a request: what it asked, else the server's settings.
    A server set to mmi whose checkpoint has no reverse model falls back to likelihood."""
    if rerank is None:
        rerank = settings.rerank
        if rerank == "mmi" and not engine.has_reverse:
            rerank = "likelihood"
    return {"rerank": rerank, "mmi_weight": settings.mmi_weight if mmi_weight is None else mmi_weight}


async def get_reply_filter(request: Request) -> ReplyFilter | None:
    return getattr(request.app.state, "reply_filter", None)


ReplyFilterDep = Annotated[ReplyFilter | None, Depends(get_reply_filter)]


def screened(found: list[Reply], reply_filter: ReplyFilter | None) -> list[Reply]:
    """The candidates the reply filter lets through, in order; its fallback if none passes."""
    if reply_filter is None:
        return found
    kept = [found[i] for i in reply_filter.passed([r.text for r in found])]
    return kept or [Reply(text=reply_filter.fallback, score=0.0, tokens=0, finished=True, fallback=True)]


def _finite(score: float) -> float:
    # JSON has no infinities; a hypothesis forced to end can score -inf.
    return float(score) if math.isfinite(score) else -1e9


def replies(engine: Engine, hyps: Sequence[Hypothesis]) -> list[Reply]:
    """Decoded hypotheses, in the engine's order (best first by the request's reranking)."""
    return [Reply(text=engine.decode(h.tokens), score=_finite(h.score), tokens=len(h.tokens),
                  finished=h.finished) for h in hyps]


def distinct(items: Sequence[Reply]) -> list[Reply]:
    seen: set[str] = set()
    out = []
    for r in items:
        if r.text not in seen:
            seen.add(r.text)
            out.append(r)
    return out
