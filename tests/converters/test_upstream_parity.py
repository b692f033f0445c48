"""Our GGUFs equal llama.cpp's own converter's: convert_hf_to_gguf.py from the llama-cpp-python
sdist we build (its vendored llama.cpp and gguf-py) runs on the same checkpoint folder, and
every KV pair (key, type, value) and every tensor (name, type, shape, bytes) must match, for
the text GGUF and the mmproj.

The checkpoints are the tiny test ones, turned into the layouts real checkpoints have:
Hub tensor names, sparse Hub configs (defaults left to transformers), float16 / bfloat16
weights, model cards and sampling defaults, added tokens past ``vocab_size``, Qwen's
special-looking tokens not marked special. Skipped when the sdist is not in the wheel cache
(``make install`` puts it there).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from ggufserve.converters.convert import ConversionResult, convert
from ggufserve.native import wheels
from ggufserve.native.plan import LLAMA_CPP_PYTHON_VERSION

UPSTREAM_TIMEOUT_S = 600
UPSTREAM_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
MODEL_CARD = """---
license: apache-2.0
base_model: example-org/tiny-base
tags:
- tiny
- test
language:
- en
---
# A tiny test model
"""


# --- the reference converter -------------------------------------------------------------


@pytest.fixture(scope="session")
def upstream_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """convert_hf_to_gguf.py with its conversion/ package and gguf-py, from the sdist."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tarball = wheels.cache_root() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"no llama-cpp-python sdist at {tarball} (make install downloads it)")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    target = tmp_path_factory.mktemp("upstream")
    with tarfile.open(tarball) as archive:
        members = [
            m
            for m in archive.getmembers()
            if m.name.removeprefix(prefix).startswith(UPSTREAM_FILES)
        ]
        archive.extractall(target, members=members, filter="data")
    script = target / prefix / "convert_hf_to_gguf.py"
    assert script.is_file(), f"{tarball} has no {prefix}convert_hf_to_gguf.py"
    return script


