#!/usr/bin/env bash
# `make image`: builds the CPU image with docker where a daemon answers, else with podman
# (podman, runc and mmdebstrap installed with apt-get when missing; sudo unless root).
# Where the Dockerfile's base (python:3.11-slim) cannot be pulled, the same base is built
# locally (Debian bookworm minbase with its Python 3.11) and the build says so.
# Writes build/image/engine.env (ENGINE, CONTAINERS_CONF) for tests/docker and scripts.
#   IMAGE=ggufserve:cpu DOCKERFILE=docker/Dockerfile.cpu BASE=python:3.11-slim
#   LLAMA_CPP_PYTHON_VERSION=0.3.36
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-ggufserve:cpu}
DOCKERFILE=${DOCKERFILE:-docker/Dockerfile.cpu}
BASE=${BASE:-docker.io/library/python:3.11-slim}
LOCAL_BASE=localhost/ggufserve-base:bookworm
STATE=build/image
mkdir -p "$STATE"

say() { echo "build-image: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

apt_install() {
  command -v apt-get >/dev/null || { say "no apt-get: install $* yourself"; return 1; }
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y "$@" >/dev/null ||
    { as_root apt-get update >/dev/null &&
      DEBIAN_FRONTEND=noninteractive as_root apt-get install -y "$@" >/dev/null; }
}

engine() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
  if ! command -v podman >/dev/null; then
    say "no Docker daemon answers; using podman"
    apt_install podman runc >&2 || return 1
  fi
  echo podman
}

ENGINE=$(engine) || { say "no container engine: neither a Docker daemon nor podman"; exit 1; }

# The base: pulled when a registry answers, else built from Debian's packages.
base_image() {
  if $ENGINE image inspect "$BASE" >/dev/null 2>&1 || $ENGINE pull -q "$BASE" >/dev/null 2>&1; then
    echo "$BASE"; return
  fi
  say "cannot pull $BASE (no registry reachable): building the same base locally," \
      "Debian bookworm minbase + python3.11 + python3-venv, as $LOCAL_BASE"
  if ! $ENGINE image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || apt_install mmdebstrap >&2
    local tar="$STATE/base.tar"
    as_root mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$tar" >&2
    $ENGINE import --change 'CMD ["python3"]' "$tar" "$LOCAL_BASE" >/dev/null
    rm -f "$tar"
  fi
  echo "$LOCAL_BASE"
}

# podman's defaults fail on sandboxed hosts (no RLIMIT raise, hybrid cgroups): then the
# settings of docker/podman-sandbox.conf are used for every podman command of the project.
conf=${CONTAINERS_CONF:-}
probe_podman() {
  local image=$1
  if ! podman run --rm --network=none "$image" true >/dev/null 2>&1; then
    conf=$PWD/docker/podman-sandbox.conf
    say "podman's defaults cannot run a container here: using $conf"
    CONTAINERS_CONF=$conf podman run --rm --network=none "$image" true
    export CONTAINERS_CONF=$conf
  fi
}

base=$(base_image)
args=(--build-arg "BASE=$base" -f "$DOCKERFILE" -t "$IMAGE")
[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ] &&
  args+=(--build-arg "LLAMA_CPP_PYTHON_VERSION=$LLAMA_CPP_PYTHON_VERSION")
if [ "$ENGINE" = podman ]; then
  probe_podman "$base"
  # The package registries (apt, pip) inside RUN: the host's network, and the host's CA
  # bundle with a pip configuration naming it, both mounted for the build only.
  args+=(--pull=never --format docker --network=host)
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$STATE/pip.conf"
    args+=(-v /etc/ssl/certs:/etc/ssl/certs:ro -v "$PWD/$STATE/pip.conf:/etc/pip.conf:ro")
  fi
else
  args+=(--network=host)
fi
printf 'ENGINE=%s\nCONTAINERS_CONF=%s\n' "$ENGINE" "$conf" > "$STATE/engine.env"

say "$ENGINE build ${args[*]} ."
start=$(date +%s)
$ENGINE build "${args[@]}" .
size=$($ENGINE image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE with $ENGINE in $(($(date +%s) - start)) s;" \
    "size $((size / 1000000)) MB (base: $base)"
