"""Image chat over HTTP with the tiny Gemma 3 converted by our converter (text + mmproj)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import NO_EOG, TINY_VISION, RunningServer

MODEL = TINY_VISION  # served by the shared ``vision_server`` (tests/conftest.py)
IMAGE_TOKENS = 16  # mm_tokens_per_image of the tiny checkpoint


def png(
    color: tuple[int, int, int] | None = None, size: tuple[int, int] = (112, 112), sigma: int = 60
) -> bytes:
    """A PNG of ``size`` (width, height): one colour, or Gaussian noise of ``sigma`` when
    ``color`` is None."""
    picture = (
        Image.new("RGB", size, color)
        if color is not None
        else Image.effect_noise(size, sigma).convert("RGB")
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def sdk(vision_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vision_server.v1, api_key="unused", max_retries=0) as client:
        yield client


def ask(sdk: openai.OpenAI, content: list[dict[str, Any]] | str, max_tokens: int = 12) -> Any:
    return sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],  # type: ignore[misc, list-item]
        max_tokens=max_tokens,
        temperature=0,
        logit_bias=NO_EOG,  # type: ignore[arg-type]
    )


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is in the image?"}


def test_models_endpoint_says_vision(sdk: openai.OpenAI) -> None:
    card = sdk.models.list().data[0]
    assert card.id == MODEL and (card.model_extra or {})["capabilities"] == [
        "completion",
        "vision",
        "tools",
    ]


def test_prompt_tokens_grow_by_image_tokens(sdk: openai.OpenAI) -> None:
    text_only = ask(sdk, "What is in the image?").usage.prompt_tokens
    one = ask(sdk, [image(data_uri(png((255, 0, 0)))), TEXT]).usage.prompt_tokens
    two = ask(sdk, [image(data_uri(png((255, 0, 0)))), image(data_uri(png((0, 0, 255)))), TEXT])
    # Per image: 16 image tokens, <start_of_image>, <end_of_image> and the "\n\n" that
    # Gemma3Processor puts after the image (the one before merges with the turn's "\n").
    assert one - text_only == IMAGE_TOKENS + 3
    assert two.usage.prompt_tokens - one == IMAGE_TOKENS + 3


def test_different_images_give_different_outputs(sdk: openai.OpenAI) -> None:
    red = ask(sdk, [image(data_uri(png((255, 0, 0)))), TEXT]).choices[0].message.content
    other = ask(sdk, [image(data_uri(png(sigma=80))), TEXT]).choices[0].message.content
    assert red and other and red != other


def test_every_source_form_gives_identical_output(
    sdk: openai.OpenAI, media: tuple[Path, str]
) -> None:
    root, base_url = media
    raw = (root / "green.png").read_bytes()
    forms = [
        data_uri(raw),
        base64.b64encode(raw).decode(),
        "green.png",
        f"file://{root / 'green.png'}",
        f"{base_url}/green.png",
    ]
    answers = {ask(sdk, [image(url), TEXT]).choices[0].message.content for url in forms}
    assert len(answers) == 1


def test_multi_turn_with_images_in_several_turns(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=[  # type: ignore[list-item]
            {"role": "user", "content": [image(data_uri(png((255, 0, 0)))), TEXT]},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": [TEXT, image(data_uri(png((0, 0, 255))))]},
        ],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(reply)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 2 * IMAGE_TOKENS
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ([image(data_uri(png((1, 1, 1))))] * 9, "At most 8 images"),
        ([image("ftp://example.com/a.png")], "scheme 'ftp'"),
        ([image("http://127.0.0.2.nip.invalid/a.png")], "cannot be resolved"),
        ([image("http://169.254.169.254/latest/meta-data/")], "not a public"),
        ([image("../etc/passwd")], "outside the allowed media folder"),
        ([image("data:image/png;base64,AAAA")], "invalid"),
    ],
    ids=["too-many", "ftp", "unresolvable", "metadata", "traversal", "not-an-image"],
)
def test_bad_images_over_http(
    vision_server: RunningServer, content: list[dict[str, Any]], text: str
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    response = httpx.post(f"{vision_server.v1}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert text in response.json()["error"]["message"]
    after = httpx.post(
        f"{vision_server.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        timeout=30,
    )
    assert after.status_code == 200


def image_metric(server: RunningServer, name: str, model: str = MODEL) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith(f'{name}_total{{model="{model}"}}'))
    return float(line.split()[-1])


def check_repeat_is_cached(
    server: RunningServer, sdk: openai.OpenAI, model: str, size: tuple[int, int], **extra: Any
) -> None:
    """Send one new image twice: one encode, then one cache hit, the same answer; prints
    both times to first token (after a warm-up request with another image of that size,
    so the first time is not also the server's first image)."""
    warm_up, url = (data_uri(png(size=size, sigma=sigma)) for sigma in (60, 61))
    messages = [{"role": "user", "content": [image(warm_up), TEXT]}]
    sdk.chat.completions.create(model=model, messages=messages, max_tokens=1, **extra)  # type: ignore[arg-type]
    encodes = image_metric(server, "ggufserve_image_encodes", model)
    hits = image_metric(server, "ggufserve_image_cache_hits", model)
    ttft = []
    answers = []
    for _ in range(2):
        started = time.perf_counter()
        stream = sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [image(url), TEXT]}],  # type: ignore[list-item]
            max_tokens=6,
            temperature=0,
            stream=True,
            **extra,
        )
        text, first = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        ttft.append((first or time.perf_counter()) - started)
        answers.append(text)
    print(
        f"\n{model} {size} image TTFT first {1000 * ttft[0]:.1f} ms, repeat {1000 * ttft[1]:.1f} ms"
    )
    assert image_metric(server, "ggufserve_image_encodes", model) == encodes + 1
    assert image_metric(server, "ggufserve_image_cache_hits", model) == hits + 1
    assert answers[0] == answers[1]


