"""llama.cpp's log lines, routed to a Python function for the length of a block."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator

GGML_LOG_LEVEL_ERROR = 4  # enum ggml_log_level (ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT)


@contextlib.contextmanager
def captured_logs(on_line: Callable[[int, str], None]) -> Iterator[None]:
    """Send each llama.cpp/ggml log message (level, text) to ``on_line`` instead of stderr;
    llama-cpp-python's own handler is put back afterwards. ``on_line`` must not raise."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        on_line(level, text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class ErrorLines:
    """An ``on_line`` that keeps llama.cpp's error messages (for one-line error reports)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, level: int, text: str) -> None:
        if level == GGML_LOG_LEVEL_ERROR and text.strip():
            self.lines.append(text.strip())

    def last(self) -> str:
        return self.lines[-1] if self.lines else ""
