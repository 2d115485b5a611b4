"""OpenAI-compatible endpoints: POST /v1/chat/completions, GET /v1/models[/{id}].

Mapping onto the seq2seq model:
- temperature 0 or unset: deterministic; greedy for n = 1, beam search n-best for
  n > 1 (or whenever `beam_size` > 1 is given); temperature > 0: n samples.
- `messages`: user and assistant turns form the conversation; system, developer and
  tool messages are accepted but the model does not see them.
- `model`: any name is accepted (front ends send their own default); the answer
  names the served model. `GET /v1/models` lists it.
- `stream`: server-sent events ending in `data: [DONE]`. Greedy and sampled single
  replies stream token by token; beam search (and n > 1) sends each choice whole
  when the search ends.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from model.options import DEFAULT_LENGTH_PENALTY, DEFAULT_NO_REPEAT_NGRAM_SIZE, DecodeOptions

from ..error_responses import error_responses
from ..errors import NotFound, ServiceError, status_of
from ..jobs import Completion, Engine, Ticket
from ..reply_filter import ReplyFilter
from ..schemas import (
    DEFAULT_BEAM_SIZE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    Message,
    ModelCard,
    ModelList,
)
from .common import (
    EngineDep,
    Reply,
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

router = APIRouter(tags=["openai"])
STARTED = int(time.time())
DEFAULT_MAX_TOKENS = 40


def decode_options(req: ChatCompletionRequest, rerank: dict[str, Any] | None = None) -> DecodeOptions:
    """temperature 0 or unset: greedy for n = 1, beam n-best for n > 1 or a beam_size > 1; else
    sampling; `strategy` overrides. Unset extras take /api/chat's defaults."""
    strategy = req.strategy
    if strategy is None:
        if req.temperature:
            strategy = "sample"
        elif req.n > 1 or (req.beam_size or 1) > 1:
            strategy = "beam"
        else:
            strategy = "greedy"
    return search_options(
        strategy, max_length=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
        length_penalty=DEFAULT_LENGTH_PENALTY if req.length_penalty is None else req.length_penalty,
        no_repeat_ngram_size=(DEFAULT_NO_REPEAT_NGRAM_SIZE if req.no_repeat_ngram_size is None
                              else req.no_repeat_ngram_size),
        beam_size=req.beam_size or DEFAULT_BEAM_SIZE, n_best=req.n, samples=req.samples or 1,
        temperature=max(req.temperature or 1.0, 0.01), top_p=req.top_p or 1.0, rerank=rerank or {})


