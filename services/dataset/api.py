"""DatasetService over gRPC: requests to use cases (`usecases.Datasets`), versions and reports
back to protos. Domain errors become status codes in `grpcutil`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from llmstudio.auth import current_principal
from llmstudio.errors import InvalidArgument
from llmstudio.v1 import datasets_pb2, datasets_pb2_grpc

from . import ingest
from .core import DatasetRecord
from .usecases import Datasets, Derivation, NewVersion

POLICY_FIELDS = ("max_invalid_fraction", "max_duplicate_fraction", "max_pii_fraction")
STATS_FIELDS = ("count", "min", "max", "mean", "p50", "p95", "p99")


class DatasetApi(datasets_pb2_grpc.DatasetServiceServicer):
    PERMISSIONS = {
        "CreateDataset": "write", "UploadDataset": "write", "ImportDataset": "write",
        "DeriveDataset": "write", "GetDataset": "read", "ListDatasets": "read",
        "GetDatasetReport": "read", "PreviewDataset": "read",
    }

    def __init__(self, datasets: Datasets):
        self.datasets = datasets

    async def CreateDataset(self, request: datasets_pb2.CreateDatasetRequest, context):
        record = await self.datasets.upload(current_principal(), new_version(request),
                                            request.content)
        return to_proto(record)

    async def UploadDataset(self, request_iterator, context):
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            raise InvalidArgument("options", "empty upload: no options message")
        if first.WhichOneof("part") != "options":
            raise InvalidArgument("options", "the first message of an upload must carry the "
                                             "options")
        if first.options.content:
            raise InvalidArgument("options.content", "must be empty: the file follows in data "
                                                     "chunks")
        record = await self.datasets.upload_stream(
            current_principal(), new_version(first.options), _data(messages))
        return to_proto(record)

    async def ImportDataset(self, request: datasets_pb2.ImportDatasetRequest, context):
        if request.options.content:
            raise InvalidArgument("options.content", "must be empty: the file is source_uri")
        record = await self.datasets.import_from(
            current_principal(), new_version(request.options), request.source_uri)
        return to_proto(record)

    async def DeriveDataset(self, request: datasets_pb2.DeriveDatasetRequest, context):
        derivation = Derivation(
            parent_id=request.parent_id, name=request.name, quality=quality_of(request.quality),
            resplit=request.resplit, validation_fraction=request.validation_fraction,
            test_fraction=request.test_fraction, seed=request.seed,
            idempotency_key=request.idempotency_key, description=request.description,
        )
        return to_proto(await self.datasets.derive(current_principal(), derivation))

    async def GetDataset(self, request: datasets_pb2.GetDatasetRequest, context):
        return to_proto(await self.datasets.get(current_principal().tenant, request.id))

    async def ListDatasets(self, request: datasets_pb2.ListDatasetsRequest, context):
        records = await self.datasets.versions(current_principal().tenant, request.name,
                                               request.page_size, request.page_token)
        return datasets_pb2.ListDatasetsResponse(datasets=[to_proto(r) for r in records],
                                                 next_page_token=records.next_page_token)

    async def GetDatasetReport(self, request: datasets_pb2.GetDatasetReportRequest, context):
        report = await self.datasets.report(current_principal().tenant, request.id)
        return report_to_proto(request.id, report)

    async def PreviewDataset(self, request: datasets_pb2.PreviewDatasetRequest, context):
        preview = await self.datasets.preview(
            current_principal().tenant, request.id, split=request.split,
            base_model=request.base_model, offset=request.offset, limit=request.limit,
            max_length=request.max_length,
        )
        rows = [datasets_pb2.PreviewRow(**vars(row)) for row in preview.rows]
        return datasets_pb2.PreviewDatasetResponse(rows=rows, split=preview.split,
                                                   split_rows=preview.split_rows)


async def _data(messages: AsyncIterator[datasets_pb2.UploadDatasetChunk]) -> AsyncIterator[bytes]:
    """The file's bytes from the messages after the options."""
    async for message in messages:
        if message.WhichOneof("part") != "data":
            raise InvalidArgument("options", "only the first message may carry options")
        yield message.data


def new_version(request: datasets_pb2.CreateDatasetRequest) -> NewVersion:
    policy = request.policy
    defaults = ingest.Policy()
    options = ingest.Options(
        name=request.name, filename=request.filename, file_format=request.file_format,
        schema=request.schema, column_map=dict(request.column_map),
        source_split=request.source_split,
        validation_fraction=request.validation_fraction, test_fraction=request.test_fraction,
        seed=request.seed,
        policy=ingest.Policy(**{
            name: getattr(policy, name) if policy.HasField(name) else getattr(defaults, name)
            for name in POLICY_FIELDS
        }),
        quality=quality_of(request.quality),
        base_model=request.base_model, max_length=request.max_length,
    )
    return NewVersion(options, request.idempotency_key, request.description)


def quality_of(q: datasets_pb2.QualityOptions) -> ingest.Quality:
    return ingest.Quality(remove_duplicates=q.remove_duplicates,
                          remove_near_duplicates=q.remove_near_duplicates,
                          redact_pii=q.redact_pii)


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


def report_to_proto(dataset_id: str, report: dict) -> datasets_pb2.DatasetReport:
    def stats(s: dict) -> datasets_pb2.LengthStats:
        return datasets_pb2.LengthStats(**{k: s[k] for k in STATS_FIELDS if k in s})

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
