"""The import package is ``ggufserve``: pyproject's package list names every folder of
server/ and converters/, and nothing generic (``server``, ``converters``) is importable."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.conftest import REPO

ROOTS = {"server": "ggufserve", "converters": "ggufserve.converters"}


def folder_packages() -> set[str]:
    found = set()
    for folder, package in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rest = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *rest)))
    return found


def test_every_folder_is_a_listed_package() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == folder_packages()
    assert config["package-dir"] == {package: folder for folder, package in ROOTS.items()}


def test_only_ggufserve_is_importable_from_outside_the_repository(tmp_path: Path) -> None:
    assert importlib.util.find_spec("ggufserve.converters.convert") is not None
    probe = "import importlib.util as u; print(u.find_spec('server'), u.find_spec('converters'))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["None", "None"]


def test_python_m_ggufserve_is_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ggufserve", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ggufserve")


def test_tests_import_the_package_not_the_folders() -> None:
    # pytest puts the repository root on sys.path, where server/ would import as a second
    # copy of the package under another name.
    wrong = []
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            wrong += [f"{path}: {n}" for n in names if n.split(".")[0] in ROOTS]
    assert wrong == []
