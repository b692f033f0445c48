"""The quality report at quantize time (converters/quality.py) with real llama.cpp on the
real Gemma 3 270M round trip (``real_f32``): the figures order by precision, land in the
GGUF's metadata and the JSON beside it, ``--no-report`` writes none, the CLI prints the
table, and an interrupted run leaves no file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import ggufserve.converters.quality as quality
from ggufserve.converters.__main__ import main
from ggufserve.converters.errors import QuantizationError
from ggufserve.converters.gguf_meta import read_metadata
from ggufserve.converters.llama_eval import LogitsRunner, QualityError
from ggufserve.converters.progress import PlainProgress
from ggufserve.converters.quality import (
    QualityReport,
    calibration,
    format_table,
    read_quality,
    report_path,
)
from ggufserve.converters.quality_measure import compare_rows, reference_rows
from ggufserve.converters.quantize import copy_with_metadata
from tests.conftest import REPO, sigint_default

# The reference pass (F32, 703 tokens) plus three quantize + measure passes run in one
# fixture; on 2 busy cores that can pass the default 300 s per test.
pytestmark = pytest.mark.timeout(900)

QUANTS = ["Q8_0", "Q4_K_M", "Q2_K"]  # decreasing precision
FIGURE_KEYS = {"kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "n_tokens", "reference"}


def own_copy(source: Path, folder: Path) -> Path:
    """``source`` in ``folder`` (a hard link when possible): outputs land beside it."""
    copy = folder / source.name
    try:
        os.link(source, copy)
    except OSError:
        copy.symlink_to(source)
    return copy


@pytest.fixture(scope="module")
def reported(real_f32: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python -m ggufserve.converters quantize real-F32.gguf Q8_0 Q4_K_M Q2_K`` (report on)."""
    folder = tmp_path_factory.mktemp("quality")
    source = own_copy(real_f32["path"], folder)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ggufserve.converters", "quantize", str(source), *QUANTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\n{result.stdout}\n(quantize + report, 3 types: {time.monotonic() - started:.0f} s)")
    files = {quant: folder / f"real-{quant}.gguf" for quant in QUANTS}
    return {"folder": folder, "source": source, "stdout": result.stdout, "files": files}


def test_figures_order_by_precision(reported: dict[str, Any]) -> None:
    figures = {quant: read_quality(path) for quant, path in reported["files"].items()}
    for quant, found in figures.items():
        assert found is not None, quant
        assert found["reference"] == "F32"
        assert found["calibration"] == calibration().label
        assert found["n_tokens"] == 702  # 703 tokens (BOS included), each but the last scored
        assert 0 < found["kl_mean"] <= found["kl_p99"]
        assert 0 < found["top1_agreement"] <= 1
    q8, q4, q2 = (figures[q] for q in QUANTS)
    assert q8 is not None and q4 is not None and q2 is not None
    assert q8["kl_mean"] < q4["kl_mean"] < q2["kl_mean"]
    assert q8["top1_agreement"] > q4["top1_agreement"] > q2["top1_agreement"]
    assert q2["ppl_ratio"] > 1  # 2-bit weights predict the text worse than F32


def test_cli_prints_the_table(reported: dict[str, Any]) -> None:
    lines = reported["stdout"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("type"))
    assert lines[header - 1].startswith(f"quality vs F32 on {calibration().label} (702 tokens)")
    columns = ["type", "size", "MB", "KL", "mean", "KL", "p99", "top-1", "PPL", "ratio"]
    assert lines[header].split() == columns
    rows = [line.split() for line in lines[header + 1 : header + 1 + len(QUANTS)]]
    assert [row[0] for row in rows] == QUANTS
    for row, quant in zip(rows, QUANTS, strict=True):
        size_mb = reported["files"][quant].stat().st_size / 1e6
        assert float(row[1]) == pytest.approx(size_mb, abs=0.05)
        assert row[4].endswith("%")


@pytest.fixture(scope="module")
def q8_reader(reported: dict[str, Any]) -> gguf.GGUFReader:
    """gguf-py's reader on the reported Q8_0 file (~10-20 s: Gemma's 262k vocabulary)."""
    return gguf.GGUFReader(reported["files"]["Q8_0"])


