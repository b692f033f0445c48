"""Browser fixtures: Debian's chromium driven by Playwright (sync API), and the servers
the page is tested against.

The tests skip, saying why, when Playwright is not installed or no chromium executable
exists (``make test`` installs it with ``apt-get install chromium`` where it can).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import API_KEY, NO_EOG, TINY_TEXT, TINY_VISION, RunningServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route

CHROMIUM = os.environ.get("GGUFSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed: pip install -e '.[test]'"
    if not Path(CHROMIUM).is_file():
        return (
            f"no chromium executable at {CHROMIUM}: run `make chromium` "
            "(apt-get install -y chromium) or set GGUFSERVE_CHROMIUM"
        )
    return None


MODEL = "gemma-3-270m"
# Served by the shared ``vision_server`` (tests/conftest.py).
VISION = TINY_VISION
TEXT_ONLY = TINY_TEXT
VIEWPORT = {"width": 1280, "height": 720}
UI_TIMEOUT_MS = 90_000  # generation on 2 busy cores can be slow


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    chromium = playwright.chromium.launch(executable_path=CHROMIUM)
    yield chromium
    chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh profile (empty localStorage) at 1280×720 per test."""
    ctx = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Uncaught exceptions and Content-Security-Policy violations seen by ``page``."""
    return []


@pytest.fixture
def page(context: BrowserContext, page_errors: list[str]) -> Iterator[Page]:
    """A new tab; the test fails if the page threw or broke its CSP."""
    tab = context.new_page()
    tab.on("pageerror", lambda exc: page_errors.append(f"page error: {exc}"))
    tab.on(
        "console",
        lambda msg: (
            page_errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text
            else None
        ),
    )
    yield tab
    assert not page_errors, page_errors


@pytest.fixture
def keyed_page(context: BrowserContext, page: Page) -> Page:
    """``page`` with the main server's API key already remembered (as after entering it)."""
    context.add_init_script(f"localStorage.setItem('ggufserve.apiKey', {json.dumps(API_KEY)})")
    return page


def amend_chat_requests(page: Page, **fields: Any) -> None:
    """Let the page's chat requests through to the real server with ``fields`` added."""

    def handle(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, **fields}))

    page.route("**/v1/chat/completions", handle)


def force_length(page: Page) -> None:
    """Ban Gemma 3's end-of-generation tokens in the page's chat requests, so a reply
    always runs to max_tokens (the bundled base model may otherwise end after one token)."""
    amend_chat_requests(page, logit_bias=NO_EOG)


def open_chat(page: Page, server: RunningServer, model: str = MODEL) -> None:
    """Load the page and wait until ``model`` is in the picker, then choose it."""
    page.goto(server.base_url + "/")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached")
    page.select_option("#model", model)


def set_max_tokens(page: Page, n: int) -> None:
    page.fill("#max-tokens", str(n))
    page.dispatch_event("#max-tokens", "change")


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_reply(page: Page) -> str:
    """The stats line of the last reply, once it has finished."""
    stats = page.locator(".msg.assistant").last.locator(".stats")
    stats.wait_for()
    return stats.inner_text()


def metric(server: RunningServer, name: str, model: str = MODEL) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers()).text
    match = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
