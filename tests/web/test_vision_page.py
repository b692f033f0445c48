"""Images in the chat page, on the tiny Gemma 3 vision model converted by our converter:
file picker (a large photo, downscaled in the browser), drag-and-drop and paste; and the
refusal for a text-only model."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tests.conftest import RunningServer
from tests.web.conftest import (
    TEXT_ONLY,
    VISION,
    browser_missing,
    open_chat,
    send,
    set_max_tokens,
    wait_for_reply,
)

if (reason := browser_missing()) is not None:
    pytest.skip(reason, allow_module_level=True)

from playwright.sync_api import Page, expect

pytestmark = pytest.mark.e2e
MAX_SIDE = 896  # server/api/web/images.js


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# Builds a File in the page and hands it over as a user would: dropped or pasted.
GIVE_FILE = """([how, b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/png" }));
  const target = document.querySelector(how === "drop" ? "#messages" : "#input");
  const event = how === "drop"
    ? new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true })
    : new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
  target.dispatchEvent(event);
}"""


def give_file(page: Page, how: str, data: bytes, name: str) -> None:
    page.evaluate(GIVE_FILE, [how, base64.b64encode(data).decode(), name])


def decode(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_images_by_picker_drop_and_paste_reach_the_model(
    page: Page, vision_server: RunningServer
) -> None:
    bodies: list[dict[str, object]] = []
    page.on(
        "request",
        lambda r: (
            bodies.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    open_chat(page, vision_server, VISION)
    expect(page.locator(f"#model option[value='{VISION}']")).to_contain_text("vision")
    set_max_tokens(page, 6)
    photo = png((200, 30, 30), (1800, 1200))
    page.set_input_files(
        "#file-input", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": photo}]
    )
    give_file(page, "drop", png((0, 160, 0), (64, 48)), "green.png")
    give_file(page, "paste", png((0, 0, 200), (40, 40)), "blue.png")
    thumbnails = page.locator("#attachments img")
    expect(thumbnails).to_have_count(3)

    send(page, "What is in these images?")
    assert "token" in wait_for_reply(page)
    expect(page.locator(".msg.user .msg-images img")).to_have_count(3)
    expect(thumbnails).to_have_count(0)

    (body,) = bodies
    (message,) = body["messages"]  # type: ignore[misc]
    parts = message["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]
    assert parts[3]["text"] == "What is in these images?"
    images = [decode(p["image_url"]["url"]) for p in parts[:3]]
    assert images[0].format == "JPEG" and max(images[0].size) == MAX_SIDE  # downscaled
    assert images[0].size == (MAX_SIDE, MAX_SIDE * 2 // 3)
    assert [(i.format, i.size) for i in images[1:]] == [("PNG", (64, 48)), ("PNG", (40, 40))]


def test_text_only_model_refuses_images(page: Page, vision_server: RunningServer) -> None:
    open_chat(page, vision_server, TEXT_ONLY)
    expect(page.locator(f"#model option[value='{TEXT_ONLY}']")).not_to_contain_text("vision")
    give_file(page, "drop", png((0, 160, 0), (32, 32)), "green.png")
    expect(page.locator("#banner")).to_contain_text("text-only")
    expect(page.locator("#attachments img")).to_have_count(0)
    # An image attached for a vision model is refused too once a text model is chosen.
    page.select_option("#model", VISION)
    give_file(page, "paste", png((0, 160, 0), (32, 32)), "green.png")
    expect(page.locator("#attachments img")).to_have_count(1)
    page.select_option("#model", TEXT_ONLY)
    send(page, "Describe it")
    expect(page.locator("#banner")).to_contain_text("text-only")
    expect(page.locator(".msg")).to_have_count(0)
    assert page.input_value("#input") == "Describe it"
