"""The build phase of ``tests/gpu/run_gpu_checks.sh``: llama-cpp-python from the kit's trimmed
sdist with the project's build plan (``ggufserve.native.wheels.machine_plan``: flags, AMX
decision, cache key) and its install record, plus llama-bench and llama-server from the
same CMake configure (``llama_tools.cmake``).

Unlike ``make install`` (``wheels.build_wheel``, which hands pip the tarball), the sdist is
unpacked once into ``<work>/src`` and built there with a fixed CMake build folder, so a
build stopped by a command's time limit continues where it stopped on the next run.

``--configure-only`` (the CPU dry run) runs CMake's configure step alone (seconds) and
checks that the tool targets exist: nothing is compiled and nothing is installed.
Writes ``<work>/results/build.json``.

``python -m tests.gpu.build --work DIR --sdist TARBALL --backend cuda|cpu [--configure-only]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ggufserve.native import wheels

HERE = Path(__file__).resolve().parent
HOOK = HERE / "llama_tools.cmake"
# -DCMAKE_CUDA_ARCHITECTURES=90: the H100/H200 only (issue 23), not ggml's list of five.
BACKEND_ARGS = {"cuda": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90", "cpu": ""}
TOOLS = {
    "llama-server": Path("vendor/llama.cpp/tools/server/llama-server"),
    "llama-bench": Path("vendor/llama.cpp/tools/llama-bench/llama-bench"),
}


def cublas_args() -> list[str]:
    """Where the CUDA toolkit beside ``nvcc`` has no cuBLAS but a pip ``nvidia`` package
    does (torch's), point CMake at that one; else nothing."""
    nvcc = shutil.which("nvcc")
    toolkit = Path(nvcc).resolve().parent.parent if nvcc else Path("/usr/local/cuda")
    if list(toolkit.glob("**/include/cublas_v2.h")):
        return []
    import site

    for root in map(Path, site.getsitepackages()):
        for header in sorted(root.glob("nvidia/*/include/cublas_v2.h")):
            libs = sorted(header.parent.parent.glob("lib/libcublas.so*"))
            if libs:
                return [f"-DCMAKE_CUDA_FLAGS=-I{header.parent}", f"-DCUDA_cublas_LIBRARY={libs[0]}"]
    return []


def unpack(sdist: Path, work: Path) -> Path:
    """The sdist's folder under ``<work>/src`` (unpacked once)."""
    target = work / "src"
    folder = target / sdist.name.removesuffix(".tar.gz")
    if not (folder / "pyproject.toml").is_file():
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(target, filter="data")
    return folder


def build(source: Path, work: Path, plan: wheels.BuildPlan) -> dict[str, object]:
    """Build and install the wheel (recording ``plan`` in the venv); the tools' paths."""
    build_dir = work / "cmake-build"
    env = {
        **os.environ,
        "CMAKE_ARGS": plan.cmake_args,
        "FORCE_CMAKE": "1",
        "SKBUILD_BUILD_DIR": str(build_dir),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
    }
    out = work / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--no-index", "-w", str(out), str(source)],
        env=env, check=True,
    )  # fmt: skip
    wheel = next(out.glob("llama_cpp_python-*.whl"))
    wheels.install(plan, wheel, sys.executable, Path(sys.prefix))
    return {"wheel": str(wheel), **{k: str(build_dir / v) for k, v in TOOLS.items()}}


def configure_only(source: Path, work: Path, plan: wheels.BuildPlan) -> dict[str, object]:
    """CMake's configure step alone, as the wheel build runs it; the tool targets found."""
    build_dir = work / "cmake-configure"
    shutil.rmtree(build_dir, ignore_errors=True)
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja",
         "-DCMAKE_BUILD_TYPE=Release", "-Wno-dev", *shlex.split(plan.cmake_args)],
        check=True,
    )  # fmt: skip
    targets = subprocess.run(
        ["ninja", "-C", str(build_dir), "-t", "targets", "all"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = {k: f"{v}:" in targets for k, v in TOOLS.items()}
    if not all(found.values()):
        raise SystemExit(f"tool targets missing from the configure: {found}")
    return {"configured": str(build_dir), "targets_found": found, "compiled": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sdist", type=Path, required=True)
    parser.add_argument("--backend", choices=sorted(BACKEND_ARGS), required=True)
    parser.add_argument("--configure-only", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    source = unpack(args.sdist, args.work)
    extra = cublas_args() if args.backend == "cuda" else []
    cmake_args = " ".join([BACKEND_ARGS[args.backend], f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={HOOK}"])
    os.environ["CMAKE_ARGS"] = shlex.join([*shlex.split(cmake_args), *extra])
    plan = wheels.machine_plan(args.backend, "auto")
    print(f"build plan: key {plan.key}, CMAKE_ARGS '{plan.cmake_args}', AMX {plan.amx}", flush=True)
    result = (configure_only if args.configure_only else build)(source, args.work, plan)
    record = {
        "plan": json.loads(plan.to_json()),
        "cublas_fallback": extra,
        "seconds": round(time.monotonic() - started, 1),
        **result,
    }
    results = args.work / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "build.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
