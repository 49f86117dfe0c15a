"""The dataset service's use cases: make a version (upload, streamed upload, import, derive),
check a submitted job's dataset, and the reads (get, list, report, preview).

Every way in ends in `_create`: the source is on local disk (spooled upload, import, parent
rows), `ingest.ingest` runs on the service's own ingest threads, the files are stored, then the
version's row and its DatasetRegistered are written in one transaction (`outbox.transact`) and
published after the commit. A rejection stores nothing and announces DatasetRejected. The
outbox defers failed publishes: a stored version is reported as made, and the background loop
publishes its event once NATS is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from llmstudio.auth import Principal
from llmstudio.config import Settings
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmstudio.events import (
    DatasetRegistered,
    DatasetRejected,
    DatasetValidated,
    EventData,
    JobSubmitted,
)
from llmstudio.outbox import Outbox, now_iso
from llmstudio.paging import Paged
from llmstudio.storage import ArtifactStore

from . import core, ingest
from .core import DatasetRecord
from .files import read_lines, split_problems, write_files
from .sources import PathSource, check_model_dir, fetch_s3, parse_source
from .spool import Spool, TenantUploads, receive
from .store import VERSIONS, DatasetStore, Unit

log = logging.getLogger(__name__)
PREVIEW_DEFAULT_ROWS, PREVIEW_MAX_ROWS, PREVIEW_DEFAULT_LENGTH = 5, 100, 2048
VERSION_ATTEMPTS = 10  # concurrent versions of one name, each taking the next number


@dataclass(frozen=True)
class NewVersion:
    """What an upload or import asks for: how to ingest, and the version's own fields."""

    options: ingest.Options
    idempotency_key: str = ""
    description: str = ""


@dataclass(frozen=True)
class Derivation:
    """A new version of `parent_id`: cleaned (quality) and/or split again (resplit)."""

    parent_id: str
    name: str = ""  # "" = the parent's
    quality: ingest.Quality = ingest.Quality()
    resplit: bool = False
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0
    idempotency_key: str = ""
    description: str = ""


@dataclass(frozen=True)
class Source:
    """What `_create` ingests: a local path and its story."""

    path: Path
    content_sha256: str  # identifies the request's content for idempotency ("" = none)
    transformation: str
    raw: Path | None = None  # stored as the version's "raw" artifact
    parent: DatasetRecord | None = None


@dataclass(frozen=True)
class PreviewRow:
    index: int
    row_json: str
    rendered: str
    learned: str
    num_tokens: int
    learned_tokens: int
    truncated: bool


@dataclass(frozen=True)
class Preview:
    split: str
    split_rows: int
    rows: list[PreviewRow]


