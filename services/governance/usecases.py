"""Governance's use cases: API keys (bootstrap, issue, revoke, list, keeping the key bucket
equal to the table), the audit log (append, query, verify) and its signed checkpoints.

Administration is scoped (core.administered_tenant): a tenant admin acts on its own tenant,
a platform admin on any.

Every store call runs in a worker thread. A key change and its event (ApiKeyCreated,
ApiKeyRevoked) are written in one transaction to the outbox, which publishes the event after the
commit. The table holds the truth (hashes only); the JetStream KV bucket is the key directory
every service's auth interceptor reads, so each change is also written there, and the bucket is
re-synced on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js.errors import NoKeysError

from llmstudio.auth import PLATFORM_TENANT, KeyDirectory, Principal, hash_secret, new_secret
from llmstudio.bus import APIKEY_BUCKET, Bus
from llmstudio.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from llmstudio.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    ApprovalRefused,
    AuditCheckpointed,
    ModelPromotionRequested,
    PolicyChanged,
    PolicyDecided,
    PromotionApproved,
    PromotionRejected,
)
from llmstudio.outbox import Outbox

from .anchor import CheckpointStore
from .config import AuditAnchorSettings, PromotionSettings
from .core import (
    ApiKey,
    AuditEvent,
    AuditRecord,
    Checkpoint,
    InvalidCheckpoint,
    VerifyResult,
    administered_tenant,
    audit_scope,
    check_after_sequence,
    check_new_key,
    check_revocable,
    checkpoint_due,
    configured_key_problem,
    iso_utc,
    new_checkpoint,
    new_key_id,
    query_limit,
    verify_chain,
)
from .lineage import Lineage, build_lineage, data_fragment, references
from .policy import (
    DEFAULT_POLICY,
    EXPIRED,
    OPEN_STATUSES,
    REJECTED,
    Approval,
    Decision,
    Facts,
    Policy,
    Verdict,
    decide,
    may_approve,
    parse_policy,
    policy_id,
)
from .store import GovernanceStore, PromotionRow, Unit

log = logging.getLogger(__name__)

# The first key is a platform admin's: it issues the keys of every tenant.
BOOTSTRAP_TENANT = PLATFORM_TENANT
BOOTSTRAP_NAME = "bootstrap-admin"


class KeyManager:
    def __init__(self, store: GovernanceStore, outbox: Outbox, bus: Bus, directory: KeyDirectory):
        self.store = store
        self.outbox = outbox
        self.bus = bus
        self.directory = directory
        # Revocations are checked against the live admins; one at a time so two admins
        # revoking each other cannot both pass the last-admin check.
        self._revoke_lock = asyncio.Lock()

    async def bootstrap(self, configured_secret: str) -> str | None:
        """Create the first admin key when there is no key at all.

        Returns the secret when it was generated here (the caller shows it once), else None.
        """
        if configured_secret and (problem := configured_key_problem(configured_secret)):
            raise ValueError(f"LLMSTUDIO_BOOTSTRAP_ADMIN_KEY {problem}")
        if await self.store.in_unit(Unit.count_keys):
            return None
        secret = configured_secret or new_secret()
        await self._issue(secret, "admin", BOOTSTRAP_TENANT, BOOTSTRAP_NAME, actor=self.bus.service)
        log.info("created the bootstrap admin key (tenant %s)", BOOTSTRAP_TENANT)
        return None if configured_secret else secret

    async def sync_bucket(self) -> None:
        """Put every live key into the bucket and delete whatever else is in it: revoked keys,
        and entries governance never issued (written by someone who reached the bucket)."""
        kv = await self.bus.kv(APIKEY_BUCKET)
        try:
            present = set(await kv.keys())
        except NoKeysError:
            present = set()
        live = [k for k in await self.store.in_unit(Unit.list_keys) if k.revoked_at is None]
        for key in live:
            await kv.put(key.key_hash, key.principal().to_json())
        for stray in present - {k.key_hash for k in live}:
            log.warning("key bucket: deleting %s, not a live key governance issued", stray)
            await kv.delete(stray)

    async def create(
        self, role: str, tenant: str, name: str, caller: Principal
    ) -> tuple[ApiKey, str]:
        """Issue a key; returns it with its secret (the only time the secret exists)."""
        check_new_key(role, tenant or caller.tenant, name)
        tenant = administered_tenant(caller, tenant)
        secret = new_secret()
        key = await self._issue(secret, role, tenant, name, actor=caller.key_id)
        return key, secret

    async def list(self, caller: Principal, tenant: str, include_revoked: bool) -> list[ApiKey]:
        keys = await self.store.in_unit(Unit.list_keys, administered_tenant(caller, tenant))
        return [k for k in keys if include_revoked or k.revoked_at is None]

    async def revoke(self, key_id: str, caller: Principal) -> ApiKey:
        async with self._revoke_lock:
            key = await self.outbox.transact(self._revoke, key_id, caller, _now())
        # Deleted even when revoked before: heals a bucket a failed earlier call left behind.
        await (await self.bus.kv(APIKEY_BUCKET)).delete(key.key_hash)
        return key

    def _revoke(self, u: Unit, key_id: str, caller: Principal, now: str) -> ApiKey:
        key = u.get_key(key_id)
        # Another tenant's key is as absent as an unknown one: its existence is not revealed.
        if key is None or not caller.administers(key.tenant):
            raise NotFound(f"API key {key_id!r} not found")
        platform_admins = {
            k.key_id for k in u.list_keys(PLATFORM_TENANT)
            if k.revoked_at is None and k.principal().is_platform_admin}
        check_revocable(key, platform_admins)
        if u.revoke_key(key_id, now):
            self.outbox.add(
                u, ApiKeyRevoked(key_id=key_id), tenant=key.tenant, actor=caller.key_id)
        return key

    async def _issue(self, secret: str, role: str, tenant: str, name: str, *, actor: str) -> ApiKey:
        key = ApiKey(
            key_id=new_key_id(), key_hash=hash_secret(secret), tenant=tenant, roles=(role,),
            name=name, created_at=_now(), created_by=actor,
        )
        await self.outbox.transact(self._add_key, key)
        await (await self.bus.kv(APIKEY_BUCKET)).put(key.key_hash, key.principal().to_json())
        # The bucket watch would bring it too; this makes the key usable here at once.
        self.directory.put(key.key_hash, key.principal())
        return key

    def _add_key(self, u: Unit, key: ApiKey) -> None:
        u.add_key(key)
        self.outbox.add(
            u,
            ApiKeyCreated(key_id=key.key_id, tenant=key.tenant, roles=list(key.roles),
                          name=key.name),
            tenant=key.tenant, actor=key.created_by,
        )


class Checkpointer:
    """Signs checkpoints of the audit chain into the artifact store: after every
    `checkpoint_every_records` appended records, and `checkpoint_every_s` after the last
    checkpoint when records wait unanchored."""

    def __init__(
        self, store: GovernanceStore, checkpoints: CheckpointStore, key: Ed25519PrivateKey,
        settings: AuditAnchorSettings, outbox: Outbox | None = None,
    ):
        self.store = store
        self.checkpoints = checkpoints
        self.key = key
        self.settings = settings
        self.outbox = outbox  # announces each checkpoint (AuditCheckpointed) when given
        self.newest: Checkpoint | None = None  # the newest checkpoint written or found
        self._head = 0  # the newest sequence appended (as far as this process saw)
        self._since = time.monotonic()  # when the newest checkpoint was made (or we started)
        self._due = asyncio.Event()
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self.checkpoints.publish_public_key, self.key)
        try:
            self.newest = await asyncio.to_thread(self.checkpoints.newest)
        except InvalidCheckpoint as e:
            # Serve anyway: VerifyAudit names the bad checkpoint; new ones cannot be numbered
            # after it (nothing is overwritten) until an operator looks.
            log.error("audit checkpoints: %s", e)
        self._head = await self.store.in_unit(Unit.audit_head_sequence)
        self._since = time.monotonic()

    def appended(self, sequence: int) -> None:
        """A record was appended: wake the checkpointer once enough wait unanchored."""
        self._head = max(self._head, sequence)
        if self._head - self._anchored() >= self.settings.checkpoint_every_records:
            self._due.set()

    def _anchored(self) -> int:
        return self.newest.records if self.newest else 0

    async def run(self) -> None:
        every_s = self.settings.checkpoint_every_s
        while True:
            # Wake when enough records wait, or when the oldest unanchored one is due by time.
            wait = every_s
            if self._head > self._anchored():
                wait = max(0.05, every_s - (time.monotonic() - self._since))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), wait)
            self._due.clear()
            try:
                while checkpoint_due(self._head - self._anchored(), time.monotonic() - self._since,
                                     self.settings.checkpoint_every_records, every_s):
                    await self.checkpoint()
            except Exception:  # noqa: BLE001 - keep anchoring; the next round tries again
                log.exception("audit checkpoint failed")
                await asyncio.sleep(min(every_s, 30.0))

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the records appended since the newest checkpoint, `checkpoint_every_records`
        at most (a backlog goes into several); None when there are none."""
        async with self._lock:
            previous = self.newest
            records = await self.store.in_unit(
                _query, "", "", None, self._anchored(),
                self.settings.checkpoint_every_records)
            if not records:
                self._head = self._anchored()  # nothing waits after all
                return None
            checkpoint = new_checkpoint(
                previous.seq + 1 if previous else 1, records, previous, _now(), self.key)
            object_key = await asyncio.to_thread(self.checkpoints.write, checkpoint)
            self.newest, self._since = checkpoint, time.monotonic()
            if self.outbox is not None:
                await self.outbox.transact(self._announce, checkpoint, object_key)
            self._head = max(self._head, checkpoint.records)
            log.info("audit checkpoint %d: records %d..%d, head %s", checkpoint.seq,
                     checkpoint.first_sequence, checkpoint.records, checkpoint.head_hash[:16])
            return checkpoint


    def _announce(self, u: Unit, checkpoint: Checkpoint, object_key: str) -> None:
        assert self.outbox is not None
        self.outbox.add(u, AuditCheckpointed(
            checkpoint=checkpoint.seq, first_sequence=checkpoint.first_sequence,
            records=checkpoint.records, head_hash=checkpoint.head_hash, object_key=object_key,
            key_id=checkpoint.key_id,
        ), tenant=PLATFORM_TENANT, actor="governance")


