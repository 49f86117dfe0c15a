"""The registry's use cases: read models and versions, stream a version's artifact files, move
a version between stages, register the version a finished job made, attach an evaluation to it.

Each runs in one transaction in a worker thread; a change and the events announcing it are
written together to the outbox (`outbox.transact`), which publishes them after the commit. The
registry's outbox defers failed publishes: a committed change is reported as made, and the
background loop publishes its events once NATS is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from llmstudio import telemetry
from llmstudio.artifactkeys import InvalidKey, check_tenant_key, tenant_key, validate_key
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound
from llmstudio.events import (
    EvalCompleted,
    JobCompleted,
    ModelAliasMoved,
    ModelPromotionRequested,
    ModelStageChanged,
    ModelVersionDeleted,
    ModelVersionRegistered,
    PolicyChanged,
    PolicyDecided,
)
from llmstudio.outbox import Outbox
from llmstudio.paging import Paged
from llmstudio.storage import (
    CHUNK,
    MANIFEST,
    ArtifactNotFound,
    ArtifactStore,
    CorruptArtifact,
)

from . import core
from .core import Evidence, Model, ModelVersion, Promotion, Stage, StageRequest
from .store import MODELS, RegistryStore, Unit

log = logging.getLogger(__name__)


class VersionNotRegisteredYet(Exception):
    """An evaluation arrived before its job's version: raised so the bus retries later."""


# The artifacts of a version that are folders of files with a manifest (put_dir).
DOWNLOADABLE_ARTIFACTS = ("checkpoint", "adapter")


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the artifact folder
    size: int
    sha256: str


@dataclass(frozen=True)
class ArtifactChunk:
    data: bytes
    file: ArtifactFile | None = None  # set on a file's first chunk


class _Gated(Exception):
    """SetStage asked for a gated stage with no approved request: the open request to wait on
    (None: file one)."""

    def __init__(self, promotion: Promotion | None):
        self.promotion = promotion


