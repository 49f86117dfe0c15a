"""Serving persistence (SQLAlchemy 2 Core; SQLite or PostgreSQL).

`serving_jobs`, `serving_versions` and `serving_aliases` are serving's own view of the registry,
built from events (what a job produced; which version it became, its stage, the aliases naming
it); `serving_deployments` are the
deployments. Each use case runs in one transaction with its events in `serving_outbox`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, select

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table
from llmstudio.paging import Listing, Page, Paged

from .core import Deployment, ServedVersion, follows_alias

metadata = MetaData()

jobs = Table(
    "serving_jobs",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("job_id", String(128), primary_key=True),
    Column("base_model", String(1024), nullable=False),
    Column("checkpoint_key", String(1024), nullable=False),
)

versions = Table(
    "serving_versions",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("model_name", String(256), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("job_id", String(128), nullable=False),
    Column("stage", String(16), nullable=False),
)

deployments = Table(
    "serving_deployments",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("model_name", String(256), nullable=False),
    Column("version", Integer, nullable=False),
    Column("follows", String(64), nullable=False),  # a stage or an alias
    Column("created_by", String(256), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

# The registry's aliases, as its events said: the version each names.
aliases = Table(
    "serving_aliases",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("model_name", String(256), primary_key=True),
    Column("alias", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
)

outbox = outbox_table(metadata, "serving")

DEPLOYMENTS: Listing[Deployment] = Listing(lambda d: (d.name,), (str,))


class Unit(OutboxUnit):
    outbox_table = outbox

    # -- what serving knows of the registry ----------------------------------------------------
    def add_job(self, tenant: str, job_id: str, base_model: str, checkpoint_key: str) -> None:
        if self.conn.execute(select(jobs.c.job_id).where(
                jobs.c.tenant == tenant, jobs.c.job_id == job_id)).first() is None:
            self.conn.execute(jobs.insert().values(
                tenant=tenant, job_id=job_id, base_model=base_model,
                checkpoint_key=checkpoint_key))

    def add_version(self, tenant: str, model_name: str, version: int, job_id: str) -> None:
        if self._version_row(tenant, model_name, version) is None:
            self.conn.execute(versions.insert().values(
                tenant=tenant, model_name=model_name, version=version, job_id=job_id,
                stage="development"))

    def set_stage(self, tenant: str, model_name: str, version: int, stage: str) -> None:
        self.conn.execute(versions.update().where(
            versions.c.tenant == tenant, versions.c.model_name == model_name,
            versions.c.version == version).values(stage=stage))

    def set_alias(self, tenant: str, model_name: str, alias: str, version: int) -> None:
        """Record that `alias` names `version` (0: removed)."""
        self.conn.execute(aliases.delete().where(
            aliases.c.tenant == tenant, aliases.c.model_name == model_name,
            aliases.c.alias == alias))
        if version:
            self.conn.execute(aliases.insert().values(
                tenant=tenant, model_name=model_name, alias=alias, version=version))

    def version(self, tenant: str, model_name: str, version: int = 0,
                stage: str = "") -> ServedVersion | None:
        """A version whose job's outputs are known: the one numbered `version`, or the newest in
        `stage`, or the one the alias `stage` names."""
        if not version and follows_alias(stage):
            version = self.conn.execute(select(aliases.c.version).where(
                aliases.c.tenant == tenant, aliases.c.model_name == model_name,
                aliases.c.alias == stage)).scalar() or 0
            if not version:
                return None
        q = select(versions, jobs.c.base_model, jobs.c.checkpoint_key).join(
            jobs, (jobs.c.tenant == versions.c.tenant) & (jobs.c.job_id == versions.c.job_id)
        ).where(versions.c.tenant == tenant, versions.c.model_name == model_name)
        q = q.where(versions.c.version == version) if version else q.where(
            versions.c.stage == stage)
        row = self.conn.execute(q.order_by(versions.c.version.desc()).limit(1)).first()
        if row is None:
            return None
        return ServedVersion(tenant=row.tenant, model_name=row.model_name, version=row.version,
                             job_id=row.job_id, base_model=row.base_model,
                             checkpoint_key=row.checkpoint_key, stage=row.stage)

    def _version_row(self, tenant: str, model_name: str, version: int):
        return self.conn.execute(select(versions.c.version).where(
            versions.c.tenant == tenant, versions.c.model_name == model_name,
            versions.c.version == version)).first()

    # -- deployments -----------------------------------------------------------------------------
    def deployment(self, tenant: str, name: str) -> Deployment | None:
        row = self.conn.execute(select(deployments).where(
            deployments.c.tenant == tenant, deployments.c.name == name)).first()
        return _deployment(row) if row else None

    def deployments(self, tenant: str, page: Page | None = None) -> Paged[Deployment]:
        q = select(deployments).where(deployments.c.tenant == tenant)
        if page is not None:
            if page.after is not None:
                q = q.where(deployments.c.name > page.after[0])
            q = q.limit(page.rows_to_read)
        rows = self.conn.execute(q.order_by(deployments.c.name)).all()
        return DEPLOYMENTS.paged([_deployment(r) for r in rows], page)

    def following(self, tenant: str, model_name: str) -> list[Deployment]:
        rows = self.conn.execute(select(deployments).where(
            deployments.c.tenant == tenant, deployments.c.model_name == model_name,
            deployments.c.follows != ""))
        return [_deployment(r) for r in rows]

    def add_deployment(self, d: Deployment) -> None:
        self.conn.execute(deployments.insert().values(**_deployment_row(d)))

    def save_deployment(self, d: Deployment) -> None:
        self.conn.execute(deployments.update().where(
            deployments.c.tenant == d.tenant, deployments.c.name == d.name
        ).values(version=d.version, updated_at=d.updated_at))

    def delete_deployment(self, tenant: str, name: str) -> None:
        self.conn.execute(deployments.delete().where(
            deployments.c.tenant == tenant, deployments.c.name == name))


class ServingStore(UnitOfWorkStore[Unit]):
    service = "serving"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"


def _deployment_row(d: Deployment) -> dict:
    return {"tenant": d.tenant, "name": d.name, "model_name": d.model_name,
            "version": d.version, "follows": d.follows, "created_by": d.created_by,
            "created_at": d.created_at, "updated_at": d.updated_at}


def _deployment(row) -> Deployment:
    return Deployment(tenant=row.tenant, name=row.name, model_name=row.model_name,
                      version=row.version, follows=row.follows, created_by=row.created_by,
                      created_at=row.created_at, updated_at=row.updated_at)
