"""Hostile input over HTTP: every bad body gets a clear 4xx JSON error, never a 5xx, and no
body (errors included) shows a stack trace or an internal path."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from app.batching import default_step
from tests.api.conftest import serving

from .conftest import assert_clean_error

pytestmark = pytest.mark.anyio

CHAT = "/api/chat"
COMPLETIONS = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def completion(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hello"}], **fields}


@pytest.fixture
async def client(make_app):
    app, _ = make_app(max_body_bytes=256 * 1024)
    async with serving(app) as c:
        yield c


async def test_oversized_bodies_get_413_on_every_post_route(client: httpx.AsyncClient) -> None:
    big = "x" * (257 * 1024)
    for path, body in [(CHAT, {"message": big}), (COMPLETIONS, completion(messages=[
            {"role": "user", "content": big}]))]:
        assert_clean_error(await client.post(path, json=body), 413)
    # A Content-Length that lies about a small body is refused before anything is read.
    r = await client.post(CHAT, content=b'{"message": "hi"}',
                          headers={**JSON, "content-length": str(10**12)})
    assert_clean_error(r, 413)
    r = await client.post(CHAT, content=b'{"message": "hi"}', headers={**JSON, "content-length": "-1"})
    assert_clean_error(r, 400)


@pytest.mark.parametrize("depth", [40, 5_000, 30_000])
async def test_deeply_nested_json_is_refused_cleanly(client: httpx.AsyncClient, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for path, body in [(CHAT, f'{{"message": "hi", "history": {nested}}}'),
                       (COMPLETIONS, f'{{"messages": {nested}}}'),
                       (CHAT, '{"message": ' + '{"a": ' * depth + "1" + "}" * depth + "}")]:
        r = await client.post(path, content=body.encode(), headers=JSON)
        assert r.status_code in (400, 422), (depth, r.status_code, r.text[:300])
        assert_clean_error(r, r.status_code)


@pytest.mark.parametrize(("ctype", "status"), [
    (None, 415), ("application/xml", 415), ("multipart/form-data; boundary=x", 415),
    ("text/json", 415), ("application/json; charset=utf-8", 200), ("application/vnd.api+json", 200),
])
async def test_wrong_content_types_get_415_and_json_types_pass(client: httpx.AsyncClient, ctype: str | None,
                                                               status: int) -> None:
    headers = {"content-type": ctype} if ctype else {}
    for path, body in [(CHAT, {"message": "hello"}), (COMPLETIONS, completion())]:
        r = await client.post(path, content=json.dumps(body).encode(), headers=headers)
        if status == 200:
            assert r.status_code == 200, r.text
        else:
            assert "JSON" in assert_clean_error(r, status)["message"]


@pytest.mark.parametrize(("content", "status"), [
    (b"", 422),  # no body at all: the body is the missing field
    (b"null", 422), (b"[]", 422), (b'"hello"', 422), (b"1e999", 422),
    (b"{", 400), (b'{"message": "hi"} trailing', 400), (b"\xff\xfe{}", 400),
    (b'{"message": "\xc3\x28"}', 400), (b'{"message": "\xed\xa0\x80"}', 400),  # bad UTF-8, CESU surrogate
    (b'{"message": "hi", "message": 5}', 422),  # the last duplicate wins, and it is not a string
])
async def test_bodies_that_are_not_a_json_object(client: httpx.AsyncClient, content: bytes,
                                                 status: int) -> None:
    for path in (CHAT, COMPLETIONS):
        r = await client.post(path, content=content, headers=JSON)
        assert_clean_error(r, status)


@pytest.mark.parametrize("text", ["\\ud800", "\\udfff", "a\\ud83d", "\\ude00b", "\\udc80\\ud800"])
async def test_lone_surrogates_in_json_strings_get_422_naming_the_field(client: httpx.AsyncClient,
                                                                        text: str) -> None:
    # JSON allows "\ud800" escapes, but no UTF-8 text holds a lone surrogate: refused, never
    # passed to the tokenizer, never echoed raw (the error body must itself be valid UTF-8).
    part = f'{{"type": "text", "text": "{text}"}}'
    for path, body, param in [
            (CHAT, f'{{"message": "hi {text}"}}', "message"),
            (CHAT, f'{{"message": "hi", "history": [{{"role": "user", "content": "{text}"}}]}}',
             "history.0.content"),
            (CHAT, f'{{"message": "hi", "strategy": "{text}"}}', "strategy"),
            (CHAT, f'{{"message": "hi", "history": [{{"role": "{text}", "content": "x"}}]}}',
             "history.0.role"),
            (CHAT, f'{{"message": "hi", "{text}": 1}}', None),
            (COMPLETIONS, f'{{"messages": [{{"role": "user", "content": "{text}"}}]}}',
             "messages.0.content"),
            (COMPLETIONS, f'{{"messages": [{{"role": "user", "content": [{part}]}}]}}', "messages.0.content"),
            (COMPLETIONS, f'{{"model": "{text}", "messages": [{{"role": "user", "content": "x"}}]}}',
             "model")]:
        r = await client.post(path, content=body.encode(), headers=JSON)
        error = assert_clean_error(r, 422, param)
        r.content.decode("utf-8")  # strict: no lone surrogate got out
        assert error["message"]
    r = await client.get(f"/v1/models/{text.replace(chr(92), '%5C')}%ED%A0%80")
    assert_clean_error(r, 404)


@pytest.mark.parametrize(("path", "field", "values"), [
    (CHAT, "max_length", [257, 10**6, 2**63, 10**400, 1e308, -1, 0]),
    (CHAT, "beam_size", [17, 10**9, 2**64, -(2**63)]),
    (CHAT, "n_best", [17, 10**9]),
    (CHAT, "no_repeat_ngram_size", [11, 10**12]),
    (CHAT, "temperature", [1e308, -1e308, 0]),
    (COMPLETIONS, "max_tokens", [257, 10**9, 2**63, 10**400]),
    (COMPLETIONS, "max_completion_tokens", [10**9]),
    (COMPLETIONS, "n", [17, 10**6, 2**63, 0]),
    (COMPLETIONS, "beam_size", [17, 10**9]),
    (COMPLETIONS, "temperature", [2.5, 1e308]),
])
async def test_huge_numbers_get_422_naming_the_field(client: httpx.AsyncClient, path: str, field: str,
                                                     values: list[object]) -> None:
    base = {"message": "hi"} if path == CHAT else completion()
    for value in values:
        body = json.dumps({**base, field: value}).encode()  # 10**400 stays an integer in JSON
        error = assert_clean_error(await client.post(path, content=body, headers=JSON), 422, field)
        assert field in error["message"]
    # Infinity and NaN are not JSON, but Python's parser takes them: still 422, never a crash.
    for literal in ("Infinity", "-Infinity", "NaN", "1e999"):
        body = json.dumps(base)[:-1] + f', "{field}": {literal}}}'
        assert_clean_error(await client.post(path, content=body.encode(), headers=JSON), 422, field)


async def test_many_turns_and_long_strings_are_bounded(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={"message": "hi", "history": [{"role": "user", "content": "a"}] * 257})
    assert_clean_error(r, 422, "history")
    r = await client.post(COMPLETIONS, json=completion(messages=[{"role": "user", "content": "a"}] * 257))
    assert_clean_error(r, 422, "messages")
    r = await client.post(CHAT, json={"message": "\u202e" * 2001})
    assert_clean_error(r, 422, "message")
    # Just inside every bound: served, not refused (the limits are not off by one).
    r = await client.post(CHAT, json={"message": "\u202e\u05d0" * 1000, "history": [
        {"role": "assistant", "content": "\x00\x07"}] * 256, "strategy": "beam", "beam_size": 16,
        "n_best": 16, "max_length": 5})
    assert r.status_code == 200, r.text


async def test_an_unexpected_error_is_a_plain_500_without_internals(make_app) -> None:
    app, engine = make_app()
    async with serving(app):
        def boom(turns: object) -> list[int]:
            raise RuntimeError('File "/work/main/app/secret.py", line 3: token=abc')

        engine.encode_turns = boom  # type: ignore[method-assign]
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.post(CHAT, json={"message": "hi"})
    assert_clean_error(r, 500)
    assert "secret" not in r.text and "token" not in r.text


async def test_a_failing_model_step_answers_500_without_internals(make_app, ckpt) -> None:
    armed = False  # the warm-up decode at start must pass
    step = default_step(ckpt.model)

    def failing_step(tokens: Any, rows: Any) -> Any:
        if armed:
            raise RuntimeError("/work/main/model/network.py: CUDA out of memory at 0xdeadbeef")
        return step(tokens, rows)

    app, _ = make_app(step=failing_step)
    async with serving(app) as c:
        armed = True
        for path, body in [(CHAT, {"message": "hi"}), (CHAT, {"message": "hi", "strategy": "beam"}),
                           (COMPLETIONS, completion()), (COMPLETIONS, completion(stream=True)),
                           (COMPLETIONS, completion(stream=True, n=2))]:
            r = await c.post(path, json=body)
            assert_clean_error(r, 500)
            assert "deadbeef" not in r.text
        assert (await c.get("/ready")).status_code == 200  # the engine carries on
