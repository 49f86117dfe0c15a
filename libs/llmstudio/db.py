"""SQLAlchemy engine factory and unit-of-work store base shared by the services' stores (SQLite by
default, PostgreSQL too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import Connection, Engine, MetaData, create_engine, event

U = TypeVar("U")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # WAL: readers don't block the writer
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True)


class UnitOfWorkStore(Generic[U]):
    """A store whose use cases each run in one transaction: `unit()` yields the subclass's
    `unit_class` (its queries) on the transaction's connection; committed when the block ends,
    rolled back if it raises. The subclass sets `metadata` (its tables) and `unit_class`."""

    metadata: ClassVar[MetaData]
    unit_class: ClassVar[Callable[[Connection], Any]]

    def __init__(self, url: str):
        self.engine = make_engine(url)

    def create_tables(self) -> None:
        self.metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def unit(self) -> Iterator[U]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self.engine.begin() as conn:
            yield self.unit_class(conn)
