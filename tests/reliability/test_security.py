"""Security: the API key (constant-time compare, never logged, never echoed), CORS only for
the configured origins, the page's security headers."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from app.routes import common
from tests.api.conftest import on_a_port, serving

from .conftest import assert_clean_error

KEY = "sk-live-7f3a9c2e4b1d8f6a"
CHAT_BODY = {"message": "hello"}
COMPLETION_BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.anyio
async def test_every_wrong_key_is_refused_through_compare_digest(make_app,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(common.hmac, "compare_digest", spy)
    app, _ = make_app(api_key=KEY)
    wrong = [KEY[:-1], KEY + "x", KEY.upper(), KEY[:1], "x" * 4096, f"{KEY} {KEY}", "\\" + KEY[1:]]
    async with serving(app) as client:
        for token in wrong:
            for path, body in [("/api/chat", CHAT_BODY), ("/v1/chat/completions", COMPLETION_BODY)]:
                r = await client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
                assert_clean_error(r, 401)
                assert KEY not in r.text and r.headers["www-authenticate"] == "Bearer"
        # Malformed headers never reach the comparison, and are refused all the same.
        for header in ["", "Bearer", "Bearer ", "Token " + KEY, KEY, "Basic " + KEY, "Bearer\t" + KEY]:
            r = await client.get("/v1/models", headers={"Authorization": header})
            assert_clean_error(r, 401)
        ok = await client.post("/api/chat", json=CHAT_BODY, headers={"Authorization": f"bearer {KEY}"})
        assert ok.status_code == 200  # the scheme is case-insensitive (RFC 7235)
    # Each wrong key was compared as bytes against the key, in constant time.
    assert {a for a, _ in compared} >= {t.encode() for t in wrong}
    assert {b for _, b in compared} == {KEY.encode()}


def test_the_key_never_reaches_the_logs(make_app, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app, _ = make_app(api_key=KEY)
    with on_a_port(app) as url, uvicorn_logs_captured(caplog):
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content is not None
        stream = good.chat.completions.create(model="tiny", stream=True,
                                              messages=[{"role": "user", "content": "hello"}])
        assert [c for c in stream]
        for token in (KEY[:-1], KEY + KEY):
            bad = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as err:
                bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
            assert KEY not in str(err.value.body)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        # A key sent where no key is expected (in the body) is not echoed or logged either.
        r = httpx.post(f"{url}/api/chat", json={"message": "hi", "api_key": KEY},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 422 and KEY not in r.text
    server_side = [r for r in caplog.records if not r.name.startswith(("openai", "httpx", "httpcore"))]
    assert any(r.name == "uvicorn.access" for r in server_side)  # the server's logs were captured
    assert any(r.name.startswith("chatbot") for r in server_side)
    for record in server_side:
        assert KEY not in record.getMessage() and KEY not in str(record.args), record.name


@contextmanager
def uvicorn_logs_captured(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """uvicorn's loggers do not propagate to the root logger: hand them caplog's handler."""
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(caplog.handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(caplog.handler)
            lg.setLevel(level)


@pytest.mark.anyio
async def test_cors_never_answers_for_an_origin_it_was_not_given(make_app) -> None:
    app, _ = make_app(cors_origins="https://chat.example", api_key=KEY)
    async with serving(app) as client:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        # The preflight needs no key (browsers never send one), and names only the allowed origin.
        r = await client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://chat.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://chat.example"
        assert "access-control-allow-credentials" not in r.headers
        for origin in ("https://evil.example", "https://chat.example.evil.example", "null",
                       "http://chat.example", "https://CHAT.example.", "*"):
            r = await client.options("/api/chat", headers={**preflight, "Origin": origin})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, origin
            for method, path, body, headers in [
                    ("POST", "/api/chat", CHAT_BODY, {"Authorization": f"Bearer {KEY}"}),
                    ("POST", "/api/chat", CHAT_BODY, {}),  # 401
                    ("POST", "/api/chat", {"message": 5}, {"Authorization": f"Bearer {KEY}"}),  # 422
                    ("GET", "/health", None, {})]:
                r = await client.request(method, path, json=body, headers={**headers, "Origin": origin})
                assert "access-control-allow-origin" not in r.headers, (origin, path, r.status_code)
        r = await client.post("/api/chat", json=CHAT_BODY, headers={"Origin": "https://chat.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://chat.example"


@pytest.mark.anyio
async def test_the_page_and_its_assets_carry_the_security_headers(make_app) -> None:
    app, _ = make_app()
    async with serving(app) as client:
        for method, path in [("GET", "/"), ("HEAD", "/"), ("GET", "/static/app.js"),
                             ("GET", "/favicon.ico")]:
            r = await client.request(method, path)
            assert r.status_code == 200, path
            csp = r.headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            assert directives["script-src"] == "'self'" and directives["default-src"] == "'self'"
            assert directives["frame-ancestors"] == "'none'"
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
        for path in ("/static/..%2Fmain.py", "/static/%2e%2e/settings.py", "/static/.env", "/main.py"):
            r = await client.get(path)
            assert r.status_code == 404 and "import" not in r.text, path
