"""Image token budgets: mtmd's size arithmetic for Qwen-VL projectors, request budgets
within a model's range, the image-aware context message and models.yaml validation."""

from __future__ import annotations

import pytest
from PIL import Image

from ggufserve.errors import ContextLengthExceededError, InvalidRequestError
from ggufserve.generation.capacity import check_context
from ggufserve.generation.image_budget import (
    TokenRange,
    check_request_budget,
    fit_image,
    fit_images,
    image_tokens,
    projector_range,
    request_range,
    token_grid,
)
from ggufserve.generation.images import loaded_image
from ggufserve.settings import ModelsFileError, parse_models_file

# Qwen3-VL: 16 px patches merged 2 × 2, clip.cpp's default range.
QWEN = TokenRange(cell_px=32, min_tokens=8, max_tokens=4096)


@pytest.mark.parametrize(
    ("size", "limits", "grid"),
    [
        ((128, 96), QWEN, (4, 3)),  # whole cells: one token per 32 × 32 pixels
        ((31, 33), QWEN, (3, 3)),  # 1 × 1 cell is below 8 tokens: scaled up by √8
        ((2000, 1), QWEN, (63, 1)),  # 62.5 cells round half away from zero; sides >= 1 cell
        ((3000, 2000), QWEN, (78, 52)),  # 94 × 63 > 4096: scaled down by 1.196, floored
        ((1024, 768), TokenRange(32, 8, 192), (16, 12)),  # exactly half each side
        ((1024, 768), TokenRange(32, 8, 48), (8, 6)),  # a quarter each side
        ((64, 64), TokenRange(32, 100, 4096), (10, 10)),  # 2 × 2 scaled up by 5
        ((640, 480), TokenRange(32, 1024, 4096), (37, 28)),  # 300 tokens → 1036
    ],
)
def test_token_grid_follows_mtmd(
    size: tuple[int, int], limits: TokenRange, grid: tuple[int, int]
) -> None:
    assert token_grid(*size, limits) == grid
    assert image_tokens(*size, limits) == grid[0] * grid[1]


def test_projector_range_for_qwen_and_gemma() -> None:
    assert projector_range("qwen3vl_merger", 16, 2, None, None) == QWEN
    assert projector_range("qwen2.5vl_merger", 14, 2, 256, None) == TokenRange(28, 256, 4096)
    assert projector_range("gemma3", 14, 4, None, None) is None
    with pytest.raises(ValueError, match="'gemma3' gives every image a fixed size"):
        projector_range("gemma3", 14, 4, None, 256)
    with pytest.raises(ValueError, match=r"image_min_tokens \(5000\) is above"):
        projector_range("qwen3vl_merger", 16, 2, 5000, None)


def test_request_range_within_the_model() -> None:
    model = TokenRange(32, 16, 1024)
    assert request_range(model, None, None) is None
    assert request_range(model, None, 64) == TokenRange(32, 16, 64)
    assert request_range(model, 512, None) == TokenRange(32, 512, 1024)


@pytest.mark.parametrize(
    ("model", "low", "high", "param", "words"),
    [
        (None, None, 64, "image_max_tokens", "fixed number of tokens"),
        (None, 64, None, "image_min_tokens", "fixed number of tokens"),
        (TokenRange(32, 16, 1024), None, 2048, "image_max_tokens", "16 to 1024"),
        (TokenRange(32, 16, 1024), 8, None, "image_min_tokens", "16 to 1024"),
        (TokenRange(32, 16, 1024), 512, 256, "image_min_tokens", "is above"),
    ],
)
def test_request_budgets_the_model_cannot_honour(
    model: TokenRange | None, low: int | None, high: int | None, param: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        request_range(model, low, high)
    assert info.value.param == param and words in info.value.message


def test_check_request_budget_needs_min_at_most_max() -> None:
    check_request_budget(64, 64)
    check_request_budget(None, 8)
    with pytest.raises(InvalidRequestError) as info:
        check_request_budget(65, 64)
    assert info.value.param == "image_min_tokens"


def test_fit_image_resizes_to_whole_cells_of_the_request_grid() -> None:
    picture = loaded_image(Image.effect_noise((1024, 768), 60).convert("RGB"))
    fitted = fit_image(picture, QWEN, TokenRange(32, 8, 48))
    assert (fitted.width, fitted.height) == (256, 192)
    assert len(fitted.rgb) == 256 * 192 * 3 and fitted.digest != picture.digest
    # mtmd keeps a whole-cell image within the model's range as it is: 8 × 6 tokens.
    assert token_grid(fitted.width, fitted.height, QWEN) == (8, 6)
    # A budget that picks the grid the model picks anyway leaves the image alone.
    assert fit_image(picture, QWEN, TokenRange(32, 8, 1024)) is picture
    assert fit_images([picture], None, None, None) == [picture]


def test_context_error_names_each_image() -> None:
    with pytest.raises(ContextLengthExceededError) as info:
        check_context(1040, 16, 1024, part="messages", param="messages", image_tokens=[1024, 4])
    message = info.value.message
    assert "image 1 takes 1024 tokens, image 2 takes 4 tokens" in message
    assert "the text (12 tokens) and max_tokens (16) that exceeds n_ctx (1024)" in message
    assert message.startswith("This model's maximum context length is 1024 tokens.")
    check_context(1000, 24, 1024, part="messages", param="messages", image_tokens=[1000])


def models_problem(entry: dict[str, object]) -> str:
    with pytest.raises(ModelsFileError) as info:
        parse_models_file({"models": [{"id": "m", "gguf": {"path": "m.gguf"}, **entry}]}, "f")
    return str(info.value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"image_min_tokens": 1024, "image_max_tokens": 256},
            "key 'image_max_tokens': Value error, image_max_tokens (256) is below "
            "image_min_tokens (1024)",
        ),
        ({"image_min_tokens": 0}, "key 'image_min_tokens': Input should be greater than"),
        ({"image_max_tokens": "many"}, "key 'image_max_tokens': Input should be a valid integer"),
        (
            {"n_ctx": 512, "image_min_tokens": 1024},
            "key 'image_min_tokens': Value error, image_min_tokens (1024) leaves no room in "
            "n_ctx (512)",
        ),
    ],
)
def test_models_file_checks_image_token_limits(entry: dict[str, object], expected: str) -> None:
    assert expected in models_problem(entry)


def test_models_file_accepts_image_token_limits() -> None:
    raw = {
        "id": "m",
        "gguf": {"path": "m.gguf"},
        "image_min_tokens": 1024,
        "image_max_tokens": 1024,
    }
    entry = parse_models_file({"models": [raw]}, "f").entry("m")
    assert (entry.image_min_tokens, entry.image_max_tokens) == (1024, 1024)