class AuditLog:
    def __init__(self, store: GovernanceStore, checkpointer: Checkpointer):
        self.store = store
        self.checkpointer = checkpointer
        # Every audit consumer appends here; one append at a time keeps the chain from forking.
        self._append_lock = asyncio.Lock()

    async def append(self, event: AuditEvent) -> AuditRecord | None:
        """The new record, or None when the event is already in the log (a redelivery)."""
        async with self._append_lock:
            record = await self.store.in_unit(Unit.append, event)
        if record:
            self.checkpointer.appended(record.sequence)
        return record

    async def query(
        self, caller: Principal, *, event_type_prefix: str = "", entity: str = "",
        tenant: str = "", after_sequence: int = 0, limit: int = 0,
    ) -> list[AuditRecord]:
        """Records after `after_sequence` in order (`limit` 0: the default page), of `tenant`
        (empty: every tenant the caller administers)."""
        return await self.store.in_unit(
            _query, event_type_prefix, entity, audit_scope(caller, tenant),
            check_after_sequence(after_sequence), query_limit(limit))

    async def verify(self, caller: Principal) -> VerifyResult:
        """The whole chain against every checkpoint; a tenant admin sees only whether it holds
        and its own record count."""
        tenant = audit_scope(caller, "")
        newest_written = self.checkpointer.newest.seq if self.checkpointer.newest else 0
        # Listed before the log is read: the records they anchor are all visible to the walk.
        # Appends may land while it reads: the log only grows, so the scan stays consistent.
        checkpoints = await asyncio.to_thread(self.checkpointer.checkpoints.snapshot)
        result = await self.store.in_unit(
            _verify, checkpoints, self.checkpointer.key.public_key(), newest_written, tenant)
        return result if tenant is None else result.seen_by_tenant_admin()


