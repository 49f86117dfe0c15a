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
