"""``ggufserve run`` driven through a pseudo-terminal (pexpect): replies stream, Ctrl-C
stops a reply and keeps the session, ``/image`` works on the tiny Gemma 3 vision model;
one-shot prompts from the argument and from stdin."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from tests.conftest import REPO, sigint_default

PROMPT = ">>> "
STATS = re.compile(r"\[(\d+) tokens \(prompt (\d+)\)")
IMAGE_TOKENS = 16  # mm_tokens_per_image of the tiny checkpoint


def spawn(home: Path, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ggufserve", "run", *args],
        cwd=str(REPO),
        env={**os.environ, "GGUFSERVE_HOME": str(home), "TERM": "dumb"},
        encoding="utf-8",
        timeout=300,
        preexec_fn=sigint_default,
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    return child


@pytest.fixture
def chat(bundled_gguf: Path, tmp_path: Path) -> Iterator[pexpect.spawn]:
    child = spawn(tmp_path / "home", str(bundled_gguf), "--max-tokens", "2000")
    yield child
    child.close(force=True)


def stats_after(child: pexpect.spawn) -> tuple[int, int]:
    """(completion, prompt) tokens of the reply that just ended; waits for the prompt."""
    child.expect(STATS)
    counts = (int(child.match.group(1)), int(child.match.group(2)))
    child.expect_exact(PROMPT)
    return counts


def test_reply_streams_and_ctrl_c_keeps_the_session(chat: pexpect.spawn) -> None:
    # Ctrl-C once text is streaming (2000 tokens: the 270M base model rarely stops that
    # early; a reply that ended on its own is tried again).
    for _ in range(3):
        chat.sendline("Tell me everything about the history of the Roman empire.")
        chat.expect_exact("Roman empire.\r\n")  # the terminal's echo; then the reply
        chat.expect(r"\w{3,}")
        chat.sendintr()
        index = chat.expect([r"\[stopped\]", STATS])
        chat.expect_exact(PROMPT)
        if index == 0:
            break
    else:
        pytest.fail("every reply ended before Ctrl-C reached it")
    chat.sendline("/set max_tokens 6")
    chat.expect_exact("max_tokens = 6")
    chat.sendline("Write a story about a lighthouse keeper.")
    completion, prompt = stats_after(chat)
    assert 0 < completion <= 6 and prompt > 0
    # The session goes on, with the history: the next prompt is longer than the first.
    chat.sendline("/system You are terse.")
    chat.expect_exact("system prompt set")
    chat.sendline('"""First line')
    chat.sendline('second line"""')
    _, later_prompt = stats_after(chat)
    assert later_prompt > prompt
    chat.sendline("/image /nonexistent.png")
    chat.expect_exact("text-only model")
    chat.sendline("/bye")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_image_command_on_the_tiny_vision_model(gemma3_mm_ckpt: Path, tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    picture.write_bytes(buffer.getvalue())
    folder = tmp_path / "tiny-vision"
    folder.symlink_to(gemma3_mm_ckpt)
    child = spawn(tmp_path / "home", str(folder), "--quant", "F32", "--max-tokens", "4")
    try:
        child.sendline("Hi")
        _, text_prompt = stats_after(child)
        child.sendline("/clear")
        child.expect_exact("conversation cleared")
        child.sendline(f"/image {picture}")
        child.expect_exact("attached red.png")
        child.sendline("Hi")
        _, image_prompt = stats_after(child)
        # The image reached the model: its tokens (and the markers around them) were added.
        assert image_prompt >= text_prompt + IMAGE_TOKENS
        child.sendline("/save " + str(tmp_path / "chat.json"))
        child.expect_exact("saved 2 messages")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert '"image_url"' in (tmp_path / "chat.json").read_text()


def test_one_shot_from_argument_and_stdin(bundled_gguf: Path, tmp_path: Path) -> None:
    env = {**os.environ, "GGUFSERVE_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "ggufserve", "run", str(bundled_gguf), "--max-tokens", "8"]
    by_argument = subprocess.run(
        [*command, "The capital of France is"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert by_argument.returncode == 0, by_argument.stderr
    assert by_argument.stdout.strip()
    assert ": made (" in by_argument.stderr
    by_stdin = subprocess.run(
        command, cwd=REPO, env=env, input="Once upon a time", capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert by_stdin.returncode == 0, by_stdin.stderr
    assert by_stdin.stdout.strip()
    assert ": found in the store (" in by_stdin.stderr
