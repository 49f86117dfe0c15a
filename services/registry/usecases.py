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
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

from llmstudio import telemetry
from llmstudio.artifactkeys import InvalidKey, check_tenant_key, validate_key
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound
from llmstudio.events import EvalCompleted, JobCompleted, ModelStageChanged, ModelVersionRegistered
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
from .core import Model, ModelVersion, StageRequest
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


class Registry:
    def __init__(self, store: RegistryStore, outbox: Outbox,
                 artifacts: ArtifactStore | None = None):
        self.store = store
        self.outbox = outbox
        self.artifacts = artifacts

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

    async def get_version(self, tenant: str, model_name: str, version: int) -> ModelVersion:
        """`version` 0 is the latest."""
        _required("model_name", model_name)
        if version < 0:
            raise InvalidArgument("version", "must be >= 1, or 0 for the latest")
        mv = await self.store.in_unit(Unit.get_version, tenant, model_name, version)
        if mv is None:
            what = f"version {version}" if version else "any version"
            raise NotFound(f"model {model_name} has no {what}")
        return mv

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
        self, tenant: str, actor: str, asked: StageRequest, idempotency_key: str = ""
    ) -> ModelVersion:
        """Move a version to a stage (see `core` for the lifecycle).

        The version must be named (>= 1): a stage change is a deliberate act on one version, and
        "latest" may change under the caller. A retry with the same idempotency key returns the
        version without applying the request again, even if its stage moved on since; reusing a
        key for another request is INVALID_ARGUMENT."""
        _required("model_name", asked.model_name)
        if asked.version < 1:
            raise InvalidArgument("version", "must be >= 1 (name the version to move)")
        return await self.outbox.transact(
            self._set_stage, tenant, actor, asked, idempotency_key, core.now_iso())

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
        if key:
            u.add_stage_request(tenant, key, asked, now)
        return moved

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