def test_figures_are_in_the_gguf_metadata(
    reported: dict[str, Any], q8_reader: gguf.GGUFReader
) -> None:
    path = reported["files"]["Q8_0"]
    fields = q8_reader.fields
    stored = {
        name.removeprefix(quality.PREFIX): field.contents()
        for name, field in fields.items()
        if name.startswith(quality.PREFIX)
    }
    assert set(stored) == FIGURE_KEYS | {"calibration"}
    assert fields[f"{quality.PREFIX}kl_mean"].types == [gguf.GGUFValueType.FLOAT32]
    assert fields[f"{quality.PREFIX}n_tokens"].types == [gguf.GGUFValueType.UINT32]
    assert stored == read_quality(path)
    assert int(fields["general.file_type"].contents()) == 7  # still LLAMA_FTYPE_MOSTLY_Q8_0


def test_json_beside_each_file(reported: dict[str, Any]) -> None:
    for quant, path in reported["files"].items():
        data = json.loads(report_path(path).read_text(encoding="utf-8"))
        in_gguf = read_metadata(path, quality.PREFIX)
        assert in_gguf is not None
        for key in FIGURE_KEYS - {"reference"}:
            assert data[key] == pytest.approx(in_gguf[quality.PREFIX + key], rel=1e-6)
        assert data["reference"] == in_gguf[quality.PREFIX + "reference"]
        assert data["file"] == path.name and data["type"] == quant
        assert data["size_bytes"] == path.stat().st_size
        assert data["reference_file"] == "real-F32.gguf"
        assert set(data["versions"]) == {"ggufserve", "llama_cpp_python", "llama.cpp"}
        assert set(data["seconds"]) == {"reference", "quantize", "measure", "write"}
    leftovers = [p.name for p in reported["folder"].iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no scratch file or reference folder remains


def test_no_report_writes_none_and_the_same_tensors(
    reported: dict[str, Any], q8_reader: gguf.GGUFReader, tmp_path: Path
) -> None:
    target = tmp_path / "plain-Q8_0.gguf"
    stale = report_path(target)
    stale.write_text("{}")  # a report of an earlier file under this name must go
    assert (
        main(["quantize", str(reported["source"]), "Q8_0", "--out", str(target), "--no-report"])
        == 0
    )
    assert not stale.exists()
    assert read_metadata(target, quality.PREFIX) == {}
    assert read_quality(target) is None
    # The report's metadata copy keeps every tensor byte: the data sections are equal.
    with_report = reported["files"]["Q8_0"]
    data_bytes = with_report.stat().st_size - q8_reader.data_offset
    assert tail(with_report, data_bytes) == tail(target, data_bytes)
    assert target.stat().st_size < with_report.stat().st_size


def tail(path: Path, n_bytes: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-n_bytes, os.SEEK_END)
        return handle.read()


def test_read_quality_falls_back_to_the_json(reported: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "no-metadata-Q8_0.gguf"
    target.write_bytes(b"not a GGUF")
    data = json.loads(report_path(reported["files"]["Q8_0"]).read_text(encoding="utf-8"))
    report_path(target).write_text(json.dumps({**data, "size_bytes": target.stat().st_size}))
    found = read_quality(target)
    assert found is not None and found["kl_mean"] == data["kl_mean"]
    target.write_bytes(b"another file now")  # the JSON describes a file of another size
    assert read_quality(target) is None
    assert read_quality(tmp_path / "missing.gguf") is None


def test_interrupted_measurement_leaves_no_file(
    real_f32: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = own_copy(real_f32["path"], tmp_path)

    class Interrupted:
        seconds = 0.0

        def compare(self, model: Path, quant: str) -> Any:
            assert model.is_file()  # quantized into a scratch file, now being measured
            raise KeyboardInterrupt

    @contextmanager
    def reference_pass(*_args: Any) -> Iterator[Any]:
        yield Interrupted()

    monkeypatch.setattr(quality, "reference_pass", reference_pass)
    assert main(["quantize", str(source), "Q8_0"]) == 130
    assert [p.name for p in tmp_path.iterdir()] == [source.name]


def test_ctrl_c_during_quantization_leaves_no_file(
    real_f32: dict[str, Any], tmp_path: Path
) -> None:
    """SIGINT while llama.cpp quantizes (in its child process): the CLI kills the child,
    removes the partial file and exits 130."""
    source = own_copy(real_f32["path"], tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ggufserve.converters",
            "quantize",
            str(source),
            "Q2_K",
            "--no-report",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )
    assert process.stderr is not None
    for line in process.stderr:  # plain progress lines (stderr is not a terminal)
        if line.startswith("quantize Q2_K: 25%"):
            break
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 130, rest
    assert "interrupted; no partial file left" in rest and "Traceback" not in rest
    time.sleep(1)  # a surviving child would still be writing
    assert [p.name for p in tmp_path.iterdir()] == [source.name]


# --- no model needed ---------------------------------------------------------------------


def test_compare_rows_matches_float64() -> None:
    """The float32 streaming KL and NLL equal a direct float64 computation (Gemma 3's
    vocabulary size, peaked and flat rows)."""
    rng = np.random.default_rng(0)
    vocab = 262_144
    ref = (rng.standard_normal((8, vocab)) * 4).astype(np.float32)
    ref[:4, 17] += 30  # confident rows
    got = (ref + rng.standard_normal(ref.shape) * 0.2).astype(np.float32)
    next_ids = rng.integers(0, vocab, 8)
    p, neg_entropy, ref_nll = reference_rows(ref, next_ids)
    kl, nll = compare_rows(p, neg_entropy, got, next_ids)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    rows = np.arange(8)
    np.testing.assert_allclose(kl, (np.exp(lp) * (lp - lq)).sum(-1), atol=1e-6)
    np.testing.assert_allclose(nll, -lq[rows, next_ids], atol=1e-5)
    np.testing.assert_allclose(ref_nll, -lp[rows, next_ids], atol=1e-9)
    same, _ = compare_rows(p, neg_entropy, ref, next_ids)
    np.testing.assert_allclose(same, 0, atol=1e-6)  # KL(p ‖ p) = 0


def test_table_layout() -> None:
    report = QualityReport("Q4_K_M", 0.0412, 0.31, 0.9123, 1.034, 702, "BF16", "udhr6-code@ab")
    report.size_bytes = 253_000_000
    table = format_table([report]).splitlines()
    assert table[0] == "quality vs BF16 on udhr6-code@ab (702 tokens):"
    assert table[2].split() == ["Q4_K_M", "253.0", "0.04120", "0.3100", "91.2%", "1.0340"]
    assert format_table([]) == ""


def test_calibration_text_is_bundled_with_its_source() -> None:
    text = calibration()
    assert text.label == f"udhr6-code@{text.sha256[:12]}"
    for marker in ("Article 1", "Artículo 1", "Статья 1", "المادة 1", "第一条", "अनुच्छेद १", "def "):
        assert marker in text.text
    source_note = Path(quality.__file__).with_name("calibration") / "SOURCE.md"
    assert text.sha256 in source_note.read_text(encoding="utf-8")  # the note names this text


def test_plain_progress_prints_quarters(capsys: pytest.CaptureFixture[str]) -> None:
    bar = PlainProgress(236, "quantize Q4_K_M", "tensors", sys.stderr)
    for _ in range(236):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "quantize Q4_K_M: 25% (59/236 tensors)",
        "quantize Q4_K_M: 50% (118/236 tensors)",
        "quantize Q4_K_M: 75% (177/236 tensors)",
        "quantize Q4_K_M: 100% (236/236 tensors)",
    ]


def test_a_model_llama_cpp_cannot_load_is_a_quality_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken-Q4_K_M.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(QualityError, match=r"llama\.cpp could not load broken-Q4_K_M\.gguf"):
        LogitsRunner(broken).__enter__()


def test_metadata_that_llama_cpp_cannot_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="longer than 127"):
        copy_with_metadata(tmp_path / "a.gguf", tmp_path / "b.gguf", {"k": "x" * 200})
    with pytest.raises(QuantizationError, match="UINT32"):
        copy_with_metadata(tmp_path / "a.gguf", tmp_path / "b.gguf", {"k": -1})
    assert list(tmp_path.iterdir()) == []
