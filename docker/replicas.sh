#!/usr/bin/env bash
# docker/compose.replicas.yaml with plain podman: one pod (shared loopback) holding two
# replicas pinned to cores 0 and 1 (one thread each) and HAProxy on 127.0.0.1:$PORT; the
# replicas share the model store, the volume $POD-store (kept by `down`).
#   docker/replicas.sh up|down      PORT=8080 IMAGE=ggufserve:cpu LB_IMAGE=ggufserve-lb
# Build the images first: make image; IMAGE=ggufserve-lb DOCKERFILE=docker/Dockerfile.haproxy
# BASE=docker.io/library/debian:bookworm-slim docker/build-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
IMAGE=${IMAGE:-ggufserve:cpu}
LB_IMAGE=${LB_IMAGE:-ggufserve-lb}
POD=${POD:-ggufserve-replicas}
# The podman settings docker/build-image.sh found this host needs (if any).
if [ -z "${CONTAINERS_CONF:-}" ] && [ -f build/image/engine.env ]; then
  . build/image/engine.env
  [ -n "$CONTAINERS_CONF" ] && export CONTAINERS_CONF || unset CONTAINERS_CONF
fi

case ${1:-} in
  up)
    podman pod create --name "$POD" -p "127.0.0.1:$PORT:8080" >/dev/null
    for i in 1 2; do
      podman run -d --pod "$POD" --name "$POD-r$i" --cpuset-cpus "$((i - 1))" \
        -e GGUFSERVE_PORT="808$i" -e GGUFSERVE_HOST=127.0.0.1 \
        -v "$PWD/docker/replica-models.yaml:/etc/ggufserve/models.yaml:ro" -v "$POD-store:/data" \
        "$IMAGE" ggufserve serve --models /etc/ggufserve/models.yaml >/dev/null
    done
    podman run -d --pod "$POD" --name "$POD-lb" \
      -e REPLICA1=127.0.0.1:8081 -e REPLICA2=127.0.0.1:8082 "$LB_IMAGE" >/dev/null
    echo "replicas: http://127.0.0.1:$PORT (pod $POD)"
    ;;
  down)
    podman pod stop -t 40 "$POD" >/dev/null 2>&1 || true
    podman pod rm -f "$POD" >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
