"""Unexpected exceptions become a generic 500 envelope with a request id, nothing more."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from ggufserve.api.app import create_app
from ggufserve.models.registry import ModelRegistry
from ggufserve.settings import ModelEntry, ServerSettings


async def explode(request: Request) -> None:
    raise RuntimeError("secret detail /home/user/model.gguf at 0x7f00")


def test_unexpected_error_is_generic_500_with_request_id() -> None:
    settings = ServerSettings()
    entry = ModelEntry.model_validate({"id": "absent", "gguf": {"path": "absent.gguf"}})
    app = create_app(settings, ModelRegistry([entry], Path("."), settings))
    app.router.routes.append(Route("/boom", explode))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret" not in response.text and "/home" not in response.text
