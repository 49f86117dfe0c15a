"""The contract checker itself fails, naming the field, when a contract breaks.

Each test breaks a contract the way a code change would (an event model with a field dropped,
retyped or made required; a proto field retyped or removed), regenerates the document and checks
that the diff against the real one names exactly what changed.
"""

from __future__ import annotations

import pytest
from pydantic import create_model

from llmstudio.contracts import asyncapi_document, event_schemas, proto_files, proto_summary
from llmstudio.events import EVENT_TYPES, EventData, JobCancelled, JobCompleted

from .contractdiff import diff_asyncapi, diff_event_schemas, diff_proto
from .snapshot import UPDATE_ENV, check_snapshot

COMPLETED = JobCompleted.TYPE


def broken_job_completed() -> type[EventData]:
    """JobCompleted with `checkpoint_key` dropped, `steps` a string, `trace_id` required and a
    new required `run_name`."""
    fields = {n: (f.annotation, f) for n, f in JobCompleted.model_fields.items()}
    del fields["checkpoint_key"]
    fields["steps"] = (str, ...)
    fields["trace_id"] = (str, ...)
    fields["run_name"] = (str, ...)
    model = create_model("JobCompleted", __base__=EventData, __doc__=JobCompleted.__doc__, **fields)
    model.TYPE, model.SUBJECT, model.ENTITY = COMPLETED, JobCompleted.SUBJECT, JobCompleted.ENTITY
    return model


@pytest.fixture(scope="module")
def broken_types():
    """The real registry with JobCompleted broken and JobCancelled gone."""
    types = {**EVENT_TYPES, COMPLETED: broken_job_completed()}
    del types[JobCancelled.TYPE]
    return types


def test_event_schema_diff_names_each_changed_field(broken_types):
    changes = diff_event_schemas(event_schemas(), event_schemas(broken_types))

    assert changes == [
        f"event {JobCancelled.TYPE}: removed",
        f"event {COMPLETED}: field 'checkpoint_key' removed",
        f"event {COMPLETED}: field 'run_name' added (required, string)",
        f"event {COMPLETED}: field 'steps' changed type integer -> string",
        f"event {COMPLETED}: field 'trace_id' became required",
        f"event {COMPLETED}: field 'trace_id' changed default \"\" -> null",
    ]


def test_asyncapi_diff_names_the_field_and_the_channel(broken_types):
    changes = diff_asyncapi(asyncapi_document(), asyncapi_document(broken_types))

    assert "asyncapi schema JobCompleted: field 'checkpoint_key' removed" in changes
    assert "asyncapi schema JobCompleted: field 'steps' changed type integer -> string" in changes
    assert f"asyncapi channels: '{JobCancelled.TYPE}' removed" in changes
    assert "asyncapi schema JobCancelledEvent: removed" in changes


def test_proto_diff_names_field_number_name_and_types():
    files = proto_files()
    jobs = next(f for f in files if f.name.endswith("/jobs.proto"))
    job = next(m for m in jobs.message_type if m.name == "Job")
    priority = next(f for f in job.field if f.name == "priority")
    priority.type = priority.TYPE_STRING
    job.field.remove(next(f for f in job.field if f.name == "trace_id"))
    service = jobs.service[0]
    watch = next(m for m in service.method if m.name == "WatchJob")
    watch.server_streaming = False

    changes = diff_proto(proto_summary(proto_files()), proto_summary(files))

    assert changes == [
        f"proto message llmstudio.v1.Job: field {priority.number} 'priority' changed type "
        "int32 -> string",
        "proto message llmstudio.v1.Job: field 13 'trace_id' removed",
        f"proto service llmstudio.v1.{service.name}: method 'WatchJob' changed "
        "server_streaming True -> False",
    ]


def test_snapshot_check_fails_naming_the_field_and_how_to_regenerate(
    tmp_path, monkeypatch, broken_types
):
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    snapshot = tmp_path / "events.json"
    with pytest.raises(pytest.fail.Exception, match="no contract snapshot"):
        check_snapshot(snapshot, event_schemas(), diff_event_schemas)

    monkeypatch.setenv(UPDATE_ENV, "1")
    check_snapshot(snapshot, event_schemas(), diff_event_schemas)  # writes it
    monkeypatch.delenv(UPDATE_ENV)
    check_snapshot(snapshot, event_schemas(), diff_event_schemas)  # unchanged: passes

    with pytest.raises(pytest.fail.Exception) as failed:
        check_snapshot(snapshot, event_schemas(broken_types), diff_event_schemas)
    message = str(failed.value)
    assert f"event {COMPLETED}: field 'checkpoint_key' removed" in message
    assert f"{UPDATE_ENV}=1" in message
