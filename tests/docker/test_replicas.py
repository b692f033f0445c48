"""Two replicas (one core, one thread each) behind HAProxy in a podman pod
(``docker/replicas.sh``): affinity on ``X-Session-Id`` holds, and killing one replica
under load loses no request that had not started (HAProxy retries on the other; its
/health checks drop the dead one).
Runs only with ``GGUFSERVE_IMAGE_TESTS=1`` (``make image-test``) and podman."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port, wait_for_status
from tests.docker.conftest import REPO, Engine

pytestmark = [pytest.mark.docker]
POD = "ggufserve-replicas-test"


@pytest.fixture(scope="module")
def balancer(engine: Engine) -> Iterator[str]:
    """Base URL of HAProxy in front of replicas r1 (core 0) and r2 (core 1)."""
    if engine.name != "podman":
        pytest.skip("the replica set-up script uses podman pods; with docker use compose")
    env = {**os.environ, **engine.env}
    subprocess.run(
        ["docker/build-image.sh"], cwd=REPO, check=True, timeout=900,
        env={**env, "IMAGE": "ggufserve-lb", "DOCKERFILE": "docker/Dockerfile.haproxy",
             "BASE": "docker.io/library/debian:bookworm-slim"},
    )  # fmt: skip
    port = free_port()
    script = {**env, "POD": POD, "PORT": str(port)}
    subprocess.run(["docker/replicas.sh", "down"], cwd=REPO, env=script, check=True)
    try:
        subprocess.run(["docker/replicas.sh", "up"], cwd=REPO, env=script, check=True)
        base = f"http://127.0.0.1:{port}"
        assert wait_for_status(f"{base}/health", (200,), 180)
        # HAProxy's checks mark each replica up in its own time; affinity holds once both are.
        assert both_replicas_up(base, 60)
        yield base
    finally:
        subprocess.run(["docker/replicas.sh", "down"], cwd=REPO, env=script, check=False)
        engine.run("volume", "rm", "-f", f"{POD}-store", timeout=60)


def served_by(base: str, session: str) -> str | None:
    reply = httpx.get(f"{base}/health", headers={"X-Session-Id": session}, timeout=10)
    return reply.headers.get("x-served-by")


def both_replicas_up(base: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = {served_by(base, f"probe-{i}") for i in range(16)}
        if seen == {"r1", "r2"}:
            return True
        time.sleep(0.5)
    return False


def chat(base: str, session: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={
            "model": "gemma-3-270m",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        headers={"X-Session-Id": session},
        timeout=120,
    )


def test_each_replica_is_pinned_to_its_own_core(balancer: str, engine: Engine) -> None:
    for name, core in (("r1", "0"), ("r2", "1")):
        done = engine.run("inspect", "--format", "{{.HostConfig.CpusetCpus}}", f"{POD}-{name}")
        assert done.stdout.strip() == core, done.stderr


def test_one_session_stays_on_one_replica_and_sessions_spread(balancer: str) -> None:
    served = {}
    for session in (f"user-{i}" for i in range(12)):
        replies = [chat(balancer, session) for _ in range(3)]
        assert [r.status_code for r in replies] == [200] * 3, replies[-1].text
        names = {r.headers["x-served-by"] for r in replies}
        assert len(names) == 1, f"{session} moved between replicas: {names}"
        served[session] = names.pop()
    assert set(served.values()) == {"r1", "r2"}


def test_killing_a_replica_under_load_loses_no_request(balancer: str, engine: Engine) -> None:
    home: dict[str, str | None] = {}  # two sessions whose replica is r1, two on r2
    for session in (f"load-{i}" for i in range(64)):
        name = served_by(balancer, session)
        if list(home.values()).count(name) < 2:
            home[session] = name
    sessions = list(home)
    assert sorted(map(str, home.values())) == ["r1", "r1", "r2", "r2"]

    def client(session: str) -> list[tuple[float, int, str]]:
        out = []
        for _ in range(6):
            sent = time.monotonic()
            reply = chat(balancer, session)
            out.append((sent, reply.status_code, reply.headers.get("x-served-by", "")))
        return out

    with ThreadPoolExecutor(len(sessions)) as pool:
        running = [pool.submit(client, s) for s in sessions]
        time.sleep(1.0)  # a few requests in flight on each replica
        killed_at = time.monotonic()
        killed = engine.run("kill", "--signal", "KILL", f"{POD}-r1", timeout=30)
        assert killed.returncode == 0, killed.stderr
        results = [row for future in running for row in future.result()]
    assert {name for _, status, name in results if status == 200} == {"r1", "r2"}
    # Every request sent after the kill is answered (by r2); of those running on r1 at
    # that moment, at most one per r1 session can be lost.
    assert all(status == 200 for sent, status, _ in results if sent > killed_at), results
    assert sum(status != 200 for _, status, _ in results) <= 2, results
    after = [chat(balancer, s) for s in sessions]
    assert {r.headers["x-served-by"] for r in after} == {"r2"}
