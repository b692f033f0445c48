"""The Responses store: count and age bounds, delete, persistence across reopening."""

from __future__ import annotations

from pathlib import Path

from ggufserve.generation.response_store import ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(response_id: str, created_at: float) -> dict[str, object]:
    return {"id": response_id, "created_at": created_at, "output": [{"id": f"out-{response_id}"}]}


def test_put_get_and_conversation(tmp_path: Path) -> None:
    store = ResponseStore(
        tmp_path / "home" / "r.sqlite3", max_responses=10, ttl_s=60, clock=Clock()
    )
    store.put(response("a", 999.0), [{"id": "in-a"}], [{"id": "before"}])
    stored = store.get("a")
    assert stored is not None and stored.response["id"] == "a"
    assert [i["id"] for i in stored.conversation()] == ["before", "in-a", "out-a"]
    assert store.get("missing") is None


def test_oldest_beyond_the_count_go_first(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.sqlite3", max_responses=2, ttl_s=1e9, clock=clock)
    for index, name in enumerate("abc"):
        store.put(response(name, clock.now + index), [], [])
    assert store.count() == 2
    assert store.get("a") is None and store.get("b") is not None and store.get("c") is not None


def test_expired_responses_are_invisible_then_evicted(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.sqlite3", max_responses=10, ttl_s=60, clock=clock)
    store.put(response("old", clock.now), [], [])
    clock.now += 61
    assert store.get("old") is None and not store.delete("old")
    store.put(response("new", clock.now), [], [])
    assert store.count() == 1


def test_delete_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ResponseStore(path, max_responses=10, ttl_s=1e9, clock=Clock())
    store.put(response("kept", 5.0), [], [])
    store.put(response("gone", 6.0), [], [])
    assert store.delete("gone") and not store.delete("gone")
    store.close()
    reopened = ResponseStore(path, max_responses=10, ttl_s=1e9, clock=Clock())
    assert reopened.get("kept") is not None and reopened.get("gone") is None
    reopened.close()
