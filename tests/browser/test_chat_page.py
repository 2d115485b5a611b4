"""The chat page in a real Chromium against a live server on the tiny checkpoint."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from tests.browser.conftest import (
    API_KEY,
    ARTIFACTS,
    DESKTOP,
    PHONE,
    LiveServer,
    PageProblems,
    new_page,
    open_chat,
)

pytestmark = pytest.mark.browser

REPLY = ".msg-bot:not(.is-typing):not(.is-streaming)"
STREAM = "**/v1/chat/completions"
CHAT = "**/api/chat"
# How the meta line names the strategy the server reports (app/static/view.js).
STRATEGY_NAMES = {"greedy": "Greedy", "beam": "Beam", "sample": "Sampling"}
SETTINGS_KEY = "chatbot.settings.v1"
XSS = "<img src=x onerror=window.__pwned=1><b>bold</b><script>window.__pwned=2</script>"


def send(page: Page, text: str) -> None:
    box = page.locator("#composer-input")
    box.fill(text)
    box.press("Enter")


def wait_replies(page: Page, count: int) -> None:
    expect(page.locator(REPLY)).to_have_count(count)


def choose_greedy(page: Page) -> None:
    """Pick greedy decoding, which streams through /v1/chat/completions (the default does not)."""
    page.click("#settings-toggle")
    page.select_option("#strategy", "greedy")
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#settings-panel")).to_be_hidden()


def choose_beam(page: Page, beam_size: int = 4, n_best: int = 3) -> None:
    page.click("#settings-toggle")
    page.select_option("#strategy", "beam")
    page.fill("#beam-size", str(beam_size))
    page.fill("#n-best", str(n_best))
    page.click("#settings-form button[type=submit]")
    expect(page.locator("#settings-panel")).to_be_hidden()


def fail_with(page: Page, status: int, message: str, error_type: str = "overloaded_error") -> None:
    """Answer both chat endpoints with an error in the server's own shape (app/errors.py)."""
    body = json.dumps({"error": {"message": message, "type": error_type}})

    def answer(route: Route) -> None:
        route.fulfill(status=status, content_type="application/json", body=body)

    for pattern in (CHAT, STREAM):
        page.route(pattern, answer)


