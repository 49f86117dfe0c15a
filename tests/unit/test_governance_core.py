"""Governance domain rules: the audit hash chain and its verification, query bounds, key rules."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from datetime import datetime, timedelta, timezone

import pytest

from llmstudio.errors import FailedPrecondition, InvalidArgument
from services.governance.core import (
    GENESIS_HASH,
    ApiKey,
    AuditEvent,
    audit_consumers,
    canonical_json,
    chain,
    check_new_key,
    check_revocable,
    iso_utc,
    query_limit,
    record_hash,
    verify_chain,
)


def event(n: int, **over) -> AuditEvent:
    fields = dict(
        event_id=f"ev-{n}", event_type="llmstudio.job.queued.v1",
        subject=f"llmstudio.job.queued.job-{n}", entity=f"job-{n}", source="scheduler",
        tenant="acme", actor="key-1", time="2025-01-01T00:00:00+00:00",
        data_json=canonical_json({"job_id": f"job-{n}", "note": "héllo"}), trace_id="ab" * 16,
    )
    return AuditEvent(**{**fields, **over})


def build_log(n: int):
    records, head = [], None
    for i in range(1, n + 1):
        head = chain(event(i), head)
        records.append(head)
    return records


def test_canonical_json_is_sorted_compact_and_keeps_unicode():
    assert canonical_json({"b": 1, "a": ["é", {"d": 2, "c": None}]}) == \
        '{"a":["é",{"c":null,"d":2}],"b":1}'


def test_record_hash_is_sha256_of_canonical_hashed_fields_only():
    rec = build_log(1)[0]
    fields = {k: v for k, v in asdict(rec).items() if k != "hash"}
    expected = hashlib.sha256(
        json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert record_hash(asdict(rec)) == expected == rec.hash
    # the stored hash itself is not covered; every other field is
    assert record_hash({**asdict(rec), "hash": "x"}) == rec.hash
    for name in fields:
        changed = {**asdict(rec), name: 99 if name == "sequence" else fields[name] + "x"}
        assert record_hash(changed) != rec.hash, name


def test_chain_links_each_record_to_the_previous_hash():
    a, b, c = build_log(3)
    assert (a.sequence, a.prev_hash) == (1, GENESIS_HASH)
    assert (b.sequence, b.prev_hash) == (2, a.hash)
    assert (c.sequence, c.prev_hash) == (3, b.hash)


def test_verify_intact_chain_and_empty_log():
    records = build_log(5)
    result = verify_chain(iter(records))
    assert result.ok and result.records == 5 and result.first_bad_sequence == 0
    assert result.head_hash == records[-1].hash and result.reason == ""
    empty = verify_chain([])
    assert empty.ok and empty.records == 0 and empty.head_hash == ""


@pytest.mark.parametrize("field", ["data_json", "tenant", "actor", "time", "event_type", "entity"])
def test_verify_detects_an_edited_field(field):
    records = build_log(5)
    records[2] = replace(records[2], **{field: "tampered"})
    result = verify_chain(records)
    assert not result.ok and result.first_bad_sequence == 3
    assert "edited" in result.reason
    assert result.records == 5 and result.head_hash == records[-1].hash


def test_verify_detects_an_edit_whose_hash_was_recomputed_at_the_next_record():
    records = build_log(5)
    forged = replace(records[1], data_json='{"job_id":"forged"}')
    records[1] = replace(forged, hash=record_hash(asdict(forged)))
    result = verify_chain(records)
    assert not result.ok and result.first_bad_sequence == 3
    assert "prev_hash" in result.reason


def test_verify_detects_a_deleted_record():
    records = build_log(5)
    del records[2]
    result = verify_chain(records)
    assert not result.ok and result.first_bad_sequence == 4
    assert "deleted" in result.reason and result.records == 4


def test_verify_detects_a_deleted_first_record():
    result = verify_chain(build_log(3)[1:])
    assert not result.ok and result.first_bad_sequence == 2


def test_verify_detects_reordered_records():
    records = build_log(5)
    records[1], records[2] = records[2], records[1]
    result = verify_chain(records)
    assert not result.ok and result.first_bad_sequence == 3


def test_verify_detects_swapped_contents_under_kept_sequences():
    records = build_log(4)
    second, third = records[1], records[2]
    records[1] = replace(third, sequence=2)
    records[2] = replace(second, sequence=3)
    result = verify_chain(records)
    assert not result.ok and result.first_bad_sequence == 2


def test_iso_utc_normalizes_zones_and_takes_naive_as_utc():
    plus2 = datetime(2025, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert iso_utc(plus2) == "2025-01-01T12:00:00+00:00"
    assert iso_utc(datetime(2025, 1, 1, 12, 0)) == "2025-01-01T12:00:00+00:00"


def test_audit_consumers_one_per_stream_and_one_per_subject_of_a_multi_subject_stream():
    consumers = audit_consumers({
        "JOBS": ["llmstudio.job.>"],
        "GOVERNANCE": ["llmstudio.governance.>", "llmstudio.policy.>"],
    })
    assert consumers == [
        ("audit-jobs", "llmstudio.job.>"),
        ("audit-governance-governance", "llmstudio.governance.>"),
        ("audit-governance-policy", "llmstudio.policy.>"),
    ]


def test_query_limit_defaults_caps_and_rejects_negative():
    assert query_limit(0) == 1000
    assert query_limit(5) == 5
    assert query_limit(50_000) == 10_000
    with pytest.raises(InvalidArgument) as e:
        query_limit(-1)
    assert e.value.field == "limit"


def test_check_new_key_names_the_bad_field():
    check_new_key("viewer", "acme", "ci bot")
    for args, field in [
        (("owner", "acme", ""), "role"),
        (("viewer", "", ""), "tenant"),
        (("viewer", "bad tenant!", ""), "tenant"),
        (("viewer", "acme", "x" * 201), "name"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            check_new_key(*args)
        assert e.value.field == field


def test_last_live_admin_key_cannot_be_revoked():
    admin = ApiKey("key-a", "h1", "default", ("admin",), "", "t", "t")
    viewer = ApiKey("key-v", "h2", "default", ("viewer",), "", "t", "t")
    with pytest.raises(FailedPrecondition):
        check_revocable(admin, {"key-a"})
    check_revocable(admin, {"key-a", "key-b"})
    check_revocable(viewer, {"key-a"})
    check_revocable(replace(admin, revoked_at="t"), {"key-b"})


def test_a_configured_bootstrap_key_must_be_no_placeholder_and_long_enough():
    from llmstudio.auth import new_secret
    from services.governance.core import configured_key_problem

    assert "placeholder" in configured_key_problem("CHANGE-ME")
    assert "shorter than 43" in configured_key_problem("lls_short-but-not-empty")
    assert "shorter than 43" in configured_key_problem("x" * 42)
    assert configured_key_problem(new_secret()) == ""
    assert configured_key_problem("y" * 43) == ""