class Registry:
    def __init__(self, store: RegistryStore, outbox: Outbox,
                 artifacts: ArtifactStore | None = None, decision_wait_s: float = 10.0):
        self.store = store
        self.outbox = outbox
        self.artifacts = artifacts
        # How long SetStage to a gated stage waits for governance to decide the request it filed.
        self.decision_wait_s = decision_wait_s

    # -- reads -------------------------------------------------------------------------------
    async def list_models(self, tenant: str, page_size: int = 0,
                          page_token: str = "") -> Paged[Model]:
        """A page of the tenant's models by name (default: the first 100)."""
        return await self.store.in_unit(Unit.models, tenant, MODELS.page(page_size, page_token))

    async def get_model(self, tenant: str, name: str) -> Model:
        model = await self.store.in_unit(Unit.model, tenant, _required("name", name))
        if model is None:
            raise NotFound(f"model {name} not found")
        return model

    async def get_version(self, tenant: str, model_name: str, version: int,
                          alias: str = "") -> ModelVersion:
        """`version` 0 is the latest; `alias` (instead of a version): the one it names."""
        _required("model_name", model_name)
        if version < 0:
            raise InvalidArgument("version", "must be >= 1, or 0 for the latest")
        if alias and version:
            raise InvalidArgument("alias", "give a version or an alias, not both")

        def read(u: Unit) -> ModelVersion | None:
            number = version
            if alias:
                number = u.aliases_of(tenant, model_name).get(alias, 0)
                if not number:
                    raise NotFound(f"model {model_name} has no alias {alias!r}")
            return u.get_version(tenant, model_name, number)

        mv = await self.store.in_unit(read)
        if mv is None:
            what = f"version {version}" if version else "any version"
            raise NotFound(f"model {model_name} has no {what}")
        return mv

    # -- CompareVersions -----------------------------------------------------------------------
    async def compare_versions(self, tenant: str, model_name: str, a: int,
                               b: int) -> core.Comparison:
        """Versions `a` and `b` of a model side by side (`core.compare_versions`), with each
        one's evaluation intervals when its report is readable."""
        for field, number in (("a", a), ("b", b)):
            if number < 1:
                raise InvalidArgument(field, "must be a version number (>= 1)")
        va = await self.get_version(tenant, model_name, a)
        vb = await self.get_version(tenant, model_name, b)
        ea, eb = await self._evidence(tenant, va), await self._evidence(tenant, vb)
        return core.compare_versions(va, vb, ea.intervals, eb.intervals)

    # -- model cards ---------------------------------------------------------------------------
    async def model_card(self, tenant: str, model_name: str, version: int) -> ModelCardFile:
        """The version's model card (`core.model_card`) from what the registry holds now,
        stored as an artifact under the tenant's prefix (rewritten when it changed) and named in
        the version's artifacts as "model_card"."""
        mv = await self.get_version(tenant, model_name, version)
        model = await self.get_model(tenant, model_name)
        markdown = core.model_card(
            mv, model.description,
            await self._read_json(tenant, mv.lineage.get("dataset_report_key", "")),
            await self._read_json(tenant, mv.artifacts.get("eval_report", "")))
        data = markdown.encode()
        sha256 = hashlib.sha256(data).hexdigest()
        if self.artifacts is None:
            return ModelCardFile(mv.model_name, mv.version, markdown, "", sha256)
        key = tenant_key(tenant, "models", mv.model_name, f"v{mv.version}", core.MODEL_CARD)
        if not await asyncio.to_thread(_same_bytes, self.artifacts, key, sha256):
            await asyncio.to_thread(self.artifacts.put_bytes, key, data, "text/markdown")
        if mv.artifacts.get("model_card") != key:
            await self.store.in_unit(_name_artifact, tenant, mv, "model_card", key)
        return ModelCardFile(mv.model_name, mv.version, markdown, key, sha256)

    # -- DeleteVersion -------------------------------------------------------------------------
    async def delete_version(self, tenant: str, actor: str, model_name: str, version: int,
                             reason: str = "") -> ModelVersion:
        """Mark a version deleted (`core.check_deletable`): hidden from reads and lists, its row,
        artifacts and number kept; announced as ModelVersionDeleted (the audit keeps it)."""
        _required("model_name", model_name)
        if version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version to delete)")
        if len(reason) > 4000:
            raise InvalidArgument("reason", "at most 4000 characters")
        return await self.outbox.transact(self._delete_version, tenant, actor, model_name,
                                          version, reason, core.now_iso())

    def _delete_version(self, u: Unit, tenant: str, actor: str, model_name: str, version: int,
                        reason: str, now: str) -> ModelVersion:
        mv = u.get_version(tenant, model_name, version)
        if mv is None:
            raise NotFound(f"model {model_name} has no version {version}")
        core.check_deletable(mv, u.aliases_of(tenant, model_name))
        u.delete_version(mv, actor, now)
        self.outbox.add(u, ModelVersionDeleted(ref=mv.ref, model_name=model_name,
                                               version=version, stage=mv.stage.value,
                                               reason=reason), tenant=tenant, actor=actor)
        log.info("deleted %s (tenant %s, by %s)", mv.ref, tenant, actor)
        return replace(mv, deleted_at=now)

    # -- tags and descriptions -----------------------------------------------------------------
    async def update_model(self, tenant: str, name: str, description: str | None = None,
                           set_tags: dict[str, str] | None = None,
                           remove_tags: list[str] | None = None) -> Model:
        """Set a model's description (None: unchanged) and tags; remove the tags named."""
        _required("name", name)
        core.check_description(description)

        def update(u: Unit) -> Model:
            model = u.model(tenant, name)
            if model is None:
                raise NotFound(f"model {name} not found")
            changed = replace(
                model, tags=core.updated_tags(model.tags, set_tags or {}, remove_tags or []),
                description=model.description if description is None else description)
            u.save_model(changed)
            return changed

        return await self.store.in_unit(update)

    async def update_version(self, tenant: str, model_name: str, version: int,
                             description: str | None = None,
                             set_tags: dict[str, str] | None = None,
                             remove_tags: list[str] | None = None) -> ModelVersion:
        """Set a version's description (None: unchanged) and tags; remove the tags named."""
        _required("model_name", model_name)
        if version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version)")
        core.check_description(description)

        def update(u: Unit, now: str) -> ModelVersion:
            mv = u.get_version(tenant, model_name, version)
            if mv is None:
                raise NotFound(f"model {model_name} has no version {version}")
            changed = replace(
                mv, tags=core.updated_tags(mv.tags, set_tags or {}, remove_tags or []),
                description=mv.description if description is None else description,
                updated_at=now)
            u.save_version(changed)
            return changed

        return await self.store.in_unit(update, core.now_iso())

    # -- aliases -------------------------------------------------------------------------------
    async def set_alias(self, tenant: str, actor: str, model_name: str, alias: str,
                        version: int) -> Model:
        """Point `alias` at `version` (ModelAliasMoved when it moves; setting it where it is
        changes and announces nothing)."""
        _required("model_name", model_name)
        core.check_alias(alias)
        if version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version the alias names)")
        return await self.outbox.transact(self._move_alias, tenant, actor, model_name, alias,
                                          version, core.now_iso())

    async def delete_alias(self, tenant: str, actor: str, model_name: str, alias: str) -> Model:
        _required("model_name", model_name)
        _required("alias", alias)
        return await self.outbox.transact(self._move_alias, tenant, actor, model_name, alias, 0,
                                          core.now_iso())

    def _move_alias(self, u: Unit, tenant: str, actor: str, model_name: str, alias: str,
                    version: int, now: str) -> Model:
        model = u.model(tenant, model_name)
        if model is None:
            raise NotFound(f"model {model_name} not found")
        previous = model.aliases.get(alias, 0)
        if not version and not previous:
            raise NotFound(f"model {model_name} has no alias {alias!r}")
        if version and not any(v.version == version for v in model.versions):
            raise NotFound(f"model {model_name} has no version {version}")
        if previous == version:
            return model
        u.set_alias(tenant, model_name, alias, version, actor, now)
        self.outbox.add(u, ModelAliasMoved(model_name=model_name, alias=alias, version=version,
                                           previous_version=previous),
                        tenant=tenant, actor=actor)
        log.info("alias %s@%s: v%d -> v%d (tenant %s, by %s)", model_name, alias, previous,
                 version, tenant, actor)
        moved = u.model(tenant, model_name)
        assert moved is not None
        return moved

    # -- DownloadArtifact ----------------------------------------------------------------------
    async def download_artifact(self, tenant: str, model_name: str, version: int,
                                artifact: str) -> AsyncGenerator[ArtifactChunk, None]:
        """The files of a version's artifact as listed in its manifest, then the manifest, in
        chunks of at most 1 MiB read in a worker thread. The key comes from the version record
        of `tenant`, never from the caller. A file that does not match the manifest raises
        CorruptArtifact once its last chunk is out; the caller must drop what it got."""
        if artifact not in DOWNLOADABLE_ARTIFACTS:
            raise InvalidArgument("artifact", f"must be one of {', '.join(DOWNLOADABLE_ARTIFACTS)}")
        mv = await self.get_version(tenant, model_name, version)
        key = mv.artifacts.get(artifact)
        if not key:
            raise NotFound(f"{mv.ref} has no {artifact} artifact")
        try:
            check_tenant_key(key, tenant)  # a record from before the tenant-bounded layout
        except InvalidKey as e:
            raise FailedPrecondition(f"{mv.ref}: {e}") from None
        if self.artifacts is None:
            raise FailedPrecondition("this registry is not connected to the artifact store")
        store, prefix = self.artifacts, key.rstrip("/") + "/"
        try:
            raw = await asyncio.to_thread(store.get_bytes, prefix + MANIFEST)
        except ArtifactNotFound:
            raise FailedPrecondition(
                f"{mv.ref}: its {artifact} has no {MANIFEST}: incomplete artifact") from None
        for file in manifest_files(raw, store.uri(prefix + MANIFEST)):
            yield ArtifactChunk(b"", file)
            async for data in _verified_chunks(store, prefix + file.path, file):
                yield ArtifactChunk(data)
        yield ArtifactChunk(raw, ArtifactFile(MANIFEST, len(raw), hashlib.sha256(raw).hexdigest()))

    # -- SetStage ----------------------------------------------------------------------------
    async def set_stage(
        self, tenant: str, actor: str, asked: StageRequest, idempotency_key: str = "",
        requester: str = "",
    ) -> ModelVersion:
        """Move a version to a stage (see `core` for the lifecycle).

        The version must be named (>= 1): a stage change is a deliberate act on one version, and
        "latest" may change under the caller. A retry with the same idempotency key returns the
        version without applying the request again, even if its stage moved on since; reusing a
        key for another request is INVALID_ARGUMENT.

        A stage the tenant's policy gates is reached only through an approved promotion
        request: one approved but not applied is applied here; else the open request for it
        (or one filed now, by `requester`) is awaited for `decision_wait_s`, and unless
        governance approves it, FAILED_PRECONDITION names the unmet rules."""
        _required("model_name", asked.model_name)
        if asked.version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version to move)")
        try:
            return await self.outbox.transact(
                self._set_stage, tenant, actor, asked, idempotency_key, core.now_iso())
        except _Gated as gated:
            promotion = gated.promotion
        # A gated stage: through a promotion request (the open one, or one filed now), applied
        # by the decision handler once governance approves it.
        if promotion is None:
            promotion = await self.request_promotion(
                tenant, requester or actor, actor, asked, "SetStage")
        decided = await self._await_decision(tenant, promotion)
        if decided.status != core.APPLIED:
            raise FailedPrecondition(core.refusal(decided))
        return await self.get_version(tenant, asked.model_name, asked.version)

    def _set_stage(
        self, u: Unit, tenant: str, actor: str, asked: StageRequest, key: str, now: str
    ) -> ModelVersion:
        earlier = u.stage_request(tenant, key) if key else None
        if earlier is not None:
            core.check_same_request(earlier, asked)
            replayed = u.get_version(tenant, asked.model_name, asked.version)
            assert replayed is not None, "a recorded stage request names a stored version"
            return replayed
        versions = u.versions_of(tenant, asked.model_name)
        if not versions:
            raise NotFound(f"model {asked.model_name} not found")
        current = next((v for v in versions if v.version == asked.version), None)
        if current is not None and current.stage != asked.stage and \
                asked.stage.value in u.gated_stages(tenant):
            core.check_transition(current.stage, asked.stage)
            requests = [p for p in u.promotions_of(tenant, asked.model_name, asked.version)
                        if p.stage == asked.stage]
            approved = next((p for p in requests if p.status == core.APPROVED), None)
            if approved is None:
                raise _Gated(next((p for p in requests if p.status in core.OPEN), None))
            u.save_promotion(replace(approved, status=core.APPLIED, updated_at=now))
        moved = self._move(u, tenant, actor, versions, asked, now)
        if key:
            u.add_stage_request(tenant, key, asked, now)
        return moved

    def _move(self, u: Unit, tenant: str, actor: str, versions: list[ModelVersion],
              asked: StageRequest, now: str) -> ModelVersion:
        moved, changes = core.plan_stage_change(versions, asked.version, asked.stage, now)
        for change in changes:
            u.save_version(change.version)
            self.outbox.add(
                u,
                ModelStageChanged(
                    ref=change.version.ref, model_name=asked.model_name,
                    version=change.version.version,
                    from_stage=change.from_stage.value, to_stage=change.to_stage.value,
                ),
                tenant=tenant, actor=actor,
            )
        return moved

    async def _await_decision(self, tenant: str, promotion: Promotion) -> Promotion:
        """The request once governance decided it (or as it is after `decision_wait_s`)."""
        deadline = time.monotonic() + self.decision_wait_s
        while True:
            now = await self.store.in_unit(Unit.promotion, tenant, promotion.request_id)
            promotion = now or promotion
            if promotion.status != core.PENDING or time.monotonic() >= deadline:
                return promotion
            await asyncio.sleep(0.1)

    # -- RequestPromotion ----------------------------------------------------------------------
    async def request_promotion(
        self, tenant: str, requester: str, actor: str, asked: StageRequest,
        justification: str = "", idempotency_key: str = "",
    ) -> Promotion:
        """File a request to move a version to a stage under the tenant's policy
        (ModelPromotionRequested, with the evidence governance checks). While one for the same
        version and stage is open, that one is returned; a retry with the same idempotency key
        returns its request."""
        _required("model_name", asked.model_name)
        if asked.version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version to promote)")
        if len(justification) > 4000:
            raise InvalidArgument("justification", "at most 4000 characters")
        mv = await self.get_version(tenant, asked.model_name, asked.version)
        evidence = await self._evidence(tenant, mv)
        return await self.outbox.transact(
            self._request_promotion, tenant, requester, actor, asked, justification,
            idempotency_key, evidence, core.now_iso())

    def _request_promotion(
        self, u: Unit, tenant: str, requester: str, actor: str, asked: StageRequest,
        justification: str, key: str, evidence: Evidence, now: str,
    ) -> Promotion:
        earlier = u.promotion_by_key(tenant, key) if key else None
        if earlier is not None:
            core.check_same_request(
                StageRequest(earlier.model_name, earlier.version, earlier.stage), asked)
            return earlier
        versions = u.versions_of(tenant, asked.model_name)
        if not versions:
            raise NotFound(f"model {asked.model_name} not found")
        target = core.check_promotable(versions, asked.version, asked.stage)
        open_ = [p for p in u.open_promotions_of(tenant, asked.model_name, asked.version)
                 if p.stage == asked.stage]
        if open_:
            return open_[0]
        promotion = Promotion(
            request_id=f"pr-{uuid.uuid4().hex[:16]}", tenant=tenant, model_name=asked.model_name,
            version=asked.version, stage=asked.stage, from_stage=target.stage,
            justification=justification, requester=requester, status=core.PENDING,
            created_at=now, updated_at=now)
        u.add_promotion(promotion, key)
        production = next((v for v in versions if v.stage == Stage.PRODUCTION), None)
        self.outbox.add(u, _requested(promotion, target, evidence, production, "requested"),
                        tenant=tenant, actor=actor)
        log.info("promotion %s: %s -> %s requested by %s", promotion.request_id, target.ref,
                 asked.stage, requester)
        return promotion

    async def get_promotion(self, tenant: str, request_id: str) -> Promotion:
        p = await self.store.in_unit(Unit.promotion, tenant, _required("request_id", request_id))
        if p is None:
            raise NotFound(f"promotion request {request_id!r} not found")
        return p

    async def _evidence(self, tenant: str, mv: ModelVersion) -> Evidence:
        """The evaluation's suite and intervals and the dataset's PII report, from the store."""
        eval_report = await self._read_json(tenant, mv.artifacts.get("eval_report", ""))
        dataset_report = await self._read_json(tenant, mv.lineage.get("dataset_report_key", ""))
        return core.evidence_from_reports(eval_report, dataset_report,
                                          bool(mv.lineage.get("evaluation_id")))

    async def _read_json(self, tenant: str, key: str) -> dict[str, Any] | None:
        if not key or self.artifacts is None:
            return None
        try:
            check_tenant_key(key, tenant)
            doc = json.loads(await asyncio.to_thread(self.artifacts.get_bytes, key))
        except (ArtifactNotFound, InvalidKey, ValueError, OSError) as e:
            log.warning("promotion evidence: cannot read %s: %s", key, e)
            return None
        return doc if isinstance(doc, dict) else None

    # -- governance's decisions ----------------------------------------------------------------
    async def apply_decision(self, tenant: str, decision: PolicyDecided) -> Promotion | None:
        """Record governance's decision on a request; an approved one moves the version (as
        SetStage does: ModelStageChanged). Idempotent."""
        return await self.outbox.transact(self._apply_decision, tenant, decision,
                                          core.now_iso())

    def _apply_decision(self, u: Unit, tenant: str, d: PolicyDecided, now: str
                        ) -> Promotion | None:
        p = u.promotion(tenant, d.request_id)
        if p is None:
            log.warning("decision on unknown promotion request %s (tenant %s)", d.request_id,
                        tenant)
            return None
        if p.status == core.APPLIED:
            return p
        unmet = tuple(str(v.get("message", "")) for v in d.verdicts if not v.get("ok"))
        status = d.status
        if status == core.APPROVED:
            versions = u.versions_of(tenant, p.model_name)
            try:
                self._move(u, tenant, p.requester, versions,
                           StageRequest(p.model_name, p.version, p.stage), now)
                status = core.APPLIED
            except (FailedPrecondition, NotFound) as e:
                log.warning("approved %s cannot be applied now: %s", p.request_id, e)
        decided = replace(p, status=status, unmet=unmet, policy_version=d.policy_version,
                          updated_at=now)
        u.save_promotion(decided)
        return decided

    async def apply_policy_change(self, tenant: str, change: PolicyChanged) -> None:
        await self.store.in_unit(Unit.set_gated_stages, tenant, change.version,
                                 list(change.gated_stages), core.now_iso())

    async def refresh_open_requests(self, tenant: str, mv: ModelVersion) -> int:
        """The version's evaluation changed: send governance the new evidence of each of its
        open requests (same request id, reason "evaluated"); how many."""
        open_ = await self.store.in_unit(Unit.open_promotions_of, tenant, mv.model_name,
                                         mv.version)
        if not open_:
            return 0
        evidence = await self._evidence(tenant, mv)
        return await self.outbox.transact(self._refresh, tenant, mv, evidence)

    def _refresh(self, u: Unit, tenant: str, mv: ModelVersion, evidence: Evidence) -> int:
        versions = u.versions_of(tenant, mv.model_name)
        current = next(v for v in versions if v.version == mv.version)
        production = next((v for v in versions if v.stage == Stage.PRODUCTION), None)
        open_ = u.open_promotions_of(tenant, mv.model_name, mv.version)
        for p in open_:
            self.outbox.add(u, _requested(p, current, evidence, production, "evaluated"),
                            tenant=tenant, actor=p.requester)
        return len(open_)

    # -- from events -------------------------------------------------------------------------
    async def register_job(self, tenant: str, actor: str, job: JobCompleted) -> ModelVersion:
        """The version a finished job registers; a redelivered job finds the one it made."""
        trace_id = job.trace_id or telemetry.current_trace_id()
        return await self.outbox.transact(
            self._register_job, tenant, actor, job, trace_id, core.now_iso())

    def _register_job(
        self, u: Unit, tenant: str, actor: str, job: JobCompleted, trace_id: str, now: str
    ) -> ModelVersion:
        known = u.version_by_job(tenant, job.job_id)
        if known is not None:
            return known
        mv = core.version_from_job(
            tenant, job, u.next_version(tenant, job.model_name), trace_id, now)
        u.add_version(mv)
        self.outbox.add(
            u,
            ModelVersionRegistered(
                ref=mv.ref, model_name=mv.model_name, version=mv.version,
                job_id=job.job_id, dataset_sha256=job.dataset_sha256,
            ),
            tenant=tenant, actor=actor,
        )
        log.info("registered %s for job %s (tenant %s)", mv.ref, job.job_id, tenant)
        return mv

    async def attach_evaluation(self, tenant: str, ev: EvalCompleted) -> ModelVersion:
        """Attach an evaluation to its job's version (idempotent); raises
        VersionNotRegisteredYet while the job's version is not there."""
        mv = await self.store.in_unit(self._attach_evaluation, tenant, ev, core.now_iso())
        log.info("attached evaluation %s to %s", ev.evaluation_id, mv.ref)
        await self.refresh_open_requests(tenant, mv)  # governance re-evaluates open requests
        return mv

    @staticmethod
    def _attach_evaluation(u: Unit, tenant: str, ev: EvalCompleted, now: str) -> ModelVersion:
        mv = u.version_by_job(tenant, ev.job_id)
        if mv is None:
            raise VersionNotRegisteredYet(
                f"no model version for job {ev.job_id} (tenant {tenant}) yet")
        evaluated = core.with_evaluation(mv, ev, now)
        u.save_version(evaluated)
        return evaluated


