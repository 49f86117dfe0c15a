"""DatasetService over gRPC: translate requests to the ingest pipeline, store, announce.

Every way in (one-message upload, streamed upload, import, derive) ends in `_create`: spool the
source on local disk, run `ingest.ingest` in a thread, store the files, then the record, then
announce. A rejection stores nothing and publishes DatasetRejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from llmstudio.auth import Principal, current_principal
from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmstudio.events import DatasetRegistered, DatasetRejected
from llmstudio.storage import ArtifactStore, S3ArtifactStore
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc

from . import core, ingest
from .files import write_files
from .sources import PathSource, check_model_dir, parse_source
from .store import DatasetRecord, DatasetStore, DuplicateIdempotencyKey, VersionTaken

log = logging.getLogger(__name__)
PREVIEW_DEFAULT_ROWS, PREVIEW_MAX_ROWS, PREVIEW_DEFAULT_LENGTH = 5, 100, 2048


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_proto(record: DatasetRecord) -> datasets_pb2.Dataset:
    return datasets_pb2.Dataset(
        id=record.id, name=record.name, tenant=record.tenant, sha256=record.sha256,
        format=record.format, num_rows=record.num_rows, train_rows=record.train_rows,
        validation_rows=record.validation_rows, test_rows=record.test_rows,
        artifacts=record.artifacts, created_at=record.created_at, created_by=record.created_by,
        version=record.version, parent_id=record.parent_id,
        transformation=record.transformation, status=record.status, warnings=record.warnings,
        source_schema=record.source_schema, source_format=record.source_format,
        description=record.description, validation_fraction=record.validation_fraction,
        test_fraction=record.test_fraction, seed=record.seed,
    )


async def announce(bus: Bus, store: DatasetStore, record: DatasetRecord) -> None:
    """Publish DatasetRegistered, then remember it was published (a crash in between means
    it is published again on the next start: downstream handlers are idempotent)."""
    event = DatasetRegistered(
        dataset_id=record.id, name=record.name, sha256=record.sha256, format=record.format,
        num_rows=record.num_rows, train_rows=record.train_rows,
        validation_rows=record.validation_rows, artifacts=record.artifacts,
        version=record.version, parent_id=record.parent_id,
        transformation=record.transformation,
    )
    await bus.publish(event, tenant=record.tenant, actor=record.created_by)
    await asyncio.to_thread(store.mark_announced, record.id)


def options_of(request: datasets_pb2.CreateDatasetRequest) -> ingest.Options:
    policy = request.policy
    defaults = ingest.Policy()
    return ingest.Options(
        name=request.name, filename=request.filename, file_format=request.file_format,
        schema=request.schema, column_map=dict(request.column_map),
        source_split=request.source_split,
        validation_fraction=request.validation_fraction, test_fraction=request.test_fraction,
        seed=request.seed,
        policy=ingest.Policy(**{
            name: getattr(policy, name) if policy.HasField(name) else getattr(defaults, name)
            for name in ("max_invalid_fraction", "max_duplicate_fraction", "max_pii_fraction")
        }),
        quality=quality_of(request.quality),
        base_model=request.base_model, max_length=request.max_length,
    )


def quality_of(q: datasets_pb2.QualityOptions) -> ingest.Quality:
    return ingest.Quality(remove_duplicates=q.remove_duplicates,
                          remove_near_duplicates=q.remove_near_duplicates,
                          redact_pii=q.redact_pii)


@dataclass
class Source:
    """What `_create` ingests: a local path (spooled upload, import, parent rows) and its story."""

    path: Path
    content_sha256: str  # identifies the request's content for idempotency ("" = none)
    transformation: str
    raw: Path | None = None  # stored as the version's "raw" artifact
    parent: DatasetRecord | None = None


class DatasetApi(datasets_pb2_grpc.DatasetServiceServicer):
    PERMISSIONS = {
        "CreateDataset": "write", "UploadDataset": "write", "ImportDataset": "write",
        "DeriveDataset": "write", "GetDataset": "read", "ListDatasets": "read",
        "GetDatasetReport": "read", "PreviewDataset": "read",
    }

    def __init__(self, store: DatasetStore, artifacts: ArtifactStore, bus: Bus,
                 settings: Settings):
        self.store, self.artifacts, self.bus, self.settings = store, artifacts, bus, settings
        self.spool_root = settings.dataset_work_dir or Path(settings.data_dir) / "spool"
        self.ingest_slots = asyncio.Semaphore(settings.dataset_max_concurrent_ingests)
        self.ingest_pool = ThreadPoolExecutor(settings.dataset_max_concurrent_ingests,
                                              thread_name_prefix="ingest")
        self.limits = ingest.Limits(
            max_expanded_bytes=settings.dataset_max_expanded_bytes,
            max_line_bytes=settings.dataset_max_line_bytes,
            near_duplicate_max_rows=settings.dataset_near_duplicate_max_rows,
        )

    def clear_spool(self) -> int:
        """Remove what ingests that died with a previous process left in the spool."""
        leftovers = list(self.spool_root.glob("ingest-*")) if self.spool_root.is_dir() else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return len(leftovers)

    @contextmanager
    def _workdir(self):
        self.spool_root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="ingest-", dir=self.spool_root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- ways in --------------------------------------------------------------------------------

    async def CreateDataset(self, request: datasets_pb2.CreateDatasetRequest, context):
        with self._workdir() as work:
            spooled = work / "upload"
            spooled.write_bytes(request.content)
            source = Source(spooled, hashlib.sha256(request.content).hexdigest(),
                            _upload_transformation(request), raw=spooled)
            return await self._create(request, source, work)

    async def UploadDataset(self, request_iterator, context):
        with self._workdir() as work:
            spooled = work / "upload"
            header, digest, size = None, hashlib.sha256(), 0
            with spooled.open("wb") as sink:
                async for chunk in request_iterator:
                    if header is None:
                        if chunk.WhichOneof("part") != "options":
                            raise InvalidArgument("options", "the first message of an upload "
                                                             "must carry the options")
                        header = chunk.options
                        if header.content:
                            raise InvalidArgument("options.content", "must be empty: the file "
                                                                     "follows in data chunks")
                        if errors := options_of(header).errors():  # before a byte is spooled
                            raise InvalidArgument("", "; ".join(errors))
                        continue
                    if chunk.WhichOneof("part") != "data":
                        raise InvalidArgument("options", "only the first message may carry "
                                                         "options")
                    size += len(chunk.data)
                    if size > self.settings.dataset_max_upload_bytes:
                        raise ResourceExhausted(
                            f"upload is larger than the limit of "
                            f"{self.settings.dataset_max_upload_bytes} bytes")
                    digest.update(chunk.data)
                    await asyncio.to_thread(sink.write, chunk.data)
            if header is None:
                raise InvalidArgument("options", "empty upload: no options message")
            source = Source(spooled, digest.hexdigest(), _upload_transformation(header),
                            raw=spooled)
            return await self._create(header, source, work)

    async def ImportDataset(self, request: datasets_pb2.ImportDatasetRequest, context):
        options = request.options
        if options.content:
            raise InvalidArgument("options.content", "must be empty: the file is source_uri")
        where = parse_source(request.source_uri, self.settings.dataset_import_buckets,
                             self.settings.dataset_import_roots)
        with self._workdir() as work:
            if isinstance(where, PathSource):
                path, raw = where.path, None  # read in place: the file stays where it is
                if not options.filename:
                    options.filename = path.name
            else:
                path = raw = work / "import"
                await asyncio.to_thread(self._fetch_s3, where.bucket, where.key, path)
                if not options.filename:
                    options.filename = Path(where.key).name
            transformation = json.loads(_upload_transformation(options))
            transformation.update(op="import", source=request.source_uri)
            # Idempotency of an import is by URI: a retry with the same key and URI returns
            # the version the first call made, even if the object changed since.
            content = hashlib.sha256(request.source_uri.encode()).hexdigest()
            source = Source(path, content, json.dumps(transformation, sort_keys=True), raw=raw)
            return await self._create(options, source, work)

    def _fetch_s3(self, bucket: str, key: str, dest: Path) -> None:
        s = self.settings
        store = S3ArtifactStore(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, bucket,
                                secure=s.s3_secure, region=s.s3_region, create_bucket=False)
        try:
            chunks = store.open_stream(key)
        except Exception as e:  # noqa: BLE001 - any S3 failure is the caller's to fix
            raise FailedPrecondition(f"source_uri: cannot read s3://{bucket}/{key}: {e}") from None
        size = 0
        with dest.open("wb") as sink:
            for chunk in chunks:
                size += len(chunk)
                if size > s.dataset_max_upload_bytes:
                    raise ResourceExhausted(f"s3://{bucket}/{key} is larger than the limit of "
                                            f"{s.dataset_max_upload_bytes} bytes")
                sink.write(chunk)

    async def DeriveDataset(self, request: datasets_pb2.DeriveDatasetRequest, context):
        principal = current_principal()
        if not request.parent_id:
            raise InvalidArgument("parent_id", "required")
        parent = await asyncio.to_thread(self.store.get, principal.tenant, request.parent_id)
        if parent is None:
            raise NotFound(f"dataset {request.parent_id} not found")
        q = request.quality
        if not (q.remove_duplicates or q.remove_near_duplicates or q.redact_pii
                or request.resplit):
            raise InvalidArgument("quality", "nothing to derive: ask for remove_duplicates, "
                                             "remove_near_duplicates, redact_pii or resplit")
        split = ((request.validation_fraction, request.test_fraction, request.seed)
                 if request.resplit
                 else (parent.validation_fraction, parent.test_fraction, parent.seed))
        options = datasets_pb2.CreateDatasetRequest(
            name=request.name or parent.name, filename=f"{parent.id}.jsonl", file_format="jsonl",
            schema=_schema_of_format(parent.format), validation_fraction=split[0],
            test_fraction=split[1], seed=split[2], quality=q,
            idempotency_key=request.idempotency_key, description=request.description,
        )
        transformation = core.transformation(
            "derive", parent=parent.id, remove_duplicates=q.remove_duplicates,
            remove_near_duplicates=q.remove_near_duplicates, redact_pii=q.redact_pii,
            resplit=request.resplit,
            **({"validation_fraction": split[0], "test_fraction": split[1], "seed": split[2]}
               if request.resplit else {}),
        )
        with self._workdir() as work:
            rows = work / "parent.jsonl"
            await asyncio.to_thread(self.artifacts.download_file, parent.artifacts["rows"], rows)
            source = Source(rows, parent.sha256, transformation, parent=parent)
            return await self._create(options, source, work)

    # -- the one path ---------------------------------------------------------------------------

    async def _create(self, request: datasets_pb2.CreateDatasetRequest, source: Source,
                      work: Path) -> datasets_pb2.Dataset:
        principal = current_principal()
        options = options_of(request)
        key = request.idempotency_key
        fingerprint = core.request_fingerprint(
            options.name, options.fractions, options.seed, source.transformation,
            options.policy, options.base_model, options.max_length,
            content_sha256=source.content_sha256,
        )
        if key:
            done = await asyncio.to_thread(self.store.by_idempotency_key, principal.tenant, key)
            if done:
                return await self._replay(done, fingerprint)
        counter = None
        if options.base_model:
            from .tokens import load_tokenizer, token_counter

            check_model_dir(options.base_model, self.settings.dataset_model_roots)
            counter = token_counter(await asyncio.to_thread(load_tokenizer, options.base_model))
        out = work / "out"
        out.mkdir()
        if self.ingest_slots.locked():
            raise ResourceExhausted(
                f"{self.settings.dataset_max_concurrent_ingests} datasets are being ingested; "
                "retry in a moment (LLMSTUDIO_DATASET_MAX_CONCURRENT_INGESTS)")
        try:
            async with self.ingest_slots:
                # Its own threads: long ingests never take the threads reads and handlers use.
                # A cancelled call (client gone, deadline) stops its ingest too, so the slot it
                # frees is really free.
                cancelled = threading.Event()
                try:
                    ingested = await asyncio.get_running_loop().run_in_executor(
                        self.ingest_pool, partial(
                            ingest.ingest, source.path, options, out, self.limits,
                            token_counter=counter, should_stop=cancelled.is_set,
                            on_progress=lambda rows: log.info(
                                "dataset %s: %d rows read", options.name, rows)))
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
        except ingest.Rejected as e:
            await self._reject(principal, options.name, e.rejection)
            raise InvalidArgument("", str(e)) from None
        dataset_id = "ds-" + secrets.token_hex(6)
        prefix = core.split_prefix(ingested.sha256, options.validation_fraction, options.seed,
                                   options.test_fraction)
        # A redacted version must not link to the unredacted upload.
        raw = None if options.quality.redact_pii else source.raw
        artifacts = await asyncio.to_thread(
            write_files, self.artifacts, ingested, dataset_id, prefix, raw
        )
        record = DatasetRecord(
            id=dataset_id, tenant=principal.tenant, name=options.name, sha256=ingested.sha256,
            format=ingested.format, num_rows=ingested.num_rows,
            train_rows=ingested.counts["train"], validation_rows=ingested.counts["validation"],
            test_rows=ingested.counts.get("test", 0), artifacts=artifacts,
            split_sha256=ingested.split_sha256, validation_fraction=options.fractions["validation"],
            test_fraction=options.test_fraction, seed=options.seed, created_at=utc_now(),
            created_by=principal.key_id, parent_id=source.parent.id if source.parent else "",
            transformation=source.transformation, status=ingested.status,
            warnings=ingested.warnings, source_schema=ingested.source_schema,
            source_format=ingested.source_format, description=request.description,
            idempotency_key=key or None, request_sha256=fingerprint,
        )
        return await self._add(record, fingerprint)

    async def _add(self, record: DatasetRecord, fingerprint: str) -> datasets_pb2.Dataset:
        for _ in range(10):
            version = await asyncio.to_thread(self.store.latest_version, record.tenant,
                                              record.name)
            record = replace(record, version=version + 1)
            try:
                await asyncio.to_thread(self.store.add, record)
                break
            except VersionTaken:  # a concurrent upload of the same name took this number
                continue
            except DuplicateIdempotencyKey:  # a concurrent call with the same key won
                done = await asyncio.to_thread(self.store.by_idempotency_key, record.tenant,
                                               record.idempotency_key)
                return await self._replay(done, fingerprint)
        else:
            raise FailedPrecondition(f"dataset {record.name}: too many concurrent versions")
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

    # -- reads ----------------------------------------------------------------------------------

    async def _get(self, dataset_id: str) -> DatasetRecord:
        if not dataset_id:
            raise InvalidArgument("id", "required")
        record = await asyncio.to_thread(self.store.get, current_principal().tenant, dataset_id)
        if record is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return record

    async def GetDataset(self, request: datasets_pb2.GetDatasetRequest, context):
        return to_proto(await self._get(request.id))

    async def ListDatasets(self, request: datasets_pb2.ListDatasetsRequest, context):
        records = await asyncio.to_thread(
            self.store.list, current_principal().tenant, request.name
        )
        return datasets_pb2.ListDatasetsResponse(datasets=[to_proto(r) for r in records])

    async def GetDatasetReport(self, request: datasets_pb2.GetDatasetReportRequest, context):
        record = await self._get(request.id)
        raw = await asyncio.to_thread(self.artifacts.get_bytes, record.artifacts["report"])
        return report_to_proto(record.id, json.loads(raw))

    async def PreviewDataset(self, request: datasets_pb2.PreviewDatasetRequest, context):
        record = await self._get(request.id)
        split = request.split or "train"
        if split not in record.split_sha256:
            raise InvalidArgument("split", f"dataset {record.id} has splits "
                                           f"{', '.join(record.split_sha256)}, not {split!r}")
        if not request.base_model:
            raise InvalidArgument("base_model", "required: rows are rendered with its tokenizer "
                                                "and chat template, as the trainer does")
        if request.offset < 0 or request.limit < 0 or request.max_length < 0:
            raise InvalidArgument("offset", "offset, limit and max_length must be >= 0")
        limit = min(request.limit or PREVIEW_DEFAULT_ROWS, PREVIEW_MAX_ROWS)
        rows = await asyncio.to_thread(self._read_rows, record.artifacts[split],
                                       request.offset, limit)
        from .tokens import load_tokenizer, preview_row

        check_model_dir(request.base_model, self.settings.dataset_model_roots)
        tokenizer = await asyncio.to_thread(load_tokenizer, request.base_model)
        max_length = request.max_length or PREVIEW_DEFAULT_LENGTH
        out = []
        for index, line in rows:
            shown = await asyncio.to_thread(preview_row, tokenizer, json.loads(line), max_length)
            out.append(datasets_pb2.PreviewRow(index=index, row_json=line, **shown))
        split_rows = {"train": record.train_rows, "validation": record.validation_rows,
                      "test": record.test_rows}[split]
        return datasets_pb2.PreviewDatasetResponse(rows=out, split=split, split_rows=split_rows)

    def _read_rows(self, key: str, offset: int, limit: int) -> list[tuple[int, str]]:
        """Lines offset..offset+limit of a stored JSONL file, streamed (never the whole file)."""
        rows, buffer, index = [], b"", 0
        for chunk in self.artifacts.open_stream(key):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if index >= offset:
                    rows.append((index, line.decode("utf-8")))
                    if len(rows) == limit:
                        return rows
                index += 1
        return rows


def _schema_of_format(fmt: str) -> str:
    """The input schema that reads a normalized format as is (for derived versions)."""
    return "openai_chat" if fmt == core.MESSAGES else fmt


def _upload_transformation(request: datasets_pb2.CreateDatasetRequest) -> str:
    q = request.quality
    return core.transformation(
        "upload", file_format=request.file_format, schema=request.schema,
        column_map=dict(request.column_map), source_split=request.source_split, remove_duplicates=q.remove_duplicates,
        remove_near_duplicates=q.remove_near_duplicates, redact_pii=q.redact_pii,
    )


def report_to_proto(dataset_id: str, report: dict) -> datasets_pb2.DatasetReport:
    def stats(s: dict) -> datasets_pb2.LengthStats:
        return datasets_pb2.LengthStats(**{k: s[k] for k in ("count", "min", "max", "mean",
                                                               "p50", "p95", "p99") if k in s})

    return datasets_pb2.DatasetReport(
        dataset_id=dataset_id, status=report["status"], warnings=report["warnings"],
        rows_read=report["rows_read"], invalid_rows=report["invalid_rows"],
        errors=report["errors"], total_errors=report["total_errors"],
        exact_duplicates=report["exact_duplicates"], near_duplicates=report["near_duplicates"],
        pii_counts=report["pii_counts"], pii_rows=report["pii_rows"],
        length_outliers=report["length_outliers"], chars=stats(report["chars"]),
        tokens=stats(report["tokens"]), tokenizer=report["tokenizer"],
        max_length=report["max_length"], truncated_rows=report["truncated_rows"],
        findings=[
            datasets_pb2.Finding(kind=f["kind"], row=f["row"], other_row=f.get("other_row", 0),
                                 detail=f.get("detail", ""))
            for f in report["findings"]
        ],
        report_json=json.dumps(report, sort_keys=True),
        removed_exact_duplicates=report["removed"]["exact_duplicates"],
        removed_near_duplicates=report["removed"]["near_duplicates"],
        redacted_counts=report["redacted"],
    )
