"""Governance persistence (SQLAlchemy Core; SQLite or PostgreSQL): the audit log, API keys and
the outbox of key events.

Tables are prefixed `governance_` (the services may share one PostgreSQL database); their schema
is made and upgraded by the Alembic scripts in `migrations/` (before them the log and the keys
were `audit_log` and `api_keys`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Integer,
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
from .policy import OPEN_STATUSES, Approval, Policy, parse_policy

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

# Promotion policies: every version of each tenant's policy, as set (YAML text).
policies = Table(
    "governance_policies",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("yaml", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("author", String(255), nullable=False),
    Column("created_at", String(40), nullable=False),
)

# Promotion requests as the registry announced them, and governance's decision on each.
promotions = Table(
    "governance_promotions",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("ref", String(300), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("requester", String(255), nullable=False),
    Column("facts", JSON, nullable=False),
    Column("status", String(24), nullable=False),
    Column("policy_version", Integer, nullable=False),
    Column("verdicts", JSON, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("expires_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

approvals = Table(
    "governance_approvals",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("approver", String(255), primary_key=True),
    Column("roles", JSON, nullable=False),
    Column("comment", Text, nullable=False),
    Column("time", String(40), nullable=False),
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

    def matching(self, tenant: str, *, entities: Collection[str] = (),
                 event_type_prefix: str = "", data_contains: str = "",
                 limit: int = 100_000) -> list[AuditRecord]:
        """`tenant`'s records about one of `entities` (when given), of a type under
        `event_type_prefix`, whose data JSON holds `data_contains`, in order (the lineage's)."""
        stmt = select(audit_log).where(audit_log.c.tenant == tenant)
        if entities:
            stmt = stmt.where(audit_log.c.entity.in_(sorted(entities)))
        if event_type_prefix:
            stmt = stmt.where(audit_log.c.event_type.startswith(event_type_prefix, autoescape=True))
        if data_contains:
            stmt = stmt.where(audit_log.c.data_json.contains(data_contains, autoescape=True))
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


    # -- policies ----------------------------------------------------------------------------
    def policy(self, tenant: str, version: int = 0) -> Policy | None:
        """The tenant's policy `version` (0: the newest); None when it has none."""
        q = select(policies).where(policies.c.tenant == tenant)
        if version:
            q = q.where(policies.c.version == version)
        row = self.conn.execute(q.order_by(policies.c.version.desc()).limit(1)).first()
        return _policy(row) if row else None

    def policy_history(self, tenant: str) -> list[Policy]:
        rows = self.conn.execute(
            select(policies).where(policies.c.tenant == tenant).order_by(policies.c.version))
        return [_policy(r) for r in rows]

    def add_policy(self, tenant: str, policy: Policy) -> None:
        self.conn.execute(insert(policies).values(
            tenant=tenant, version=policy.version, yaml=policy.yaml, sha256=policy.sha256,
            author=policy.author, created_at=policy.created_at))

    # -- promotion requests ----------------------------------------------------------------------
    def promotion(self, request_id: str) -> PromotionRow | None:
        row = self.conn.execute(
            select(promotions).where(promotions.c.request_id == request_id)).first()
        return PromotionRow(**row._mapping) if row else None

    def promotions(self, tenant: str | None, statuses: tuple[str, ...] = (),
                   limit: int = 1000) -> list[PromotionRow]:
        q = select(promotions)
        if tenant is not None:
            q = q.where(promotions.c.tenant == tenant)
        if statuses:
            q = q.where(promotions.c.status.in_(statuses))
        rows = self.conn.execute(q.order_by(promotions.c.created_at).limit(limit))
        return [PromotionRow(**r._mapping) for r in rows]

    def open_promotions(self, tenant: str | None = None) -> list[PromotionRow]:
        return self.promotions(tenant, OPEN_STATUSES, limit=100_000)

    def add_promotion(self, row: PromotionRow) -> None:
        self.conn.execute(insert(promotions).values(**asdict(row)))

    def save_promotion(self, row: PromotionRow) -> None:
        values = asdict(row)
        del values["request_id"]
        self.conn.execute(update(promotions).where(
            promotions.c.request_id == row.request_id).values(**values))

    def approvals(self, request_id: str) -> tuple[Approval, ...]:
        rows = self.conn.execute(select(approvals).where(approvals.c.request_id == request_id)
                                 .order_by(approvals.c.time, approvals.c.approver))
        return tuple(Approval(r.approver, tuple(r.roles), r.time, r.comment) for r in rows)

    def add_approval(self, request_id: str, approval: Approval) -> None:
        self.conn.execute(insert(approvals).values(
            request_id=request_id, approver=approval.approver, roles=list(approval.roles),
            comment=approval.comment, time=approval.time))


@dataclass
class PromotionRow:
    request_id: str
    tenant: str
    ref: str
    stage: str
    requester: str
    facts: dict
    status: str
    policy_version: int
    verdicts: list
    reason: str
    created_at: str
    expires_at: str
    updated_at: str


class GovernanceStore(UnitOfWorkStore[Unit]):
    """Each use case runs in one transaction: `await store.in_unit(fn)`."""

    service = "governance"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"
    legacy_tables = frozenset({"audit_log", "api_keys"})


def _policy(row) -> Policy:
    return parse_policy(row.yaml, row.version, row.author, row.created_at)


def _api_key(row) -> ApiKey:
    return ApiKey(**{**row._mapping, "roles": tuple(row.roles)})
