"""Rate limiting per API key or client address: off by default, 429 with Retry-After."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from app.ratelimit import RateLimiter
from app.settings import Settings
from tests.api.conftest import serving

from .conftest import assert_clean_error

KEY = "k3y-for-rate-limits"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_the_burst_then_one_request_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(6, clock=clock)  # 6 a minute: one every 10 s
    assert [limiter.acquire("a") for _ in range(6)] == [0.0] * 6
    assert limiter.acquire("a") == pytest.approx(10.0)
    assert limiter.acquire("b") == 0.0  # another client has its own bucket
    clock.now += 4
    assert limiter.acquire("a") == pytest.approx(6.0)  # a refused request costs nothing
    clock.now += 6
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    clock.now += 3600  # an idle client's bucket fills up to the burst, no further
    assert [limiter.acquire("a") for _ in range(7)].count(0.0) == 6


def test_the_table_of_clients_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(1, max_clients=100, clock=clock)
    assert limiter.acquire("first") == 0.0
    for i in range(1000):
        limiter.acquire(f"client-{i}")
    assert len(limiter) == 100
    assert limiter.acquire("first") == 0.0  # forgotten: a fresh bucket, never a wrong refusal


def test_bad_limits_are_refused_early() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        RateLimiter(0)
    with pytest.raises(ValueError, match="max_clients"):
        RateLimiter(5, max_clients=0)
    assert Settings().rate_limit_per_minute == 0  # off by default


def client_at(app: FastAPI, address: str, **headers: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers, timeout=30)


@pytest.mark.anyio
async def test_over_the_limit_a_client_gets_429_with_retry_after(make_app) -> None:
    app, _ = make_app(rate_limit_per_minute=3)
    async with serving(app), client_at(app, "10.0.0.1") as one, client_at(app, "10.0.0.2") as two:
        statuses = [(await one.post("/api/chat", json={"message": "hi"})).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        r = await one.get("/v1/models")
        error = assert_clean_error(r, 429)
        assert error["type"] == "rate_limit_error" and "3 requests a minute" in error["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 20
        # A body the limiter refuses is not even read; probes and the page stay open.
        assert (await one.post("/api/chat", content=b"x" * 10_000)).status_code == 429
        for path in ("/health", "/ready", "/metrics", "/"):
            assert (await one.get(path)).status_code == 200, path
        assert (await two.post("/api/chat", json={"message": "hi"})).status_code == 200
        # Each refusal is counted like any other response.
        registry = app.state.metrics.registry
        assert registry.get_sample_value("chatbot_requests_total",
                                         {"route": "unmatched", "method": "GET", "status": "429"}) == 1
        schema = (await two.get("/openapi.json")).json()
        assert "429" in schema["paths"]["/v1/models"]["get"]["responses"]


@pytest.mark.anyio
async def test_the_key_holder_has_one_bucket_and_wrong_keys_count_against_the_address(make_app) -> None:
    app, _ = make_app(rate_limit_per_minute=2, api_key=KEY)
    good = {"authorization": f"Bearer {KEY}"}
    async with serving(app), client_at(app, "10.0.0.1", **good) as a, \
            client_at(app, "10.0.0.2", **good) as b, client_at(app, "10.0.0.3") as c:
        assert (await a.get("/v1/models")).status_code == 200
        assert (await b.get("/v1/models")).status_code == 200
        r = await a.get("/v1/models")  # the key's two requests are spent, from any address
        assert r.status_code == 429 and r.headers["retry-after"]
        # Made-up keys are refused (401) while the address has tokens, then limited like it.
        codes = [(await c.get("/v1/models", headers={"authorization": f"Bearer made-up-{i}"})).status_code
                 for i in range(4)]
        assert codes == [401, 401, 429, 429]


@pytest.mark.anyio
async def test_without_a_limit_bursts_are_not_refused(make_app) -> None:
    app, _ = make_app()
    async with serving(app) as client:
        codes = {(await client.get("/v1/models")).status_code for _ in range(150)}
        assert codes == {200}
        schema = (await client.get("/openapi.json")).json()
        assert "429" not in schema["paths"]["/v1/models"]["get"]["responses"]
