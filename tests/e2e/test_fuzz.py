"""Fuzz the real server against its own ``/openapi.json`` with schemathesis.

Every operation gets schema-valid (positive) and schema-breaking (negative) requests from
a fixed seed. Any 5xx, a status or content type the document does not list, a reply that
breaks its schema, a request that hangs, or a server that stops answering ``/health``
fails the run. ``make test`` runs a small budget; ``make fuzz`` a longer one
(``GGUFSERVE_FUZZ_EXAMPLES``, ``GGUFSERVE_FUZZ_SEED``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from ggufserve.api.messages_routes import routes as messages_routes
from ggufserve.api.responses_routes import routes as responses_routes
from ggufserve.api.routes import routes
from tests.conftest import RunningServer, model_entry
from tests.e2e.conftest import MODEL

# Examples per operation and generation mode (the GET operations take no input: a few).
FUZZ_EXAMPLES = int(os.environ.get("GGUFSERVE_FUZZ_EXAMPLES", "80"))
FUZZ_SEED = int(os.environ.get("GGUFSERVE_FUZZ_SEED", "20240624"))
# Generation the fuzzer may ask for: a few tokens of at most two choices.
MAX_FUZZ_TOKENS = 4
MAX_FUZZ_CHOICES = 2
REQUEST_TIMEOUT_S = 60
HEALTH_TIMEOUT_S = 1.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(server_factory: Callable[..., RunningServer], bundled_gguf: Path) -> RunningServer:
    """The bundled model with embeddings on, so every operation reaches the model."""
    return server_factory(
        [model_entry(MODEL, bundled_gguf, n_ctx=512, n_parallel=2, embeddings=True)],
        env={"GGUFSERVE_MAX_REQUEST_BYTES": str(256 * 1024)},
    )


def bounded(document: dict[str, Any]) -> dict[str, Any]:
    """The published document with the fuzzer's requests aimed at the served model and
    their generation capped (the document itself allows 8k-token generations)."""
    out = copy.deepcopy(document)
    schemas = out["components"]["schemas"]
    for name in (
        "ChatCompletionRequest",
        "CompletionRequest",
        "EmbeddingRequest",
        "ResponsesRequest",
        "MessagesRequest",
        "CountTokensRequest",
    ):
        schemas[name]["properties"]["model"] = {"const": MODEL}
    for name, field, low in (
        ("ChatCompletionRequest", "max_tokens", 1),
        ("ChatCompletionRequest", "max_completion_tokens", 1),
        ("CompletionRequest", "max_tokens", 0),
        ("ResponsesRequest", "max_output_tokens", 1),
        ("MessagesRequest", "max_tokens", 1),
    ):
        schemas[name]["properties"][field] = {
            "type": "integer",
            "minimum": low,
            "maximum": MAX_FUZZ_TOKENS,
        }
    schemas["ChatCompletionRequest"]["required"].append("max_tokens")
    schemas["CompletionRequest"]["required"].append("max_tokens")
    schemas["ResponsesRequest"].setdefault("required", []).append("max_output_tokens")
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["n"] = {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_FUZZ_CHOICES,
        }
    return out


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server: RunningServer) -> Iterator[Any]:
    response = httpx.get(f"{fuzz_server.base_url}/openapi.json", headers=fuzz_server.headers())
    assert response.status_code == 200, response.text
    yield schemathesis.openapi.from_dict(bounded(response.json()))


def healthy(server: RunningServer) -> bool:
    try:
        return httpx.get(f"{server.base_url}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
    except httpx.TransportError:
        return False


def fuzz_operation(
    operation: Any, mode: GenerationMode, server: RunningServer, failures: list[str]
) -> None:
    """Run one operation's budget in one generation mode, recording (not raising) each
    failure with a curl command that reproduces it."""

    @seed(FUZZ_SEED)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            case.call_and_validate(
                base_url=server.base_url,
                headers=server.headers(),
                checks=CHECKS,
                timeout=REQUEST_TIMEOUT_S,
            )
        except (FailureGroup, Exception) as exc:  # a check failed, or the request hung
            report = f"{operation.label} [{mode.value}]: {str(exc)[:3000]}"
            if report not in failures:  # the message carries a curl command to reproduce it
                failures.append(report)
        if not healthy(server):
            failures.append(f"{operation.label} [{mode.value}]: /health stopped answering")

    run()


@pytest.mark.e2e
@pytest.mark.timeout(max(300, FUZZ_EXAMPLES * 30))
def test_fuzz_every_operation(fuzz_schema: Any, fuzz_server: RunningServer) -> None:
    failures: list[str] = []
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/embeddings",
        "GET /v1/models",
        "GET /health",
        "POST /v1/responses",
        "GET /v1/responses/{response_id}",
        "DELETE /v1/responses/{response_id}",
        "GET /v1/responses/{response_id}/input_items",
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
    }
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() != "GET" or "{" in operation.path:  # takes input
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            fuzz_operation(operation, mode, fuzz_server, failures)
    assert fuzz_server.process.poll() is None, fuzz_server.log()[-4000:]
    assert healthy(fuzz_server)
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:20])


# ---- the document itself -------------------------------------------------------------------


@pytest.fixture(scope="module")
def document(fuzz_server: RunningServer) -> dict[str, Any]:
    response = httpx.get(f"{fuzz_server.base_url}/openapi.json", headers=fuzz_server.headers())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    result: dict[str, Any] = response.json()
    return result


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator for one component, its ``#/components/...`` references resolvable."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.e2e
def test_openapi_document_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"] == "ggufserve" and document["info"]["version"]
    served = {route.path for route in [*routes, *messages_routes, *responses_routes]}
    assert set(document["paths"]) == served
    schemas = document["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    prefix = "#/components/schemas/"
    for ref in refs(document):
        assert ref.startswith(prefix) and ref[len(prefix) :] in schemas, ref
    for path, item in document["paths"].items():
        # Anthropic's error body on its paths, OpenAI's envelope everywhere else.
        error = "AnthropicErrorResponse" if path.startswith("/v1/messages") else "ErrorResponse"
        for method, operation in item.items():
            if method == "parameters":  # shared by the path's operations
                assert all(p["in"] == "path" and p["required"] for p in operation), path
                continue
            assert method in {"get", "post", "delete"}, (path, method)
            responses = operation["responses"]
            assert "200" in responses, path
            for status, response in responses.items():
                assert response["description"], (path, status)
                if status.startswith(("4", "5")) and path != "/health":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": prefix + error}, (path, status)
    chat = document["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": prefix + "ChatCompletionRequest"}
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(chat["responses"])
    assert document["paths"]["/health"]["get"]["security"] == []
    messages = document["paths"]["/v1/messages"]["post"]
    assert {"x-api-key": []} in messages["security"]
    assert document["components"]["securitySchemes"]["x-api-key"]["in"] == "header"
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(messages["responses"])
    responses = document["paths"]["/v1/responses"]["post"]
    body = responses["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": prefix + "ResponsesRequest"}
    assert "text/event-stream" in responses["responses"]["200"]["content"]


@pytest.mark.e2e
def test_openapi_documents_the_limits(document: dict[str, Any]) -> None:
    request = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    bias = request["logit_bias"]["anyOf"][0]
    assert bias["propertyNames"] == {"pattern": "^[0-9]{1,10}$"}
    assert bias["maxProperties"] == 1024
    assert {"type": "string", "maxLength": 64} in request["keep_alive"]["anyOf"]
    arguments = document["components"]["schemas"]["FunctionCall"]["properties"]["arguments"]
    assert "64 levels" in arguments["description"]


@pytest.mark.e2e
def test_openapi_is_behind_the_api_key(fuzz_server: RunningServer) -> None:
    response = httpx.get(f"{fuzz_server.base_url}/openapi.json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.e2e
def test_replies_match_the_document(document: dict[str, Any], fuzz_server: RunningServer) -> None:
    with httpx.Client(base_url=fuzz_server.base_url, headers=fuzz_server.headers()) as http:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        replies = {
            "ModelList": http.get("/v1/models"),
            "ChatCompletion": http.post("/v1/chat/completions", json=chat),
            "Completion": http.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}
            ),
            "EmbeddingResponse": http.post("/v1/embeddings", json={"model": MODEL, "input": "Hi"}),
            "ErrorResponse": http.post("/v1/chat/completions", json={**chat, "top_k": -1}),
            "HealthStatus": http.get("/health"),
            "ResponseObject": http.post(
                "/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2}
            ),
            "Message": http.post("/v1/messages", json={**chat, "max_tokens": 2}),
            "TokenCount": http.post("/v1/messages/count_tokens", json={**chat}),
            "AnthropicErrorResponse": http.post("/v1/messages", json={**chat, "top_k": -1}),
        }
        stored = replies["ResponseObject"].json()["id"]
        replies["InputItemList"] = http.get(f"/v1/responses/{stored}/input_items")
        replies["DeletedResponse"] = http.delete(f"/v1/responses/{stored}")
    for name, reply in replies.items():
        failed = name in ("ErrorResponse", "AnthropicErrorResponse")
        assert reply.status_code == (400 if failed else 200), reply.text
        validator(document, name).validate(reply.json())
    with pytest.raises(jsonschema.ValidationError):
        validator(document, "ChatCompletion").validate(replies["ErrorResponse"].json())
