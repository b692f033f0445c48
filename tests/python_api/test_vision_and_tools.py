"""Images as ``PIL.Image`` and as a path on the tiny Gemma 3 vision model; convert,
quantize (with its quality report) and the store, in-process."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import ggufserve
from tests.conftest import TINY_VISION


@pytest.fixture(scope="module")
def vision(tiny_vision_models: list[dict[str, Any]], store_home: Path) -> Iterator[ggufserve.Model]:
    [entry] = [e for e in tiny_vision_models if e["id"] == TINY_VISION]
    # The mmproj beside the GGUF is found as `ggufserve run` finds it.
    with ggufserve.load(entry["gguf"]["path"], home=store_home, n_ctx=2048) as model:
        assert model.entry.mmproj is not None
        yield model


def ask(model: ggufserve.Model, image: object) -> str:
    content = [image, "What is this?"]
    reply = model.chat([{"role": "user", "content": content}], temperature=0, max_tokens=8)
    assert reply.usage.prompt_tokens > 20  # the image's tokens are in the prompt
    return reply.choices[0].message.content or ""


def test_pil_image_path_and_base64_give_the_same_reply(vision: ggufserve.Model, tmp_path: Path):
    picture = Image.new("RGB", (64, 48), (0, 160, 0))
    path = tmp_path / "green.png"
    picture.save(path)
    as_pil = ask(vision, picture)
    assert ask(vision, path) == as_pil
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert ask(vision, {"type": "image_url", "image_url": {"url": url}}) == as_pil


def test_a_string_path_keeps_the_servers_rule(vision: ggufserve.Model, tmp_path: Path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    part = {"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}
    with pytest.raises(ggufserve.InvalidRequestError):
        vision.chat([{"role": "user", "content": [part]}], max_tokens=2)


def test_convert_quantize_and_store(
    gemma3_mm_ckpt: Path, tmp_path: Path, store_home: Path, vision: ggufserve.Model
) -> None:
    result = ggufserve.convert(gemma3_mm_ckpt, tmp_path, name="tiny", report=False)
    assert result.text.is_file() and result.mmproj is not None
    report = ggufserve.quantize(result.text, "Q8_0")
    assert report is not None and report.quant == "Q8_0"
    assert report.n_tokens > 0 and 0.0 <= report.top1_agreement <= 1.0
    assert (tmp_path / "tiny-Q8_0.gguf").is_file()
    ids = [r.id for r in ggufserve.store.models(store_home)]
    assert vision.id in ids
    with pytest.raises(ggufserve.StoreError):
        ggufserve.store.remove("no-such-model", store_home)
    with pytest.raises(ggufserve.PullError):
        ggufserve.load(tmp_path / "missing.gguf", home=store_home)
