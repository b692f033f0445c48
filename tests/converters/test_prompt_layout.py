"""The server's image prompt has exactly the token layout of the reference processors
(transformers' Gemma3Processor and Qwen3VLProcessor) on the tiny converted models.

The server side is the real path: the model registry loads the GGUF + mmproj, the chat
module renders the GGUF's template and places mtmd's marker, and mtmd tokenizes. The
reference side is transformers' processing: the checkpoint's chat template, the image
processor's grid and the processor's image-token expansion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_cpp import mtmd_cpp

from ggufserve.converters.convert import ConversionResult
from ggufserve.engine.media import Mtmd
from ggufserve.generation.images import LoadedImage
from ggufserve.generation.prompting import TemplateInput, render, tokenize_media
from ggufserve.models.loading import LoadedParts
from ggufserve.models.registry import ModelRegistry
from ggufserve.settings import ModelEntry, ServerSettings
from tests.converters.qwen_builders import IMAGE_PAD_ID

GEMMA_SOFT_TOKEN = 262_144  # <image_soft_token> of the tiny multimodal Gemma 3
IMAGE = -1  # stands for one image embedding row in a layout


def loaded(image: np.ndarray) -> LoadedImage:
    height, width, _ = image.shape
    rgb = np.ascontiguousarray(image).tobytes()
    return LoadedImage(rgb, width, height, hashlib.sha256(rgb).hexdigest())


@pytest.fixture(scope="module")
def served(
    converted: dict[str, ConversionResult], qwen_converted: dict[str, ConversionResult]
) -> Iterator[dict[str, LoadedParts]]:
    results = {
        "gemma3": converted["mm-f32"],
        "qwen3vl": qwen_converted["dense-f32"],
        "qwen3vlmoe": qwen_converted["moe-f32"],
    }
    entries = [
        ModelEntry.model_validate(
            {
                "id": name,
                "gguf": {"path": str(r.text)},
                "mmproj": {"path": str(r.mmproj)},
                "n_ctx": 1024,
            }
        )
        for name, r in results.items()
    ]
    registry = ModelRegistry(entries, Path("."), ServerSettings())
    registry.start_loading()
    registry.wait_loaded(timeout_s=120)
    loaded = {name: registry.lookup(name).parts for name in results}
    yield {name: parts for name, parts in loaded.items() if parts is not None}
    registry.close()


def server_layout(
    model: LoadedParts, messages: list[dict[str, Any]], images: list[Any]
) -> list[int]:
    """Token ids of the server's prompt, each image embedding row as ``IMAGE``."""
    text = render(model.template, TemplateInput(messages, []))
    prompt = tokenize_media(model.engine, text, [loaded(i) for i in images])
    layout: list[int] = []
    for index in range(mtmd_cpp.mtmd_input_chunks_size(prompt.chunks)):
        chunk = mtmd_cpp.mtmd_input_chunks_get(prompt.chunks, index)
        if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
            layout += Mtmd.text_tokens(chunk)
        else:
            layout += [IMAGE] * mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
    assert len(layout) == prompt.n_tokens
    return layout


def conversation(n_images: int) -> list[dict[str, Any]]:
    """Two user turns: text before and after images, images across turns."""
    first = [{"type": "text", "text": "Compare these."}] + [{"type": "image"}] * (n_images - 1)
    return [
        {"role": "user", "content": [*first, {"type": "text", "text": "Which is brighter?"}]},
        {"role": "assistant", "content": "The first one."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
    ]


def test_gemma3_layout_matches_gemma3_processor(
    served: dict[str, LoadedParts], gemma3_mm_ckpt: Path
) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, Gemma3Processor

    # The Hub tokenizer_config names these; the tiny checkpoint's does not.
    tokenizer = AutoTokenizer.from_pretrained(
        gemma3_mm_ckpt,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    processor = Gemma3Processor(
        image_processor=AutoImageProcessor.from_pretrained(gemma3_mm_ckpt, backend="pil"),
        tokenizer=tokenizer,
        image_seq_length=16,
    )
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    messages = conversation(len(images))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=text, images=images)["input_ids"][0]
    # BOS comes from the template text; the processor's tokenizer must not add a second.
    if expected[:2] == [tokenizer.bos_token_id] * 2:
        expected = expected[1:]
    expected = [IMAGE if t == GEMMA_SOFT_TOKEN else t for t in expected]
    assert server_layout(served["gemma3"], messages, images) == expected


@pytest.mark.parametrize("arch", ["qwen3vl", "qwen3vlmoe"])
def test_qwen3vl_layout_matches_qwen3vl_processor(
    served: dict[str, LoadedParts], qwen_ckpt: dict[str, Path], arch: str
) -> None:
    """Qwen3VLProcessor (which needs torchvision to build here) replaces each
    <|image_pad|> by grid_t·grid_h·grid_w / merge² copies; that step is reproduced on the
    checkpoint's own tokenizer, template and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    ckpt = qwen_ckpt["dense" if arch == "qwen3vl" else "moe"]
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    image_processor = AutoImageProcessor.from_pretrained(ckpt)
    rng = np.random.default_rng(4)
    images = [
        rng.integers(0, 256, size, dtype=np.uint8)
        for size in [(128, 128, 3), (96, 160, 3), (256, 64, 3)]
    ]
    messages = conversation(len(images))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    grids = image_processor(images=images, return_tensors="np")["image_grid_thw"]
    counts = iter(int(np.prod(grid)) // image_processor.merge_size**2 for grid in grids)
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * next(counts) + p for p in pieces[1:])
    expected = [IMAGE if t == IMAGE_PAD_ID else t for t in tokenizer(text)["input_ids"]]
    got = server_layout(served[arch], messages, images)
    assert got == expected
    assert got.count(IMAGE) == (16 + 15 + 16)
