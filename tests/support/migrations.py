"""What the services' migration tests share: a store per test on the `db_url` database, a
database of the schema a service had before migrations upgraded to head, the schema a store's
database has against a MetaData (and its history: first revision, head, downgrade), whether it
is at head, a downgrade, and a started bus whose publications are read back from JetStream.

Each helper takes the store: it knows its `engine`, its Alembic scripts (`migrations`) and its
`service` (whose version table, `<service>_alembic_version`, is not part of the schema)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.db import UnitOfWorkStore
from llmstudio.events import Envelope
from llmstudio.migrations import alembic_config, current_revision, first_revision, version_table
from tests.support.bus import stream_messages

R = TypeVar("R")


def store_fixture(store_class: type[UnitOfWorkStore]):
    """A `store` fixture: a `store_class` on the test's `db_url`, disposed afterwards."""

    @pytest.fixture
    def store(db_url) -> Iterator[UnitOfWorkStore]:
        s = store_class(db_url)
        yield s
        s.dispose()

    return store


def bus_fixture(service: str):
    """A `bus` fixture: `service`'s started `Bus` on the test's nats-server."""

    @pytest.fixture
    async def bus(nats_server, tmp_path: Path) -> AsyncIterator[Bus]:
        b = Bus(Settings(nats_url=nats_server.url, data_dir=tmp_path), service)
        await b.start()
        yield b
        await b.stop()

    return bus


# The two ways a database of a service's pre-migrations schema (its test's frozen LEGACY
# MetaData) is met at start: written at the first revision (which is that schema), or made by
# the service's start before migrations existed (`create_all`, no version table: stamped).
LEGACY_DATABASES: dict[str, Callable[[UnitOfWorkStore, sa.MetaData], None]] = {
    "first-revision": lambda store, legacy: store.migrate(first_revision(store.migrations)),
    "before-migrations": lambda store, legacy: legacy.create_all(store.engine),
}


def upgrade_legacy_database(
    store: UnitOfWorkStore, made: str, legacy: sa.MetaData, write_rows: Callable[[sa.Engine], R]
) -> R:
    """A database of the `legacy` schema made as `LEGACY_DATABASES[made]`, with the rows
    `write_rows(engine)` writes, upgraded to head; returns what `write_rows` returned."""
    LEGACY_DATABASES[made](store, legacy)
    rows = write_rows(store.engine)
    store.migrate()
    assert at_head(store)
    return rows


def schema_diff(store: UnitOfWorkStore, models: sa.MetaData) -> list:
    """Alembic's differences between the store's database and `models` ([] when they match)."""
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": version_table(store.service), "compare_type": True})
        return compare_metadata(ctx, models)


def assert_schema_history(
    store: UnitOfWorkStore, legacy: sa.MetaData, models: sa.MetaData
) -> None:
    """The first revision's schema is `legacy` (what the service made before migrations), head's
    is `models`, and a downgrade from head to the first revision gives `legacy` back."""
    first = first_revision(store.migrations)
    store.migrate(first)
    _assert_schema(store, legacy, "at the first revision")
    store.migrate()
    _assert_schema(store, models, "at head")
    downgrade(store, first)
    _assert_schema(store, legacy, "after a downgrade to the first revision")


def _assert_schema(store: UnitOfWorkStore, models: sa.MetaData, when: str) -> None:
    diff = schema_diff(store, models)  # said in the message: no assertion rewriting here
    assert diff == [], f"{when}: {diff}"


def at_head(store: UnitOfWorkStore) -> bool:
    head = ScriptDirectory(str(store.migrations)).get_current_head()
    return current_revision(store.engine, store.service) == head


def downgrade(store: UnitOfWorkStore, revision: str) -> None:
    cfg = alembic_config(store.migrations, store.service)
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def rows_of(store: UnitOfWorkStore, table: sa.Table) -> list[dict]:
    """The rows of `table` in the store's database, by primary key."""
    with store.engine.connect() as conn:
        query = sa.select(table).order_by(*table.primary_key.columns)
        return [dict(r) for r in conn.execute(query).mappings()]


async def published(
    nats_url: str, subject_filter: str, n: int, timeout: float = 10.0
) -> list[tuple[Envelope, str]]:
    """The (envelope, subject) pairs JetStream holds on `subject_filter`, oldest first (see
    `stream_messages`: a caller comparing the list sees any extra one)."""
    messages = await stream_messages(nats_url, subject_filter, n, timeout)
    return [(Envelope.model_validate_json(m.data), m.subject) for m in messages]
