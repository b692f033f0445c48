"""``ggufserve`` command line: ``ggufserve serve [--models FILE] [--model ID] ...``,
``ggufserve doctor [--models FILE] [--model ID] [--no-smoke]``;
``ggufserve run / chat / pull / ls / rm / ps`` (the model store and the terminal chat);
``ggufserve convert`` and ``ggufserve quantize`` are handed to ``converters``.

Flags override ``GGUFSERVE_*`` environment variables, which override the defaults.
Exit codes: 0 after a clean shutdown, 1 when a store command fails (one line says why),
2 for a usage or models-file error, 3 when the installed llama.cpp crashes on a tiny
generation (``doctor`` shows the same check), 130 after Ctrl-C outside a chat.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from ggufserve.settings import (
    ModelEntry,
    ModelsFile,
    ModelsFileError,
    ServerSettings,
    load_models_file,
)
from ggufserve.store.model_store import ModelStore

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_BUILD = 3
EXIT_INTERRUPTED = 130


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
    serve.add_argument(
        "--no-webui",
        dest="webui",
        action="store_false",
        default=None,
        help="do not serve the browser chat page at / (or GGUFSERVE_WEBUI=false)",
    )
    serve.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="idle time before an on-demand model unloads: '5m', '1h', seconds, -1 = never "
        "(default 5m)",
    )
    serve.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget of the loaded models, e.g. '8GiB' (default: unbounded)",
    )
    serve.add_argument(
        "--load-timeout",
        dest="load_timeout_s",
        type=float,
        metavar="SECONDS",
        help="longest a request waits for its model to load before a 503 (default 120)",
    )
    _add_limit_flags(serve)
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
    _add_store_commands(commands)
    return parser


def _add_limit_flags(serve: argparse.ArgumentParser) -> None:
    """HTTP hardening and liveness (docs/security.md: what each bounds and why)."""
    limits = serve.add_argument_group("limits")
    flags: tuple[tuple[str, str, type, str], ...] = (
        ("--max-header-bytes", "max_header_bytes", int, "bytes of a request's headers (32768)"),
        ("--max-header-count", "max_header_count", int, "header fields of a request (100)"),
        ("--header-timeout", "header_timeout_s", float, "seconds to receive the headers (10)"),
        ("--body-timeout", "body_timeout_s", float, "seconds to receive a body (60)"),
        ("--http-keep-alive", "http_keep_alive_s", float, "seconds an idle connection lives (5)"),
        ("--max-json-values", "max_json_values", int, "JSON values in a request body (50000)"),
        ("--max-embedding-chars", "max_embedding_chars", int, "characters per embeddings "
         "request (1000000)"),
        ("--max-step-time", "max_step_s", float, "seconds a scheduler step may run before "
         "/health answers 503 stalled (60)"),
    )  # fmt: skip
    for flag, dest, kind, text in flags:
        limits.add_argument(flag, dest=dest, type=kind, metavar="N", help=text)


def _add_store_commands(commands: Any) -> None:
    """run / chat / pull / ls / rm / ps (the model store and the terminal chat)."""
    from ggufserve.store.pull import DEFAULT_QUANT

    run = commands.add_parser("run", help="pull a model if needed, then chat with it")
    pull = commands.add_parser("pull", help="convert / quantize / download into the store")
    for sub in (run, pull):
        sub.add_argument(
            "source", help="HF repo id, checkpoint folder, GGUF file or stored model id"
        )
        sub.add_argument(
            "--quant", type=str.upper, default=DEFAULT_QUANT, help="llama.cpp type (Q4_K_M)"
        )
        sub.add_argument(
            "--no-report", dest="report", action="store_false", help="skip the quality report"
        )
    chat = commands.add_parser("chat", help="chat with a model of a running server")
    chat.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    chat.add_argument("--model", help="model id (default: the server's first)")
    for sub in (run, chat):
        sub.add_argument("prompt", nargs="*", help="answer this once and exit (or pipe stdin)")
        sub.add_argument("--image", action="append", type=Path, metavar="PATH")
        sub.add_argument("--system", help="system prompt")
        sub.add_argument("--max-tokens", type=int, help="bound of each reply, in tokens")
    run.add_argument("--n-ctx", type=int, help="context size in tokens (default 8192)")
    commands.add_parser("ls", help="list the models in the store")
    rm = commands.add_parser("rm", help="remove models from the store")
    rm.add_argument("ids", nargs="+", metavar="ID")
    ps = commands.add_parser("ps", help="models loaded in a running server")
    ps.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    for sub in (chat, ps):
        sub.add_argument("--api-key", help="the server's API key (or GGUFSERVE_API_KEY)")


def _settings(args: argparse.Namespace) -> ServerSettings:
    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "smoke") and value is not None
    }
    return ServerSettings(**overrides)


def _chosen(settings: ServerSettings, store: ModelStore) -> tuple[ModelsFile, list[ModelEntry]]:
    """The models file and the entries chosen by ``--model`` (default: the file's
    default); an id names a models.yaml entry first, else a store model.

    Raises:
        ModelsFileError: bad models file, or an id neither has.
    """
    models_file = load_models_file(settings.models_file)
    return models_file, [
        _entry(models_file, model_id, store)
        for model_id in settings.models or [models_file.default_id]
    ]


def _entry(models_file: ModelsFile, model_id: str, store: ModelStore) -> ModelEntry:
    """The models.yaml entry with this id, else the store's.

    Raises:
        ModelsFileError: neither has it.
    """
    try:
        return models_file.entry(model_id)
    except ModelsFileError:
        record = store.find(model_id)
        if record is None:
            raise
        return record.model_entry()


def serve(settings: ServerSettings) -> int:
    """Validate the models file, then run uvicorn until SIGINT/SIGTERM.

    Raises:
        ModelsFileError: bad models file, unknown id, or a missing local GGUF/mmproj.
        LibraryCrashError: the start-up check's tiny generation crashed (e.g. SIGILL).
    """
    import uvicorn

    from ggufserve.api.app import create_app
    from ggufserve.api.http_limits import DeadlineH11Protocol, ReadDeadlines
    from ggufserve.models.model_files import check_local, resolve_draft
    from ggufserve.models.registry import ModelRegistry

    store = ModelStore()
    models_file, entries = _chosen(settings, store)
    base_dir = settings.models_file.resolve().parent
    # Store entries hold absolute paths: the same check applies to them.
    for entry in entries:
        check_local(entry.gguf, base_dir, f"entry '{entry.id}': key 'gguf.path'")
        if entry.mmproj is not None:
            check_local(entry.mmproj, base_dir, f"entry '{entry.id}': key 'mmproj.path'")
        if entry.speculative.draft is not None:
            try:
                resolve_draft(entry.speculative.draft, base_dir)
            except ModelsFileError as exc:
                raise ModelsFileError(f"entry '{entry.id}': {exc}") from None
    _log_build()
    _check_build(settings)
    # Every models.yaml and store entry is available; the --model ones load at start-up.
    preload = [entry.id for entry in entries]
    registry = ModelRegistry(models_file.models, base_dir, settings, catalog=store, preload=preload)
    app = create_app(settings, registry)
    # uvicorn re-raises SIGINT/SIGTERM once its graceful shutdown is done; that shutdown
    # was clean, so the handler it lands on exits 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_cleanly)
    deadlines = ReadDeadlines(settings.header_timeout_s, settings.body_timeout_s)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        http=DeadlineH11Protocol.with_deadlines(deadlines),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.http_keep_alive_s,  # type: ignore[arg-type]
    )
    return 0


def _check_build(settings: ServerSettings) -> None:
    """The start-up check (a tiny generation in a child process, once per build).

    Raises:
        LibraryCrashError: it crashed (e.g. SIGILL).
    """
    if settings.startup_check:
        from ggufserve.native.startup_check import check_library

        failed = check_library()
        if failed is not None:
            raise LibraryCrashError(failed.summary)


def _log_build() -> None:
    """One log line: llama.cpp's backends, compiled-in CPU features, AMX, GPU offload."""
    from ggufserve.native.sysinfo import system_info

    logging.getLogger("ggufserve").info("%s", system_info().summary())


