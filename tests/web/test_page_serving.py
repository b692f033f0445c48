"""How the page is served (no browser needed): open without a key, strict security
headers, no inline script or style, and off with ``--no-webui`` / ``GGUFSERVE_WEBUI``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ggufserve.api.web_page import WEB_DIR
from ggufserve.cli.main import _parser, _settings
from tests.conftest import RunningServer, model_entry

pytestmark = pytest.mark.e2e

ASSETS = {
    "/": "text/html",
    "/web/app.js": "javascript",
    "/web/markdown.js": "javascript",
    "/web/style.css": "text/css",
    "/web/icon.svg": "image/svg+xml",
}


def test_page_and_assets_load_without_key_with_security_headers(server: RunningServer) -> None:
    for path, media_type in ASSETS.items():
        response = httpx.get(server.base_url + path)  # no Authorization header
        assert response.status_code == 200, path
        assert media_type in response.headers["content-type"], path
        csp = response.headers["content-security-policy"]
        for directive in (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ):
            assert directive in csp, (path, directive)
        assert "unsafe" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    # The API itself stays protected, also when reached through the asset prefix.
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/web/../v1/models").status_code in (401, 404)
    missing = httpx.get(server.base_url + "/web/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"]


def test_html_has_no_inline_script_or_style() -> None:
    html = (WEB_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html  # nothing remote


def test_no_webui_flag_sets_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GGUFSERVE_WEBUI", raising=False)
    assert _settings(_parser().parse_args(["serve", "--no-webui"])).webui is False
    assert _settings(_parser().parse_args(["serve"])).webui is True
    monkeypatch.setenv("GGUFSERVE_WEBUI", "false")
    assert _settings(_parser().parse_args(["serve"])).webui is False


def test_webui_off_gives_404(
    server_factory: Callable[..., RunningServer], bundled_gguf: Path
) -> None:
    off = server_factory(
        [model_entry("gemma-3-270m", bundled_gguf)],
        api_key=None,
        env={"GGUFSERVE_WEBUI": "false"},
    )
    for path in ("/", "/web/app.js"):
        response = httpx.get(off.base_url + path)
        assert response.status_code == 404, path
        assert response.json()["error"]["message"] == f"No route {path}."
        assert "content-security-policy" not in response.headers
    assert httpx.get(off.v1 + "/models").status_code == 200
