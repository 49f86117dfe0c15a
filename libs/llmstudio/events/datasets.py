"""Dataset domain events (stream DATASETS)."""

from __future__ import annotations

from .base import EventData, register


@register
class DatasetRegistered(EventData):
    TYPE = "llmstudio.dataset.registered.v1"
    SUBJECT = "llmstudio.dataset.registered"
    ENTITY = "dataset_id"

    dataset_id: str
    name: str
    sha256: str
    format: str
    num_rows: int
    train_rows: int
    validation_rows: int
    artifacts: dict[str, str]
    version: int = 1
    parent_id: str = ""  # the version this one was derived from ("" for an upload)
    transformation: str = ""  # JSON: how it was made (upload, import, derive and its options)


@register
class DatasetValidated(EventData):
    """The dataset a job names exists for its tenant and its stored files match their sha256."""

    TYPE = "llmstudio.dataset.validated.v1"
    SUBJECT = "llmstudio.dataset.validated"
    ENTITY = "job_id"

    job_id: str
    dataset_id: str
    sha256: str
    artifacts: dict[str, str]


@register
class DatasetRejected(EventData):
    """An upload that failed validation (job_id empty) or a job's dataset that is unusable."""

    TYPE = "llmstudio.dataset.rejected.v1"
    SUBJECT = "llmstudio.dataset.rejected"
    ENTITY = "ref"

    ref: str  # the job id, or the dataset name for a rejected upload
    job_id: str = ""
    dataset_id: str = ""
    reason: str
    errors: list[str] = []