def test_repeated_image_comes_from_the_embedding_cache(
    vision_server: RunningServer, sdk: openai.OpenAI
) -> None:
    check_repeat_is_cached(vision_server, sdk, MODEL, (112, 112))


@pytest.mark.parametrize(
    "size", [(1, 1), (2000, 1), (1, 2000), (3000, 2000)], ids=["1x1", "2000x1", "1x2000", "big"]
)
def test_images_of_any_size_become_the_models_image(
    sdk: openai.OpenAI, size: tuple[int, int]
) -> None:
    """Gemma 3 sees every image at its fixed image_size: any size gives 16 image tokens."""
    text_only = ask(sdk, "What is in the image?", max_tokens=1).usage.prompt_tokens
    reply = ask(sdk, [image(data_uri(png(size=size))), TEXT], max_tokens=1)
    assert reply.usage.prompt_tokens - text_only == IMAGE_TOKENS + 3


def check_parallel_equals_solo(base_v1: str, model: str, **extra: Any) -> None:
    """Three image requests (two sharing an image) and two text requests, sent at once,
    give exactly the greedy answers each gives alone."""
    noise = [data_uri(png(size=(96, 64))) for _ in range(2)]  # random: two different images
    contents: list[Any] = [[image(noise[i]), TEXT] for i in (0, 1, 0)]
    contents += ["Tell me a story.", "Count to ten."]

    async def one(client: openai.AsyncOpenAI, content: Any) -> tuple[str, int]:
        reply = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=10,
            temperature=0,
            **{"logit_bias": NO_EOG, **extra},
        )
        return reply.choices[0].message.content or "", reply.usage.prompt_tokens  # type: ignore[union-attr]

    async def run() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        async with openai.AsyncOpenAI(base_url=base_v1, api_key="unused", max_retries=0) as c:
            solo = [await one(c, content) for content in contents]
            together = await asyncio.gather(*(one(c, content) for content in contents))
        return solo, list(together)

    solo, together = asyncio.run(run())
    assert together == solo
    assert solo[0] == solo[2] and solo[0] != solo[1]


def test_image_and_text_requests_in_parallel_equal_solo(vision_server: RunningServer) -> None:
    check_parallel_equals_solo(vision_server.v1, MODEL)
