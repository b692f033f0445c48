"""The chat page in a real browser (Debian's chromium through Playwright) against the
real server with the bundled Gemma 3 270M: streaming, stats, Stop, the API key,
conversations in localStorage, safe Markdown, keyboard and narrow windows, and the
README screenshot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import API_KEY, REPO, RunningServer
from tests.web.conftest import (
    MODEL,
    amend_chat_requests,
    browser_missing,
    force_length,
    metric,
    open_chat,
    send,
    set_max_tokens,
    wait_for_reply,
)

if (reason := browser_missing()) is not None:
    pytest.skip(reason, allow_module_level=True)

from playwright.sync_api import Page, Route, expect

pytestmark = pytest.mark.e2e
SCREENSHOT = REPO / "docs" / "webui.png"


def test_streamed_reply_with_stats(keyed_page: Page, server: RunningServer) -> None:
    page = keyed_page
    force_length(page)
    requests: list[dict[str, object]] = []
    page.on(
        "request",
        lambda r: (
            requests.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    open_chat(page, server)
    set_max_tokens(page, 8)
    send(page, "The capital of France is")
    stats = wait_for_reply(page)
    assert "8 tokens" in stats and "tok/s" in stats and "first token" in stats
    assert page.locator(".msg.assistant .content").last.inner_text().strip()
    assert page.locator(".msg.user .content").last.inner_text() == "The capital of France is"
    body = requests[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL and body["max_tokens"] == 8


def test_stop_aborts_and_server_cancels(keyed_page: Page, server: RunningServer) -> None:
    page = keyed_page
    force_length(page)
    open_chat(page, server)
    set_max_tokens(page, 1500)
    before = metric(server, "ggufserve_requests_cancelled_total")
    send(page, "Once upon a time")
    expect(page.locator("#stop")).to_be_visible()
    content = page.locator(".msg.assistant .content").last
    expect(content).not_to_have_text("▍")  # some text has streamed in
    page.keyboard.press("Escape")
    expect(page.locator("#send")).to_be_visible()
    assert "stopped" in wait_for_reply(page)
    deadline = time.monotonic() + 15
    while metric(server, "ggufserve_requests_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the server did not count a cancelled request"
        time.sleep(0.2)


def test_api_key_prompt_then_conversations_survive_reload(
    page: Page, server: RunningServer
) -> None:
    page.goto(server.base_url + "/")
    key_form = page.locator("#key-form")
    expect(key_form).to_be_visible()  # /v1/models answered 401
    expect(page.locator("#banner")).to_contain_text("API key")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    expect(key_form).to_be_hidden()
    set_max_tokens(page, 4)
    send(page, "Hello there")
    assert "token" in wait_for_reply(page)
    page.fill("#title", "Greetings")
    page.press("#title", "Tab")  # change event: renamed
    page.click("#new-chat")
    expect(page.locator("#conversations li")).to_have_count(2)

    page.reload()
    expect(page.locator("#key-form")).to_be_hidden()  # the key was remembered
    conversations = page.locator("#conversations .open")
    expect(conversations).to_have_count(2)
    page.click("#conversations .open >> text=Greetings")
    expect(page.locator("#title")).to_have_value("Greetings")
    expect(page.locator(".msg.user .content")).to_have_text("Hello there")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("token")

    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["title"] == "Greetings" and len(exported["messages"]) == 2

    page.click("#conversations li >> nth=1 >> .delete")
    expect(conversations).to_have_count(1)
    page.reload()
    expect(page.locator("#conversations .open")).to_have_count(1)


# A reply with everything a hostile model could try. The page's request is answered by
# page.route with this fixed SSE body (this test only), so the reply is deterministic.
HOSTILE = [
    {"role": "assistant"},
    {"reasoning_content": "Let me think about <b>this</b>."},
    {"content": 'Hi <img src=x onerror="window.__xss=1"> '},
    {"content": "<script>window.__xss=2</script> [click](javascript:window.__xss=3) "},
    {"content": "[site](https://example.com/) **bold** `code`\n\n"},
    {"content": "```html\n<img src=x onerror=alert(1)>\n```\n"},
    {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": '},
            }
        ]
    },
    {"tool_calls": [{"index": 0, "function": {"arguments": '"<img src=x>"}'}}]},
]


def hostile_sse() -> str:
    def event(payload: dict[str, object]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    chunks = [
        event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        for delta in HOSTILE
    ]
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    chunks.append(event({**base, "choices": [], "usage": usage}))
    return "".join(chunks) + "data: [DONE]\n\n"


def test_model_output_is_inert(keyed_page: Page, server: RunningServer) -> None:
    page = keyed_page
    dialogs: list[str] = []
    urls: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: urls.append(r.url))

    def fulfil(route: Route) -> None:
        route.fulfill(status=200, content_type="text/event-stream", body=hostile_sse())

    page.route("**/v1/chat/completions", fulfil)
    open_chat(page, server)
    send(page, "Say something dangerous")
    assert "9 tokens" in wait_for_reply(page)
    reply = page.locator(".msg.assistant").last
    text = reply.locator(".content").inner_text()
    assert '<img src=x onerror="window.__xss=1">' in text
    assert "<script>window.__xss=2</script>" in text
    assert "[click](javascript:window.__xss=3)" in text
    assert page.evaluate("window.__xss") is None and not dialogs
    assert reply.locator("img, script, iframe").count() == 0
    assert not [u for u in urls if u.rstrip("/").endswith("/x")]
    links = reply.locator(".content a")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == "https://example.com/"
    assert links.get_attribute("rel") == "noopener noreferrer"
    expect(reply.locator(".content strong")).to_have_text("bold")
    # Code block with a copy button, the reasoning block and the tool-call card.
    expect(reply.locator(".code-block code")).to_have_text("<img src=x onerror=alert(1)>")
    expect(reply.locator(".code-block button.copy")).to_be_visible()
    details = reply.locator("details.reasoning")
    expect(details).to_contain_text("Reasoning")
    details.locator("summary").click()
    expect(details.locator(".reasoning-text")).to_have_text("Let me think about <b>this</b>.")
    card = reply.locator(".tool-call")
    expect(card.locator(".tool-name")).to_contain_text("get_weather")
    expect(card.locator(".tool-args")).to_have_text('{"city": "<img src=x>"}')


def test_errors_keyboard_and_narrow_window(keyed_page: Page, server: RunningServer) -> None:
    page = keyed_page
    calls: list[str] = []

    def busy_then_bad(route: Route) -> None:
        calls.append(route.request.url)
        if len(calls) == 1:  # 503 with Retry-After: the page waits, then retries
            route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                json={"error": {"message": "Model loading", "type": "x", "code": None}},
            )
        else:
            route.fulfill(
                status=400,
                json={"error": {"message": "Invalid request: 'max_tokens'.", "type": "x"}},
            )

    page.route("**/v1/chat/completions", busy_then_bad)
    open_chat(page, server)
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.type("#input", "second line")
    assert page.input_value("#input") == "first line\nsecond line" and not calls
    page.press("#input", "Enter")
    expect(page.locator("#banner")).to_contain_text("Retrying in 1 s")
    expect(page.locator("#banner")).to_contain_text("Error 400: Invalid request: 'max_tokens'.")
    assert len(calls) == 2
    # The failed message is back in the composer, not in the conversation.
    assert page.input_value("#input") == "first line\nsecond line"
    expect(page.locator(".msg")).to_have_count(0)

    page.set_viewport_size({"width": 420, "height": 760})
    sidebar, menu = page.locator("#sidebar"), page.locator("#menu")
    expect(menu).to_be_visible()
    expect(sidebar).not_to_be_in_viewport()
    menu.click()
    expect(sidebar).to_be_in_viewport()
    expect(menu).to_have_attribute("aria-expanded", "true")
    page.mouse.click(400, 400)  # beside the drawer
    expect(sidebar).not_to_be_in_viewport()
    expect(page.locator("#input")).to_be_visible()


def test_screenshot_of_a_real_exchange(keyed_page: Page, server: RunningServer) -> None:
    """docs/webui.png (README) at 1280×720, after a real exchange with the bundled model
    (a base model: it continues text; a fixed sampling seed keeps the picture stable)."""
    page = keyed_page
    amend_chat_requests(page, seed=3)
    open_chat(page, server)
    set_max_tokens(page, 48)
    page.fill("#temperature", "0.8")
    page.dispatch_event("#temperature", "change")
    send(page, "Once upon a time, in a small village by the sea,")
    assert "token" in wait_for_reply(page)
    page.fill("#input", "Go on: what happened next?")
    page.mouse.move(0, 0)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 20_000
