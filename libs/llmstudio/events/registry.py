"""Model registry events (stream MODELS)."""

from __future__ import annotations

from .base import EventData, register


@register
class ModelVersionRegistered(EventData):
    TYPE = "llmstudio.model.version_registered.v1"
    SUBJECT = "llmstudio.model.version_registered"
    ENTITY = "ref"

    ref: str  # "<model>-v<version>" (subject tokens cannot hold '@' safely everywhere)
    model_name: str
    version: int
    job_id: str
    dataset_sha256: str


@register
class ModelStageChanged(EventData):
    TYPE = "llmstudio.model.stage_changed.v1"
    SUBJECT = "llmstudio.model.stage_changed"
    ENTITY = "ref"

    ref: str
    model_name: str
    version: int
    from_stage: str
    to_stage: str


@register
class ModelPromotionRequested(EventData):
    """A developer asked to move a version to a gated stage: everything governance needs to
    evaluate the tenant's policy, so it needs no lookup (the version's metrics and evaluation,
    its training dataset and that dataset's PII report, the current production version)."""

    TYPE = "llmstudio.model.promotion_requested.v1"
    SUBJECT = "llmstudio.model.promotion_requested"
    ENTITY = "request_id"

    request_id: str
    ref: str
    model_name: str
    version: int
    from_stage: str
    to_stage: str
    justification: str = ""
    requester: str  # the requesting key's id (never its approver)
    metrics: dict[str, float] = {}
    evaluation_id: str = ""
    evaluation_suites: list[str] = []
    # per metric, the evaluation's 95% interval of tuned - base: {"ci_low": .., "ci_high": ..}
    intervals: dict[str, dict[str, float]] = {}
    dataset_id: str = ""
    dataset_sha256: str = ""
    # PII the dataset's report found in the version's rows (rows, occurrences per kind);
    # dataset_report False: no report could be read (PII status unknown)
    dataset_report: bool = False
    dataset_pii_rows: int = 0
    dataset_pii_counts: dict[str, int] = {}
    production_version: int = 0  # the model's current production version (0: none)
    production_metrics: dict[str, float] = {}
    # "requested", or "evaluated": the version's evaluation changed while the request was open
    # (same request_id: governance re-evaluates it)
    reason: str = "requested"


@register
class ModelAliasMoved(EventData):
    """An alias of a model (`champion`, `candidate`, ...) now names another version (set or
    moved), or none (removed: version 0). Deployments of NAME@ALIAS follow it."""

    TYPE = "llmstudio.model.alias_moved.v1"
    SUBJECT = "llmstudio.model.alias_moved"
    ENTITY = "model_name"

    model_name: str
    alias: str
    version: int  # the version it names now (0: removed)
    previous_version: int = 0  # the one it named before (0: none)


@register
class ModelVersionDeleted(EventData):
    """A version was deleted: hidden from lists and reads, its row and its audit kept
    (retention); its number is never reused."""

    TYPE = "llmstudio.model.version_deleted.v1"
    SUBJECT = "llmstudio.model.version_deleted"
    ENTITY = "ref"

    ref: str
    model_name: str
    version: int
    stage: str  # the stage it was in
    reason: str = ""