def message_text(message: Message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return " ".join(part.text for part in message.content)


def conversation(req: ChatCompletionRequest, limit: int) -> list[str]:
    turns = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                check_length(part.text, limit, f"messages.{i}.content.{j}.text")
        elif m.content is not None:
            check_length(m.content, limit, f"messages.{i}.content")
        if m.role in ("user", "assistant"):
            turns.append(message_text(m))
    return turns


def choose(found: list[Reply], n: int, opts: DecodeOptions) -> list[Reply]:
    """Exactly n choices: distinct candidates first, best first (repeats only if the search
    found fewer distinct replies; n samples drawn as n are taken as ranked, repeats
    included), or the greedy reply n times."""
    if not found:
        return [Reply(text="", score=0.0, tokens=0, finished=False)] * n
    if opts.strategy == "greedy":
        return found[:1] * n
    drawn_as_asked = opts.strategy == "sample" and opts.n_best == n
    picked = found[:n] if drawn_as_asked else distinct(found)[:n]
    taken = {id(r) for r in picked}
    picked += [r for r in found if id(r) not in taken][: n - len(picked)]
    return [picked[i % len(picked)] for i in range(n)]


def _finish(reply: Reply) -> str:
    if reply.fallback:
        return "content_filter"
    return "stop" if reply.finished else "length"


def _shown(text: str, final: bool) -> str:
    """What of a streamed reply's text may go out: all of it at the end, else up to its last
    whitespace (a word still being written could turn out blocked)."""
    if final:
        return text
    cut = max(text.rfind(" "), text.rfind("\n"))
    return text[:cut + 1] if cut >= 0 else ""


def completion_body(engine: Engine, completion: Completion, chosen: list[Reply],
                    request_id: str) -> ChatCompletion:
    tokens = sum(r.tokens for r in chosen)
    return ChatCompletion(
        id=request_id, created=int(time.time()), model=engine.name,
        choices=[Choice(index=i, message=AssistantMessage(content=r.text), finish_reason=_finish(r))
                 for i, r in enumerate(chosen)],
        usage=CompletionUsage(prompt_tokens=completion.prompt_tokens, completion_tokens=tokens,
                              total_tokens=completion.prompt_tokens + tokens),
    )


class _Chunks:
    """Server-sent events in OpenAI's chat.completion.chunk format."""

    def __init__(self, request_id: str, model: str) -> None:
        self.base = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}

    def event(self, data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def delta(self, delta: dict[str, Any], index: int = 0, finish: str | None = None) -> str:
        return self.event({**self.base, "choices": [
            {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    def usage(self, prompt: int, completion: int) -> str:
        return self.event({**self.base, "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}})

    def error(self, exc: ServiceError) -> str:
        status, type_ = status_of(exc)
        return self.event({"error": {"message": exc.message, "type": type_, "code": str(status)}})


async def _token_events(engine: Engine, ticket: Ticket, tokens: AsyncIterator[int],
                        first: int | None, chunks: _Chunks, include_usage: bool,
                        reply_filter: ReplyFilter | None) -> AsyncIterator[str]:
    """Tokens as they come. With the reply filter on, text goes out a whole word at a time,
    each checked first: at a blocked word the stream ends there, finish_reason
    "content_filter" (what is already sent cannot be taken back, and it passed)."""
    try:
        yield chunks.delta({"role": "assistant", "content": ""})
        ids: list[int] = []
        sent = ""
        token = first
        while token is not None:
            ids.append(token)
            # Decode the whole prefix: a token can end inside a multi-byte character.
            text = engine.decode(ids)
            if reply_filter is not None:
                text = _shown(text, final=False)
                if reply_filter.blocked(text):
                    break
            if len(text) > len(sent) and text.startswith(sent):
                yield chunks.delta({"content": text[len(sent):]})
                sent = text
            token = await anext(tokens, None)
        if token is not None:  # the filter stopped it
            yield chunks.delta({}, finish="content_filter")
            if include_usage:
                yield chunks.usage(ticket.prompt_tokens, len(ids))
        else:
            completion = await ticket.result()
            reply = replies(engine, completion.hypotheses)[0]
            if reply_filter is not None and reply_filter.blocked(reply.text):
                reply = Reply(text=sent, score=reply.score, tokens=reply.tokens, finished=True,
                              fallback=True)
            if len(reply.text) > len(sent) and reply.text.startswith(sent):
                yield chunks.delta({"content": reply.text[len(sent):]})
            yield chunks.delta({}, finish=_finish(reply))
            if include_usage:
                yield chunks.usage(completion.prompt_tokens, reply.tokens)
    except ServiceError as exc:  # e.g. the deadline passed mid-stream: headers are gone
        yield chunks.error(exc)
    finally:
        ticket.cancel()
    yield "data: [DONE]\n\n"


async def _whole_events(completion: Completion, chosen: list[Reply], chunks: _Chunks,
                        include_usage: bool) -> AsyncIterator[str]:
    for i, r in enumerate(chosen):
        yield chunks.delta({"role": "assistant", "content": r.text}, index=i)
    for i, r in enumerate(chosen):
        yield chunks.delta({}, index=i, finish=_finish(r))
    if include_usage:
        yield chunks.usage(completion.prompt_tokens, sum(r.tokens for r in chosen))
    yield "data: [DONE]\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# OpenAPI 3.1 reads the schema of an event stream as the schema of one event.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "A chat.completion.chunk as JSON, an {\"error\": ...} "
                                              "object, or [DONE] to end the stream"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion,
    responses={200: {"description": "A chat.completion, or with `stream` a text/event-stream of "
                                    "chat.completion.chunk events ending in `data: [DONE]`",
                     "content": {"text/event-stream": {"schema": SSE_EVENT}}},
               **error_responses(400, 413, 415, 422, 429, 500, 503, 504)},
)
async def chat_completions(req: ChatCompletionRequest, request: Request, engine: EngineDep,
                           settings: SettingsDep, reply_filter: ReplyFilterDep) -> Response | ChatCompletion:
    """OpenAI chat completions; beam_size, length_penalty, no_repeat_ngram_size, strategy,
    samples, rerank and mmi_weight may be added as extra fields."""
    opts = decode_options(req, reranking(req.rerank, req.mmi_weight, settings, engine))
    source = engine.encode_turns(conversation(req, settings.max_input_chars))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    token_stream = req.stream and opts.rows_per_item == 1 and req.n == 1
    ticket = engine.submit(source, opts, stream=token_stream, timeout=settings.request_timeout_s)
    if not req.stream:
        completion = await unless_disconnected(request, ticket.result())
        chosen = choose(screened(replies(engine, completion.hypotheses), reply_filter), req.n, opts)
        return completion_body(engine, completion, chosen, request_id)
    chunks = _Chunks(request_id, engine.name)
    if token_stream:
        tokens = ticket.tokens()
        # Wait for the first token before answering 200, so that a deadline or a
        # failure while queued still gets its own status.
        first = await unless_disconnected(request, anext(tokens, None))
        if first is None:  # ended before any token: a failure raises here, with its status
            await unless_disconnected(request, ticket.result())
        events = _token_events(engine, ticket, tokens, first, chunks, include_usage, reply_filter)
    else:
        completion = await unless_disconnected(request, ticket.result())
        chosen = choose(screened(replies(engine, completion.hypotheses), reply_filter), req.n, opts)
        events = _whole_events(completion, chosen, chunks, include_usage)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _card(engine: Engine) -> ModelCard:
    return ModelCard(id=engine.name, created=STARTED)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(503))
async def list_models(engine: EngineDep) -> ModelList:
    """The served model (one per process)."""
    return ModelList(data=[_card(engine)])


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=error_responses(404, 503))
async def get_model(model_id: str, engine: EngineDep) -> ModelCard:
    """The served model, if `model_id` names it."""
    if model_id != engine.name:
        raise NotFound(f"no model {model_id!r}; this server serves {engine.name!r}", param="model_id")
    return _card(engine)