def _query(
    u: Unit, event_type_prefix: str, entity: str, tenant: str | None, after_sequence: int,
    limit: int,
) -> list[AuditRecord]:
    return u.query(event_type_prefix=event_type_prefix, entity=entity, tenant=tenant,
                   after_sequence=after_sequence, limit=limit)


def _verify(u: Unit, checkpoints, public_key, newest_written: int, tenant: str | None
            ) -> VerifyResult:
    return verify_chain(u.iter_audit(), checkpoints, public_key=public_key,
                        newest_written=newest_written, tenant=tenant)


def _now() -> str:
    return iso_utc(datetime.now(UTC))


# -- promotion policies and requests ----------------------------------------------------------


@dataclass(frozen=True)
class PromotionView:
    """A promotion request as governance decided it, with its approvals."""

    row: PromotionRow
    approvals: tuple[Approval, ...]


@dataclass(frozen=True)
class _Refused:
    """An approval or rejection refused: its ApprovalRefused is committed, then `error`
    raised."""

    error: Exception


class Promotions:
    """Tenant policies (versioned, each change announced: PolicyChanged) and the decisions on
    promotion requests (PolicyDecided): from the registry's ModelPromotionRequested, on each
    approval or rejection, on expiry, and again for every open request when the policy
    changes or the version's evaluation does."""

    def __init__(self, store: GovernanceStore, outbox: Outbox,
                 settings: PromotionSettings | None = None):
        self.store = store
        self.outbox = outbox
        self.settings = settings or PromotionSettings()

    # -- policies --------------------------------------------------------------------------
    async def set_policy(self, caller: Principal, tenant: str, text: str) -> Policy:
        tenant = administered_tenant(caller, tenant)
        parse_policy(text)  # InvalidArgument before anything is written
        return await self.outbox.transact(self._set_policy, caller, tenant, text, _now())

    def _set_policy(self, u: Unit, caller: Principal, tenant: str, text: str, now: str
                    ) -> Policy:
        newest = u.policy(tenant)
        policy = parse_policy(text, (newest.version if newest else 0) + 1, caller.key_id, now)
        u.add_policy(tenant, policy)
        self.outbox.add(u, PolicyChanged(
            policy_id=policy_id(tenant, policy.version), tenant=tenant, version=policy.version,
            author=caller.key_id, sha256=policy.sha256, yaml=policy.yaml,
            gated_stages=policy.gated_stages), tenant=tenant, actor=caller.key_id)
        for row in u.open_promotions(tenant):
            self._reevaluate(u, row, policy, now, f"policy v{policy.version}")
        log.info("policy v%d of tenant %s set by %s", policy.version, tenant, caller.key_id)
        return policy

    async def get_policy(self, caller: Principal, tenant: str = "", version: int = 0) -> Policy:
        """The tenant's policy `version` (0: the one in force; the built-in default when the
        tenant has set none). Any role of the tenant may read it; another tenant's needs its
        admin."""
        tenant = self._readable_tenant(caller, tenant)
        policy = await self.store.in_unit(Unit.policy, tenant, version)
        if policy is None:
            if version:
                raise NotFound(f"tenant {tenant} has no policy version {version}")
            return DEFAULT_POLICY
        return policy

    async def history(self, caller: Principal, tenant: str = "") -> list[Policy]:
        return await self.store.in_unit(
            Unit.policy_history, self._readable_tenant(caller, tenant))

    @staticmethod
    def _readable_tenant(caller: Principal, tenant: str) -> str:
        if not tenant or tenant == caller.tenant:
            return caller.tenant
        return administered_tenant(caller, tenant)

    # -- requests --------------------------------------------------------------------------
    async def on_requested(self, tenant: str, data: ModelPromotionRequested) -> None:
        """Decide a new request; a known one with new evidence (reason "evaluated") is
        re-evaluated while open; a redelivered one changes nothing."""
        await self.outbox.transact(self._on_requested, tenant, data, _now())

    def _on_requested(self, u: Unit, tenant: str, data: ModelPromotionRequested, now: str
                      ) -> None:
        known = u.promotion(data.request_id)
        if known is not None:
            if known.tenant != tenant:
                log.warning("promotion request %s of tenant %s named again by tenant %s: "
                            "ignored", data.request_id, known.tenant, tenant)
                return
            if data.reason == "evaluated" and known.status in OPEN_STATUSES:
                known.facts = data.model_dump(mode="json")
                self._reevaluate(u, known, self._policy(u, tenant), now, "new evaluation")
            return
        policy = self._policy(u, tenant)
        expires = iso_utc(datetime.fromisoformat(now) + timedelta(
            seconds=self.settings.request_ttl_s))
        row = PromotionRow(
            request_id=data.request_id, tenant=tenant, ref=data.ref, stage=data.to_stage,
            requester=data.requester, facts=data.model_dump(mode="json"), status="",
            policy_version=policy.version, verdicts=[], reason="", created_at=now,
            expires_at=expires, updated_at=now)
        decision = decide(policy, row.stage, Facts(row.facts))
        self._record(u, row, policy, decision, (), now, "requested", new=True)

    async def list_requests(self, caller: Principal, status: str = "", tenant: str = "",
                            limit: int = 0) -> list[PromotionView]:
        tenant = self._readable_tenant(caller, tenant)
        await self.expire_due()
        return await self.store.in_unit(self._list, tenant, status, query_limit(limit))

    @staticmethod
    def _list(u: Unit, tenant: str, status: str, limit: int) -> list[PromotionView]:
        rows = u.promotions(tenant, (status,) if status else (), limit)
        return [PromotionView(r, u.approvals(r.request_id)) for r in rows]

    async def get(self, caller: Principal, request_id: str) -> PromotionView:
        await self.expire_due()
        view = await self.store.in_unit(self._get, request_id)
        if view is None or (view.row.tenant != caller.tenant
                            and not caller.administers(view.row.tenant)):
            raise NotFound(f"promotion request {request_id!r} not found")
        return view

    @staticmethod
    def _get(u: Unit, request_id: str) -> PromotionView | None:
        row = u.promotion(request_id)
        return PromotionView(row, u.approvals(request_id)) if row else None

    async def approve(self, caller: Principal, request_id: str, comment: str = ""
                      ) -> PromotionView:
        """Record `caller`'s approval and decide again. Refused (and the refusal audited):
        a key that may not approve, the requester's own key, a request that expired or is
        closed."""
        return await self._review(caller, request_id, "approve", comment)

    async def reject(self, caller: Principal, request_id: str, reason: str) -> PromotionView:
        if not reason.strip():
            raise InvalidArgument("reason", "required: say why the request is rejected")
        return await self._review(caller, request_id, "reject", reason)

    async def _review(self, caller: Principal, request_id: str, action: str, text: str
                      ) -> PromotionView:
        if not request_id.strip():
            raise InvalidArgument("request_id", "required")
        result = await self.outbox.transact(self._review_in_unit, caller, request_id, action,
                                            text, _now())
        if isinstance(result, _Refused):
            raise result.error
        return result

    def _review_in_unit(self, u: Unit, caller: Principal, request_id: str, action: str,
                        text: str, now: str) -> PromotionView | _Refused:
        row = u.promotion(request_id)
        if row is None or (row.tenant != caller.tenant and not caller.administers(row.tenant)):
            raise NotFound(f"promotion request {request_id!r} not found")
        policy = self._policy(u, row.tenant, row.policy_version)

        def refuse(error: Exception) -> _Refused:
            self.outbox.add(u, ApprovalRefused(
                request_id=request_id, caller=caller.key_id, action=action, reason=str(error)),
                tenant=row.tenant, actor=caller.key_id)
            log.info("%s of %s by %s refused: %s", action, request_id, caller.key_id, error)
            return _Refused(error)

        if row.status in OPEN_STATUSES and row.expires_at <= now:
            self._expire(u, row, now)
        if caller.key_id == row.requester:
            return refuse(PermissionDenied(
                f"{action}: key {caller.key_id} requested {row.ref} -> {row.stage} itself: "
                "someone other than the requester must review it"))
        if not caller.can("approve") or not may_approve(policy, row.stage, caller.roles):
            return refuse(PermissionDenied(
                f"{action}: key {caller.key_id} (roles {', '.join(caller.roles) or 'none'}) may "
                f"not review promotions to {row.stage}; a {_approver_role(policy, row.stage)} "
                "or an admin may"))
        if row.status == EXPIRED:
            return refuse(FailedPrecondition(
                f"{action}: request {request_id} expired at {row.expires_at}; request the "
                "promotion again"))
        if row.status not in OPEN_STATUSES:
            return refuse(FailedPrecondition(
                f"{action}: request {request_id} is {row.status}, not awaiting approval"))
        approvals = u.approvals(request_id)
        if action == "reject":
            self.outbox.add(u, PromotionRejected(
                request_id=request_id, ref=row.ref, reviewer=caller.key_id, reason=text),
                tenant=row.tenant, actor=caller.key_id)
            self._record(u, row, policy, Decision(REJECTED, _verdicts(row)), approvals, now,
                         f"rejected by {caller.key_id}: {text}")
            return PromotionView(row, approvals)
        if any(a.approver == caller.key_id for a in approvals):
            return PromotionView(row, approvals)  # a retried approval
        approval = Approval(caller.key_id, tuple(caller.roles), now, text)
        u.add_approval(request_id, approval)
        self.outbox.add(u, PromotionApproved(
            request_id=request_id, ref=row.ref, approver=caller.key_id,
            role=",".join(caller.roles), comment=text), tenant=row.tenant, actor=caller.key_id)
        approvals = (*approvals, approval)
        self._record(u, row, policy, decide(policy, row.stage, Facts(row.facts, approvals)),
                     approvals, now, f"approved by {caller.key_id}")
        return PromotionView(row, approvals)

    # -- expiry ----------------------------------------------------------------------------
    async def expire_due(self) -> int:
        """Expire every open request past its time (announced); how many."""
        return await self.outbox.transact(self._expire_due, _now())

    def _expire_due(self, u: Unit, now: str) -> int:
        due = [r for r in u.open_promotions() if r.expires_at <= now]
        for row in due:
            self._expire(u, row, now)
        return len(due)

    def _expire(self, u: Unit, row: PromotionRow, now: str) -> None:
        policy = self._policy(u, row.tenant, row.policy_version)
        self._record(u, row, policy, Decision(EXPIRED, _verdicts(row)),
                     u.approvals(row.request_id), now, f"expired at {row.expires_at}")

    async def sweep(self) -> None:
        """Background: expire due requests every `sweep_every_s`."""
        while True:
            await asyncio.sleep(self.settings.sweep_every_s)
            try:
                expired = await self.expire_due()
                if expired:
                    log.info("expired %d promotion request(s)", expired)
            except Exception:  # noqa: BLE001 - sweep again next round
                log.exception("promotion expiry sweep failed")

    # -- shared ----------------------------------------------------------------------------
    @staticmethod
    def _policy(u: Unit, tenant: str, version: int | None = None) -> Policy:
        """The tenant's policy `version` (None: the one in force; 0: the built-in default)."""
        if version == 0:
            return DEFAULT_POLICY
        return u.policy(tenant, version or 0) or DEFAULT_POLICY

    def _reevaluate(self, u: Unit, row: PromotionRow, policy: Policy, now: str, why: str
                    ) -> None:
        approvals = u.approvals(row.request_id)
        decision = decide(policy, row.stage, Facts(row.facts, approvals))
        self._record(u, row, policy, decision, approvals, now, f"re-evaluated: {why}")

    def _record(self, u: Unit, row: PromotionRow, policy: Policy, decision: Decision,
                approvals: tuple[Approval, ...], now: str, reason: str, new: bool = False
                ) -> None:
        """Store the decision and announce it (PolicyDecided) when it is new or changed."""
        verdicts = [v.as_dict() for v in decision.verdicts]
        changed = new or (row.status, row.verdicts, row.policy_version) != (
            decision.status, verdicts, policy.version)
        row.status, row.verdicts, row.policy_version = decision.status, verdicts, policy.version
        row.reason, row.updated_at = reason, now
        if new:
            u.add_promotion(row)
        else:
            u.save_promotion(row)
        if not changed:
            return
        self.outbox.add(u, PolicyDecided(
            request_id=row.request_id, ref=row.ref, model_name=row.facts.get("model_name", ""),
            version=int(row.facts.get("version", 0)), stage=row.stage, status=decision.status,
            policy_version=policy.version, verdicts=verdicts,
            approvals=[a.approver for a in approvals], requester=row.requester, reason=reason,
        ), tenant=row.tenant, actor="governance")


