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
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    select,
)

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, outbox_table
from llmstudio.paging import Listing, Page, Paged

from . import core
from .core import DEFAULT_GATED_STAGES, OPEN, Model, ModelVersion, Promotion, Stage, StageRequest

metadata = MetaData()

models = Table(
    "registry_models",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("name", String(256), primary_key=True),
    Column("created_at", String(40), nullable=False),
    Column("tags", JSON, nullable=False, server_default="{}"),
    Column("description", Text, nullable=False, server_default=""),
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
    Column("tags", JSON, nullable=False, server_default="{}"),
    Column("description", Text, nullable=False, server_default=""),
    # deleted (DeleteVersion): hidden from reads and lists, the row kept ("": not deleted)
    Column("deleted_at", String(40), nullable=False, server_default=""),
    Column("deleted_by", String(256), nullable=False, server_default=""),
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

# Promotion requests this registry filed, with governance's last decision on each.
promotions = Table(
    "registry_promotions",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("model_name", String(256), nullable=False),
    Column("version", Integer, nullable=False),
    Column("stage", String(16), nullable=False),
    Column("from_stage", String(16), nullable=False),
    Column("justification", Text, nullable=False),
    Column("requester", String(255), nullable=False),
    Column("status", String(24), nullable=False),
    Column("unmet", JSON, nullable=False),
    Column("policy_version", Integer, nullable=False),
    Column("idempotency_key", String(256), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    Index("ix_registry_promotions_version", "tenant", "model_name", "version"),
)

# The stages each tenant's policy gates, as governance last announced (PolicyChanged).
policy_gates = Table(
    "registry_policy_gates",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("policy_version", Integer, nullable=False),
    Column("gated_stages", JSON, nullable=False),
    Column("updated_at", String(40), nullable=False),
)

# Each model's aliases (champion, candidate, ...): the version each names now.
aliases = Table(
    "registry_aliases",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("model_name", String(256), primary_key=True),
    Column("alias", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_by", String(256), nullable=False),
    Column("updated_at", String(40), nullable=False),
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
        q = select(versions).where(versions.c.tenant == tenant, versions.c.model_name == model_name,
                                   versions.c.deleted_at == "")
        if version:
            q = q.where(versions.c.version == version)
        row = self.conn.execute(q.order_by(versions.c.version.desc()).limit(1)).first()
        if row is None:
            return None
        [v] = core.with_aliases([_version(row)], self.aliases_of(tenant, model_name))
        return v

    def versions_of(self, tenant: str, model_name: str) -> list[ModelVersion]:
        rows = self.conn.execute(
            select(versions)
            .where(versions.c.tenant == tenant, versions.c.model_name == model_name,
                   versions.c.deleted_at == "")
            .order_by(versions.c.version)
        )
        return [_version(r) for r in rows]

    def delete_version(self, v: ModelVersion, actor: str, now: str) -> None:
        """Mark `v` deleted (its row kept: retention)."""
        self.conn.execute(versions.update().where(
            versions.c.tenant == v.tenant, versions.c.model_name == v.model_name,
            versions.c.version == v.version).values(deleted_at=now, deleted_by=actor))

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
                       for k in ("stage", "lineage", "metrics", "artifacts", "updated_at",
                                 "tags", "description")})
        )

    def model(self, tenant: str, name: str) -> Model | None:
        row = self.conn.execute(
            select(models).where(models.c.tenant == tenant, models.c.name == name)
        ).first()
        if row is None:
            return None
        named = self.aliases_of(tenant, name)
        return Model(tenant, name, row.created_at,
                     core.with_aliases(self.versions_of(tenant, name), named), named,
                     dict(row.tags or {}), row.description or "")

    def save_model(self, m: Model) -> None:
        """A model's tags and description."""
        self.conn.execute(models.update().where(
            models.c.tenant == m.tenant, models.c.name == m.name).values(
            tags=m.tags, description=m.description))

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
            .where(versions.c.tenant == tenant, versions.c.model_name.in_(list(by_model)),
                   versions.c.deleted_at == "")
            .order_by(versions.c.version)
        ):
            by_model[r.model_name].append(_version(r))
        named: dict[str, dict[str, int]] = {name: {} for name in by_model}
        for r in self.conn.execute(select(aliases).where(
                aliases.c.tenant == tenant, aliases.c.model_name.in_(list(by_model)))):
            named[r.model_name][r.alias] = r.version
        return MODELS.paged(
            [Model(tenant, r.name, r.created_at,
                   core.with_aliases(by_model[r.name], named[r.name]), named[r.name],
                   dict(r.tags or {}), r.description or "")
             for r in rows], page)

    # -- aliases -------------------------------------------------------------------------------
    def aliases_of(self, tenant: str, model_name: str) -> dict[str, int]:
        rows = self.conn.execute(select(aliases.c.alias, aliases.c.version).where(
            aliases.c.tenant == tenant, aliases.c.model_name == model_name))
        return {r.alias: r.version for r in rows}

    def set_alias(self, tenant: str, model_name: str, alias: str, version: int, actor: str,
                  now: str) -> None:
        """Point `alias` at `version` (0: remove it)."""
        where = (aliases.c.tenant == tenant, aliases.c.model_name == model_name,
                 aliases.c.alias == alias)
        self.conn.execute(aliases.delete().where(*where))
        if version:
            self.conn.execute(aliases.insert().values(
                tenant=tenant, model_name=model_name, alias=alias, version=version,
                updated_by=actor, updated_at=now))

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


    # -- promotion requests ------------------------------------------------------------------
    def promotion(self, tenant: str, request_id: str) -> Promotion | None:
        row = self.conn.execute(select(promotions).where(
            promotions.c.tenant == tenant, promotions.c.request_id == request_id)).first()
        return _promotion(row) if row else None

    def promotion_by_key(self, tenant: str, key: str) -> Promotion | None:
        row = self.conn.execute(select(promotions).where(
            promotions.c.tenant == tenant, promotions.c.idempotency_key == key)).first()
        return _promotion(row) if row else None

    def promotions_of(self, tenant: str, model_name: str, version: int,
                      statuses: tuple[str, ...] = ()) -> list[Promotion]:
        """The version's requests, newest first (of `statuses` when given)."""
        q = select(promotions).where(
            promotions.c.tenant == tenant, promotions.c.model_name == model_name,
            promotions.c.version == version)
        if statuses:
            q = q.where(promotions.c.status.in_(statuses))
        rows = self.conn.execute(q.order_by(promotions.c.created_at.desc()))
        return [_promotion(r) for r in rows]

    def open_promotions_of(self, tenant: str, model_name: str, version: int) -> list[Promotion]:
        return self.promotions_of(tenant, model_name, version, OPEN)

    def add_promotion(self, p: Promotion, idempotency_key: str) -> None:
        self.conn.execute(promotions.insert().values(
            **_promotion_row(p), idempotency_key=idempotency_key))

    def save_promotion(self, p: Promotion) -> None:
        row = _promotion_row(p)
        self.conn.execute(promotions.update().where(
            promotions.c.request_id == p.request_id).values(
            **{k: row[k] for k in ("status", "unmet", "policy_version", "updated_at")}))

    # -- policy gates ------------------------------------------------------------------------
    def gated_stages(self, tenant: str) -> tuple[str, ...]:
        row = self.conn.execute(
            select(policy_gates).where(policy_gates.c.tenant == tenant)).first()
        return tuple(row.gated_stages) if row else DEFAULT_GATED_STAGES

    def set_gated_stages(self, tenant: str, policy_version: int, stages: list[str],
                         now: str) -> bool:
        """Keep the gates of the newest policy version (an older one arriving late is
        ignored); False when ignored."""
        row = self.conn.execute(
            select(policy_gates).where(policy_gates.c.tenant == tenant)).first()
        if row is None:
            self.conn.execute(policy_gates.insert().values(
                tenant=tenant, policy_version=policy_version, gated_stages=stages,
                updated_at=now))
            return True
        if row.policy_version >= policy_version:
            return False
        self.conn.execute(policy_gates.update().where(policy_gates.c.tenant == tenant).values(
            policy_version=policy_version, gated_stages=stages, updated_at=now))
        return True


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
        "tags": v.tags,
        "description": v.description,
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
        tags=dict(row.tags or {}),
        description=row.description or "",
        deleted_at=row.deleted_at or "",
    )


def _promotion_row(p: Promotion) -> dict:
    return {
        "request_id": p.request_id, "tenant": p.tenant, "model_name": p.model_name,
        "version": p.version, "stage": p.stage.value, "from_stage": p.from_stage.value,
        "justification": p.justification, "requester": p.requester, "status": p.status,
        "unmet": list(p.unmet), "policy_version": p.policy_version,
        "created_at": p.created_at, "updated_at": p.updated_at,
    }


def _promotion(row) -> Promotion:
    return Promotion(
        request_id=row.request_id, tenant=row.tenant, model_name=row.model_name,
        version=row.version, stage=Stage(row.stage), from_stage=Stage(row.from_stage),
        justification=row.justification, requester=row.requester, status=row.status,
        unmet=tuple(row.unmet), policy_version=row.policy_version, created_at=row.created_at,
        updated_at=row.updated_at)
