"""``ggufserve`` command line: ``ggufserve serve [--models FILE] [--model ID] ...``,
``ggufserve doctor [--models FILE] [--model ID] [--no-smoke]``;
``ggufserve convert`` and ``ggufserve quantize`` are handed to ``converters``.

Flags override ``GGUFSERVE_*`` environment variables, which override the defaults.
Exit codes: 0 after a clean shutdown, 2 for a usage or models-file error, 3 when the
installed llama.cpp crashes on a tiny generation (``doctor`` shows the same check).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from server.settings import ModelEntry, ModelsFileError, ServerSettings, load_models_file

EXIT_USAGE = 2
EXIT_BROKEN_BUILD = 3


class LibraryCrashError(Exception):
    """The installed llama.cpp cannot generate on this machine (the message says the fix)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ggufserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    serve.add_argument("--models", dest="models_file", type=Path, help="models.yaml to read")
    serve.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="ID",
        help="model id to serve (repeatable); default: the file's default entry",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument(
        "--max-queued-requests", type=int, help="requests that may wait per model (default 16)"
    )
    serve.add_argument(
        "--cors-allow-origin",
        dest="cors_allow_origins",
        action="append",
        metavar="ORIGIN",
        help="allow browser requests from this origin (repeatable; '*' for any)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    doctor = commands.add_parser(
        "doctor", help="show llama.cpp's build and check that it generates on this machine"
    )
    doctor.add_argument("--models", dest="models_file", type=Path, help="models.yaml to read")
    doctor.add_argument(
        "--model", dest="models", action="append", metavar="ID",
        help="model id to test (repeatable); default: the file's default entry",
    )  # fmt: skip
    doctor.add_argument(
        "--no-smoke", dest="smoke", action="store_false", help="skip the test generation"
    )
    return parser


def _settings(args: argparse.Namespace) -> ServerSettings:
    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "smoke") and value is not None
    }
    return ServerSettings(**overrides)


def _entries(settings: ServerSettings) -> list[ModelEntry]:
    """The models.yaml entries chosen by ``--model`` (default: the file's default).

    Raises:
        ModelsFileError: bad models file or unknown id.
    """
    models_file = load_models_file(settings.models_file)
    ids = settings.models or [models_file.default_id]
    return [models_file.entry(model_id) for model_id in ids]


def serve(settings: ServerSettings) -> int:
    """Validate the models file, then run uvicorn until SIGINT/SIGTERM.

    Raises:
        ModelsFileError: bad models file, unknown id, or a missing local GGUF/mmproj.
        LibraryCrashError: the start-up check's tiny generation crashed (e.g. SIGILL).
    """
    import uvicorn

    from server.app import create_app
    from server.model_files import check_local
    from server.registry import ModelRegistry

    entries = _entries(settings)
    base_dir = settings.models_file.resolve().parent
    for entry in entries:
        check_local(entry.gguf, base_dir, f"entry '{entry.id}': key 'gguf.path'")
        if entry.mmproj is not None:
            check_local(entry.mmproj, base_dir, f"entry '{entry.id}': key 'mmproj.path'")
    _log_build()
    if settings.startup_check:
        from server.native.startup_check import check_library

        failed = check_library()
        if failed is not None:
            raise LibraryCrashError(failed.summary)
    app = create_app(settings, ModelRegistry(entries, base_dir, settings))
    # uvicorn re-raises SIGINT/SIGTERM once its graceful shutdown is done; that shutdown
    # was clean, so the handler it lands on exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_cleanly)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


def _log_build() -> None:
    """One log line: llama.cpp's backends, compiled-in CPU features, AMX, GPU offload."""
    from server.native.sysinfo import system_info

    logging.getLogger("ggufserve").info("%s", system_info().summary())


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["convert"], ["quantize"]):
        # One console script for both halves; the converter needs nothing of the server.
        from converters.__main__ import main as converters_main

        return converters_main(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=(getattr(args, "log_level", None) or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = _settings(args)
        if args.command == "doctor":
            from server.doctor import doctor

            base_dir = settings.models_file.resolve().parent
            return doctor(_entries(settings), base_dir, smoke=args.smoke)
        return serve(settings)
    except ModelsFileError as exc:
        print(f"ggufserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LibraryCrashError as exc:
        print(f"ggufserve: error: {exc}", file=sys.stderr)
        return EXIT_BROKEN_BUILD
    except ValueError as exc:  # pydantic ValidationError for bad flag / env values
        print(f"ggufserve: error: invalid setting: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
