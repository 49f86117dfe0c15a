"""The CloudEvents 1.0 envelope and the registry of event types.

Every event's data is a pydantic model that names its `type` and the subject template it is
published on (`llmstudio.<domain>.<event>.<entity id>`). The envelope's `id` is also sent as the
`Nats-Msg-Id` header, so JetStream drops a re-publish of the same event inside its dedup window.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUBJECT_ROOT = "llmstudio"


class EventData(BaseModel):
    """Base of every event payload. Subclasses set TYPE, SUBJECT and ENTITY (the id field)."""

    model_config = ConfigDict(extra="forbid")

    TYPE: ClassVar[str]
    SUBJECT: ClassVar[str]  # e.g. "llmstudio.job.started" -> + ".<entity id>"
    ENTITY: ClassVar[str]  # name of the field holding the entity id

    def entity_id(self) -> str:
        return str(getattr(self, self.ENTITY))

    def subject(self) -> str:
        return f"{self.SUBJECT}.{self.entity_id()}"


class Envelope(BaseModel):
    """CloudEvents 1.0 structured-mode envelope."""

    model_config = ConfigDict(extra="forbid")

    specversion: str = "1.0"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    type: str
    source: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    subject: str
    tenant: str
    actor: str = ""
    datacontenttype: str = "application/json"
    data: dict[str, Any]


EVENT_TYPES: dict[str, type[EventData]] = {}


def register(cls: type[EventData]) -> type[EventData]:
    """Class decorator: add an event data model to the registry under its TYPE."""
    if cls.TYPE in EVENT_TYPES:
        raise ValueError(f"duplicate event type {cls.TYPE}")
    EVENT_TYPES[cls.TYPE] = cls
    return cls


class InvalidEvent(ValueError):
    """A message that is not a valid event: it goes to the dead-letter subject, not back."""


def make_envelope(data: EventData, *, source: str, tenant: str, actor: str = "") -> Envelope:
    return Envelope(
        type=data.TYPE,
        source=source,
        subject=data.entity_id(),
        tenant=tenant,
        actor=actor,
        data=data.model_dump(mode="json"),
    )


def decode(raw: bytes) -> tuple[Envelope, EventData]:
    """Parse and validate an envelope and its data; raise InvalidEvent saying what is wrong."""
    try:
        env = Envelope.model_validate_json(raw)
    except ValidationError as e:
        raise InvalidEvent(f"envelope: {_fields(e)}") from e
    model = EVENT_TYPES.get(env.type)
    if model is None:
        raise InvalidEvent(f"type: unknown event type {env.type!r}")
    try:
        data = model.model_validate(env.data)
    except ValidationError as e:
        raise InvalidEvent(f"{env.type} data: {_fields(e)}") from e
    return env, data


def _fields(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
    )
