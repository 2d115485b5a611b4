"""POST /api/chat and the behaviour every route shares: validation, limits, errors, load."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.routes.chat import decode_options
from app.schemas import ChatRequest
from model.checkpoint import Checkpoint

from .conftest import PROMPTS, Gate, complete, reference, serving

pytestmark = pytest.mark.anyio


GREEDY = {"strategy": "greedy"}  # the default is beam search (test_rerank_api.py)


def _opts(**body):  # type: ignore[no-untyped-def]
    return decode_options(ChatRequest(**{"message": "x", **GREEDY, **body}))


def test_beam_search_settles_the_candidates_asked_for_and_every_beam_for_mmi() -> None:
    """A beam request may stop once its n best are settled (model/decoding.py BeamSearch); MMI
    reranks every beam, so it waits for all of them."""
    plain = decode_options(ChatRequest(message="x"), {"rerank": "likelihood", "mmi_weight": 0.5})
    assert (plain.strategy, plain.beam_size, plain.n_best, plain.early_stopping) == ("beam", 5, 1, True)
    three = decode_options(ChatRequest(message="x", n_best=3))
    assert (three.beam_size, three.n_best) == (5, 3)
    mmi = decode_options(ChatRequest(message="x"), {"rerank": "mmi", "mmi_weight": 0.5})
    assert (mmi.beam_size, mmi.n_best) == (5, 5)


async def test_greedy_reply_is_the_models_reply(client: httpx.AsyncClient, ckpt: Checkpoint) -> None:
    r = await client.post("/api/chat", json={"message": "do you like cats", **GREEDY})
    assert r.status_code == 200
    body = r.json()
    assert body["reply"] == reference(ckpt, ["do you like cats"], _opts())[0]
    [candidate] = body["candidates"]
    assert candidate["text"] == body["reply"] and candidate["score"] < 0
    assert body["strategy"] == "greedy" and body["model"] == "tiny"
    assert body["usage"]["prompt_tokens"] == len(ckpt.tokenizer.encode("do you like cats"))
    assert body["usage"]["completion_tokens"] >= 1 and body["latency_ms"] > 0


async def test_history_feeds_the_last_turns_only(client: httpx.AsyncClient, ckpt: Checkpoint) -> None:
    K = ckpt.model.cfg.context_turns
    history = [{"role": "user", "content": "good night"}, {"role": "assistant", "content": "see you later"},
               {"role": "user", "content": "what is the weather"}, {"role": "assistant", "content": "sunny"}]
    r = await client.post("/api/chat", json={"message": "hello", "history": history, **GREEDY})
    assert r.status_code == 200
    turns = [h["content"] for h in history] + ["hello"]
    assert r.json()["reply"] == reference(ckpt, turns[-K:], _opts())[0]
    assert r.json()["usage"]["prompt_tokens"] == len(
        ckpt.tokenizer.encode_context(turns[-K:], ckpt.model.cfg.max_source_len))
    older = [{"role": "user", "content": "something else entirely"}, *history]
    r2 = await client.post("/api/chat", json={"message": "hello", "history": older, **GREEDY})
    assert r2.json()["reply"] == r.json()["reply"]


async def test_beam_n_best_is_sorted_and_distinct(client: httpx.AsyncClient, ckpt: Checkpoint) -> None:
    body = {"message": "do you like music", "strategy": "beam", "beam_size": 6, "n_best": 4}
    r = await client.post("/api/chat", json=body)
    assert r.status_code == 200
    cands = r.json()["candidates"]
    texts = [c["text"] for c in cands]
    scores = [c["score"] for c in cands]
    assert 1 < len(cands) <= 4
    assert len(set(texts)) == len(texts)
    assert scores == sorted(scores, reverse=True)
    assert r.json()["reply"] == texts[0]
    expected = []
    for t in reference(ckpt, ["do you like music"], _opts(**body)):
        if t not in expected:
            expected.append(t)
    assert texts == expected[:4]


async def test_sampling_returns_distinct_samples(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json={"message": "hello", "strategy": "sample", "n_best": 5,
                                             "temperature": 1.5, "top_p": 0.95})
    assert r.status_code == 200
    texts = [c["text"] for c in r.json()["candidates"]]
    assert 1 <= len(texts) <= 5 and len(set(texts)) == len(texts)


@pytest.mark.parametrize(("body", "field"), [
    ({}, "message"),
    ({"message": ""}, "message"),
    ({"message": 5}, "message"),
    ({"message": "hi", "beam_size": 0}, "beam_size"),
    ({"message": "hi", "beam_size": 17}, "beam_size"),
    ({"message": "hi", "beam_size": "5"}, "beam_size"),
    ({"message": "hi", "max_length": True}, "max_length"),
    ({"message": "hi", "max_length": 2.5}, "max_length"),
    ({"message": "hi", "temperature": "1"}, "temperature"),
    ({"message": "hi", "top_p": 0}, "top_p"),
    ({"message": "hi", "strategy": "best"}, "strategy"),
    ({"message": "hi", "history": [{"role": "system", "content": "x"}]}, "history.0.role"),
    ({"message": "hi", "history": "hello"}, "history"),
    ({"message": "hi", "colour": "red"}, "colour"),
])
async def test_invalid_fields_get_422_naming_the_field(client: httpx.AsyncClient, body: dict,
                                                      field: str) -> None:
    r = await client.post("/api/chat", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


async def test_nan_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", content=b'{"message": "hi", "length_penalty": NaN}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "length_penalty"


async def test_message_longer_than_the_limit_is_422(make_app) -> None:
    app, _ = make_app(max_input_chars=20)
    async with serving(app) as client:
        r = await client.post("/api/chat", json={"message": "x" * 21})
        assert r.status_code == 422 and r.json()["error"]["param"] == "message"
        r = await client.post("/api/chat", json={"message": "hi", "history": [
            {"role": "user", "content": "y" * 30}]})
        assert r.status_code == 422 and r.json()["error"]["param"] == "history.0.content"
        assert (await client.post("/api/chat", json={"message": "x" * 20})).status_code == 200
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
        assert schema["ChatRequest"]["properties"]["message"]["maxLength"] == 20


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b'{"message": "hi"', "application/json", 400),
    (b'{"message": "caf\xe9"}', "application/json", 400),
    (b'message=hi', "application/x-www-form-urlencoded", 415),
    (b'{"message": "hi"}', "text/plain", 415),
])
async def test_bodies_that_are_not_json_are_refused(client: httpx.AsyncClient, content: bytes, ctype: str,
                                                    status: int) -> None:
    r = await client.post("/api/chat", content=content, headers={"content-type": ctype})
    assert r.status_code == status
    assert r.json()["error"]["message"]


async def test_bodies_over_the_limit_get_413(make_app) -> None:
    app, _ = make_app(max_body_bytes=2048)
    async with serving(app) as client:
        r = await client.post("/api/chat", json={"message": "x" * 3000})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        async def chunks():  # no Content-Length: the size is counted as it streams in
            yield b'{"message": "'
            for _ in range(10):
                yield b"x" * 300
            yield b'"}'

        r = await client.post("/api/chat", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert (await client.post("/api/chat", json={"message": "x" * 500})).status_code == 200


async def test_32_concurrent_greedy_requests_equal_the_sequential_replies(make_app) -> None:
    app, _ = make_app(max_batch_size=64)
    bodies = [{"message": PROMPTS[i % len(PROMPTS)], "max_length": 10 + i % 5, **GREEDY} for i in range(32)]
    async with serving(app) as client:
        sequential = []
        for b in bodies:
            sequential.append((await client.post("/api/chat", json=b)).json()["reply"])
        registry = app.state.metrics.registry

        def batched_steps() -> float:  # steps that decoded more than one request
            return (registry.get_sample_value("chatbot_batch_requests_count")
                    - registry.get_sample_value("chatbot_batch_requests_bucket", {"le": "1.0"}))

        assert batched_steps() == 0
        responses = await asyncio.gather(*(client.post("/api/chat", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * 32
    assert [r.json()["reply"] for r in responses] == sequential
    assert batched_steps() > 0


async def test_a_full_queue_answers_429(make_app, gate: Gate) -> None:
    app, engine = make_app(step=gate, max_batch_size=1, max_queue=2)
    async with serving(app) as client:
        gate.opened.clear()
        first = asyncio.ensure_future(client.post("/api/chat", json={"message": "hello"}))
        assert await asyncio.to_thread(gate.waiting.wait, 5)
        queued = [asyncio.ensure_future(client.post("/api/chat", json={"message": p})) for p in PROMPTS[:2]]
        while engine.queue_depth < 2:
            await asyncio.sleep(0.01)
        r = await client.post("/api/chat", json={"message": "one too many"})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "overloaded_error" and r.headers["retry-after"]
        gate.opened.set()
        assert [x.status_code for x in await asyncio.gather(first, *queued)] == [200, 200, 200]


async def test_a_request_past_its_deadline_gets_504(make_app, gate: Gate) -> None:
    app, engine = make_app(step=gate, request_timeout_s=0.2)
    async with serving(app) as client:
        gate.opened.clear()
        r = await client.post("/api/chat", json={"message": "hello"})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        gate.opened.set()
        while engine.active_requests:
            await asyncio.sleep(0.01)
        # the rows were dropped and the engine carries on (no deadline here: the machine may be slow)
        assert (await complete(engine, [5, 6], _opts())).hypotheses and engine.ready


async def test_not_ready_answers_503(make_app) -> None:
    app, _ = make_app()  # no lifespan run: nothing is loaded
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
        assert (await client.post("/api/chat", json={"message": "hi"})).status_code == 503


async def test_unknown_paths_and_methods_get_json_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = await client.get("/api/chat")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


async def test_edge_values_inside_the_bounds_are_served(client: httpx.AsyncClient) -> None:
    # 7.0 is an integer to JSON Schema; the smallest top_p must still leave a token to sample
    r = await client.post("/api/chat", json={"message": "hi", "strategy": "beam", "beam_size": 3.0,
                                             "n_best": 2.0})
    assert r.status_code == 200 and len(r.json()["candidates"]) <= 2
    r = await client.post("/api/chat", json={"message": "hi", "strategy": "sample", "top_p": 5e-324,
                                             "temperature": 0.01, "max_length": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "tool"}], "top_p": 5e-324,
                                                        "strategy": "sample", "n": 2.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
