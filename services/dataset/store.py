"""Dataset versions in the service's own database (SQLite or PostgreSQL, SQLAlchemy Core), with
the outbox of the events that announce them. The schema is made by the Alembic scripts in
migrations/; the tables here are what their head revision makes.

A version is immutable once written. Every query takes the tenant: a dataset of another tenant
simply isn't there. (tenant, name, version) and (tenant, idempotency_key) are unique: an insert
that breaks one raises IntegrityError (a concurrent request took the number or the key first).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table
from llmstudio.paging import Listing, Page, Paged

from .core import DatasetRecord

metadata = sa.MetaData()

datasets = sa.Table(
    "dataset_datasets",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("num_rows", sa.BigInteger, nullable=False),
    sa.Column("train_rows", sa.BigInteger, nullable=False),
    sa.Column("validation_rows", sa.BigInteger, nullable=False),
    sa.Column("test_rows", sa.BigInteger, nullable=False),
    sa.Column("artifacts", sa.JSON, nullable=False),
    sa.Column("split_sha256", sa.JSON, nullable=False),
    sa.Column("validation_fraction", sa.Float, nullable=False),
    sa.Column("test_fraction", sa.Float, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("parent_id", sa.String(32), nullable=False),
    sa.Column("transformation", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("warnings", sa.JSON, nullable=False),
    sa.Column("source_schema", sa.String(32), nullable=False),
    sa.Column("source_format", sa.String(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    # NULL when the caller sent no key; NULLs never collide in the unique constraint.
    sa.Column("idempotency_key", sa.String(256)),
    sa.Column("request_sha256", sa.String(64), nullable=False),
    sa.UniqueConstraint("tenant", "idempotency_key",
                        name="uq_dataset_datasets_tenant_idempotency"),
    sa.UniqueConstraint("tenant", "name", "version",
                        name="uq_dataset_datasets_tenant_name_version"),
    sa.Index("ix_dataset_datasets_tenant_name", "tenant", "name"),
)

outbox = outbox_table(metadata, "dataset")

# ListDatasets pages by name, then version (`Unit.versions`).
VERSIONS: Listing[DatasetRecord] = Listing(lambda r: (r.name, r.version), (str, int))


class Unit(OutboxUnit):
    """The queries of one transaction (the outbox's from `OutboxUnit`)."""

    outbox_table = outbox

    def add(self, record: DatasetRecord) -> None:
        self.conn.execute(datasets.insert().values(
            **{c.name: getattr(record, c.name) for c in datasets.columns}))

    def latest_version(self, tenant: str, name: str) -> int:
        query = sa.select(sa.func.max(datasets.c.version)).where(
            datasets.c.tenant == tenant, datasets.c.name == name)
        return self.conn.execute(query).scalar() or 0

    def get(self, tenant: str, dataset_id: str) -> DatasetRecord | None:
        return self._one(datasets.c.tenant == tenant, datasets.c.id == dataset_id)

    def by_idempotency_key(self, tenant: str, key: str) -> DatasetRecord | None:
        return self._one(datasets.c.tenant == tenant, datasets.c.idempotency_key == key)

    def versions(self, tenant: str, name: str = "",
                 page: Page | None = None) -> Paged[DatasetRecord]:
        """The tenant's versions (of one name, if given), by name then version; `page` of them
        (None: all)."""
        query = datasets.select().where(datasets.c.tenant == tenant)
        if name:
            query = query.where(datasets.c.name == name)
        if page is not None:
            if page.after is not None:
                after_name, after_version = page.after
                query = query.where(sa.or_(datasets.c.name > after_name, sa.and_(
                    datasets.c.name == after_name, datasets.c.version > after_version)))
            query = query.limit(page.rows_to_read)
        rows = self.conn.execute(query.order_by(datasets.c.name, datasets.c.version))
        return VERSIONS.paged([DatasetRecord(**row) for row in rows.mappings()], page)

    def _one(self, *where: sa.ColumnElement[bool]) -> DatasetRecord | None:
        row = self.conn.execute(datasets.select().where(*where)).mappings().first()
        return DatasetRecord(**row) if row else None


class DatasetStore(UnitOfWorkStore[Unit]):
    service = "dataset"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"
    legacy_tables = frozenset({"datasets"})  # its name before the `dataset_` prefix
