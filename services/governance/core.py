"""Governance domain rules, pure: the audit hash chain and its signed checkpoints, audit query
bounds, API key rules, and who administers which tenant.

The audit log is a hash chain: each record's hash covers its own fields and the previous
record's hash, so editing, deleting or reordering any stored record breaks verification from
that record on. Someone who can write the database could still cut the tail or rewrite every
record from one onward with consistent hashes; checkpoints close that gap: governance signs the
hashes of the records appended since the previous checkpoint (ed25519) and keeps them outside
the database, and verification compares every anchored record with its checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from llmstudio.auth import KEY_PREFIX, PLATFORM_TENANT, ROLES, Principal
from llmstudio.errors import FailedPrecondition, InvalidArgument, PermissionDenied

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
    checkpoint_seq: int = 0  # the newest valid checkpoint read (0: none)
    anchored_records: int = 0  # the records it covers
    checkpoint_time: str = ""
    tenant_records: int = 0  # the records of the tenant asked about (all when none was)

    def seen_by_tenant_admin(self) -> VerifyResult:
        """What a tenant admin may learn: whether the chain holds and its own record count;
        nothing that measures or locates other tenants' records."""
        reason = "" if self.ok else "the audit chain is broken (a platform admin sees where)"
        return VerifyResult(self.ok, self.tenant_records, 0, reason, "",
                            tenant_records=self.tenant_records)


def verify_chain(
    records: Iterable[AuditRecord],
    checkpoints: Iterable[Checkpoint] = (),
    *,
    public_key: Ed25519PublicKey | None = None,
    newest_written: int = 0,
    tenant: str | None = None,
) -> VerifyResult:
    """Walk the records in stored order against the checkpoints (oldest first); report the
    first sequence number that is not what the chain and its anchors say it must be.

    Streams: `records` and `checkpoints` may be generators over a large table and a store.
    `newest_written`: the newest checkpoint this process knows was written (one deleted from
    the store since is reported). `tenant`: whose records `tenant_records` counts.
    """
    anchors = _Anchors(checkpoints, public_key)
    count = tenant_count = 0
    first_bad, reason = 0, ""
    prev_hash, head_hash = GENESIS_HASH, ""
    for record in records:
        count += 1
        tenant_count += tenant is None or record.tenant == tenant
        if not first_bad:
            problem = _chain_problem(record, count, prev_hash, anchors)
            if problem:
                first_bad, reason = record.sequence, problem
        prev_hash = head_hash = record.hash
    if not first_bad:
        first_bad, reason = anchors.problem_after(count, newest_written)
    newest = anchors.newest
    return VerifyResult(
        not first_bad, count, first_bad, reason, head_hash,
        checkpoint_seq=newest.seq if newest else 0,
        anchored_records=newest.records if newest else 0,
        checkpoint_time=newest.time if newest else "", tenant_records=tenant_count)


def _chain_problem(
    record: AuditRecord, expected_sequence: int, prev_hash: str, anchors: _Anchors | None,
) -> str:
    """Why the record at `expected_sequence` is bad ('' if it is not). The anchor comes before
    the links: it names the first record an insertion or a rewrite touched, where the links
    break one record later or (rewritten consistently) not at all."""
    if record.sequence != expected_sequence:
        return (f"sequence {record.sequence} where {expected_sequence} was expected "
                "(a record was deleted, inserted or records were reordered)")
    anchor_problem = anchors.problem_at(expected_sequence, record.hash) if anchors else ""
    if anchor_problem:
        return anchor_problem
    if record.prev_hash != prev_hash:
        return "prev_hash does not match the previous record's hash (chain broken before it)"
    if record_hash(asdict(record)) != record.hash:
        return "hash does not match the record's fields (record edited)"
    return ""


# -- checkpoints: signed anchors of the chain kept outside the database --------------------------

CHECKPOINT_VERSION = 1


class InvalidCheckpoint(ValueError):
    """A checkpoint object that is not a checkpoint (unreadable JSON, missing fields)."""


