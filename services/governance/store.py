"""Governance persistence (SQLAlchemy Core; SQLite or PostgreSQL): the audit log, API keys and
the outbox of key events.

Tables are prefixed `governance_` (the services may share one PostgreSQL database); their schema
is made and upgraded by the Alembic scripts in `migrations/` (before them the log and the keys
were `audit_log` and `api_keys`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table

from .core import ApiKey, AuditEvent, AuditRecord, chain

metadata = MetaData()

# Append-only. `sequence` is the primary key, so two writers that read the same head cannot
# both append: the second insert fails and is retried on the new head.
audit_log = Table(
    "governance_audit_log",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(128), nullable=False, unique=True),
    Column("event_type", String(255), nullable=False, index=True),
    Column("subject", String(512), nullable=False),
    Column("entity", String(255), nullable=False, index=True),
    Column("source", String(255), nullable=False),
    Column("tenant", String(64), nullable=False, index=True),
    Column("actor", String(255), nullable=False),
    Column("time", String(40), nullable=False),
    Column("data_json", Text, nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

api_keys = Table(
    "governance_api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("roles", JSON, nullable=False),
    Column("name", String(255), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("created_by", String(255), nullable=False),
    Column("revoked_at", String(40)),
)

outbox = outbox_table(metadata, "governance")


class Unit(OutboxUnit):
    """The queries of one transaction (the outbox's from `OutboxUnit`)."""

    outbox_table = outbox

    # -- audit log ---------------------------------------------------------------------------
    def append(self, event: AuditEvent) -> AuditRecord | None:
        """Chain `event` after the head; None if its id is already logged.

        The caller serializes appends; the primary key on `sequence` guards other writers.
        """
        seen = self.conn.execute(
            select(audit_log.c.sequence).where(audit_log.c.event_id == event.event_id)
        ).first()
        if seen:
            return None
        head = self.conn.execute(
            select(audit_log).order_by(audit_log.c.sequence.desc()).limit(1)
        ).first()
        record = chain(event, AuditRecord(**head._mapping) if head else None)
        self.conn.execute(insert(audit_log).values(**asdict(record)))
        return record

    def query(
        self,
        *,
        event_type_prefix: str = "",
        entity: str = "",
        tenant: str | None = None,
        after_sequence: int = 0,
        limit: int,
    ) -> list[AuditRecord]:
        """Records after `after_sequence` in order; `tenant=None` means every tenant."""
        stmt = select(audit_log).where(audit_log.c.sequence > after_sequence)
        if event_type_prefix:
            stmt = stmt.where(audit_log.c.event_type.startswith(event_type_prefix, autoescape=True))
        if entity:
            stmt = stmt.where(audit_log.c.entity == entity)
        if tenant is not None:
            stmt = stmt.where(audit_log.c.tenant == tenant)
        stmt = stmt.order_by(audit_log.c.sequence).limit(limit)
        return [AuditRecord(**row._mapping) for row in self.conn.execute(stmt)]

    def audit_head_sequence(self) -> int:
        """The sequence of the newest record (0: the log is empty)."""
        return self.conn.execute(select(func.max(audit_log.c.sequence))).scalar_one() or 0

    def iter_audit(self, batch: int = 1000) -> Iterator[AuditRecord]:
        """Every record in sequence order, read in batches (the log can be large)."""
        after = 0
        while True:
            records = self.query(after_sequence=after, limit=batch)
            yield from records
            if len(records) < batch:
                return
            after = records[-1].sequence

    # -- API keys ----------------------------------------------------------------------------
    def count_keys(self) -> int:
        return self.conn.execute(select(func.count()).select_from(api_keys)).scalar_one()

    def add_key(self, key: ApiKey) -> None:
        self.conn.execute(insert(api_keys).values(**{**asdict(key), "roles": list(key.roles)}))

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self.conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return _api_key(row) if row else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """The keys of `tenant` (None: of every tenant), revoked ones included."""
        stmt = select(api_keys).order_by(api_keys.c.key_id)
        if tenant is not None:
            stmt = stmt.where(api_keys.c.tenant == tenant)
        return [_api_key(r) for r in self.conn.execute(stmt)]

    def revoke_key(self, key_id: str, revoked_at: str) -> bool:
        """Mark a live key revoked; False if it was revoked already."""
        result = self.conn.execute(
            update(api_keys)
            .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=revoked_at)
        )
        return result.rowcount == 1


class GovernanceStore(UnitOfWorkStore[Unit]):
    """Each use case runs in one transaction: `await store.in_unit(fn)`."""

    service = "governance"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"
    legacy_tables = frozenset({"audit_log", "api_keys"})


def _api_key(row) -> ApiKey:
    return ApiKey(**{**row._mapping, "roles": tuple(row.roles)})
