"""Serving events (stream SERVING): what happened to a deployment."""

from __future__ import annotations

from .base import EventData, register


@register
class DeploymentCreated(EventData):
    TYPE = "llmstudio.serving.deployment_created.v1"
    SUBJECT = "llmstudio.serving.deployment_created"
    ENTITY = "name"

    name: str
    model_name: str
    version: int  # 0: follows a stage that holds no version yet
    follows: str  # the stage it follows ("" for a fixed version)


@register
class DeploymentSwitched(EventData):
    """A deployment that follows a stage moved to the version now in it; requests already
    running finish on the one they started on."""

    TYPE = "llmstudio.serving.deployment_switched.v1"
    SUBJECT = "llmstudio.serving.deployment_switched"
    ENTITY = "name"

    name: str
    model_name: str
    from_version: int
    to_version: int


@register
class DeploymentDeleted(EventData):
    TYPE = "llmstudio.serving.deployment_deleted.v1"
    SUBJECT = "llmstudio.serving.deployment_deleted"
    ENTITY = "name"

    name: str
