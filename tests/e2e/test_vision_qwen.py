"""Image chat over HTTP with the tiny Qwen3-VL models (dense and MoE) converted by our
converter: M-RoPE image positions, deepstack rows and Qwen's image token layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer
from tests.converters.test_qwen3vl_checkpoints import QWEN_NO_EOG
from tests.e2e.test_vision import (
    TEXT,
    check_parallel_equals_solo,
    check_repeat_is_cached,
    data_uri,
    image,
    png,
)

VARIANTS = ["dense", "moe"]


@pytest.fixture(scope="module")
def sdk(qwen_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=qwen_server.v1, api_key="unused", max_retries=0) as client:
        yield client


def ask(sdk: openai.OpenAI, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return sdk.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        logit_bias=QWEN_NO_EOG,  # type: ignore[arg-type]
        **{"max_tokens": 8, **kwargs},
    )


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_tokens_grow_by_image_tokens(sdk: openai.OpenAI, variant: str) -> None:
    model = f"qwen-{variant}"
    text_only = ask(sdk, model, [user(TEXT)]).usage.prompt_tokens
    one = ask(sdk, model, [user(image(data_uri(png((255, 0, 0), (128, 96)))), TEXT)])
    red, tall = data_uri(png((255, 0, 0), (128, 96))), data_uri(png(size=(64, 256), sigma=70))
    two = ask(sdk, model, [user(image(red), image(tall), TEXT)])
    # 128×96 → 4×3 merged 32-pixel patches = 12 tokens; 64×256 → 2×8 = 16 tokens; each
    # image also brings <|vision_start|> and <|vision_end|>.
    assert one.usage.prompt_tokens - text_only == 12 + 2
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == 16 + 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_different_images_give_different_outputs(sdk: openai.OpenAI, variant: str) -> None:
    model = f"qwen-{variant}"
    answers = [
        ask(sdk, model, [user(image(data_uri(data)), TEXT)]).choices[0].message.content
        for data in (png((255, 0, 0), (128, 128)), png(size=(128, 128), sigma=70))
    ]
    assert all(answers) and answers[0] != answers[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_multi_image_multi_turn_stream(sdk: openai.OpenAI, variant: str) -> None:
    red, blue = data_uri(png((255, 0, 0), (96, 96))), data_uri(png((0, 0, 255), (160, 64)))
    messages = [
        user({"type": "text", "text": "Compare:"}, image(red), image(blue), TEXT),
        {"role": "assistant", "content": "Red, then blue."},
        user(TEXT, image(blue)),
    ]
    stream = ask(
        sdk, f"qwen-{variant}", messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    # 9 + 10 + 10 image tokens (96×96 → 3×3, 160×64 → 5×2) plus 2 wrappers each.
    assert chunks[-1].usage.prompt_tokens > 9 + 10 + 10 + 6


@pytest.mark.parametrize(
    "size",
    [(1, 1), (2000, 1), (1, 2000), (3000, 2000), (31, 33)],
    ids=["1x1", "2000x1", "1x2000", "3000x2000", "31x33"],
)
def test_images_outside_the_model_limits_are_resized(
    qwen_server: RunningServer, size: tuple[int, int]
) -> None:
    """Sides are rounded to multiples of 32 and the pixel count brought within llama.cpp's
    limits for the projector (8 to 4096 image tokens) instead of failing."""
    body = {
        "model": "qwen-moe",
        "messages": [user(image(data_uri(png(size=size, sigma=70))), TEXT)],
        "max_tokens": 2,
        "logit_bias": QWEN_NO_EOG,
    }
    response = httpx.post(f"{qwen_server.v1}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    text_only = httpx.post(
        f"{qwen_server.v1}/chat/completions",
        json={**body, "messages": [user(TEXT)]},
        timeout=60,
    )
    assert text_only.status_code == 200
    image_tokens = prompt_tokens - text_only.json()["usage"]["prompt_tokens"] - 2
    assert 8 <= image_tokens <= 4096


@pytest.mark.parametrize("variant", VARIANTS)
def test_repeated_image_comes_from_the_embedding_cache(
    qwen_server: RunningServer, sdk: openai.OpenAI, variant: str
) -> None:
    # 512×512 → 256 image tokens, each 3 × 64 wide (main + 2 deepstack rows).
    check_repeat_is_cached(qwen_server, sdk, f"qwen-{variant}", (512, 512), logit_bias=QWEN_NO_EOG)


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_and_text_requests_in_parallel_equal_solo(
    qwen_server: RunningServer, variant: str
) -> None:
    check_parallel_equals_solo(qwen_server.v1, f"qwen-{variant}", logit_bias=QWEN_NO_EOG)
