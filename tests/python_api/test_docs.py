"""docs/python.md's ``python`` blocks run, in order and in one namespace, so its examples
cannot rot. Substituted (as the page says): the bundled GGUF for the 270M repo id, the tiny
vision GGUF for the 4B one; ``mountain.jpg`` is written in the working folder and the
store is a temporary ``GGUFSERVE_HOME``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import REPO, TINY_VISION

BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def test_python_page_examples_run(
    bundled_gguf: Path,
    tiny_vision_models: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    [vision] = [e for e in tiny_vision_models if e["id"] == TINY_VISION]
    page = (REPO / "docs" / "python.md").read_text(encoding="utf-8")
    page = page.replace('"google/gemma-3-270m-it"', repr(str(bundled_gguf)))
    page = page.replace('"google/gemma-3-4b-it"', repr(vision["gguf"]["path"]))
    blocks = BLOCK.findall(page)
    assert len(blocks) >= 9
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GGUFSERVE_HOME", str(tmp_path / "store"))
    Image.new("RGB", (96, 64), (40, 90, 200)).save("mountain.jpg")
    namespace: dict[str, Any] = {"__name__": "python_md"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/python.md block {index}", "exec"), namespace)
        finally:
            model = namespace.get("model")
        assert model is not None
    out = capsys.readouterr().out
    assert "vectors of 640" in out
    assert namespace["city"].__class__.__name__ == "City"
    assert len(namespace["topics"]) == 3
