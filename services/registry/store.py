"""Registry persistence (SQLAlchemy 2 Core; SQLite or PostgreSQL).

Tables are prefixed `registry_` because the services may share one PostgreSQL database; their
schema is made and upgraded by the Alembic scripts in `migrations/`. Every use case runs in one
transaction, and the events it announces are written in that same transaction to the outbox
(`registry_outbox`), so a version never exists without its event, nor an event without its
version.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    JSON,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
    select,
)

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table
from llmstudio.paging import Listing, Page, Paged

from .core import Model, ModelVersion, Stage, StageRequest

metadata = MetaData()

models = Table(
    "registry_models",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("name", String(256), primary_key=True),
    Column("created_at", String(40), nullable=False),
)

versions = Table(
    "registry_versions",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("model_name", String(256), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("stage", String(16), nullable=False),
    Column("job_id", String(128), nullable=False),
    Column("lineage", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("artifacts", JSON, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    # One version per job: a redelivered JobCompleted finds the version it registered.
    UniqueConstraint("tenant", "job_id", name="registry_versions_job"),
)

# ListModels pages by name (`Unit.models`).
MODELS: Listing[Model] = Listing(lambda model: (model.name,), (str,))

# SetStage idempotency keys: a retried request is answered, not re-applied.
stage_requests = Table(
    "registry_stage_requests",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("idempotency_key", String(256), primary_key=True),
    Column("model_name", String(256), nullable=False),
    Column("version", Integer, nullable=False),
    Column("stage", String(16), nullable=False),
    Column("created_at", String(40), nullable=False),
)

outbox = outbox_table(metadata, "registry")


class Unit(OutboxUnit):
    """The queries of one transaction (the outbox's from `OutboxUnit`)."""

    outbox_table = outbox

    # -- models and versions ------------------------------------------------------------------
    def version_by_job(self, tenant: str, job_id: str) -> ModelVersion | None:
        row = self.conn.execute(
            select(versions).where(versions.c.tenant == tenant, versions.c.job_id == job_id)
        ).first()
        return _version(row) if row else None

    def get_version(self, tenant: str, model_name: str, version: int) -> ModelVersion | None:
        """`version` 0 is the latest."""
        q = select(versions).where(versions.c.tenant == tenant, versions.c.model_name == model_name)
        if version:
            q = q.where(versions.c.version == version)
        row = self.conn.execute(q.order_by(versions.c.version.desc()).limit(1)).first()
        return _version(row) if row else None

    def versions_of(self, tenant: str, model_name: str) -> list[ModelVersion]:
        rows = self.conn.execute(
            select(versions)
            .where(versions.c.tenant == tenant, versions.c.model_name == model_name)
            .order_by(versions.c.version)
        )
        return [_version(r) for r in rows]

    def next_version(self, tenant: str, model_name: str) -> int:
        top = self.conn.execute(
            select(func.max(versions.c.version)).where(
                versions.c.tenant == tenant, versions.c.model_name == model_name
            )
        ).scalar()
        return (top or 0) + 1

    def add_version(self, v: ModelVersion) -> None:
        exists = self.conn.execute(
            select(models.c.name).where(models.c.tenant == v.tenant, models.c.name == v.model_name)
        ).first()
        if not exists:
            self.conn.execute(
                models.insert().values(tenant=v.tenant, name=v.model_name, created_at=v.created_at)
            )
        self.conn.execute(versions.insert().values(**_version_row(v)))

    def save_version(self, v: ModelVersion) -> None:
        row = _version_row(v)
        self.conn.execute(
            versions.update()
            .where(
                versions.c.tenant == v.tenant,
                versions.c.model_name == v.model_name,
                versions.c.version == v.version,
            )
            .values(**{k: row[k]
                       for k in ("stage", "lineage", "metrics", "artifacts", "updated_at")})
        )

    def model(self, tenant: str, name: str) -> Model | None:
        row = self.conn.execute(
            select(models).where(models.c.tenant == tenant, models.c.name == name)
        ).first()
        if row is None:
            return None
        return Model(tenant, name, row.created_at, self.versions_of(tenant, name))

    def models(self, tenant: str, page: Page | None = None) -> Paged[Model]:
        """The tenant's models by name, each with all its versions; `page` of them (None:
        all)."""
        query = select(models).where(models.c.tenant == tenant)
        if page is not None:
            if page.after is not None:
                query = query.where(models.c.name > page.after[0])
            query = query.limit(page.rows_to_read)
        rows = self.conn.execute(query.order_by(models.c.name)).all()
        by_model: dict[str, list[ModelVersion]] = {r.name: [] for r in rows}
        for r in self.conn.execute(
            select(versions)
            .where(versions.c.tenant == tenant, versions.c.model_name.in_(list(by_model)))
            .order_by(versions.c.version)
        ):
            by_model[r.model_name].append(_version(r))
        return MODELS.paged(
            [Model(tenant, r.name, r.created_at, by_model[r.name]) for r in rows], page)

    # -- idempotency keys -----------------------------------------------------------------------
    def stage_request(self, tenant: str, key: str) -> StageRequest | None:
        row = self.conn.execute(
            select(stage_requests).where(
                stage_requests.c.tenant == tenant, stage_requests.c.idempotency_key == key
            )
        ).first()
        return StageRequest(row.model_name, row.version, Stage(row.stage)) if row else None

    def add_stage_request(self, tenant: str, key: str, req: StageRequest, now: str) -> None:
        self.conn.execute(
            stage_requests.insert().values(
                tenant=tenant, idempotency_key=key, model_name=req.model_name,
                version=req.version, stage=req.stage.value, created_at=now,
            )
        )


class RegistryStore(UnitOfWorkStore[Unit]):
    """Each use case runs in one transaction: `await store.in_unit(fn)`."""

    service = "registry"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"


def _version_row(v: ModelVersion) -> dict:
    return {
        "tenant": v.tenant,
        "model_name": v.model_name,
        "version": v.version,
        "stage": v.stage.value,
        "job_id": v.job_id,
        "lineage": v.lineage,
        "metrics": v.metrics,
        "artifacts": v.artifacts,
        "created_at": v.created_at,
        "updated_at": v.updated_at,
    }


def _version(row) -> ModelVersion:
    return ModelVersion(
        tenant=row.tenant,
        model_name=row.model_name,
        version=row.version,
        stage=Stage(row.stage),
        job_id=row.job_id,
        lineage=dict(row.lineage),
        metrics=dict(row.metrics),
        artifacts=dict(row.artifacts),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