def _requested(p: Promotion, mv: ModelVersion, evidence: Evidence,
               production: ModelVersion | None, reason: str) -> ModelPromotionRequested:
    return ModelPromotionRequested(
        request_id=p.request_id, ref=mv.ref, model_name=mv.model_name, version=mv.version,
        from_stage=p.from_stage.value, to_stage=p.stage.value, justification=p.justification,
        requester=p.requester, metrics=mv.metrics,
        evaluation_id=mv.lineage.get("evaluation_id", ""),
        evaluation_suites=list(evidence.evaluation_suites), intervals=evidence.intervals,
        dataset_id=mv.lineage.get("dataset_id", ""),
        dataset_sha256=mv.lineage.get("dataset_sha256", ""),
        dataset_report=evidence.dataset_report, dataset_pii_rows=evidence.dataset_pii_rows,
        dataset_pii_counts=evidence.dataset_pii_counts,
        production_version=production.version if production else 0,
        production_metrics=production.metrics if production else {}, reason=reason)


@dataclass(frozen=True)
class ModelCardFile:
    model_name: str
    version: int
    markdown: str
    artifact_key: str
    sha256: str


def _same_bytes(store: ArtifactStore, key: str, sha256: str) -> bool:
    try:
        return hashlib.sha256(store.get_bytes(key)).hexdigest() == sha256
    except ArtifactNotFound:
        return False