def _verdicts(row: PromotionRow) -> tuple[Verdict, ...]:
    return tuple(Verdict(str(v["rule"]), bool(v["ok"]), str(v["message"])) for v in row.verdicts)


def _approver_role(policy: Policy, stage: str) -> str:
    rule = policy.approvals_rule(stage)
    return rule.role if rule else "reviewer"


# -- lineage ----------------------------------------------------------------------------------

MAX_LINEAGE_ROUNDS = 20  # fetches of referenced entities (a dataset's parents add one each)


class Lineages:
    """The lineage graph of a model version, read from the audit log (lineage.build_lineage).
    Any key of the tenant may read it (viewers too); another tenant's needs its admin."""

    def __init__(self, store: GovernanceStore):
        self.store = store

    async def get(self, caller: Principal, model_name: str, version: int, tenant: str = ""
                  ) -> Lineage:
        if not model_name.strip():
            raise InvalidArgument("model_name", "required")
        if version < 1:
            raise InvalidArgument("version", "must be >= 1")
        tenant = Promotions._readable_tenant(caller, tenant)
        lineage = await self.store.in_unit(_lineage, tenant, model_name, version)
        if lineage is None:
            raise NotFound(f"model version {model_name}@{version} not found")
        return lineage


def _lineage(u: Unit, tenant: str, model_name: str, version: int) -> Lineage | None:
    """Fetch the version's records (its model's events), then the
    entities they reference (job, datasets and parents, requests) and the job's evaluations,
    until nothing new is referenced; build the graph."""
    name = data_fragment("model_name", model_name)
    records = {r.sequence: r for r in u.matching(
        tenant, event_type_prefix="llmstudio.model.", data_contains=name)}
    fetched: set[str] = set()
    evaluated: set[str] = set()
    for _ in range(MAX_LINEAGE_ROUNDS):
        entities, jobs = references(records.values(), model_name, version, tenant)
        new_entities, new_jobs = entities - fetched, jobs - evaluated
        if not new_entities and not new_jobs:
            break
        if new_entities:
            records.update((r.sequence, r) for r in u.matching(tenant, entities=new_entities))
        for job_id in new_jobs:
            records.update((r.sequence, r) for r in u.matching(
                tenant, event_type_prefix="llmstudio.eval.",
                data_contains=data_fragment("job_id", job_id)))
        fetched |= new_entities
        evaluated |= new_jobs
    return build_lineage(records.values(), model_name, version, tenant)
