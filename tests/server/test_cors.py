"""``--cors-allow-origin``: a listed origin is echoed with ``Vary: Origin``, others get no
CORS headers, preflights pass without the API key, and errors stay readable."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from ggufserve.api.app import create_app
from ggufserve.models.registry import ModelRegistry
from ggufserve.settings import ModelEntry, ServerSettings

ALLOWED = "http://app.example:5173"


def cors_client(origins: list[str], api_key: str | None = None) -> TestClient:
    settings = ServerSettings(cors_allow_origins=origins, api_key=api_key)
    entry = ModelEntry.model_validate({"id": "absent", "gguf": {"path": "absent.gguf"}})
    return TestClient(create_app(settings, ModelRegistry([entry], Path("."), settings)))


def test_listed_origin_is_echoed_with_vary() -> None:
    with cors_client([ALLOWED, "http://other.example"]) as client:
        response = client.get("/v1/models", headers={"Origin": ALLOWED})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "origin" in response.headers["vary"].lower()


def test_unlisted_origin_gets_no_cors_headers() -> None:
    with cors_client([ALLOWED]) as client:
        response = client.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_preflight_needs_no_key_and_allows_the_auth_headers() -> None:
    with cors_client([ALLOWED], api_key="k") as client:
        response = client.options(
            "/v1/chat/completions",
            headers={
                "Origin": ALLOWED,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_an_error_is_readable_by_the_listed_origin() -> None:
    with cors_client([ALLOWED], api_key="k") as client:
        response = client.get("/v1/models", headers={"Origin": ALLOWED})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.json()["error"]["code"] == "invalid_api_key"
