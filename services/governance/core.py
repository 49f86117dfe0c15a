"""Governance domain rules, pure: the audit hash chain, audit query bounds, API key rules.

The audit log is a hash chain: each record's hash covers its own fields and the previous
record's hash, so editing, deleting or reordering any stored record breaks verification from
that record on (truncating the tail needs an outside anchor of the head hash).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from llmstudio.auth import ROLES, Principal
from llmstudio.errors import FailedPrecondition, InvalidArgument

GENESIS_HASH = "0" * 64
# The fields a record's hash covers: all of them but the hash itself.
HASHED_FIELDS = (
    "sequence", "event_id", "event_type", "subject", "entity", "source", "tenant", "actor",
    "time", "data_json", "trace_id", "prev_hash",
)
DEFAULT_QUERY_LIMIT = 1000
MAX_QUERY_LIMIT = 10000
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_KEY_NAME = 200


def canonical_json(value: Any) -> str:
    """One byte-exact JSON text per value, so a hash over it is reproducible anywhere."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def iso_utc(moment: datetime) -> str:
    # A timestamp without a zone is taken as UTC: envelopes are written in UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


# -- audit chain ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEvent:
    """What the audit log keeps of one event, before it is placed on the chain."""

    event_id: str
    event_type: str
    subject: str  # the NATS subject it travelled on
    entity: str  # the envelope's subject: the entity id
    source: str
    tenant: str
    actor: str
    time: str
    data_json: str
    trace_id: str


@dataclass(frozen=True)
class AuditRecord:
    sequence: int
    event_id: str
    event_type: str
    subject: str
    entity: str
    source: str
    tenant: str
    actor: str
    time: str
    data_json: str
    trace_id: str
    prev_hash: str
    hash: str


def record_hash(fields: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of a record's hashed fields."""
    covered = {name: fields[name] for name in HASHED_FIELDS}
    return hashlib.sha256(canonical_json(covered).encode("utf-8")).hexdigest()


def chain(event: AuditEvent, head: AuditRecord | None) -> AuditRecord:
    """The record that appends `event` after `head` (None: the log is empty)."""
    fields = {
        **asdict(event),
        "sequence": head.sequence + 1 if head else 1,
        "prev_hash": head.hash if head else GENESIS_HASH,
    }
    return AuditRecord(**fields, hash=record_hash(fields))


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # how many records were read
    first_bad_sequence: int  # 0 when ok
    reason: str
    head_hash: str  # the stored hash of the last record ("" for an empty log)


def verify_chain(records: Iterable[AuditRecord]) -> VerifyResult:
    """Walk the records in stored order; report the first one that breaks the chain.

    Streams: `records` may be a generator over a large table.
    """
    count = 0
    first_bad, reason = 0, ""
    prev_hash, head_hash = GENESIS_HASH, ""
    for record in records:
        count += 1
        if not first_bad:
            problem = _chain_problem(record, expected_sequence=count, prev_hash=prev_hash)
            if problem:
                first_bad, reason = record.sequence, problem
        prev_hash = head_hash = record.hash
    return VerifyResult(not first_bad, count, first_bad, reason, head_hash)


def _chain_problem(record: AuditRecord, *, expected_sequence: int, prev_hash: str) -> str:
    if record.sequence != expected_sequence:
        return (f"sequence {record.sequence} where {expected_sequence} was expected "
                "(a record was deleted or records were reordered)")
    if record.prev_hash != prev_hash:
        return "prev_hash does not match the previous record's hash (chain broken before it)"
    if record_hash(asdict(record)) != record.hash:
        return "hash does not match the record's fields (record edited)"
    return ""


def audit_consumers(streams: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """(consumer name, subject filter) per audited subject: one consumer per stream, except
    that a stream holding several subjects gets one per subject (a consumer has one filter)."""
    consumers = []
    for stream, subjects in streams.items():
        base = f"audit-{stream.lower()}"
        for subject in subjects:
            domain = subject.split(".")[1]
            consumers.append((base if len(subjects) == 1 else f"{base}-{domain}", subject))
    return consumers


def query_limit(limit: int) -> int:
    if limit < 0:
        raise InvalidArgument("limit", f"must be >= 0, got {limit}")
    return min(limit or DEFAULT_QUERY_LIMIT, MAX_QUERY_LIMIT)


def check_after_sequence(after_sequence: int) -> int:
    if after_sequence < 0:
        raise InvalidArgument("after_sequence", f"must be >= 0, got {after_sequence}")
    return after_sequence


# -- API keys ------------------------------------------------------------------------------------


def new_key_id() -> str:
    return f"key-{secrets.token_hex(4)}"


def check_new_key(role: str, tenant: str, name: str) -> None:
    """Raise InvalidArgument naming the first field a new key may not have."""
    if role not in ROLES:
        raise InvalidArgument("role", f"{role!r} is not one of {', '.join(ROLES)}")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidArgument(
            "tenant", f"{tenant!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(name) > MAX_KEY_NAME:
        raise InvalidArgument("name", f"at most {MAX_KEY_NAME} characters, got {len(name)}")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    key_hash: str
    tenant: str
    roles: tuple[str, ...]
    name: str
    created_at: str
    created_by: str
    revoked_at: str | None = None

    def principal(self) -> Principal:
        return Principal(self.key_id, self.tenant, self.roles, self.name)


def check_revocable(key: ApiKey, live_admin_ids: set[str]) -> None:
    """Refuse to revoke the last live admin key: nobody could issue keys again (a restart only
    bootstraps an admin into an empty key table)."""
    if key.revoked_at is None and "admin" in key.roles and live_admin_ids <= {key.key_id}:
        raise FailedPrecondition(
            f"{key.key_id} is the last active admin key; create another admin key first")
