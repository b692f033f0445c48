"""Sizes, durations, the GGUF header reader, the memory estimate and eviction plans."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from pydantic import ValidationError

from ggufserve.api.wire import FOREVER, ChatCompletionRequest, keep_alive_seconds
from ggufserve.converters.gguf_meta import read_metadata
from ggufserve.models.memory import (
    MiB,
    Resident,
    estimate_bytes,
    file_bytes,
    kv_bytes_per_token,
    parse_budget,
    parse_bytes,
    plan_eviction,
)
from ggufserve.settings import ModelsFileError, ServerSettings, parse_models_file


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("4GiB", 4 * 1024**3),
        ("512MiB", 512 * MiB),
        ("512 mib", 512 * MiB),
        ("8GB", 8 * 1000**3),
        ("8G", 8 * 1024**3),
        ("1.5GiB", 3 * 512 * MiB),
        ("64k", 64 * 1024),
        ("2TB", 2 * 1000**4),
    ],
)
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "4 GiBs", "-1GiB", "0", 0, -5, True, 1.5, "1e9", None])
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_budget_none_forms() -> None:
    assert parse_budget(None) is None and parse_budget("") is None
    assert parse_budget("None") is None and parse_budget("2GiB") == 2 * 1024**3


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        (-1, FOREVER),
        (-300, FOREVER),
        ("300", 300.0),
        ("-1", FOREVER),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("-1m", FOREVER),
        (" 5m ", 300.0),
    ],
)
def test_keep_alive_seconds(value: object, seconds: float) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize(
    "bad", ["", "5 minutes", "5d", "m", "5m5", "nan", "inf", float("nan"), float("inf"), True, [5]]
)
def test_keep_alive_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        keep_alive_seconds(bad)


def test_keep_alive_in_requests_settings_and_models_file() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate(base).keep_alive is None
    assert ChatCompletionRequest.model_validate({**base, "keep_alive": "1m"}).keep_alive == 60
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**base, "keep_alive": "soon"})
    assert ServerSettings().keep_alive == 300
    settings = ServerSettings(keep_alive="-1", max_memory="1GiB", load_timeout_s=3)
    assert settings.keep_alive == FOREVER and settings.max_memory == 1024**3
    with pytest.raises(ValidationError):
        ServerSettings(max_memory="lots")
    raw = {"models": [{"id": "m", "gguf": {"path": "m.gguf"}, "keep_alive": "10s"}]}
    assert parse_models_file(raw, "models.yaml").models[0].keep_alive == 10
    raw["models"][0]["keep_alive"] = "later"  # type: ignore[index]
    with pytest.raises(ModelsFileError, match="entry 'm': key 'keep_alive'"):
        parse_models_file(raw, "models.yaml")


def write_gguf(path: Path, arch: str = "llama", **kv: int | list[int]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_token_list([f"t{i}".encode() for i in range(1000)])  # a string array to skip
    writer.add_tensor("x", np.zeros(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_reader_skips_arrays(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", block_count=4, **{"attention.head_count_kv": [2, 4]})
    meta = read_metadata(path, arrays=lambda key: key.endswith("head_count_kv"))
    assert meta is not None
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 4
    assert meta["llama.attention.head_count_kv"] == [2, 4]
    assert "tokenizer.ggml.tokens" not in meta  # a string array: skipped


def test_header_reader_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\x00" * 64)
    assert read_metadata(tmp_path / "bad.gguf") is None
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    assert read_metadata(tmp_path / "short.gguf") is None
    assert read_metadata(tmp_path / "missing.gguf") is None


def test_kv_bytes_from_metadata(tmp_path: Path) -> None:
    # 4 layers × 2 KV heads × (64 + 32) × 2 bytes
    explicit = write_gguf(
        tmp_path / "a.gguf",
        block_count=4,
        embedding_length=512,
        **{"attention.head_count": 8, "attention.head_count_kv": 2},
        **{"attention.key_length": 64, "attention.value_length": 32},
    )
    assert kv_bytes_per_token(explicit) == 4 * 2 * 96 * 2
    # no key/value length: n_embd / n_head = 64 each; no head_count_kv: head_count
    derived = write_gguf(
        tmp_path / "b.gguf", block_count=2, embedding_length=512, **{"attention.head_count": 8}
    )
    assert kv_bytes_per_token(derived) == 2 * 8 * 128 * 2
    # per-layer KV heads (an array)
    per_layer = write_gguf(
        tmp_path / "c.gguf",
        block_count=3,
        embedding_length=256,
        **{"attention.head_count": 4, "attention.head_count_kv": [1, 2, 0]},
    )
    assert kv_bytes_per_token(per_layer) == 3 * 128 * 2


def test_estimate_of_the_bundled_model(bundled_gguf: Path) -> None:
    # Gemma 3 270M: 18 layers × 1 KV head × (256 + 256) × 2 bytes per token.
    assert kv_bytes_per_token(bundled_gguf) == 18 * 512 * 2
    size = bundled_gguf.stat().st_size
    assert estimate_bytes(bundled_gguf, None, n_ctx=1024) == size + 1024 * 18432
    with_embeddings = estimate_bytes(bundled_gguf, bundled_gguf, n_ctx=1024, embeddings=True)
    assert with_embeddings == 2 * size + 2 * 1024 * 18432


@pytest.mark.parametrize(("kind", "ratio"), [("q8_0", 34 / 32 / 2), ("q4_0", 18 / 32 / 2)])
def test_quantized_kv_cache_shrinks_the_estimate(
    bundled_gguf: Path, kind: str, ratio: float
) -> None:
    # ggml's sizes per element, from gguf-py's table (not the code under test's arithmetic).
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
    assert size / block / 2 == ratio
    f16 = kv_bytes_per_token(bundled_gguf)
    assert kv_bytes_per_token(bundled_gguf, kind, kind) == f16 * ratio  # type: ignore[arg-type]
    # keys and values each take half of an f16 cache's bytes (k = v = 256 on Gemma 3)
    assert kv_bytes_per_token(bundled_gguf, kind, "f16") == f16 * (ratio + 1) / 2  # type: ignore[arg-type]
    files = bundled_gguf.stat().st_size
    quantized = estimate_bytes(bundled_gguf, None, n_ctx=8192, type_k=kind, type_v=kind)  # type: ignore[arg-type]
    assert quantized - files == 8192 * f16 * ratio
    # the embedding context keeps an f16 cache (flash attention off there)
    both = estimate_bytes(
        bundled_gguf,
        None,
        n_ctx=8192,
        type_k=kind,
        type_v=kind,
        embeddings=True,  # type: ignore[arg-type]
    )
    assert both - quantized == 8192 * f16


def test_unreadable_header_estimates_files_only(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    assert estimate_bytes(corrupt, None, n_ctx=4096) == 68


def test_split_gguf_counts_every_part(tmp_path: Path) -> None:
    for index, size in ((1, 10), (2, 20), (3, 30)):
        (tmp_path / f"m-{index:05d}-of-00003.gguf").write_bytes(b"x" * size)
    assert file_bytes(tmp_path / "m-00001-of-00003.gguf") == 60


def test_eviction_plan_is_lru_first_and_only_as_needed() -> None:
    loaded = [
        Resident("old", 100, busy=False, last_used=1.0),
        Resident("busy", 100, busy=True, last_used=0.5),
        Resident("new", 100, busy=False, last_used=3.0),
        Resident("mid", 100, busy=False, last_used=2.0),
    ]
    assert plan_eviction(100, 500, loaded) == []
    assert plan_eviction(150, 500, loaded) == ["old"]
    assert plan_eviction(250, 500, loaded) == ["old", "mid"]
    assert plan_eviction(400, 500, loaded) == ["old", "mid", "new"]
    assert plan_eviction(450, 500, loaded) is None  # the busy one holds 100: no eviction
    with pytest.raises(ValueError):
        plan_eviction(501, 500, [])
