"""Alembic, run from code: each service keeps its scripts in `services/<name>/migrations/`
(an `env.py` that calls `run_env()`, and `versions/`), and its store applies them at start.

Services may share one PostgreSQL database, so each has its own version table
(`<service>_alembic_version`) beside its `<service>_*` tables. A database made before migrations
existed (tables, no version table) is stamped at the first revision, whose schema it has, and
upgraded from there: an existing database is upgraded, never recreated.
"""

from __future__ import annotations

import fcntl
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text


def alembic_config(migrations: Path, service: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    cfg.attributes["version_table"] = version_table(service)
    return cfg


def version_table(service: str) -> str:
    return f"{service}_alembic_version"


def upgrade(
    engine: Engine, migrations: Path, service: str, revision: str = "head",
    legacy_tables: Collection[str] = (),
) -> None:
    """Bring the service's schema to `revision`, stamping a pre-migrations database first: one
    with `<service>_*` tables, or with any of `legacy_tables` (first-revision tables named before
    the `<service>_` convention, renamed by a later revision)."""
    cfg = alembic_config(migrations, service)
    with _one_migrator(engine, service), engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # held until this transaction ends
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                         {"key": version_table(service)})
        cfg.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        own = {t for t in tables if t.startswith(f"{service}_") or t in legacy_tables}
        own -= {version_table(service)}
        if own and version_table(service) not in tables:
            command.stamp(cfg, first_revision(migrations))
        command.upgrade(cfg, revision)


@contextmanager
def _one_migrator(engine: Engine, service: str) -> Iterator[None]:
    """Replicas of a service starting together migrate one after the other (the second finds the
    schema at head): on SQLite through a lock file beside the database; PostgreSQL takes an
    advisory lock in the migration's transaction instead."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.{service}-migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def current_revision(engine: Engine, service: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": version_table(service)})
        return ctx.get_current_revision()


def first_revision(migrations: Path) -> str:
    scripts = ScriptDirectory(str(migrations))
    (base,) = scripts.get_bases()
    return base


def run_env() -> None:
    """The body of every service's `migrations/env.py`: online migrations on the connection
    `upgrade` passes in (batch mode, so SQLite can alter tables)."""
    cfg = context.config
    context.configure(
        connection=cfg.attributes["connection"],
        version_table=cfg.attributes["version_table"],
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