class Datasets:
    def __init__(self, store: DatasetStore, outbox: Outbox, artifacts: ArtifactStore,
                 settings: Settings):
        self.store, self.outbox, self.artifacts, self.settings = store, outbox, artifacts, settings
        self.spool = Spool(settings.dataset_work_dir or Path(settings.data_dir) / "spool")
        self.ingest_slots = asyncio.Semaphore(settings.dataset_max_concurrent_ingests)
        self.uploads = TenantUploads(settings.dataset_max_uploads_per_tenant,
                                     settings.dataset_tenant_spool_bytes)
        # Its own threads: long ingests never take the threads reads and handlers use.
        self.ingest_pool = ThreadPoolExecutor(settings.dataset_max_concurrent_ingests,
                                              thread_name_prefix="ingest")
        self.limits = ingest.Limits(
            max_expanded_bytes=settings.dataset_max_expanded_bytes,
            max_line_bytes=settings.dataset_max_line_bytes,
            near_duplicate_max_rows=settings.dataset_near_duplicate_max_rows,
        )

    def close(self) -> None:
        self.ingest_pool.shutdown(wait=False, cancel_futures=True)

    # -- ways in --------------------------------------------------------------------------------

    async def upload(self, caller: Principal, new: NewVersion, content: bytes) -> DatasetRecord:
        """A file sent in one message: any problem with it, its options' included, is a
        rejection (DatasetRejected)."""
        with self.spool.workdir() as work:
            spooled = work / "upload"
            await asyncio.to_thread(spooled.write_bytes, content)
            sha256 = hashlib.sha256(content).hexdigest()
            return await self._create_uploaded(caller, new, spooled, sha256, work)

    async def upload_stream(self, caller: Principal, new: NewVersion,
                            chunks: AsyncIterator[bytes]) -> DatasetRecord:
        """A file sent in chunks, spooled as they come. Its options are checked before a byte
        is spooled: a bad request costs no transfer."""
        if errors := new.options.errors():
            raise InvalidArgument("", "; ".join(errors))
        self._check_ingest_slot()  # a busy service refuses before the transfer, not after it
        with self.uploads.admit(caller.tenant) as take, self.spool.workdir() as work:
            spooled = work / "upload"
            sha256 = await receive(chunks, spooled, self.settings.dataset_max_upload_bytes, take)
            return await self._create_uploaded(caller, new, spooled, sha256, work)

    async def _create_uploaded(self, caller: Principal, new: NewVersion, spooled: Path,
                               sha256: str, work: Path) -> DatasetRecord:
        transformation = core.transformation("upload", **_upload_params(new.options))
        return await self._create(caller, new, Source(spooled, sha256, transformation,
                                                      raw=spooled), work)

    async def import_from(self, caller: Principal, new: NewVersion,
                          source_uri: str) -> DatasetRecord:
        """A file the server reads itself: an S3 object or a path under the import roots."""
        s = self.settings
        where = parse_source(source_uri, s.dataset_import_buckets, s.dataset_import_roots)
        with self.spool.workdir() as work:
            if isinstance(where, PathSource):
                path, raw = where.path, None  # read in place: the file stays where it is
            else:
                path = raw = work / "import"
                await asyncio.to_thread(fetch_s3, s, where, path)
            new = replace(new, options=replace(new.options,
                                               filename=new.options.filename or where.name))
            transformation = core.transformation(
                "import", source=source_uri, **_upload_params(new.options))
            # Idempotency of an import is by URI: a retry with the same key and URI returns
            # the version the first call made, even if the object changed since.
            content = hashlib.sha256(source_uri.encode()).hexdigest()
            return await self._create(caller, new, Source(path, content, transformation, raw=raw),
                                      work)

    async def derive(self, caller: Principal, d: Derivation) -> DatasetRecord:
        if not d.parent_id:
            raise InvalidArgument("parent_id", "required")
        parent = await self.get(caller.tenant, d.parent_id)
        q = d.quality
        if not (q.remove_duplicates or q.remove_near_duplicates or q.redact_pii or d.resplit):
            raise InvalidArgument("quality", "nothing to derive: ask for remove_duplicates, "
                                             "remove_near_duplicates, redact_pii or resplit")
        split = ((d.validation_fraction, d.test_fraction, d.seed) if d.resplit
                 else (parent.validation_fraction, parent.test_fraction, parent.seed))
        options = ingest.Options(
            name=d.name or parent.name, filename=f"{parent.id}.jsonl", file_format="jsonl",
            schema=core.schema_of_format(parent.format), validation_fraction=split[0],
            test_fraction=split[1], seed=split[2], quality=q,
        )
        transformation = core.transformation(
            "derive", parent=parent.id, remove_duplicates=q.remove_duplicates,
            remove_near_duplicates=q.remove_near_duplicates, redact_pii=q.redact_pii,
            resplit=d.resplit,
            **({"validation_fraction": split[0], "test_fraction": split[1], "seed": split[2]}
               if d.resplit else {}),
        )
        new = NewVersion(options, d.idempotency_key, d.description)
        with self.spool.workdir() as work:
            rows = work / "parent.jsonl"
            await asyncio.to_thread(self.artifacts.download_file, parent.artifacts["rows"], rows)
            source = Source(rows, parent.sha256, transformation, parent=parent)
            return await self._create(caller, new, source, work)

    # -- the one path ---------------------------------------------------------------------------

    async def _create(self, caller: Principal, new: NewVersion, source: Source,
                      work: Path) -> DatasetRecord:
        options, key = new.options, new.idempotency_key
        fingerprint = core.request_fingerprint(
            options.name, options.fractions, options.seed, source.transformation,
            options.policy, options.base_model, options.max_length,
            content_sha256=source.content_sha256,
        )
        if key:
            done = await self.store.in_unit(Unit.by_idempotency_key, caller.tenant, key)
            if done:
                return _replayed(done, fingerprint)
        counter = None
        if options.base_model:
            from .tokens import load_tokenizer, token_counter

            check_model_dir(options.base_model, self.settings.dataset_model_roots)
            counter = token_counter(await asyncio.to_thread(load_tokenizer, options.base_model))
        try:
            ingested = await self._ingest(source.path, options, work / "out", counter)
        except ingest.Rejected as e:
            await self._reject(caller, options.name, e.rejection)
            raise InvalidArgument("", str(e)) from None
        dataset_id = "ds-" + secrets.token_hex(6)
        prefix = core.split_prefix(caller.tenant, ingested.sha256, options.validation_fraction,
                                   options.seed, options.test_fraction)
        # A redacted version must not link to the unredacted upload.
        raw = None if options.quality.redact_pii else source.raw
        artifacts = await asyncio.to_thread(
            write_files, self.artifacts, caller.tenant, ingested, dataset_id, prefix, raw)
        record = DatasetRecord(
            id=dataset_id, tenant=caller.tenant, name=options.name, sha256=ingested.sha256,
            format=ingested.format, num_rows=ingested.num_rows,
            train_rows=ingested.counts["train"], validation_rows=ingested.counts["validation"],
            test_rows=ingested.counts.get("test", 0), artifacts=artifacts,
            split_sha256=ingested.split_sha256, validation_fraction=options.fractions["validation"],
            test_fraction=options.test_fraction, seed=options.seed, created_at=now_iso(),
            created_by=caller.key_id, parent_id=source.parent.id if source.parent else "",
            transformation=source.transformation, status=ingested.status,
            warnings=ingested.warnings, source_schema=ingested.source_schema,
            source_format=ingested.source_format, description=new.description,
            idempotency_key=key or None, request_sha256=fingerprint,
        )
        return await self._register(record, fingerprint)

    async def _ingest(self, path: Path, options: ingest.Options, out: Path,
                      counter: Callable[[dict], int] | None) -> ingest.Ingested:
        self._check_ingest_slot()
        out.mkdir()
        async with self.ingest_slots:
            # A cancelled call (client gone, deadline) stops its ingest too, so the slot it
            # frees is really free.
            cancelled = threading.Event()
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self.ingest_pool, partial(
                        ingest.ingest, path, options, out, self.limits,
                        token_counter=counter, should_stop=cancelled.is_set,
                        on_progress=lambda rows: log.info(
                            "dataset %s: %d rows read", options.name, rows)))
            except asyncio.CancelledError:
                cancelled.set()
                raise

    def _check_ingest_slot(self) -> None:
        if self.ingest_slots.locked():
            raise ResourceExhausted(
                f"{self.settings.dataset_max_concurrent_ingests} datasets are being ingested; "
                "retry in a moment (LLMSTUDIO_DATASET_MAX_CONCURRENT_INGESTS)")

    async def _register(self, record: DatasetRecord, fingerprint: str) -> DatasetRecord:
        """Store the version under the next number of its name, with its DatasetRegistered.
        A concurrent version of the same name that takes the number makes this one take the
        next; a concurrent call with the same idempotency key that wins is replayed."""
        tenant, name, key = record.tenant, record.name, record.idempotency_key
        for _ in range(VERSION_ATTEMPTS):
            version = await self.store.in_unit(Unit.latest_version, tenant, name) + 1
            record = replace(record, version=version)
            try:
                await self.outbox.transact(self._add, record)
                return record
            except IntegrityError:  # a unique key: who took it decides what to do
                log.info("dataset %s: version %d or its key taken by a concurrent call",
                         name, version)
                if key and (done := await self.store.in_unit(Unit.by_idempotency_key, tenant,
                                                             key)):
                    return _replayed(done, fingerprint)
                if await self.store.in_unit(Unit.latest_version, tenant, name) < version:
                    raise
        raise FailedPrecondition(f"dataset {name}: too many concurrent versions")

    def _add(self, u: Unit, record: DatasetRecord) -> None:
        u.add(record)
        self.outbox.add(u, registered(record), tenant=record.tenant, actor=record.created_by)

    async def _reject(self, caller: Principal, name: str, rejection: core.Rejection) -> None:
        # An invalid name may hold characters a subject token can't: name the upload 'unnamed'.
        ref = "unnamed" if core.name_error(name) else name
        event = DatasetRejected(ref=ref, reason=rejection.summary(), errors=rejection.errors)
        await self.outbox.transact(self._announce, event, caller.tenant, caller.key_id)

    def _announce(self, u: Unit, event: EventData, tenant: str, actor: str) -> None:
        self.outbox.add(u, event, tenant=tenant, actor=actor)

    # -- a submitted job's dataset ----------------------------------------------------------------

    async def check_job(self, tenant: str, actor: str, job: JobSubmitted) -> None:
        """A job's "validating_files" step: does its dataset exist for the job's tenant, can its
        objective train on the dataset's format, and do the stored split files still hash to
        what was recorded? Announces DatasetValidated or DatasetRejected. Idempotent: a
        redelivery checks again and announces the verdict again."""
        record = await self.store.in_unit(Unit.get, tenant, job.dataset_id)
        verdict = await asyncio.to_thread(self._verdict, record, job)
        await self.outbox.transact(self._announce, verdict, tenant, actor)

    def _verdict(self, record: DatasetRecord | None,
                 job: JobSubmitted) -> DatasetValidated | DatasetRejected:
        def rejected(reason: str, errors: list[str]) -> DatasetRejected:
            return DatasetRejected(ref=job.job_id, job_id=job.job_id, dataset_id=job.dataset_id,
                                   reason=reason, errors=errors)

        if record is None:
            return rejected(f"dataset {job.dataset_id} not found", [])
        mismatch = core.objective_error(job.spec.get("objective", "sft"), record.format)
        if mismatch:
            return rejected(f"dataset {job.dataset_id}: {mismatch}", [mismatch])
        problems = split_problems(self.artifacts, record.artifacts, record.split_sha256)
        if problems:
            return rejected(f"dataset {job.dataset_id}: {'; '.join(problems)}", problems)
        return DatasetValidated(job_id=job.job_id, dataset_id=record.id, sha256=record.sha256,
                                artifacts=record.artifacts)

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, tenant: str, dataset_id: str) -> DatasetRecord:
        if not dataset_id:
            raise InvalidArgument("id", "required")
        record = await self.store.in_unit(Unit.get, tenant, dataset_id)
        if record is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return record

    async def versions(self, tenant: str, name: str = "", page_size: int = 0,
                       page_token: str = "") -> Paged[DatasetRecord]:
        """A page of the tenant's versions, by name then version (default: the first 100)."""
        return await self.store.in_unit(Unit.versions, tenant, name,
                                        VERSIONS.page(page_size, page_token))

    async def report(self, tenant: str, dataset_id: str) -> dict[str, Any]:
        """The ingest report stored with the version (see `ingest._report`)."""
        record = await self.get(tenant, dataset_id)
        raw = await asyncio.to_thread(self.artifacts.get_bytes, record.artifacts["report"])
        return json.loads(raw)

    async def preview(self, tenant: str, dataset_id: str, *, split: str, base_model: str,
                      offset: int, limit: int, max_length: int) -> Preview:
        """Rows of a split rendered as the trainer encodes them with the base model's tokenizer
        and chat template, with the part it learns."""
        record = await self.get(tenant, dataset_id)
        split = split or "train"
        if split not in record.split_sha256:
            raise InvalidArgument("split", f"dataset {record.id} has splits "
                                           f"{', '.join(record.split_sha256)}, not {split!r}")
        if not base_model:
            raise InvalidArgument("base_model", "required: rows are rendered with its tokenizer "
                                                "and chat template, as the trainer does")
        if offset < 0 or limit < 0 or max_length < 0:
            raise InvalidArgument("offset", "offset, limit and max_length must be >= 0")
        limit = min(limit or PREVIEW_DEFAULT_ROWS, PREVIEW_MAX_ROWS)
        lines = await asyncio.to_thread(read_lines, self.artifacts, record.artifacts[split],
                                        offset, limit)
        from .tokens import load_tokenizer, preview_row

        check_model_dir(base_model, self.settings.dataset_model_roots)
        tokenizer = await asyncio.to_thread(load_tokenizer, base_model)
        max_length = max_length or PREVIEW_DEFAULT_LENGTH
        rows = []
        for index, line in lines:
            shown = await asyncio.to_thread(preview_row, tokenizer, json.loads(line), max_length)
            rows.append(PreviewRow(index=index, row_json=line, **shown))
        split_rows = {"train": record.train_rows, "validation": record.validation_rows,
                      "test": record.test_rows}[split]
        return Preview(split=split, split_rows=split_rows, rows=rows)


def registered(record: DatasetRecord) -> DatasetRegistered:
    return DatasetRegistered(
        dataset_id=record.id, name=record.name, sha256=record.sha256, format=record.format,
        num_rows=record.num_rows, train_rows=record.train_rows,
        validation_rows=record.validation_rows, artifacts=record.artifacts,
        version=record.version, parent_id=record.parent_id,
        transformation=record.transformation,
    )


def _replayed(record: DatasetRecord, fingerprint: str) -> DatasetRecord:
    """The version an earlier call with this idempotency key made, if it asked the same."""
    if record.request_sha256 != fingerprint:
        raise FailedPrecondition(
            f"idempotency_key {record.idempotency_key!r} was already used for another "
            f"request (dataset {record.id}); use a new key for different content or settings"
        )
    return record


def _upload_params(options: ingest.Options) -> dict[str, Any]:
    """How an uploaded or imported file was read, as its version's transformation records it."""
    q = options.quality
    return dict(
        file_format=options.file_format, schema=options.schema, column_map=options.column_map,
        source_split=options.source_split, remove_duplicates=q.remove_duplicates,
        remove_near_duplicates=q.remove_near_duplicates, redact_pii=q.redact_pii,
    )