def _store_command(args: argparse.Namespace, settings: ServerSettings) -> int:
    """run / chat / pull / ls / rm / ps; their named errors end as one line, exit 1."""
    from ggufserve.cli import store_commands
    from ggufserve.cli.run import RunError, chat_command, run_command
    from ggufserve.store.model_store import StoreError
    from ggufserve.store.pull import PullError

    store = ModelStore()
    try:
        if args.command == "run":
            _check_build(settings)
            return run_command(args, settings)
        if args.command == "chat":
            return chat_command(args, settings.api_key)
        if args.command == "pull":
            return store_commands.pull_command(store, args)
        if args.command == "ls":
            return store_commands.ls_command(store)
        if args.command == "rm":
            return store_commands.rm_command(store, args.ids)
        return store_commands.ps_command(args.url, settings.api_key)
    except (PullError, StoreError, RunError) as exc:
        print(f"ggufserve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nggufserve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["convert"], ["quantize"]):
        # One console script for both halves; the converter needs nothing of the server.
        from ggufserve.converters.__main__ import main as converters_main

        return converters_main(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives positionals after an option back as extras: the prompt's later words.
    if extra and (args.command not in ("run", "chat") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.prompt = [*args.prompt, *extra]
    # The terminal commands keep the screen for the conversation: warnings only.
    quiet = args.command in ("run", "chat", "pull", "ls", "rm", "ps")
    logging.basicConfig(
        level=(getattr(args, "log_level", None) or ("warning" if quiet else "info")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = _settings(args)
        if args.command == "doctor":
            from ggufserve.cli.doctor import doctor

            base_dir = settings.models_file.resolve().parent
            return doctor(_chosen(settings, ModelStore())[1], base_dir, smoke=args.smoke)
        if quiet:
            return _store_command(args, settings)
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
