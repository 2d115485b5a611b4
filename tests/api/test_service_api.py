"""/health, /ready, /metrics, /api/model, the API key, CORS and the OpenAPI schema."""

from __future__ import annotations

import httpx
import pytest

from model.checkpoint import Checkpoint

from .conftest import serving

pytestmark = pytest.mark.anyio


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).json() == {"status": "ready", "model": "tiny"}


async def test_model_info_describes_the_checkpoint(client: httpx.AsyncClient, ckpt: Checkpoint) -> None:
    r = await client.get("/api/model")
    assert r.status_code == 200
    info = r.json()
    assert info["name"] == "tiny"
    assert info["parameters"] == ckpt.model.num_parameters()
    assert info["vocab_size"] == ckpt.tokenizer.vocab_size
    assert info["architecture"]["hidden_size"] == ckpt.model.cfg.hidden_size
    assert info["metrics"] == ckpt.metrics and info["device"] == "cpu"
    assert info["engine"]["max_batch_size"] == 128


async def test_metrics_count_requests_queue_batches_and_tokens(client: httpx.AsyncClient) -> None:
    await client.post("/api/chat", json={"message": "hello"})
    await client.post("/api/chat", json={"message": "hello", "beam_size": 0})
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'chatbot_requests_total{method="POST",route="/api/chat",status="200"} 1.0' in text
    assert 'chatbot_requests_total{method="POST",route="/api/chat",status="422"} 1.0' in text
    assert 'chatbot_request_duration_seconds_count{route="/api/chat"} 2.0' in text
    assert "chatbot_queue_depth 0.0" in text
    assert "chatbot_batch_rows_count" in text
    tokens = next(line for line in text.splitlines() if line.startswith("chatbot_generated_tokens_total"))
    assert float(tokens.split()[-1]) >= 1


async def test_the_api_key_guards_chat_and_model_endpoints(make_app) -> None:
    app, _ = make_app(api_key="s3cret")
    async with serving(app) as client:
        good = {"Authorization": "Bearer s3cret"}
        for method, path, body in [("POST", "/api/chat", {"message": "hi"}),
                                   ("POST", "/v1/chat/completions",
                                    {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                                   ("GET", "/v1/models", None), ("GET", "/api/model", None)]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic czNjcmV0"}]:
                r = await client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
                assert "s3cret" not in r.text
            assert (await client.request(method, path, json=body, headers=good)).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert "HTTPBearer" in schema["components"]["securitySchemes"]
        assert "401" in schema["paths"]["/api/chat"]["post"]["responses"]


async def test_cors_allows_the_configured_origins_only(make_app) -> None:
    app, _ = make_app(cors_origins="https://chat.example, https://other.example")
    async with serving(app) as client:
        preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        r = await client.options("/api/chat", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://chat.example"
        r = await client.options("/api/chat", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await client.get("/health", headers={"Origin": "https://other.example"})
        assert r.headers["access-control-allow-origin"] == "https://other.example"


async def test_without_cors_origins_no_cors_headers(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers={"Origin": "https://chat.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_the_openapi_schema_documents_every_error_status(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path in ("/api/chat", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        for status in ("200", "400", "413", "415", "422", "429", "500", "503", "504"):
            assert status in responses, (path, status)
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert "401" not in schema["paths"]["/api/chat"]["post"]["responses"]  # no key configured
    assert "securitySchemes" not in schema.get("components", {})
    chat = schema["components"]["schemas"]["ChatRequest"]
    assert chat["additionalProperties"] is False
    assert chat["properties"]["beam_size"] == {"type": "integer", "maximum": 16, "minimum": 1, "default": 5,
                                               "title": "Beam Size",
                                               "description": chat["properties"]["beam_size"]["description"]}
    assert chat["properties"]["message"]["maxLength"] == 2000
    assert "x-input-text" not in str(schema)