def _name_artifact(u: Unit, tenant: str, mv: ModelVersion, name: str, key: str) -> None:
    """Record `key` as the version's artifact `name` (its other fields as stored now)."""
    current = u.get_version(tenant, mv.model_name, mv.version)
    if current is not None:
        u.save_version(replace(current, artifacts={**current.artifacts, name: key}))


def manifest_files(raw: bytes, uri: str) -> list[ArtifactFile]:
    """The files a stored manifest lists; CorruptArtifact if it is malformed or names a path
    outside its folder."""
    try:
        files = [ArtifactFile(validate_key(e["path"]), int(e["size"]), str(e["sha256"]))
                 for e in json.loads(raw)["files"]]
    except (ValueError, KeyError, TypeError, InvalidKey) as e:
        raise CorruptArtifact(f"{uri} is malformed: {e}") from None
    if any(f.path == MANIFEST for f in files):
        raise CorruptArtifact(f"{uri} lists itself")
    return files


async def _verified_chunks(store: ArtifactStore, key: str,
                           file: ArtifactFile) -> AsyncGenerator[bytes, None]:
    """The object's bytes in slices of at most CHUNK, each read (and hashed) in a worker thread;
    CorruptArtifact after the last one if it is missing or does not match `file`."""
    try:
        stream = await asyncio.to_thread(store.open_stream, key)
    except ArtifactNotFound:
        raise CorruptArtifact(f"{store.uri(key)} is listed in {MANIFEST} but missing") from None
    digest, size = hashlib.sha256(), 0

    def read() -> bytes | None:
        data = next(stream, None)
        if data is not None:
            digest.update(data)
        return data

    try:
        while (data := await asyncio.to_thread(read)) is not None:
            size += len(data)
            for start in range(0, len(data), CHUNK):
                yield data[start:start + CHUNK]
    finally:
        await asyncio.to_thread(_close, stream)
    if (size, digest.hexdigest()) != (file.size, file.sha256):
        raise CorruptArtifact(
            f"{store.uri(key)}: sha256 {digest.hexdigest()} size {size}, {MANIFEST} says "
            f"sha256 {file.sha256} size {file.size}")


def _close(stream: Iterator[bytes]) -> None:
    close = getattr(stream, "close", None)  # a generator: closes its file or S3 response
    if close is not None:
        close()


def _required(field: str, value: str) -> str:
    if not value.strip():
        raise InvalidArgument(field, "required")
    return value