@dataclass(frozen=True)
class Checkpoint:
    """The hashes of records first_sequence..records (the last is the head at signing time),
    signed by governance. Checkpoint `seq` n+1 starts where n ends."""

    seq: int
    first_sequence: int
    records: int
    hashes: tuple[str, ...]
    time: str
    key_id: str  # the signing key's fingerprint
    signature: str = ""  # base64 ed25519 over signed_bytes()

    @property
    def head_hash(self) -> str:
        return self.hashes[-1]

    def signed_bytes(self) -> bytes:
        fields = {**asdict(self), "hashes": list(self.hashes), "version": CHECKPOINT_VERSION}
        del fields["signature"]
        return canonical_json(fields).encode("utf-8")

    def to_json(self) -> bytes:
        return canonical_json({**asdict(self), "hashes": list(self.hashes),
                               "version": CHECKPOINT_VERSION}).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, name: str) -> Checkpoint:
        try:
            d = json.loads(raw)
            return cls(
                seq=int(d["seq"]), first_sequence=int(d["first_sequence"]),
                records=int(d["records"]), hashes=tuple(str(h) for h in d["hashes"]),
                time=str(d["time"]), key_id=str(d["key_id"]), signature=str(d["signature"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidCheckpoint(f"checkpoint {name} is unreadable: {e}") from None


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_checkpoint(
    seq: int, records: list[AuditRecord], previous: Checkpoint | None, time: str,
    key: Ed25519PrivateKey,
) -> Checkpoint:
    """Sign the records appended since `previous` (in order, already read from the log).

    Raises FailedPrecondition when they do not continue the anchored chain: anchoring a chain
    that is already broken would make the break look genuine."""
    prev_hash = previous.head_hash if previous else GENESIS_HASH
    expected = previous.records + 1 if previous else 1
    for record in records:
        problem = _chain_problem(record, expected, prev_hash, None)
        if problem:
            raise FailedPrecondition(f"audit record {expected}: {problem}; not checkpointed")
        prev_hash, expected = record.hash, expected + 1
    unsigned = Checkpoint(
        seq=seq, first_sequence=records[0].sequence, records=records[-1].sequence,
        hashes=tuple(r.hash for r in records), time=time,
        key_id=key_fingerprint(key.public_key()))
    signature = base64.b64encode(key.sign(unsigned.signed_bytes())).decode("ascii")
    return replace(unsigned, signature=signature)


def checkpoint_problem(
    checkpoint: Checkpoint, previous: Checkpoint | None, public_key: Ed25519PublicKey | None,
) -> str:
    """Why `checkpoint` cannot anchor anything ('' if it can)."""
    expected_seq = previous.seq + 1 if previous else 1
    if checkpoint.seq != expected_seq:
        return (f"checkpoint {expected_seq} is missing from the store "
                f"(checkpoint {checkpoint.seq} comes next)")
    if public_key is None or checkpoint.key_id != key_fingerprint(public_key):
        return f"checkpoint {checkpoint.seq} is signed by unknown key {checkpoint.key_id!r}"
    try:
        public_key.verify(base64.b64decode(checkpoint.signature, validate=True),
                          checkpoint.signed_bytes())
    except (InvalidSignature, ValueError):
        return f"checkpoint {checkpoint.seq}: signature does not verify (checkpoint altered)"
    expected_first = previous.records + 1 if previous else 1
    if checkpoint.first_sequence != expected_first or \
            len(checkpoint.hashes) != checkpoint.records - checkpoint.first_sequence + 1 or \
            not checkpoint.hashes:
        return (f"checkpoint {checkpoint.seq} covers {checkpoint.first_sequence}.."
                f"{checkpoint.records} with {len(checkpoint.hashes)} hashes; it must start at "
                f"{expected_first} with one hash per record")
    return ""


class _Anchors:
    """The anchored hash of each sequence number, read from the checkpoints as the walk over
    the records reaches them (one checkpoint in memory at a time)."""

    def __init__(self, checkpoints: Iterable[Checkpoint], public_key: Ed25519PublicKey | None):
        self._checkpoints: Iterator[Checkpoint] = iter(checkpoints)
        self._public_key = public_key
        self.newest: Checkpoint | None = None  # the newest valid checkpoint read so far
        self._broken = ""  # why the checkpoints after `newest` cannot be used
        self._exhausted = False

    def _advance(self) -> bool:
        """Read the next valid checkpoint into `newest`; False at the end or a bad one."""
        if self._exhausted or self._broken:
            return False
        try:
            checkpoint = next(self._checkpoints)
        except StopIteration:
            self._exhausted = True
            return False
        except InvalidCheckpoint as e:
            self._broken = str(e)
            return False
        self._broken = checkpoint_problem(checkpoint, self.newest, self._public_key)
        if self._broken:
            return False
        self.newest = checkpoint
        return True

    def problem_at(self, sequence: int, stored_hash: str) -> str:
        while self.newest is None or self.newest.records < sequence:
            if not self._advance():
                return self._broken  # past the anchored part: the links alone vouch for it
        anchored = self.newest.hashes[sequence - self.newest.first_sequence]
        if anchored != stored_hash:
            return (f"hash differs from the one checkpoint {self.newest.seq} anchored "
                    "(record rewritten, inserted or replaced)")
        return ""

    def problem_after(self, count: int, newest_written: int) -> tuple[int, str]:
        """(first bad sequence, why) once all `count` records passed: a checkpoint anchoring
        more records than there are, a bad checkpoint, or a known one gone; (0, '') if none."""
        while self._advance():
            pass
        if self._broken:
            return count + 1, self._broken
        newest = self.newest
        if newest and newest.records > count:
            return count + 1, (
                f"records {count + 1}..{newest.records} are anchored by checkpoint "
                f"{newest.seq} but missing from the log (tail truncated)")
        if newest_written > (newest.seq if newest else 0):
            return (newest.records if newest else 0) + 1, (
                f"checkpoint {newest_written} was written but is missing from the store")
        return 0, ""


def checkpoint_due(
    unanchored: int, seconds_since_last: float, every_records: int, every_s: float,
) -> bool:
    """Sign a checkpoint when enough records or enough time went by (and something to sign)."""
    return unanchored > 0 and (unanchored >= every_records or seconds_since_last >= every_s)


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


# A configured bootstrap key is refused when it is an example's placeholder or shorter than the
# base64 of 32 random bytes (what `new_secret` makes): it would be the whole platform's admin.
EXAMPLE_KEYS = frozenset({"CHANGE-ME", "changeme", "admin", "secret"})
MIN_KEY_CHARS = 43


def configured_key_problem(secret: str) -> str:
    """Why `secret` may not be the bootstrap admin key ("" when it may)."""
    if secret.strip() in EXAMPLE_KEYS:
        return "is the example's placeholder: set a key of your own (llmstudio keys create ...)"
    if len(secret.removeprefix(KEY_PREFIX)) < MIN_KEY_CHARS:
        return (f"is shorter than {MIN_KEY_CHARS} characters (32 random bytes, base64): make "
                "one with python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return ""


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


def check_revocable(key: ApiKey, live_platform_admin_ids: set[str]) -> None:
    """Refuse to revoke the last live platform admin key: nobody could issue keys for a new
    tenant again (a restart only bootstraps an admin into an empty key table). A tenant's
    last admin may go: a platform admin can issue another."""
    if key.revoked_at is None and key.principal().is_platform_admin and \
            live_platform_admin_ids <= {key.key_id}:
        raise FailedPrecondition(
            f"{key.key_id} is the last active platform admin key; create another admin key of "
            f"tenant {PLATFORM_TENANT!r} first")


# -- scoped administration -----------------------------------------------------------------------


def administered_tenant(caller: Principal, tenant: str) -> str:
    """The tenant a request acts on (`tenant`, or the caller's when empty); PermissionDenied
    when the caller does not administer it."""
    tenant = tenant or caller.tenant
    if not caller.administers(tenant):
        raise PermissionDenied(
            f"tenant: an admin of tenant {caller.tenant!r} administers only that tenant, not "
            f"{tenant!r} (admins of {PLATFORM_TENANT!r} administer every tenant)")
    return tenant


def audit_scope(caller: Principal, tenant: str) -> str | None:
    """The tenant an audit read is limited to; None: every tenant (a platform admin who named
    none)."""
    if not tenant and caller.is_platform_admin:
        return None
    return administered_tenant(caller, tenant)
