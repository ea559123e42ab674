"""Where a batch remembers its uploads (issue 18): ``sha256 -> url`` with the URL's expiry,
so a resumed or re-run batch reuses them until they expire.

``UploadCache`` is what ``_references`` needs. ``SqliteUploadCache`` keeps the entries in a
table of their own, ``uploads``, in the batch journal's SQLite file: it runs on the journal's
connection and worker thread (``SqliteJournal._run``), so it shares its transactions' order
and its lock, and the journal's own tables and schema number are untouched (a journal written
by an older version simply has no ``uploads`` table until the first upload is kept). Any other
``Journal`` keeps no uploads (``cache_for`` gives None): a re-run uploads again.

An entry is written only after the upload's reply: a cut-off upload leaves at most an orphan
file at the service, never an entry for a half-uploaded file.

The table ``sent_urls`` keeps, per idempotency key, the URLs a job's submit named (committed
before its POST, as the key is). A submit whose outcome was unknown is sent again with its key
in a later run: it must carry the same body, so the same URLs, even after they expired and the
content was uploaded again; another body under the same key is refused (409) while the task
the first attempt may have created is billed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from ._errors import JournalError
from ._journal import Journal, SqliteJournal
from ._json import is_object

__all__ = ["CachedUpload", "SqliteUploadCache", "UploadCache", "cache_for"]

_TABLE = """
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    expires_at REAL NOT NULL,
    bytes INTEGER NOT NULL,
    updated_at REAL NOT NULL
)
"""
_SENT_TABLE = """
CREATE TABLE IF NOT EXISTS sent_urls (
    idempotency_key TEXT PRIMARY KEY,
    urls TEXT NOT NULL
)
"""


@attrs.frozen
class CachedUpload:
    """One uploaded content: its URL and when the URL stops working (Unix seconds)."""

    sha256: str
    url: str
    expires_at: float
    bytes: int


class UploadCache(Protocol):
    """URLs of uploaded contents, kept across runs."""

    async def load(self) -> list[CachedUpload]:
        """Every entry kept (expired ones too: the caller decides)."""
        ...

    async def put(self, entry: CachedUpload) -> None:
        """Keep ``entry`` (replacing the one for the same content)."""
        ...

    async def sent(self, key: str) -> dict[str, str]:
        """The URLs the submit under ``key`` named, by the local entry each replaced (empty:
        none kept)."""
        ...

    async def keep_sent(self, key: str, urls: Mapping[str, str]) -> None:
        """Keep the URLs the submit under ``key`` names (before it is sent)."""
        ...


def cache_for(journal: Journal | None) -> UploadCache | None:
    """The upload cache kept with ``journal`` (None: uploads are kept for one run only)."""
    if isinstance(journal, SqliteJournal):
        return SqliteUploadCache(journal)
    return None


class SqliteUploadCache:
    """The table ``uploads`` in an open ``SqliteJournal``'s file."""

    def __init__(self, journal: SqliteJournal) -> None:
        self.journal = journal
        self._sent_ready = False

    def _conn(self) -> sqlite3.Connection:
        conn = self.journal._conn  # the journal's own connection, on its worker thread
        if conn is None:
            raise JournalError("the journal is closed")
        return conn

    def _load_sync(self) -> list[CachedUpload]:
        try:
            conn = self._conn()
            conn.execute(_TABLE)
            rows = conn.execute("SELECT sha256, url, expires_at, bytes FROM uploads").fetchall()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot read uploads from {self.journal.path}: {exc}") from None
        return [CachedUpload(str(r[0]), str(r[1]), float(r[2]), int(r[3])) for r in rows]

    def _put_sync(self, entry: CachedUpload) -> None:
        try:
            conn = self._conn()
            conn.execute(_TABLE)
            conn.execute(
                "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?, ?)",
                (entry.sha256, entry.url, entry.expires_at, entry.bytes, time.time()),
            )
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot keep an upload in {self.journal.path}: {exc}") from None

    async def load(self) -> list[CachedUpload]:
        result: Any = await self.journal._run(self._load_sync)
        return list(result)

    async def put(self, entry: CachedUpload) -> None:
        await self.journal._run(self._put_sync, entry)

    async def sent(self, key: str) -> dict[str, str]:
        def read(conn: sqlite3.Connection) -> Any:
            self._sent_table(conn)
            return conn.execute(
                "SELECT urls FROM sent_urls WHERE idempotency_key = ?", (key,)
            ).fetchone()

        row = await self.journal.call("read", read)
        if row is None:
            return {}
        try:
            urls: object = json.loads(row[0])
        except ValueError:
            return {}  # unreadable: as if none were kept (the job uploads again)
        if not is_object(urls):
            return {}
        return {k: v for k, v in urls.items() if isinstance(v, str)}

    async def keep_sent(self, key: str, urls: Mapping[str, str]) -> None:
        text = json.dumps(dict(urls), sort_keys=True)

        def write(conn: sqlite3.Connection) -> None:
            self._sent_table(conn)
            conn.execute("INSERT OR REPLACE INTO sent_urls VALUES (?, ?)", (key, text))

        await self.journal.call("write", write)

    def _sent_table(self, conn: sqlite3.Connection) -> None:
        """Create ``sent_urls`` once per cache (a journal of an older run may lack it)."""
        if not self._sent_ready:
            conn.execute(_SENT_TABLE)
            self._sent_ready = True
