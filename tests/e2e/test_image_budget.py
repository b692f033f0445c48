"""Image token budgets over HTTP on the tiny Qwen3-VL model (32 × 32 pixels per image
token): per model (models.yaml ``image_min_tokens`` / ``image_max_tokens``, passed to
mtmd), per request (the extension fields, applied by resizing each image), the 400s for
budgets a projector cannot honour and for images that cannot fit the context."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ggufserve.converters.convert import convert
from ggufserve.engine.base import ModelLoadError
from ggufserve.engine.llama import LlamaEngine
from tests.conftest import TINY_VISION, RunningServer
from tests.converters.test_qwen3vl_checkpoints import QWEN_NO_EOG
from tests.e2e.test_vision import TEXT, data_uri, image, png

# 1024 × 768 is 32 × 24 = 768 tokens by default; scaled to the caps below it keeps 4:3.
LARGE = data_uri(png(size=(1024, 768), sigma=70))
# 64 × 64 is 2 × 2 cells, raised to the minimum: 3 × 3 by default (8 tokens).
SMALL = data_uri(png((0, 120, 255), (64, 64)))
WIDE = "qwen-max-192"  # image_max_tokens 192: LARGE → 16 × 12
NARROW = "qwen-16-to-48"  # image_min_tokens 16, image_max_tokens 48: LARGE → 8 × 6
WRAPPERS = 2  # <|vision_start|> and <|vision_end|> around each image


@pytest.fixture(scope="module")
def budget_server(
    qwen_ckpt: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    server_factory: Callable[..., RunningServer],
) -> RunningServer:
    """The dense tiny Qwen3-VL GGUF twice, with different image token ranges, in a small
    context (n_ctx 256)."""
    result = convert(str(qwen_ckpt["dense"]), out_dir=tmp_path_factory.mktemp("qb"), name="qb")
    assert result.mmproj is not None
    files = {"gguf": {"path": str(result.text)}, "mmproj": {"path": str(result.mmproj)}}
    small = {"n_ctx": 256, "n_batch": 256, "n_parallel": 2}
    entries: list[dict[str, object]] = [
        {"id": WIDE, **files, **small, "image_max_tokens": 192},
        {"id": NARROW, **files, **small, "image_min_tokens": 16, "image_max_tokens": 48},
    ]
    return server_factory(entries, api_key=None)


@pytest.fixture(scope="module")
def sdk(qwen_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=qwen_server.v1, api_key="unused", max_retries=0) as client:
        yield client


def chat(server: RunningServer, model: str, *images: str, **extra: Any) -> httpx.Response:
    content = [image(url) for url in images] + [TEXT]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 1,
        "logit_bias": QWEN_NO_EOG,
        **extra,
    }
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=120)


def prompt_tokens(server: RunningServer, model: str, *images: str, **extra: Any) -> int:
    response = chat(server, model, *images, **extra)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def refusal(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_model_entries_set_the_image_token_range(budget_server: RunningServer) -> None:
    text_only = prompt_tokens(budget_server, WIDE)
    wide, narrow = (prompt_tokens(budget_server, m, LARGE) for m in (WIDE, NARROW))
    assert wide - text_only == 16 * 12 + WRAPPERS
    assert wide - narrow == 16 * 12 - 8 * 6
    # The entry's minimum raises a small image: 4 × 4 instead of the default 3 × 3.
    assert prompt_tokens(budget_server, NARROW, SMALL) - text_only == 4 * 4 + WRAPPERS


def test_request_budget_lowers_and_raises_image_tokens(
    qwen_server: RunningServer, sdk: openai.OpenAI
) -> None:
    model = "qwen-dense"
    default = prompt_tokens(qwen_server, model, LARGE)
    assert default - prompt_tokens(qwen_server, model, LARGE, image_max_tokens=48) == 768 - 48
    small = prompt_tokens(qwen_server, model, SMALL)
    # 64 × 64 raised to 100 tokens: 10 × 10 instead of 3 × 3.
    assert prompt_tokens(qwen_server, model, SMALL, image_min_tokens=100) - small == 100 - 9
    # Grounding needs >= ~1024 image tokens: a 640 × 480 photo is 20 × 15 = 300 by default,
    # 37 × 28 = 1036 with image_min_tokens 1024 (through the SDK's extra_body).
    photo = data_uri(png(size=(640, 480), sigma=70))
    messages = [{"role": "user", "content": [image(photo), TEXT]}]
    usage = [
        sdk.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=1,
            logit_bias=QWEN_NO_EOG,  # type: ignore[arg-type]
            extra_body=extra,
        ).usage
        for extra in ({}, {"image_min_tokens": 1024})
    ]
    assert usage[0] is not None and usage[1] is not None
    assert usage[1].prompt_tokens - usage[0].prompt_tokens == 37 * 28 - 20 * 15


def test_request_budget_outside_the_model_range_is_refused(budget_server: RunningServer) -> None:
    error = refusal(chat(budget_server, WIDE, LARGE, image_max_tokens=500))
    assert error["param"] == "image_max_tokens" and "8 to 192" in error["message"]
    error = refusal(chat(budget_server, NARROW, LARGE, image_min_tokens=8))
    assert error["param"] == "image_min_tokens" and "16 to 48" in error["message"]
    error = refusal(chat(budget_server, WIDE, LARGE, image_min_tokens=64, image_max_tokens=32))
    assert error["param"] == "image_min_tokens" and "is above" in error["message"]


def test_request_budget_on_a_fixed_size_projector_is_refused(
    vision_server: RunningServer,
) -> None:
    """Gemma 3's projector gives every image its fixed size: no budget applies."""
    body = {
        "model": TINY_VISION,
        "messages": [{"role": "user", "content": [image(SMALL), TEXT]}],
        "max_tokens": 1,
        "image_max_tokens": 64,
    }
    response = httpx.post(f"{vision_server.v1}/chat/completions", json=body, timeout=60)
    error = refusal(response)
    assert error["param"] == "image_max_tokens" and "fixed number of tokens" in error["message"]


def test_image_over_the_context_is_a_400_naming_its_tokens(
    budget_server: RunningServer,
) -> None:
    error = refusal(chat(budget_server, WIDE, LARGE, max_tokens=100))
    assert error["code"] == "context_length_exceeded"
    text = prompt_tokens(budget_server, WIDE) + WRAPPERS  # the wrappers are text tokens
    assert (
        f"image 1 takes 192 tokens; with the text ({text} tokens) and max_tokens (100) "
        "that exceeds n_ctx (256)"
    ) in error["message"]
    error = refusal(chat(budget_server, WIDE, LARGE, LARGE, max_tokens=None))
    assert "image 1 takes 192 tokens, image 2 takes 192 tokens;" in error["message"]
    # The server is still fine: the same image fits with a short reply.
    assert chat(budget_server, WIDE, LARGE).status_code == 200


def test_limits_on_a_fixed_size_projector_fail_the_load(
    tiny_vision_models: list[dict[str, Any]],
) -> None:
    """models.yaml limits for Gemma 3's projector would be ignored by mtmd: the load
    fails, before the weights load, with a message saying so."""
    entry = tiny_vision_models[0]
    with pytest.raises(ModelLoadError, match="'gemma3' gives every image a fixed size"):
        LlamaEngine(
            Path(entry["gguf"]["path"]),
            n_ctx=512,
            n_gpu_layers=0,
            n_threads=1,
            n_batch=512,
            max_queued=1,
            mmproj_path=Path(entry["mmproj"]["path"]),
            image_max_tokens=256,
        )
