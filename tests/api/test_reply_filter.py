"""The reply filter: blocked candidates dropped before the choice, the fallback when all are."""

from __future__ import annotations

import json

import pytest

from app.reply_filter import BlocklistError, ReplyFilter, package_words

from .conftest import serving

pytestmark = pytest.mark.anyio


def test_the_package_list_blocks_whole_words_and_common_swaps() -> None:
    f = ReplyFilter.standard()
    assert f.size > 300 and "shit" in package_words()
    for text in ("well, shit.", "SHIT happens", "sh1t", "you @ss"):
        assert f.blocked(text), text
    for text in ("my class starts at nine", "i love my cat", "hello there", ""):
        assert not f.blocked(text), text


def test_an_operators_file_adds_words_and_phrases(tmp_path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("# our own\nPineapple Pizza\nzorblax\n\n", encoding="utf-8")
    f = ReplyFilter.standard(path)
    assert f.blocked("i love pineapple   pizza!") and f.blocked("Zorblax") and f.blocked("well shit")
    assert not f.blocked("i love pineapple") and not f.blocked("zorblaxes")
    with pytest.raises(BlocklistError, match="nowhere"):
        ReplyFilter.standard(tmp_path / "nowhere.txt")


def test_passed_keeps_order() -> None:
    f = ReplyFilter(["bad word", "nope"])
    assert f.passed(["fine", "a bad   word here", "nope!", "also fine"]) == [0, 3]


def _words_of(text: str) -> list[str]:
    return [w for w in text.lower().split() if w]


async def test_blocked_candidates_are_dropped_before_the_choice(make_app, tmp_path) -> None:
    body = {"message": "do you like music", "strategy": "beam", "beam_size": 6, "n_best": 6}
    app, _ = make_app(reply_filter=False)
    async with serving(app) as client:
        plain = [c["text"] for c in (await client.post("/api/chat", json=body)).json()["candidates"]]
    assert len(plain) >= 2
    # block a word of the best candidate that the second one lacks
    word = next(w for w in _words_of(plain[0]) if w not in _words_of(plain[1]))
    block = tmp_path / "block.txt"
    block.write_text(word + "\n", encoding="utf-8")
    app, _ = make_app(blocklist=block)
    async with serving(app) as client:
        r = (await client.post("/api/chat", json=body)).json()
    texts = [c["text"] for c in r["candidates"]]
    assert texts == [t for t in plain if word not in _words_of(t)]
    assert r["reply"] == texts[0] != plain[0]


async def test_every_candidate_blocked_gives_the_fallback_on_both_endpoints(make_app, tmp_path) -> None:
    messages = {"messages": [{"role": "user", "content": "hello"}]}
    app, _ = make_app(reply_filter=False)
    async with serving(app) as client:  # greedy on both endpoints: the one candidate is this reply
        plain = (await client.post("/api/chat", json={"message": "hello", "strategy": "greedy"})).json()
    words = _words_of(plain["reply"])
    assert words
    block = tmp_path / "block.txt"
    block.write_text(words[0] + "\n", encoding="utf-8")
    app, _ = make_app(blocklist=block, fallback_reply="Let us change the subject.")
    async with serving(app) as client:
        r = (await client.post("/api/chat", json={"message": "hello", "strategy": "greedy"})).json()
        o = (await client.post("/v1/chat/completions", json=messages)).json()
        s = await client.post("/v1/chat/completions", json={**messages, "stream": True})
    assert r["reply"] == "Let us change the subject." and len(r["candidates"]) == 1
    assert o["choices"][0]["message"]["content"] == "Let us change the subject."
    assert o["choices"][0]["finish_reason"] == "content_filter"
    events = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert words[0] not in _words_of(streamed)  # the stream stopped before the blocked word


async def test_the_filter_can_be_turned_off(make_app, tmp_path) -> None:
    block = tmp_path / "block.txt"
    block.write_text("hi\nhello\n", encoding="utf-8")
    app, _ = make_app(reply_filter=False, blocklist=block)
    assert app.state.reply_filter is None
    app, _ = make_app()
    assert app.state.reply_filter is not None  # on by default
