"""DatasetService over gRPC: translate requests to the domain, store, announce on the bus."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime

from llmstudio.auth import Principal, current_principal
from llmstudio.bus import Bus
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound
from llmstudio.events import DatasetRegistered, DatasetRejected
from llmstudio.storage import ArtifactStore
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc

from . import core
from .files import write_files
from .store import DatasetRecord, DatasetStore, DuplicateIdempotencyKey


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_proto(record: DatasetRecord) -> datasets_pb2.Dataset:
    return datasets_pb2.Dataset(
        id=record.id,
        name=record.name,
        tenant=record.tenant,
        sha256=record.sha256,
        format=record.format,
        num_rows=record.num_rows,
        train_rows=record.train_rows,
        validation_rows=record.validation_rows,
        artifacts=record.artifacts,
        created_at=record.created_at,
        created_by=record.created_by,
    )


async def announce(bus: Bus, store: DatasetStore, record: DatasetRecord) -> None:
    """Publish DatasetRegistered, then remember it was published (a crash in between means
    it is published again on the next start: downstream handlers are idempotent)."""
    event = DatasetRegistered(
        dataset_id=record.id,
        name=record.name,
        sha256=record.sha256,
        format=record.format,
        num_rows=record.num_rows,
        train_rows=record.train_rows,
        validation_rows=record.validation_rows,
        artifacts=record.artifacts,
    )
    await bus.publish(event, tenant=record.tenant, actor=record.created_by)
    await asyncio.to_thread(store.mark_announced, record.id)


class DatasetApi(datasets_pb2_grpc.DatasetServiceServicer):
    PERMISSIONS = {"CreateDataset": "write", "GetDataset": "read", "ListDatasets": "read"}

    def __init__(self, store: DatasetStore, artifacts: ArtifactStore, bus: Bus):
        self.store, self.artifacts, self.bus = store, artifacts, bus

    async def CreateDataset(self, request: datasets_pb2.CreateDatasetRequest, context):
        principal = current_principal()
        key = request.idempotency_key
        fingerprint = core.request_fingerprint(
            request.name, request.content, request.validation_fraction, request.seed
        )
        if key:
            done = await asyncio.to_thread(self.store.by_idempotency_key, principal.tenant, key)
            if done:
                return await self._replay(done, fingerprint)
        try:
            prepared = await asyncio.to_thread(
                core.prepare, request.name, request.content, request.filename,
                request.validation_fraction, request.seed,
            )
        except core.Rejected as e:
            await self._reject(principal, request.name, e.rejection)
            raise InvalidArgument("", str(e)) from None

        prefix = core.split_prefix(prepared.sha256, request.validation_fraction, request.seed)
        artifacts = await asyncio.to_thread(
            write_files, self.artifacts, request.content, prepared, prefix
        )
        record = DatasetRecord(
            id="ds-" + secrets.token_hex(6),
            tenant=principal.tenant,
            name=request.name,
            sha256=prepared.sha256,
            format=prepared.format,
            num_rows=len(prepared.rows),
            train_rows=prepared.counts["train"],
            validation_rows=prepared.counts["validation"],
            artifacts=artifacts,
            split_sha256=prepared.split_sha256,
            validation_fraction=request.validation_fraction or core.DEFAULT_VALIDATION_FRACTION,
            seed=request.seed,
            created_at=utc_now(),
            created_by=principal.key_id,
            idempotency_key=key or None,
            request_sha256=fingerprint,
        )
        try:
            await asyncio.to_thread(self.store.add, record)
        except DuplicateIdempotencyKey:  # a concurrent call with the same key won the race
            done = await asyncio.to_thread(self.store.by_idempotency_key, principal.tenant, key)
            return await self._replay(done, fingerprint)
        await announce(self.bus, self.store, record)
        return to_proto(record)

    async def _replay(self, record: DatasetRecord, fingerprint: str) -> datasets_pb2.Dataset:
        if record.request_sha256 != fingerprint:
            raise FailedPrecondition(
                f"idempotency_key {record.idempotency_key!r} was already used for another "
                f"request (dataset {record.id}); use a new key for different content or settings"
            )
        if not record.announced:
            await announce(self.bus, self.store, record)
        return to_proto(record)

    async def _reject(self, principal: Principal, name: str, rejection: core.Rejection) -> None:
        # An invalid name may hold characters a subject token can't: name the upload 'unnamed'.
        ref = "unnamed" if core.name_error(name) else name
        event = DatasetRejected(ref=ref, reason=rejection.summary(), errors=rejection.errors)
        await self.bus.publish(event, tenant=principal.tenant, actor=principal.key_id)

    async def GetDataset(self, request: datasets_pb2.GetDatasetRequest, context):
        if not request.id:
            raise InvalidArgument("id", "required")
        record = await asyncio.to_thread(self.store.get, current_principal().tenant, request.id)
        if record is None:
            raise NotFound(f"dataset {request.id} not found")
        return to_proto(record)

    async def ListDatasets(self, request: datasets_pb2.ListDatasetsRequest, context):
        records = await asyncio.to_thread(
            self.store.list, current_principal().tenant, request.name
        )
        return datasets_pb2.ListDatasetsResponse(datasets=[to_proto(r) for r in records])
