"""POST /api/chat: the REST chat endpoint."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from model.options import DecodeOptions

from ..error_responses import error_responses
from ..schemas import Candidate, ChatRequest, ChatResponse, Usage
from .common import (
    EngineDep,
    ReplyFilterDep,
    SettingsDep,
    check_length,
    distinct,
    replies,
    reranking,
    screened,
    search_options,
    unless_disconnected,
)

router = APIRouter(tags=["chat"])


def decode_options(req: ChatRequest, rerank: dict[str, Any] | None = None) -> DecodeOptions:
    return search_options(req.strategy, max_length=req.max_length, length_penalty=req.length_penalty,
                          no_repeat_ngram_size=req.no_repeat_ngram_size, beam_size=req.beam_size,
                          n_best=req.n_best, samples=req.samples, temperature=req.temperature,
                          top_p=req.top_p, rerank=rerank or {})


@router.post("/api/chat", response_model=ChatResponse,
             responses=error_responses(400, 413, 415, 422, 429, 500, 503, 504))
async def chat(req: ChatRequest, request: Request, engine: EngineDep,
               settings: SettingsDep, reply_filter: ReplyFilterDep) -> ChatResponse:
    """Reply to `message`, given the earlier turns in `history`.

    greedy gives one reply; beam searches `beam_size` beams, sample draws `samples`
    samples; the candidates are ranked by `rerank` and the `n_best` best distinct ones
    that pass the reply filter come back, best first; `reply` is the first.
    """
    start = time.perf_counter()
    limit = settings.max_input_chars
    check_length(req.message, limit, "message")
    for i, turn in enumerate(req.history):
        check_length(turn.content, limit, f"history.{i}.content")
    source = engine.encode_turns([t.content for t in req.history] + [req.message])
    opts = decode_options(req, reranking(req.rerank, req.mmi_weight, settings, engine))
    ticket = engine.submit(source, opts, timeout=settings.request_timeout_s)
    completion = await unless_disconnected(request, ticket.result())
    best = distinct(screened(replies(engine, completion.hypotheses), reply_filter))[: req.n_best]
    return ChatResponse(
        reply=best[0].text if best else "",
        candidates=[Candidate(text=r.text, score=r.score) for r in best],
        strategy=req.strategy, rerank=opts.rerank, model=engine.name,
        usage=Usage(prompt_tokens=completion.prompt_tokens,
                    completion_tokens=sum(r.tokens for r in best)),
        latency_ms=round((time.perf_counter() - start) * 1000, 3),
    )
