"""Governance's use cases: API keys (bootstrap, issue, revoke, keeping the key bucket equal to
the table) and the audit log (append, query, verify).

Every store call runs in a worker thread. A key change and its event (ApiKeyCreated,
ApiKeyRevoked) are written in one transaction to the outbox, which publishes the event after the
commit. The table holds the truth (hashes only); the JetStream KV bucket is the key directory
every service's auth interceptor reads, so each change is also written there, and the bucket is
re-synced on start.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from nats.js.errors import NoKeysError

from llmstudio.auth import KeyDirectory, Principal, hash_secret, new_secret
from llmstudio.bus import APIKEY_BUCKET, Bus
from llmstudio.errors import NotFound
from llmstudio.events import ApiKeyCreated, ApiKeyRevoked
from llmstudio.outbox import Outbox

from .core import (
    ApiKey,
    AuditEvent,
    AuditRecord,
    VerifyResult,
    check_after_sequence,
    check_new_key,
    check_revocable,
    iso_utc,
    new_key_id,
    query_limit,
    verify_chain,
)
from .store import GovernanceStore, Unit

log = logging.getLogger(__name__)

BOOTSTRAP_TENANT = "default"
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
        if await self.store.in_unit(Unit.count_keys):
            return None
        secret = configured_secret or new_secret()
        await self._issue(secret, "admin", BOOTSTRAP_TENANT, BOOTSTRAP_NAME, actor=self.bus.service)
        log.info("created the bootstrap admin key (tenant %s)", BOOTSTRAP_TENANT)
        return None if configured_secret else secret

    async def sync_bucket(self) -> None:
        """Put every live key into the bucket and delete the revoked ones still in it."""
        kv = await self.bus.kv(APIKEY_BUCKET)
        try:
            present = set(await kv.keys())
        except NoKeysError:
            present = set()
        for key in await self.store.in_unit(Unit.list_keys):
            if key.revoked_at is None:
                await kv.put(key.key_hash, key.principal().to_json())
            elif key.key_hash in present:
                await kv.delete(key.key_hash)

    async def create(
        self, role: str, tenant: str, name: str, caller: Principal
    ) -> tuple[ApiKey, str]:
        """Issue a key; returns it with its secret (the only time the secret exists)."""
        tenant = tenant or caller.tenant
        check_new_key(role, tenant, name)
        secret = new_secret()
        key = await self._issue(secret, role, tenant, name, actor=caller.key_id)
        return key, secret

    async def revoke(self, key_id: str, caller: Principal) -> ApiKey:
        async with self._revoke_lock:
            key = await self.outbox.transact(self._revoke, key_id, caller.key_id, _now())
        # Deleted even when revoked before: heals a bucket a failed earlier call left behind.
        await (await self.bus.kv(APIKEY_BUCKET)).delete(key.key_hash)
        return key

    def _revoke(self, u: Unit, key_id: str, actor: str, now: str) -> ApiKey:
        key = u.get_key(key_id)
        if key is None:
            raise NotFound(f"API key {key_id!r} not found")
        live_admins = {
            k.key_id for k in u.list_keys() if k.revoked_at is None and "admin" in k.roles}
        check_revocable(key, live_admins)
        if u.revoke_key(key_id, now):
            self.outbox.add(u, ApiKeyRevoked(key_id=key_id), tenant=key.tenant, actor=actor)
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


class AuditLog:
    def __init__(self, store: GovernanceStore):
        self.store = store
        # Every audit consumer appends here; one append at a time keeps the chain from forking.
        self._append_lock = asyncio.Lock()

    async def append(self, event: AuditEvent) -> AuditRecord | None:
        """The new record, or None when the event is already in the log (a redelivery)."""
        async with self._append_lock:
            return await self.store.in_unit(Unit.append, event)

    async def query(
        self, caller: Principal, *, event_type_prefix: str = "", entity: str = "",
        after_sequence: int = 0, limit: int = 0,
    ) -> list[AuditRecord]:
        """Records after `after_sequence` in order (`limit` 0: the default page)."""
        # The log spans tenants: admins read all of it, anyone else only their tenant.
        tenant = None if caller.can("admin") else caller.tenant
        return await self.store.in_unit(
            _query, event_type_prefix, entity, tenant, check_after_sequence(after_sequence),
            query_limit(limit))

    async def verify(self) -> VerifyResult:
        # Appends may land while this reads: the log only grows, so the scan stays consistent.
        return await self.store.in_unit(_verify)


def _query(
    u: Unit, event_type_prefix: str, entity: str, tenant: str | None, after_sequence: int,
    limit: int,
) -> list[AuditRecord]:
    return u.query(event_type_prefix=event_type_prefix, entity=entity, tenant=tenant,
                   after_sequence=after_sequence, limit=limit)


def _verify(u: Unit) -> VerifyResult:
    return verify_chain(u.iter_audit())


def _now() -> str:
    return iso_utc(datetime.now(UTC))
