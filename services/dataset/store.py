"""Dataset versions in the service's own database (SQLite or PostgreSQL, SQLAlchemy Core).

A version is immutable once written. Every query takes the tenant: a dataset of another tenant
simply isn't there. (tenant, name, version) is unique: two uploads racing for the same next
version number make one of them retry with the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from llmstudio.db import make_engine

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets",
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
    # "raw" | "rows" | "train" | "validation" | "test" | "report" -> key
    sa.Column("artifacts", sa.JSON, nullable=False),
    sa.Column("split_sha256", sa.JSON, nullable=False),  # split -> sha256 of its file
    sa.Column("validation_fraction", sa.Float, nullable=False),
    sa.Column("test_fraction", sa.Float, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("parent_id", sa.String(32), nullable=False),  # "" for an upload
    sa.Column("transformation", sa.Text, nullable=False),  # JSON: how it was made
    sa.Column("status", sa.String(32), nullable=False),  # accepted | accepted_with_warnings
    sa.Column("warnings", sa.JSON, nullable=False),
    sa.Column("source_schema", sa.String(32), nullable=False),
    sa.Column("source_format", sa.String(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
    # NULL when the caller sent no key; NULLs never collide in the unique constraint.
    sa.Column("idempotency_key", sa.String(256)),
    sa.Column("request_sha256", sa.String(64), nullable=False),
    # False until DatasetRegistered is acknowledged by JetStream; a replay publishes it again.
    sa.Column("announced", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("tenant", "idempotency_key", name="uq_datasets_tenant_idempotency"),
    sa.UniqueConstraint("tenant", "name", "version", name="uq_datasets_tenant_name_version"),
    sa.Index("ix_datasets_tenant_name", "tenant", "name"),
)


@dataclass(frozen=True)
class DatasetRecord:
    id: str
    tenant: str
    name: str
    sha256: str
    format: str
    num_rows: int
    train_rows: int
    validation_rows: int
    artifacts: dict[str, str]
    split_sha256: dict[str, str]
    validation_fraction: float
    seed: int
    created_at: str
    created_by: str
    test_rows: int = 0
    test_fraction: float = 0.0
    version: int = 1
    parent_id: str = ""
    transformation: str = "{}"
    status: str = "accepted"
    warnings: list[str] = field(default_factory=list)
    source_schema: str = ""
    source_format: str = ""
    description: str = ""
    idempotency_key: str | None = None
    request_sha256: str = ""
    announced: bool = field(default=False, compare=False)


class DuplicateIdempotencyKey(Exception):
    """Another request of the tenant recorded a dataset under this idempotency key first."""


class VersionTaken(Exception):
    """Another request recorded this (name, version) first: take the next number."""


class DatasetStore:
    def __init__(self, url: str):
        self.engine = make_engine(url)

    def create_tables(self) -> None:
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def add(self, record: DatasetRecord) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(datasets.insert().values(**_columns(record)))
        except IntegrityError as e:
            if record.idempotency_key and self.by_idempotency_key(
                record.tenant, record.idempotency_key
            ):
                raise DuplicateIdempotencyKey(record.idempotency_key) from e
            if self.latest_version(record.tenant, record.name) >= record.version:
                raise VersionTaken(record.version) from e
            raise

    def latest_version(self, tenant: str, name: str) -> int:
        query = sa.select(sa.func.max(datasets.c.version)).where(
            sa.and_(datasets.c.tenant == tenant, datasets.c.name == name)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar() or 0

    def mark_announced(self, dataset_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                datasets.update().where(datasets.c.id == dataset_id).values(announced=True)
            )

    def get(self, tenant: str, dataset_id: str) -> DatasetRecord | None:
        return self._one(sa.and_(datasets.c.tenant == tenant, datasets.c.id == dataset_id))

    def by_idempotency_key(self, tenant: str, key: str) -> DatasetRecord | None:
        return self._one(
            sa.and_(datasets.c.tenant == tenant, datasets.c.idempotency_key == key)
        )

    def list(self, tenant: str, name: str = "") -> list[DatasetRecord]:
        query = datasets.select().where(datasets.c.tenant == tenant)
        if name:
            query = query.where(datasets.c.name == name)
        with self.engine.connect() as conn:
            order = (datasets.c.name, datasets.c.version)
            rows = conn.execute(query.order_by(*order)).mappings()
            return [DatasetRecord(**row) for row in rows]

    def unannounced(self) -> list[DatasetRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(datasets.select().where(datasets.c.announced.is_(False)))
            return [DatasetRecord(**row) for row in rows.mappings()]

    def _one(self, where) -> DatasetRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(datasets.select().where(where)).mappings().first()
        return DatasetRecord(**row) if row else None


def _columns(record: DatasetRecord) -> dict:
    return {c.name: getattr(record, c.name) for c in datasets.columns}
