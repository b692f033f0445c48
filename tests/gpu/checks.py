"""The report of ``tests/gpu/run_gpu_checks.sh``: ``results.json`` (each phase's status and
time, the environment, every test's outcome and figures, the speed run) and
``summary.md``, written to ``--out`` (the device tool's ``$OUT``); the summary is printed
too, last, so it ends the reply's output tail.

``python -m tests.gpu.checks --work DIR --out DIR``
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_outcomes(junit: Path) -> dict[str, str]:
    """nodeid-like ``file::name`` → passed | failed | error | skipped, from pytest's XML."""
    if not junit.is_file():
        return {}
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[name] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes


def collect(work: Path) -> dict[str, Any]:
    results = work / "results"
    figures = {path.stem: _json(path) for path in sorted((results / "figures").glob("*.json"))}
    environment = results / "environment.txt"
    return {
        "phases": _json_lines(results / "phases.jsonl"),
        "environment": environment.read_text() if environment.is_file() else None,
        "build": _json(results / "build.json"),
        "models": _json(work / "models" / "models.json"),
        "tests": junit_outcomes(results / "junit.xml"),
        "figures": figures,
        "speed": _json(results / "speed.json"),
    }


def _parity_lines(figures: dict[str, Any]) -> list[str]:
    lines = []
    for name, fig in figures.items():
        if not fig:
            continue
        if "identical" in fig:
            lines.append(
                f"- {fig['model']}: {fig['identical']}/{len(fig['tokens'])} greedy tokens "
                f"identical (margin at divergence {fig['margin_at_divergence']}); "
                f"max |Δ logit| {fig['max_abs_logit']:.4g} (logit std {fig['logit_std']:.3g}); "
                f"max |Δ log p| chosen {fig['max_chosen_logprob']:.4g}, "
                f"top-10 {fig['max_topk_logprob']:.4g} nats (bound {fig['bound_nats']})"
            )
        elif "min_row_cosine" in fig:
            lines.append(
                f"- {fig['model']} image embeddings {fig['shape']}: min row cosine "
                f"{fig['min_row_cosine']:.6f}, per image {fig['image_cosines']}"
            )
        elif "offloaded" in fig:
            lines.append(f"- offload: {fig['offloaded']} ({name})")
        elif "doctor" in fig:
            lines += [f"- doctor: {line}" for line in fig["doctor"]]
    return lines


def latest_phases(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each phase's last outcome over the runs (a stamp keeps the run that made it)."""
    latest: dict[str, dict[str, Any]] = {}
    for phase in phases:
        if phase["status"] != "done-before" or phase["phase"] not in latest:
            latest[phase["phase"]] = phase
    return list(latest.values())


def summary(report: dict[str, Any]) -> str:
    lines = ["# GPU checks", "", "| phase | status | seconds | note |", "|---|---|---|---|"]
    lines += [
        f"| {p['phase']} | {p['status']} | {p.get('seconds', '')} | {p.get('note', '')} |"
        for p in latest_phases(report["phases"])
    ]
    tests = report["tests"]
    if tests:
        counts: dict[str, int] = {}
        for outcome in tests.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        lines += ["", "Tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
        lines += [f"- {k}: {v}" for k, v in tests.items() if v != "passed"]
    lines += ["", *_parity_lines(report["figures"])]
    speed = report["speed"]
    if speed:
        lines += ["", f"Speed ({speed['model']}): llama-bench {speed['llama_bench']}"]
        lines += ["| system | c | aggregate tok/s | stream tok/s | TTFT p50 ms | done/cut |"]
        lines += ["|---|---|---|---|---|---|"]
        lines += [
            f"| {r['system']} | {r['clients']} | {r['aggregate_tok_s']:.1f} "
            f"| {r['stream_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} "
            f"| {r['completed']}/{r['cut_short']} |"
            for r in speed["rows"]
        ]
        lines += [f"- {k}: {v:.3f}" for k, v in speed["ratios"].items()]
        if speed["not_built"]:
            lines.append(f"- not measured (no binary): {', '.join(speed['not_built'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = collect(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    text = summary(report)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
