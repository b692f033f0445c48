"""The benchmark's peers, all from the same llama-cpp-python sdist as our build:

- ``llama-server`` and ``llama-bench``, built with CMake from the sdist's vendored
  llama.cpp with our build's flags (``ggufserve.native.plan``), cached per build key under
  ``~/.cache/ggufserve/bench/`` (about 10 minutes on 2 cores the first time);
- ``examples/server/server.py``, llama-cpp-python's own continuous-batching server, run
  with the bench venv's Python (it needs FastAPI, which our environment does not carry).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from ggufserve.native import wheels
from tests.conftest import wait_for_status

TOOLS = ("llama-server", "llama-bench")


def _sdist_dir(python: str) -> Path:
    root = wheels.cache_root()
    tarball = wheels.sdist(python, root)
    target = root.parent / "bench" / tarball.name.removesuffix(".tar.gz")
    if not target.exists():
        with tarfile.open(tarball) as archive:
            archive.extractall(target.parent, filter="data")
    return target


def llama_cpp_tools(python: str) -> tuple[Path, Path]:
    """(bin folder with llama-server and llama-bench, sdist folder), built once per key."""
    plan = wheels.machine_plan("cpu", "auto")
    source = _sdist_dir(python)
    build = wheels.cache_root().parent / "bench" / f"llama.cpp-{plan.key}"
    binaries = build / "bin"
    if not all((binaries / tool).exists() for tool in TOOLS):
        configure = ["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build)]
        configure += ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_OPENSSL=OFF"]
        configure += ["-DLLAMA_BUILD_TESTS=OFF", *shlex.split(plan.cmake_args)]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", jobs], check=True)
    return binaries, source


def llama_bench_tg(binaries: Path, model: Path, threads: int, n_tokens: int) -> float:
    """llama-bench's text-generation tok/s (the single-stream limit), mean of 5 runs."""
    done = subprocess.run(
        [str(binaries / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(n_tokens),
         "-t", str(threads), "-r", "5", "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(done.stdout)[0]["avg_ts"])


def spawn(args: list[str], log: Path, ready_path: str, port: int) -> tuple[str, Callable[[], None]]:
    """Start a server process; (base URL, stop function) once ``ready_path`` answers 200."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if process.poll() is None:
            return None
        return f"{log.name}: server exited: {log.read_text()[-2000:]}"

    if not wait_for_status(f"{base_url}{ready_path}", (200,), 180, exited):
        raise RuntimeError(f"{log.name}: not ready in 180 s")

    def stop() -> None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

    return base_url, stop


def llama_server_args(
    binaries: Path, model: Path, threads: int, n_ctx: int, n_parallel: int, port: int
) -> list[str]:
    """llama-server with the same threads, context, sequences and KV layout as ours
    (unified KV; the whole context in the sliding-window layers, our ``swa_full``
    default, which llama-server leaves off unless told)."""
    return [
        str(binaries / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
        "--port", str(port), "-c", str(n_ctx), "-np", str(n_parallel), "--kv-unified",
        "--swa-full", "-t", str(threads), "-tb", str(threads), "--no-webui",
    ]  # fmt: skip


def example_server_config(
    model: Path, threads: int, n_ctx: int, n_parallel: int, port: int, template: str
) -> dict[str, object]:
    """llama-cpp-python's examples/server/server.py config (its -C file)."""
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "model": {
            "path": str(model),
            "alias": "bench",
            "n_ctx": n_ctx,
            "n_seq_max": n_parallel,
            "n_batch": 512,
            "n_ubatch": 512,
            "threads": threads,
            "threads_batch": threads,
            "kv_unified": True,
            # The bundled GGUF carries no template: give it ours for Gemma 3.
            "chat_template": template,
        },
    }