def run_upstream(script: Path, ckpt: Path, out: Path, outtype: str, *, mmproj: bool) -> Path:
    command = [sys.executable, str(script), str(ckpt), "--outfile", str(out), "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
    done = subprocess.run(
        [*command, *(["--mmproj"] if mmproj else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=UPSTREAM_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


# --- checkpoints in real-world layouts ---------------------------------------------------


def derive(
    source: Path,
    target: Path,
    *,
    tensors: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    files: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint folder made from ``source``: the same files (linked) except the
    rewritten weights (``tensors`` maps the torch state dict) and ``files`` (name → JSON
    object, or text)."""
    target.mkdir(parents=True)
    files = files or {}
    for path in source.iterdir():
        if path.name.startswith(".") or path.name in files:
            continue
        if path.name == "model.safetensors" and tensors is not None:
            from safetensors.torch import load_file, save_file

            save_file(tensors(load_file(path)), target / path.name, metadata={"format": "pt"})
        else:
            os.symlink(path, target / path.name)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (target / name).write_text(text, encoding="utf-8")
    return target


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def gemma_text_1b_style(source: Path, target: Path) -> Path:
    """Gemma 3 1B / 270M files: <image_soft_token> listed at id 262144 = vocab_size, both in
    tokenizer_config.json and added_tokens.json (no embedding row: left out)."""
    tokenizer_config = read_json(source / "tokenizer_config.json")
    image_token = {"content": "<image_soft_token>", "special": True, "normalized": False}
    tokenizer_config["added_tokens_decoder"]["262144"] = image_token
    added = {"<image_soft_token>": 262144}
    return derive(
        source,
        target,
        files={"tokenizer_config.json": tokenizer_config, "added_tokens.json": added},
    )


def gemma_multimodal_hub(source: Path, target: Path) -> Path:
    """google/gemma-3-4b-it's layout: ``vision_tower.vision_model.*`` names, float16 here,
    a sparse config (transformers' defaults for the rest) with linear rope scaling,
    ``image_seq_length`` in the preprocessor config, a model card and sampling defaults."""
    import torch

    def hub_names(state: dict[str, Any]) -> dict[str, Any]:
        renamed = {}
        for name, tensor in state.items():
            if name.startswith("vision_tower.") and not name.startswith(
                "vision_tower.vision_model."
            ):
                name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
            renamed[name] = tensor.to(torch.float16)
        return renamed

    config = read_json(source / "config.json")
    text, vision = config["text_config"], config["vision_config"]
    sparse_text = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    sparse_text |= {k: text[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")}
    sparse_text |= {
        "model_type": "gemma3_text",
        "query_pre_attn_scalar": text["query_pre_attn_scalar"],
        "max_position_embeddings": text["max_position_embeddings"],
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": text["sliding_window"],
    }
    keep = ("hidden_size", "image_size", "intermediate_size", "model_type", "num_attention_heads")
    sparse_vision = {k: vision[k] for k in (*keep, "num_hidden_layers", "patch_size")}
    hub_config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "mm_tokens_per_image": config["mm_tokens_per_image"],
        "model_type": "gemma3",
        "text_config": sparse_text,
        "torch_dtype": "float16",
        "vision_config": sparse_vision | {"vision_use_head": False},
    }
    # Hub preprocessor configs carry image_seq_length (= mm_tokens_per_image), from which
    # llama.cpp's converter derives the pooling; without it, it assumes 256 tokens.
    preprocessor = read_json(source / "preprocessor_config.json")
    preprocessor["image_seq_length"] = config["mm_tokens_per_image"]
    generation = {"bos_token_id": 2, "eos_token_id": [1, 106], "top_k": 64, "top_p": 0.95}
    return derive(
        source,
        target,
        tensors=hub_names,
        files={
            "config.json": hub_config,
            "preprocessor_config.json": preprocessor,
            "generation_config.json": generation,
            "README.md": MODEL_CARD,
        },
    )


QWEN_NOT_SPECIAL = {
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
}


def qwen_moe_hub(source: Path, target: Path) -> Path:
    """Qwen/Qwen3-VL-30B-A3B-Instruct's layout: bfloat16, ``rope_scaling`` + ``rope_theta``,
    the FIM tokens not marked special (they look special), sampling defaults with
    ``repetition_penalty``, a model card."""
    import torch

    config = read_json(source / "config.json")
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    config["torch_dtype"] = "bfloat16"
    tokenizer = read_json(source / "tokenizer.json")
    for token in tokenizer["added_tokens"]:
        if token["content"] in QWEN_NOT_SPECIAL:
            token["special"] = False
    tokenizer_config = read_json(source / "tokenizer_config.json")
    for token in (tokenizer_config.get("added_tokens_decoder") or {}).values():
        if token["content"] in QWEN_NOT_SPECIAL:
            token["special"] = False
    generation = {
        "bos_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "do_sample": True,
        "top_k": 20,
        "top_p": 0.8,
        "temperature": 0.7,
        "repetition_penalty": 1.0,
    }
    return derive(
        source,
        target,
        tensors=lambda state: {k: v.to(torch.bfloat16) for k, v in state.items()},
        files={
            "config.json": config,
            "tokenizer.json": tokenizer,
            "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation,
            "README.md": MODEL_CARD,
        },
    )


# case → (text --outtype, mmproj type); every type path once: q8_0, f16, f32, bf16.
CASES: dict[str, tuple[str, str]] = {
    "gemma3-text": ("q8_0", "f16"),
    "gemma3-mm-hub": ("f16", "f16"),
    "qwen3vl-dense": ("f32", "f32"),
    "qwen3vl-moe-hub": ("bf16", "f16"),
}
OUTPUTS = [
    ("gemma3-text", "text"),
    ("gemma3-mm-hub", "text"),
    ("gemma3-mm-hub", "mmproj"),
    ("qwen3vl-dense", "text"),
    ("qwen3vl-dense", "mmproj"),
    ("qwen3vl-moe-hub", "text"),
    ("qwen3vl-moe-hub", "mmproj"),
]


@pytest.fixture(scope="session")
def parity_checkpoints(
    tmp_path_factory: pytest.TempPathFactory,
    gemma3_text_ckpt: Path,
    gemma3_mm_ckpt: Path,
    qwen_ckpt: dict[str, Path],
) -> Callable[[str], Path]:
    """Case name → its checkpoint folder, built on first use."""
    root = tmp_path_factory.mktemp("parity-ckpt")
    builders: dict[str, Callable[[], Path]] = {
        "gemma3-text": lambda: gemma_text_1b_style(gemma3_text_ckpt, root / "gemma3-text"),
        "gemma3-mm-hub": lambda: gemma_multimodal_hub(gemma3_mm_ckpt, root / "gemma3-mm-hub"),
        "qwen3vl-dense": lambda: derive(qwen_ckpt["dense"], root / "qwen3vl-dense"),
        "qwen3vl-moe-hub": lambda: qwen_moe_hub(qwen_ckpt["moe"], root / "qwen3vl-moe-hub"),
    }
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = builders[case]()
        return built[case]

    return get


@pytest.fixture(scope="session")
def our_conversions(parity_checkpoints: Callable[[str], Path]) -> Callable[[str], ConversionResult]:
    """Case name → our conversion of its checkpoint (text + mmproj), made on first use."""
    done: dict[str, ConversionResult] = {}

    def get(case: str) -> ConversionResult:
        if case not in done:
            ckpt = parity_checkpoints(case)
            outtype, mmproj_type = CASES[case]
            out = ckpt.parent / f"{case}-ours"
            done[case] = convert(str(ckpt), out_dir=out, outtype=outtype, mmproj_type=mmproj_type)
        return done[case]

    return get


# --- comparing two GGUF files ------------------------------------------------------------


SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9


def _value(data: bytes, pos: int, vtype: int, decode: bool) -> tuple[Any, int]:
    """(the value, or None unless ``decode``; the offset past it) of a GGUF value."""
    if vtype == STRING:
        (length,) = struct.unpack_from("<Q", data, pos)
        text = data[pos + 8 : pos + 8 + length].decode("utf-8", "replace") if decode else None
        return text, pos + 8 + length
    if vtype != ARRAY:
        code = SCALARS[vtype]
        value = struct.unpack_from("<" + code, data, pos)[0] if decode else None
        return value, pos + struct.calcsize(code)
    item, count = struct.unpack_from("<IQ", data, pos)
    pos += 12
    if item != STRING:
        code = SCALARS[item]
        end = pos + count * struct.calcsize(code)
        return (list(struct.unpack_from(f"<{count}{code}", data, pos)) if decode else None), end
    values = []
    for _ in range(count):
        text, pos = _value(data, pos, STRING, decode)
        values.append(text)
    return (values if decode else None), pos


class GGUFSummary:
    """Every KV pair (key → digest of its type and value bytes) and tensor (name → type,
    ne, digest of its bytes) of a GGUF, read straight from the file (gguf-py's reader takes
    minutes on 300k-entry arrays)."""

    def __init__(self, path: Path):
        self.data = data = path.read_bytes()
        assert data[:4] == b"GGUF", path
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        pos, alignment = 24, 32
        self.kv: dict[str, str] = {}
        self.spans: dict[str, int] = {}
        for _ in range(n_kv):
            key, pos = _value(data, pos, STRING, decode=True)
            _, end = _value(data, pos + 4, struct.unpack_from("<I", data, pos)[0], decode=False)
            self.kv[key] = hashlib.sha256(data[pos:end]).hexdigest()[:16]
            self.spans[key] = pos
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", data, pos + 4)[0]
            pos = end
        infos = []
        for _ in range(n_tensors):
            name, pos = _value(data, pos, STRING, decode=True)
            (n_dims,) = struct.unpack_from("<I", data, pos)
            ne = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, ne, gguf.GGMLQuantizationType(ttype), offset))
        base = -(-pos // alignment) * alignment
        self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for name, ne, ttype, offset in infos:
            block, type_bytes = gguf.GGML_QUANT_SIZES[ttype]
            nbytes = math.prod(ne) // block * type_bytes
            chunk = data[base + offset : base + offset + nbytes]
            assert len(chunk) == nbytes, f"{path}: {name} is cut short"
            self.tensors[name] = (ttype.name, tuple(ne), hashlib.sha256(chunk).hexdigest()[:16])

    def value(self, key: str) -> tuple[int, Any]:
        """(GGUF type, value) of a KV pair."""
        pos = self.spans[key]
        (vtype,) = struct.unpack_from("<I", self.data, pos)
        return vtype, _value(self.data, pos + 4, vtype, decode=True)[0]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _kv_difference(ours: GGUFSummary, upstream: GGUFSummary, key: str) -> str:
    (type_a, a), (type_b, b) = ours.value(key), upstream.value(key)
    if isinstance(a, list) and isinstance(b, list) and type_a == type_b:
        first = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        at = (
            f"[{first}] ours {_shown(a[first : first + 3])} upstream {_shown(b[first : first + 3])}"
        )
        return f"KV {key}: {len(a)} vs {len(b)} items, first difference {at}"
    return f"KV {key}: ours {_shown(a)} (type {type_a}) != upstream {_shown(b)} (type {type_b})"


def gguf_differences(ours_path: Path, upstream_path: Path) -> list[str]:
    """Every KV pair and tensor that is not identical in both files."""
    ours, upstream = GGUFSummary(ours_path), GGUFSummary(upstream_path)
    out = []
    for key in sorted(ours.kv.keys() | upstream.kv.keys()):
        if key not in upstream.kv:
            out.append(f"KV only ours: {key} = {_shown(ours.value(key)[1])}")
        elif key not in ours.kv:
            out.append(f"KV only upstream: {key} = {_shown(upstream.value(key)[1])}")
        elif ours.kv[key] != upstream.kv[key]:
            out.append(_kv_difference(ours, upstream, key))
    for name in sorted(ours.tensors.keys() | upstream.tensors.keys()):
        mine, theirs = ours.tensors.get(name), upstream.tensors.get(name)
        if mine != theirs:
            out.append(f"tensor {name}: ours {mine} != upstream {theirs}")
    return out


# --- the test ----------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "output"), OUTPUTS, ids=[f"{c}-{o}" for c, o in OUTPUTS])
def test_identical_to_llama_cpp_converter(
    upstream_script: Path,
    parity_checkpoints: Callable[[str], Path],
    our_conversions: Callable[[str], ConversionResult],
    tmp_path: Path,
    case: str,
    output: str,
) -> None:
    outtype, mmproj_type = CASES[case]
    ckpt = parity_checkpoints(case)
    ours = our_conversions(case)
    mine = ours.mmproj if output == "mmproj" else ours.text
    assert mine is not None
    upstream = run_upstream(
        upstream_script,
        ckpt,
        tmp_path / f"upstream-{output}.gguf",
        mmproj_type if output == "mmproj" else outtype,
        mmproj=output == "mmproj",
    )
    differences = gguf_differences(mine, upstream)
    assert differences == [], "\n".join(differences)
