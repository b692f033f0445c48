"""Image token budgets: how many tokens llama.cpp's mtmd gives an image, and fitting an
image to a request's ``image_min_tokens`` / ``image_max_tokens``.

Qwen-VL projectors (Qwen2-VL, 2.5-VL, 3-VL) keep an image's aspect ratio and cut it into
square cells of ``patch_size × spatial_merge_size`` pixels (16 × 2 = 32 for Qwen3-VL), one
token each: mtmd rounds each side to a whole number of cells, then scales the image down
when it has more than ``max_tokens`` cells or up when it has fewer than ``min_tokens``
(clip.cpp's defaults for these projectors: 8 and 4,096). Other projectors (Gemma 3:
every image at its fixed ``image_size``) ignore the limits.

mtmd's limits belong to its context (one per model); a request's own budget is applied
before mtmd by resizing the decoded image to the grid mtmd would pick for that budget:
mtmd then keeps it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ggufserve.errors import InvalidRequestError
from ggufserve.generation.images import LoadedImage, loaded_image

# clip.projector_type values whose images mtmd scales into a token range (dynamic size).
DYNAMIC_PROJECTORS = frozenset({"qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger"})
# clip.cpp's range for those projectors when models.yaml sets none.
DEFAULT_MIN_TOKENS = 8
DEFAULT_MAX_TOKENS = 4096
MIN_PARAM, MAX_PARAM = "image_min_tokens", "image_max_tokens"


@dataclass(frozen=True)
class TokenRange:
    """How a dynamic-size projector turns images into tokens.

    Attributes:
        cell_px: Side of the square of pixels one token stands for (patch × merge).
        min_tokens / max_tokens: The range mtmd scales every image's token count into
            (exceeded only by extreme aspect ratios, as in mtmd: a side is never below one
            cell).
    """

    cell_px: int
    min_tokens: int
    max_tokens: int


def projector_range(
    projector: str, patch_size: int, merge: int, min_tokens: int | None, max_tokens: int | None
) -> TokenRange | None:
    """The token range of a projector under a model's limits (None: defaults).

    Returns:
        The range, or None for a projector whose images have a fixed size.

    Raises:
        ValueError: limits given for a fixed-size projector (mtmd would ignore them), or a
            minimum above the maximum once the defaults fill in.
    """
    if projector not in DYNAMIC_PROJECTORS:
        if min_tokens is not None or max_tokens is not None:
            raise ValueError(
                f"image_min_tokens / image_max_tokens: the vision projector '{projector}' "
                "gives every image a fixed size and token count, so llama.cpp ignores them; "
                "remove them from this entry"
            )
        return None
    low = DEFAULT_MIN_TOKENS if min_tokens is None else min_tokens
    high = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if low > high:
        raise ValueError(
            f"image_min_tokens ({low}) is above image_max_tokens ({high}, the default when unset)"
        )
    return TokenRange(patch_size * merge, low, high)


def token_grid(width: int, height: int, limits: TokenRange) -> tuple[int, int]:
    """The (columns, rows) of tokens mtmd gives a ``width × height`` image.

    mtmd's arithmetic in float32, as llama.cpp computes it: sides rounded to whole cells
    (halves away from zero), then scaled by the square root of the pixel-count ratio,
    flooring sides when above ``max_tokens``, ceiling them when below ``min_tokens``.
    """
    cell = np.float32(limits.cell_px)
    w, h = np.float32(width), np.float32(height)
    cols = max(1, int(np.floor(w / cell + np.float32(0.5))))
    rows = max(1, int(np.floor(h / cell + np.float32(0.5))))
    area = limits.cell_px * limits.cell_px
    if cols * rows > limits.max_tokens:
        beta = np.sqrt(h * w / np.float32(limits.max_tokens * area))
        cols = max(1, int(np.floor(w / beta / cell)))
        rows = max(1, int(np.floor(h / beta / cell)))
    elif cols * rows < limits.min_tokens:
        beta = np.sqrt(np.float32(limits.min_tokens * area) / (h * w))
        cols = int(np.ceil(w * beta / cell))
        rows = int(np.ceil(h * beta / cell))
    return cols, rows


def image_tokens(width: int, height: int, limits: TokenRange) -> int:
    """The image tokens mtmd gives a ``width × height`` image (see :func:`token_grid`)."""
    cols, rows = token_grid(width, height, limits)
    return cols * rows


def check_request_budget(min_tokens: int | None, max_tokens: int | None) -> None:
    """The checks of a request's budget that need no model.

    Raises:
        InvalidRequestError: ``image_min_tokens`` above ``image_max_tokens``.
    """
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(
            f"image_min_tokens ({min_tokens}) is above image_max_tokens ({max_tokens}).",
            param=MIN_PARAM,
        )


def request_range(
    model: TokenRange | None, min_tokens: int | None, max_tokens: int | None
) -> TokenRange | None:
    """A request's token range within the model's (None: the request sets no budget).

    Raises:
        InvalidRequestError: a budget for a fixed-size projector, or a bound outside the
            model's range (``param`` names the field).
    """
    asked = {MIN_PARAM: min_tokens, MAX_PARAM: max_tokens}
    given = [name for name, value in asked.items() if value is not None]
    if not given:
        return None
    if model is None:
        raise InvalidRequestError(
            f"{given[0]} does not apply to this model: its vision projector gives every "
            "image a fixed number of tokens.",
            param=given[0],
        )
    for name in given:
        value = asked[name]
        assert value is not None
        if not model.min_tokens <= value <= model.max_tokens:
            raise InvalidRequestError(
                f"{name} is {value}; this model takes {model.min_tokens} to "
                f"{model.max_tokens} tokens per image (image_min_tokens / image_max_tokens "
                "in models.yaml).",
                param=name,
            )
    low = model.min_tokens if min_tokens is None else min_tokens
    high = model.max_tokens if max_tokens is None else max_tokens
    check_request_budget(low, high)
    return TokenRange(model.cell_px, low, high)


def fit_image(image: LoadedImage, model: TokenRange, wanted: TokenRange) -> LoadedImage:
    """The image resized (aspect kept, bicubic as mtmd resizes Qwen-VL images) to the
    grid mtmd would give it under ``wanted``; unchanged where ``wanted`` picks the grid the
    model's range already gives. The result's sides are whole cells, so mtmd keeps it."""
    grid = token_grid(image.width, image.height, wanted)
    if grid == token_grid(image.width, image.height, model):
        return image
    size = (grid[0] * wanted.cell_px, grid[1] * wanted.cell_px)
    pixels = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    return loaded_image(pixels.resize(size, Image.Resampling.BICUBIC))


def fit_images(
    images: list[LoadedImage],
    model: TokenRange | None,
    min_tokens: int | None,
    max_tokens: int | None,
) -> list[LoadedImage]:
    """Every image fitted to the request's budget (see :func:`fit_image`).

    Raises:
        InvalidRequestError: see :func:`request_range`.
    """
    wanted = request_range(model, min_tokens, max_tokens)
    if wanted is None or model is None:
        return images
    return [fit_image(image, model, wanted) for image in images]
