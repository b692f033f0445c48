"""Python call arguments → the HTTP API's request models, validated exactly as an HTTP
body is (JSON semantics, same error messages and ``param``).

Messages may carry Python objects the wire cannot: a ``pathlib.Path`` or ``PIL.Image``
as an image (a bare content item, or an ``image_url``'s ``url``) becomes a ``data:`` URL
here, in the caller's process, because the caller named that file or object itself.
String URLs keep the server's rules (http(s) fetched with its private-address guard,
local paths only under ``local_media_root``).
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import pydantic_core
from PIL import Image
from pydantic import BaseModel

from ggufserve.api.routes import parse_request
from ggufserve.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)
# What ``messages`` may be: one user text, or OpenAI messages (dicts or reply messages).
Messages = str | Sequence[Mapping[str, Any] | BaseModel]


def validated(model: type[M], payload: Mapping[str, Any]) -> M:
    """``payload`` validated as the HTTP body would be (through JSON), except that a
    field the request does not have is an error: over HTTP it is ignored (clients send
    other servers' fields), in Python it is a typo (``max_token=8`` would run unbounded).

    Raises:
        TypeError: a keyword that is not a field of ``model`` (named).
        InvalidRequestError: a value JSON cannot hold, or the first failing field.
    """
    known = {
        name
        for field_name, field in model.model_fields.items()
        for name in (field_name, field.alias)
        if name
    }
    unknown = sorted(set(payload) - known)
    if unknown:
        raise TypeError(f"{model.__name__} has no field {unknown[0]!r}")
    try:
        raw = pydantic_core.to_json(payload)
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidRequestError(f"Invalid request: {exc}.") from None
    return parse_request(raw, model)


def chat_messages(messages: Messages) -> list[dict[str, Any]]:
    """``messages`` as wire dicts: a string is one user message; a pydantic message (e.g.
    a reply's ``choices[0].message``) is dumped without its unset fields; images inside
    content lists become ``image_url`` parts (see the module docstring)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for message in messages:
        data = (
            message.model_dump(mode="json", exclude_none=True)
            if isinstance(message, BaseModel)
            else dict(message)
        )
        content = data.get("content")
        if isinstance(content, list):
            data["content"] = [content_part(part) for part in content]
        out.append(data)
    return out


def content_part(part: Any) -> Any:
    """One content item: a string → a text part; an image object → an image part; an
    ``image_url`` part whose ``url`` (or whole ``image_url``) is an image object → a data
    URL; anything else unchanged (the request model judges it)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if is_image_object(part):
        return {"type": "image_url", "image_url": {"url": data_url(part)}}
    if isinstance(part, Mapping) and part.get("type") == "image_url":
        image = part.get("image_url")
        if is_image_object(image):
            return {**part, "image_url": {"url": data_url(image)}}
        if isinstance(image, Mapping) and is_image_object(image.get("url")):
            return {**part, "image_url": {**image, "url": data_url(image["url"])}}
    return part


def is_image_object(value: Any) -> bool:
    """A local file path object or a PIL image (not a string: strings are URLs)."""
    return isinstance(value, (os.PathLike, Image.Image))


def data_url(image: Any) -> str:
    """A ``data:`` URL of a file (its bytes as they are) or a PIL image (encoded as PNG).

    Raises:
        InvalidRequestError: the file cannot be read (param ``messages``).
    """
    if isinstance(image, os.PathLike):
        path = os.fspath(image)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise InvalidRequestError(
                f"Cannot read the image file {path!r}: {exc.strerror or exc}.", param="messages"
            ) from None
        mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        raw, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def response_format(value: Any) -> tuple[Any, type[BaseModel] | None]:
    """``response_format`` for the wire, and the pydantic class to parse replies with: a
    ``BaseModel`` subclass becomes a strict ``json_schema`` format named after it."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        schema = {"name": value.__name__[:64], "schema": value.model_json_schema(), "strict": True}
        return {"type": "json_schema", "json_schema": schema}, value
    return value, None
