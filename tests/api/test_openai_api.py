"""The OpenAI-compatible endpoints, over raw HTTP and through the official `openai` client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from app.routes.openai import decode_options
from app.schemas import ChatCompletionRequest
from model.checkpoint import Checkpoint

from .conftest import Gate, on_a_port, reference

pytestmark = pytest.mark.anyio


def _events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def _streamed(text: str) -> tuple[dict[int, str], dict[int, str], list[dict]]:
    """Content and finish_reason per choice index, and every chunk, from an SSE body."""
    events = _events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        for ch in c["choices"]:
            content[ch["index"]] = content.get(ch["index"], "") + ch["delta"].get("content", "")
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    return content, finish, chunks


async def test_completion_has_the_openai_shape(client: httpx.AsyncClient, ckpt: Checkpoint) -> None:
    body = {"model": "whatever", "messages": [{"role": "system", "content": "be nice"},
                                              {"role": "user", "content": "do you like cats"}]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "tiny" and isinstance(data["created"], int)
    [choice] = data["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    opts = decode_options(ChatCompletionRequest(**body))
    assert opts.strategy == "greedy"
    assert choice["message"]["content"] == reference(ckpt, ["do you like cats"], opts)[0]
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_cuts_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": "hello"}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("prompt", ["hello", "what is your name", "do you like coffee"])
async def test_the_stream_equals_the_plain_reply(client: httpx.AsyncClient, prompt: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    content, finish, chunks = _streamed(r.text)
    assert content == {0: plain["choices"][0]["message"]["content"]}
    assert finish == {0: plain["choices"][0]["finish_reason"]}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) >= 3  # role, at least one piece of content, finish
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


async def test_n_with_temperature_0_gives_the_n_best_beams(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "n": 3, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    data = (await client.post("/v1/chat/completions", json=body)).json()
    texts = [c["message"]["content"] for c in data["choices"]]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    content, finish, _ = _streamed(r.text)
    assert [content[i] for i in range(3)] == texts and set(finish) == {0, 1, 2}


async def test_n_with_temperature_samples_n_choices(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "n": 4, "temperature": 1.2, "top_p": 0.9,
            "messages": [{"role": "user", "content": "hello"}]}
    data = (await client.post("/v1/chat/completions", json=body)).json()
    assert len(data["choices"]) == 4
    assert decode_options(ChatCompletionRequest(**body)).strategy == "sample"


async def test_beam_options_ride_along_as_extra_fields(client: httpx.AsyncClient, ckpt: Checkpoint) -> None:
    body = {"model": "m", "beam_size": 4, "no_repeat_ngram_size": 2, "length_penalty": 1.0,
            "messages": [{"role": "user", "content": "good morning"}], "presence_penalty": 0.5}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    opts = decode_options(ChatCompletionRequest(**body))
    assert (opts.strategy, opts.beam_size, opts.no_repeat_ngram_size) == ("beam", 4, 2)
    assert r.json()["choices"][0]["message"]["content"] == reference(ckpt, ["good morning"], opts)[0]


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
])
async def test_invalid_completion_requests_get_422(client: httpx.AsyncClient, body: dict, field: str) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == field


async def test_models_are_listed(client: httpx.AsyncClient) -> None:
    data = (await client.get("/v1/models")).json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]
    assert (await client.get("/v1/models/tiny")).json()["id"] == "tiny"
    assert (await client.get("/v1/models/gpt-4")).status_code == 404


def test_the_openai_client_works_unchanged(make_app, ckpt: Checkpoint) -> None:
    app, _ = make_app(api_key="s3cret")
    with on_a_port(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        [model] = client.models.list().data
        assert model.id == "tiny"
        reply = client.chat.completions.create(model=model.id, messages=[
            {"role": "user", "content": "what is your name"}])
        text = reply.choices[0].message.content
        assert text and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model.id, stream=True, messages=[{"role": "user", "content": "what is your name"}])
            if c.choices]
        assert "".join(pieces) == text
        multi = client.chat.completions.create(model=model.id, messages=[
            {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi how are you"},
            {"role": "user", "content": "fine thanks"}])
        opts = decode_options(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}]))
        K = ckpt.model.cfg.context_turns
        expected = reference(ckpt, ["hello", "hi how are you", "fine thanks"][-K:], opts)[0]
        assert multi.choices[0].message.content == expected
        several = client.chat.completions.create(model=model.id, n=2, messages=[
            {"role": "user", "content": "hello"}], extra_body={"beam_size": 4})
        assert len(several.choices) == 2
        with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
            client.chat.completions.create(model=model.id, temperature=9, messages=[
                {"role": "user", "content": "hello"}])
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_a_client_that_disconnects_has_its_work_cancelled(make_app, gate: Gate) -> None:
    app, engine = make_app(step=gate)
    with on_a_port(app) as url:
        gate.opened.clear()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/api/chat", json={"message": "hello"}, timeout=0.5)
        # The server hears the disconnect and cancels the request before the step returns.
        registry = app.state.metrics.registry
        labels = {"route": "/api/chat", "method": "POST", "status": "499"}
        deadline = time.monotonic() + 5
        while not registry.get_sample_value("chatbot_requests_total", labels):
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.02)
        gate.opened.set()
        deadline = time.monotonic() + 5
        while engine.active_requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
