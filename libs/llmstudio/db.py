"""SQLAlchemy engine factory and unit-of-work store base shared by the services' stores (SQLite by
default, PostgreSQL too).

One rule for every service: a use case's database work runs in one transaction in a worker
thread (`await store.in_unit(fn)`), never on the event loop; the schema is created and upgraded by
the service's Alembic migrations (`store.migrate()`, at start), never by `create_all`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import Engine, MetaData, create_engine, event

U = TypeVar("U")
R = TypeVar("R")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # WAL: readers don't block the writer
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # in WAL mode a commit survives a crash of the process without an fsync of its own
            # (a power cut may lose the newest ones): the embedded stack's trade; production
            # databases are PostgreSQL
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True)


class UnitOfWorkStore(Generic[U]):
    """A store whose use cases each run in one transaction: `unit()` yields the subclass's
    `unit_class` (its queries) on the transaction's connection; committed when the block ends,
    rolled back if it raises. The subclass sets `service` (the prefix of its tables and of its
    Alembic version table), `metadata` (its tables), `unit_class` and `migrations` (the folder
    of its Alembic scripts)."""

    service: ClassVar[str]
    metadata: ClassVar[MetaData]
    unit_class: ClassVar[type]  # called with the connection (a callable here reads as a method)
    migrations: ClassVar[Path]
    # First-revision tables named before the `<service>_` convention: they, too, mark a database
    # made before migrations (stamped at the first revision, then upgraded).
    legacy_tables: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, url: str):
        self.engine = make_engine(url)

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema to `revision` (blocking: call it at start)."""
        from .migrations import upgrade

        upgrade(self.engine, self.migrations, self.service, revision, self.legacy_tables)

    async def in_unit(self, fn: Callable[..., R], *args: Any) -> R:
        """`fn(unit, *args)` in one transaction, in a worker thread: how async code touches the
        database (a blocking call on the event loop would stall every other request)."""
        return await asyncio.to_thread(self._run_unit, fn, *args)

    def _run_unit(self, fn: Callable[..., R], *args: Any) -> R:
        with self.unit() as u:
            return fn(u, *args)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def unit(self) -> Iterator[U]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self.engine.begin() as conn:
            yield type(self).unit_class(conn)
