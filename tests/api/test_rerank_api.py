"""Reranking over HTTP: validated, passed through both endpoints, the default where a reverse
model is shipped, and the same reply alone as among others."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.schemas import DEFAULT_STRATEGY
from app.settings import Settings
from model.checkpoint import load_checkpoint
from model.decoding import DecodeOptions
from model.inference import decode_sources

from .conftest import PROMPTS, make_engine, make_settings, serving

pytestmark = pytest.mark.anyio

BEAM_MMI = {"strategy": "beam", "beam_size": 5, "n_best": 5, "rerank": "mmi", "mmi_weight": 1.5}


@pytest.fixture(scope="module")
def mmi_ckpt(tiny_checkpoint_with_reverse):
    return load_checkpoint(tiny_checkpoint_with_reverse)


@pytest.fixture
def mmi_app(tiny_checkpoint_with_reverse, mmi_ckpt):
    from app.main import create_app

    def factory(**overrides):  # type: ignore[no-untyped-def]
        settings = make_settings(tiny_checkpoint_with_reverse, **overrides)
        return create_app(settings, engine=make_engine(mmi_ckpt, settings))
    return factory


def expected(ckpt, prompt: str, weight: float) -> list[str]:
    src = ckpt.tokenizer.encode_context([prompt], ckpt.model.cfg.max_source_len)
    opts = DecodeOptions(strategy="beam", beam_size=5, n_best=5, min_length=2, no_repeat_ngram_size=3,
                         rerank="mmi", mmi_weight=weight)
    return [ckpt.tokenizer.decode(h.tokens) for h in decode_sources(ckpt.model, [src], opts,
                                                                reverse=ckpt.reverse.model)[0]]


async def test_mmi_candidates_come_back_in_the_models_mmi_order(mmi_app, mmi_ckpt) -> None:
    async with serving(mmi_app()) as client:
        r = await client.post("/api/chat", json={"message": "do you like music", **BEAM_MMI})
    assert r.status_code == 200
    body = r.json()
    texts = [c["text"] for c in body["candidates"]]
    scores = [c["score"] for c in body["candidates"]]
    assert body["rerank"] == "mmi" and body["reply"] == texts[0]
    assert scores == sorted(scores, reverse=True)
    want = list(dict.fromkeys(expected(mmi_ckpt, "do you like music", 1.5)))
    assert texts == want


async def test_a_reranked_reply_is_the_same_alone_and_among_others(mmi_app) -> None:
    async with serving(mmi_app(max_batch_size=64)) as client:
        bodies = [{"message": p, **BEAM_MMI} for p in PROMPTS[:10]]
        alone = [(await client.post("/api/chat", json=b)).json()["candidates"] for b in bodies]
        together = await asyncio.gather(*(client.post("/api/chat", json=b) for b in bodies))
    for a, t in zip(alone, together, strict=True):
        assert [c["text"] for c in t.json()["candidates"]] == [c["text"] for c in a]
        scores = [c["score"] for c in t.json()["candidates"]]
        assert scores == pytest.approx([c["score"] for c in a], abs=1e-4)


async def test_the_defaults_are_the_judged_best_and_chatbot_rerank_changes_them(mmi_app) -> None:
    async with serving(mmi_app()) as client:
        r = await client.post("/api/chat", json={"message": "hello"})
        info = (await client.get("/api/model")).json()
    assert r.status_code == 200  # docs/QUALITY.md: beam search, ranked by likelihood
    assert (r.json()["strategy"], r.json()["rerank"]) == (DEFAULT_STRATEGY, "likelihood")
    assert info["reverse"]["parameters"] > 0 and "mmi" in info["reverse"]["purpose"]
    async with serving(mmi_app(rerank="mmi")) as client:
        r = await client.post("/api/chat", json={"message": "hello"})
    assert r.json()["rerank"] == "mmi"


async def test_a_server_set_to_mmi_without_a_reverse_model_ranks_by_likelihood(make_app) -> None:
    app, _ = make_app(rerank="mmi")  # the tiny checkpoint has no reverse model
    async with serving(app) as client:
        r = await client.post("/api/chat", json={"message": "hello"})
        info = (await client.get("/api/model")).json()
    assert r.status_code == 200 and r.json()["rerank"] == "likelihood" and info["reverse"] is None


@pytest.mark.parametrize("body", [{"rerank": "best"}, {"rerank": 1}, {"mmi_weight": -1},
                                  {"mmi_weight": 11}, {"mmi_weight": "1"}, {"samples": 0}, {"samples": 17}])
async def test_rerank_fields_are_validated(client: httpx.AsyncClient, body) -> None:
    r = await client.post("/api/chat", json={"message": "hi", **body})
    assert r.status_code == 422
    param = next(iter(body))
    assert param in r.text
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        **body})
    assert r.status_code == 422 and param in r.text


async def test_mmi_without_a_reverse_model_is_a_clear_422(client: httpx.AsyncClient) -> None:
    for path, body in [("/api/chat", {"message": "hi", "rerank": "mmi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "rerank": "mmi"})]:
        r = await client.post(path, json=body)
        assert r.status_code == 422, r.text
        assert "reverse model" in r.json()["error"]["message"]


async def test_the_openai_endpoint_passes_rerank_through(mmi_app, mmi_ckpt) -> None:
    async with serving(mmi_app()) as client:
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "do you like music"}], "n": 2, "beam_size": 5,
            "rerank": "mmi", "mmi_weight": 1.5})
    assert r.status_code == 200, r.text
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert texts == list(dict.fromkeys(expected(mmi_ckpt, "do you like music", 1.5)))[:2]


async def test_samples_are_drawn_as_asked_and_the_best_come_back(mmi_app) -> None:
    async with serving(mmi_app(seed=3)) as client:
        r = await client.post("/api/chat", json={"message": "hello", "strategy": "sample", "samples": 8,
                                                 "n_best": 3, "rerank": "likelihood"})
    cands = r.json()["candidates"]
    assert 1 <= len(cands) <= 3
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)


def test_the_settings_default_is_likelihood() -> None:
    assert Settings().rerank == "likelihood"


async def test_api_model_says_what_a_fine_tuned_checkpoint_started_from(tiny_checkpoint_with_reverse) -> None:
    from app.main import create_app

    ckpt = load_checkpoint(tiny_checkpoint_with_reverse / "reverse")  # trained with --init tiny
    settings = make_settings(tiny_checkpoint_with_reverse / "reverse")
    async with serving(create_app(settings, engine=make_engine(ckpt, settings))) as client:
        info = (await client.get("/api/model")).json()
    assert info["training"]["init"]["name"] == "tiny"
    assert info["training"]["init"]["checkpoint"].endswith("tiny")