def test_page_is_served_with_strict_security_headers(live_server: LiveServer) -> None:
    r = httpx.get(live_server.url + "/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    # No inline script or style in the markup: everything comes from /static.
    assert not re.search(r"<script(?![^>]*\bsrc=)", r.text)
    assert " style=" not in r.text and "<style" not in r.text and " on" + "click=" not in r.text

    js = httpx.get(live_server.url + "/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(live_server.url + "/static/../main.py").status_code == 404
    assert httpx.get(live_server.url + "/static/nope.js").status_code == 404


def test_header_shows_the_model_name(page: Page, live_server: LiveServer) -> None:
    name = httpx.get(live_server.url + "/api/model").json()["name"]
    expect(page.locator("#model-name")).to_have_text(name)


def test_enter_sends_and_the_streamed_reply_appears(page: Page) -> None:
    box = page.locator("#composer-input")
    expect(box).to_be_focused()
    choose_greedy(page)
    box.click()
    box.type("how are")
    box.press("Shift+Enter")
    box.type("you")
    expect(box).to_have_value("how are\nyou")
    expect(page.locator(".msg")).to_have_count(0)

    # Hold the request so the waiting state can be seen, then let it through.
    held: list[Route] = []
    page.route(STREAM, lambda route: held.append(route))
    box.press("Enter")
    expect(page.locator(".msg-user .text")).to_have_text("how are\nyou")
    expect(page.locator(".is-typing")).to_be_visible()
    expect(box).to_be_disabled()
    expect(box).to_have_value("")
    body = held[0].request.post_data_json
    assert body["stream"] is True and body["messages"][-1] == {"role": "user", "content": "how are\nyou"}
    held[0].continue_()

    wait_replies(page, 1)
    expect(page.locator(".is-typing")).to_have_count(0)
    expect(box).to_be_enabled()
    expect(box).to_be_focused()
    assert page.locator(f"{REPLY} .text").inner_text().strip() != ""
    expect(page.locator(f"{REPLY} .latency")).to_have_text(re.compile(r"^\d+(\.\d+)? (ms|s)$"))


def test_replies_stream_token_by_token(page: Page) -> None:
    choose_greedy(page)
    events = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
              for piece in ("good ", "morning ", "to ", "you")]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(STREAM, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    send(page, "good morning")
    wait_replies(page, 1)
    expect(page.locator(f"{REPLY} .text")).to_have_text("good morning to you")


def test_default_settings_ask_api_chat_for_the_servers_own_choice(page: Page) -> None:
    streamed: list[str] = []
    page.on("request", lambda r: streamed.append(r.url) if "/v1/chat/completions" in r.url else None)
    with page.expect_response(CHAT) as response:
        send(page, "hello")
    body = response.value.request.post_data_json
    # Only the message, the history and the length cap: no strategy or other decoding field.
    assert set(body) == {"message", "history", "max_length"}
    assert body["message"] == "hello" and body["history"] == []
    assert "strategy" not in body
    data = response.value.json()

    wait_replies(page, 1)
    expect(page.locator(f"{REPLY} .text")).to_have_text(data["reply"])
    # The meta line names the search the server reports it ran, not "default".
    meta = page.locator(f"{REPLY} .meta")
    expect(meta).to_contain_text(STRATEGY_NAMES[data["strategy"]])
    expect(meta).to_have_text(re.compile(r"\d+(\.\d+)? (ms|s)$"))
    assert streamed == []

    # The next turn carries the first as history, again without decoding fields.
    with page.expect_request(CHAT) as request:
        send(page, "what is your name")
    body = request.value.post_data_json
    assert set(body) == {"message", "history", "max_length"}
    assert body["history"] == [{"role": "user", "content": "hello"},
                               {"role": "assistant", "content": data["reply"]}]
    wait_replies(page, 2)
    assert streamed == []


def test_default_reply_is_shown_whole_with_the_reported_strategy(page: Page) -> None:
    answer = {"reply": "nice to meet you", "strategy": "beam", "rerank": "likelihood", "model": "tiny",
              "candidates": [{"text": "nice to meet you", "score": -0.5}, {"text": "hi", "score": -0.9}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 6}, "latency_ms": 12.5}
    held: list[Route] = []
    page.route(CHAT, lambda route: held.append(route))
    send(page, "hi")
    expect(page.locator(".is-typing")).to_be_visible()
    expect(page.locator(".is-streaming")).to_have_count(0)
    held[0].fulfill(status=200, content_type="application/json", body=json.dumps(answer))
    wait_replies(page, 1)
    expect(page.locator(f"{REPLY} .text")).to_have_text("nice to meet you")
    expect(page.locator(f"{REPLY} .meta .meta-part")).to_have_text("Beam")
    expect(page.locator(f"{REPLY} .latency")).to_have_text("13 ms")
    expect(page.locator(".candidates summary")).to_contain_text("2 candidates")


def test_strategy_defaults_to_recommended_and_older_saved_settings_still_load(page: Page) -> None:
    page.click("#settings-toggle")
    strategy = page.locator("#strategy")
    expect(strategy).to_have_value("default")
    assert page.locator("#strategy option").first.get_attribute("value") == "default"
    expect(page.locator("#strategy option[value=default]")).to_have_text(re.compile("Recommended"))
    expect(page.locator("#strategy-hint")).to_contain_text("candidate")
    # Fields that only apply to beam or sampling stay hidden; the length cap is shared.
    for field in ("#beam-size", "#n-best", "#temperature", "#top-p"):
        expect(page.locator(field)).to_be_hidden()
    expect(page.locator("#max-length")).to_be_visible()

    # Settings an older page saved (greedy, before "default" existed) load as they were.
    old = {"strategy": "greedy", "beam_size": 5, "n_best": 3, "max_length": 30, "temperature": 0.8,
           "top_p": 0.9}
    page.evaluate("([key, value]) => localStorage.setItem(key, value)", [SETTINGS_KEY, json.dumps(old)])
    page.reload()
    page.wait_for_selector("html[data-ready='true']")
    page.click("#settings-toggle")
    expect(strategy).to_have_value("greedy")
    expect(page.locator("#max-length")).to_have_value("30")
    page.keyboard.press("Escape")
    with page.expect_request(STREAM) as request:
        send(page, "hello")
    assert request.value.post_data_json["strategy"] == "greedy"
    wait_replies(page, 1)

    # An unknown strategy falls back to the default; "Reset to defaults" brings it back too.
    page.evaluate("([key, value]) => localStorage.setItem(key, value)",
                  [SETTINGS_KEY, json.dumps({**old, "strategy": "nucleus"})])
    page.reload()
    page.wait_for_selector("html[data-ready='true']")
    page.click("#settings-toggle")
    expect(strategy).to_have_value("default")
    page.select_option("#strategy", "sample")
    expect(page.locator("#temperature")).to_be_visible()
    page.click("#settings-reset")
    expect(strategy).to_have_value("default")
    expect(page.locator("#temperature")).to_be_hidden()
    assert json.loads(page.evaluate(f"localStorage.getItem('{SETTINGS_KEY}')"))["strategy"] == "default"


def test_beam_search_shows_n_best_candidates_with_scores(page: Page) -> None:
    choose_beam(page, beam_size=4, n_best=3)
    with page.expect_request(CHAT) as request:
        send(page, "do you like cats")
    body = request.value.post_data_json
    assert (body["strategy"], body["beam_size"], body["n_best"]) == ("beam", 4, 3)
    wait_replies(page, 1)
    expect(page.locator(f"{REPLY} .meta")).to_contain_text("Beam")

    summary = page.locator(".candidates summary")
    expect(summary).to_contain_text("3 candidates")
    candidates = page.locator(".candidate")
    expect(candidates.first).to_be_hidden()
    summary.click()
    expect(candidates).to_have_count(3)
    scores = [float(s) for s in page.locator(".candidate-score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    # The reply shown is the best candidate.
    assert page.locator(".candidate.is-chosen .candidate-text").inner_text() == \
        page.locator(f"{REPLY} .bubble .text").inner_text()

    # Settings survive a reload.
    page.reload()
    page.click("#settings-toggle")
    expect(page.locator("#strategy")).to_have_value("beam")
    expect(page.locator("#beam-size")).to_have_value("4")


def test_markup_from_user_and_bot_is_shown_as_text_and_never_runs(page: Page) -> None:
    bot = "<img src=x onerror=window.__pwned=3>&lt;i&gt; <a href=javascript:alert(1)>x</a>"
    chunk = {"choices": [{"index": 0, "delta": {"content": bot}, "finish_reason": None}]}
    choose_greedy(page)
    page.route(STREAM, lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"))
    send(page, XSS)
    wait_replies(page, 1)
    expect(page.locator(".msg-user .text")).to_have_text(XSS)
    expect(page.locator(f"{REPLY} .text")).to_have_text(bot)
    assert page.locator(".messages img, .messages b, .messages script, .messages a").count() == 0
    page.wait_for_timeout(200)  # give a broken image's onerror the time to fire, if it ever existed
    assert page.evaluate("window.__pwned") is None

    page.reload()  # and again when the stored conversation is rendered
    wait_replies(page, 1)
    expect(page.locator(".msg-user .text")).to_have_text(XSS)
    assert page.locator(".messages img, .messages b, .messages script, .messages a").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_busy_server_shows_a_plain_message_and_retry_works(page: Page) -> None:
    fail_with(page, 429, "The engine queue is full")
    send(page, "hello")
    card = page.locator(".msg-error")
    expect(card).to_be_visible()
    expect(card).to_contain_text("The server is busy")
    expect(card).to_have_attribute("data-status", "429")
    expect(page.locator(".msg-user .meta")).to_have_text("Not answered")
    expect(page.locator("#composer-input")).to_be_enabled()

    page.unroute(CHAT)
    page.unroute(STREAM)
    card.get_by_role("button", name="Try again").click()
    wait_replies(page, 1)
    expect(card).to_have_count(0)
    expect(page.locator(".msg-user .meta")).to_have_text("")
    expect(page.locator(".msg-user")).to_have_count(1)


@pytest.mark.parametrize(("status", "words"), [
    (503, "The model is not ready yet"),
    (504, "The reply took too long"),
    (422, "The server could not use this request"),
])
def test_other_errors_are_explained(page: Page, status: int, words: str) -> None:
    fail_with(page, status, "max_length: must be at most 128")
    send(page, "hello")
    card = page.locator(".msg-error")
    expect(card).to_contain_text(words)
    if status == 422:
        expect(card).to_contain_text("max_length: must be at most 128")
        expect(card.get_by_role("button")).to_have_count(0)
    else:
        expect(card.get_by_role("button", name="Try again")).to_be_visible()


def test_api_key_needed_asks_for_one_and_sends_it(browser: Any, keyed_server: LiveServer,
                                                   page_problems: PageProblems) -> None:
    page = new_page(browser, keyed_server, page_problems)
    open_chat(page)
    expect(page.locator("#model-name")).to_have_text("API key needed")

    choose_greedy(page)
    with page.expect_response(STREAM) as first:
        send(page, "hello")
    assert first.value.status == 401
    card = page.locator(".msg-error")
    expect(card).to_contain_text("API key needed")
    key = card.get_by_label("API key")
    expect(key).to_be_focused()
    key.fill(API_KEY)
    with page.expect_request(STREAM) as retried:
        key.press("Enter")
    assert retried.value.headers["authorization"] == f"Bearer {API_KEY}"
    wait_replies(page, 1)
    expect(card).to_have_count(0)
    expect(page.locator("#model-name")).not_to_have_text("API key needed")

    # The key is remembered: after a reload the page talks to the server at once.
    page.reload()
    page.wait_for_selector("html[data-ready='true']")
    expect(page.locator("#status-dot")).to_have_attribute("data-state", "ready")
    assert json.loads(page.evaluate("localStorage.getItem('chatbot.apiKey')")) == API_KEY
    page.context.close()
    assert page_problems.errors == [] and page_problems.csp == []


def test_reload_keeps_the_conversation_and_new_chat_clears_it(page: Page) -> None:
    choose_greedy(page)
    send(page, "hello")
    wait_replies(page, 1)
    first_reply = page.locator(f"{REPLY} .text").inner_text()

    page.reload()
    page.wait_for_selector("html[data-ready='true']")
    expect(page.locator(".msg")).to_have_count(2)
    expect(page.locator(f"{REPLY} .text")).to_have_text(first_reply)

    # The stored turns go to the server as history.
    with page.expect_request(STREAM) as request:
        send(page, "what is your name")
    messages: list[dict[str, Any]] = request.value.post_data_json["messages"]
    assert messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first_reply},
                        {"role": "user", "content": "what is your name"}]
    wait_replies(page, 2)

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty-state")).to_be_visible()
    page.reload()
    page.wait_for_selector("html[data-ready='true']")
    expect(page.locator(".msg")).to_have_count(0)


def test_keyboard_only_use_with_visible_focus(page: Page) -> None:
    log = page.locator("#messages")
    expect(log).to_have_attribute("aria-live", "polite")
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.textContent.trim())
        .map(el => el.id || el.outerHTML.slice(0, 60))""")
    assert unlabeled == []

    page.focus("#settings-toggle")
    page.keyboard.press("Enter")
    expect(page.locator("#settings-panel")).to_be_visible()
    expect(page.locator("#strategy")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#settings-panel")).to_be_hidden()
    expect(page.locator("#settings-toggle")).to_be_focused()

    page.keyboard.press("Tab")  # New chat
    page.keyboard.press("Tab")  # first suggestion
    chip = page.locator(".chip").first
    expect(chip).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    page.keyboard.press("Enter")
    expect(page.locator(".msg-user .text")).to_have_text("Hello!")
    wait_replies(page, 1)


def test_screenshots_desktop_and_phone(page: Page, browser: Any, live_server: LiveServer) -> None:
    """test-artifacts/: chat-desktop.png, chat-desktop-dark-busy.png, chat-phone.png, chat-phone-dark.png."""
    problems = PageProblems(errors=[], csp=[])
    ARTIFACTS.mkdir(exist_ok=True)
    send(page, "hello")
    wait_replies(page, 1)
    choose_beam(page, beam_size=4, n_best=3)
    send(page, "do you like music")
    wait_replies(page, 2)
    page.locator(".candidates summary").click()
    page.wait_for_timeout(300)  # let the entry animations finish
    page.screenshot(path=str(ARTIFACTS / "chat-desktop.png"))
    state = page.context.storage_state()

    dark = new_page(browser, live_server, problems, storage_state=state, color_scheme="dark")
    open_chat(dark)
    fail_with(dark, 429, "the queue is full (512 waiting)")
    send(dark, "are you there?")
    expect(dark.locator(".msg-error")).to_contain_text("The server is busy")
    dark.wait_for_timeout(300)
    dark.screenshot(path=str(ARTIFACTS / "chat-desktop-dark-busy.png"))
    dark.context.close()

    for scheme, name in (("light", "chat-phone.png"), ("dark", "chat-phone-dark.png")):
        phone = new_page(browser, live_server, problems, viewport=PHONE, storage_state=state,
                         color_scheme=scheme, device_scale_factor=2, is_mobile=True, has_touch=True)
        open_chat(phone)
        wait_replies(phone, 2)
        if scheme == "light":
            phone.locator(".candidates summary").click()
        else:
            phone.click("#settings-toggle")
        phone.wait_for_timeout(300)
        # Nothing sticks out sideways at a phone's width.
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        phone.screenshot(path=str(ARTIFACTS / name))
        phone.context.close()

    for name in ("chat-desktop.png", "chat-desktop-dark-busy.png", "chat-phone.png", "chat-phone-dark.png"):
        data = (ARTIFACTS / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert page.viewport_size == DESKTOP
    assert problems.errors == [] and problems.csp == []
