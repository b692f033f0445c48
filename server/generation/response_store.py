"""The Responses API's store: responses kept for ``previous_response_id`` and the
``GET`` / ``DELETE /v1/responses/{id}`` endpoints, in one SQLite file
(``$GGUFSERVE_HOME/responses.sqlite3``) so that a restart keeps them.

Bounded by count and age: each write first drops responses older than ``ttl_s`` and
then the oldest beyond ``max_responses``; reads never see an expired response. Each row
holds the response, its own input items and the conversation before them (the items a
chained request continues), so a chain survives the eviction of its first turns.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    history TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
"""


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: the response object, its own input items (ids assigned) and
    the conversation items that preceded them (from ``previous_response_id``)."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]

    def conversation(self) -> list[dict[str, Any]]:
        """The items a request chained onto this response continues: the history, the
        input, then the response's output items."""
        return [*self.history, *self.input_items, *self.response.get("output", [])]


class ResponseStore:
    """Responses in a SQLite file, safe to use from any thread (one connection, a lock).

    The file (and its folder) is created on first use.

    Args:
        path: The SQLite file.
        max_responses: Most responses kept (the oldest go first).
        ttl_s: Seconds a response is kept after it was created.
        clock: Unix time in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        path: Path,
        max_responses: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self._max = max_responses
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            # WAL with NORMAL sync: a write costs no fsync of the main file per response.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    def put(self, response: dict[str, Any], input_items: list[Any], history: list[Any]) -> None:
        """Keep a response (replacing one with the same id), after evicting expired ones
        and the oldest beyond the count limit.

        Raises:
            sqlite3.Error: the file cannot be written.
        """
        now = self._clock()
        row = (
            response["id"],
            response.get("created_at", now),
            json.dumps(response),
            json.dumps(input_items),
            json.dumps(history),
        )
        with self._lock:
            db = self._connection()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("DELETE FROM responses WHERE created_at < ?", (now - self._ttl_s,))
                db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)
                db.execute(
                    "DELETE FROM responses WHERE id IN (SELECT id FROM responses "
                    "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                    (self._max,),
                )

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response with this id, or None (unknown, deleted or expired)."""
        with self._lock:
            found = (
                self._connection()
                .execute(
                    "SELECT response, input_items, history FROM responses "
                    "WHERE id = ? AND created_at >= ?",
                    (response_id, self._clock() - self._ttl_s),
                )
                .fetchone()
            )
        if found is None:
            return None
        return StoredResponse(*(json.loads(column) for column in found))

    def delete(self, response_id: str) -> bool:
        """Forget a response; False when there was none (or it had expired)."""
        with self._lock:
            db = self._connection()
            with db:
                cursor = db.execute(
                    "DELETE FROM responses WHERE id = ? AND created_at >= ?",
                    (response_id, self._clock() - self._ttl_s),
                )
        return cursor.rowcount > 0

    def count(self) -> int:
        """Responses held, expired ones not yet evicted included."""
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        """Close the file (a later use opens it again)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
