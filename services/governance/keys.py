"""API key use cases: bootstrap, issue, revoke, and keeping the key bucket equal to the table.

The table holds the truth (hashes only); the JetStream KV bucket is what every service's auth
interceptor reads, so each change is written to both, and the bucket is re-synced on start.
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

from .core import ApiKey, check_new_key, check_revocable, iso_utc, new_key_id
from .store import GovernanceStore

log = logging.getLogger(__name__)

BOOTSTRAP_TENANT = "default"
BOOTSTRAP_NAME = "bootstrap-admin"


class KeyManager:
    def __init__(self, store: GovernanceStore, bus: Bus, directory: KeyDirectory):
        self.store = store
        self.bus = bus
        self.directory = directory
        # Revocations are checked against the live admins; one at a time so two admins
        # revoking each other cannot both pass the last-admin check.
        self._revoke_lock = asyncio.Lock()

    async def bootstrap(self, configured_secret: str) -> str | None:
        """Create the first admin key when there is no key at all.

        Returns the secret when it was generated here (the caller shows it once), else None.
        """
        if await asyncio.to_thread(self.store.count_keys):
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
        for key in await asyncio.to_thread(self.store.list_keys):
            if key.revoked_at is None:
                await kv.put(key.key_hash, key.principal().to_json())
            elif key.key_hash in present:
                await kv.delete(key.key_hash)

    async def create(self, role: str, tenant: str, name: str, caller: Principal) -> tuple[ApiKey, str]:
        """Issue a key; returns it with its secret (the only time the secret exists)."""
        tenant = tenant or caller.tenant
        check_new_key(role, tenant, name)
        secret = new_secret()
        key = await self._issue(secret, role, tenant, name, actor=caller.key_id)
        return key, secret

    async def revoke(self, key_id: str, caller: Principal) -> ApiKey:
        async with self._revoke_lock:
            key = await asyncio.to_thread(self.store.get_key, key_id)
            if key is None:
                raise NotFound(f"API key {key_id!r} not found")
            live_admins = {
                k.key_id for k in await asyncio.to_thread(self.store.list_keys)
                if k.revoked_at is None and "admin" in k.roles
            }
            check_revocable(key, live_admins)
            newly = await asyncio.to_thread(self.store.revoke_key, key_id, _now())
        # Deleted even when revoked before: heals a bucket a failed earlier call left behind.
        await (await self.bus.kv(APIKEY_BUCKET)).delete(key.key_hash)
        if newly:
            await self.bus.publish(ApiKeyRevoked(key_id=key_id), tenant=key.tenant,
                                   actor=caller.key_id)
        return key

    async def _issue(self, secret: str, role: str, tenant: str, name: str, *, actor: str) -> ApiKey:
        key = ApiKey(
            key_id=new_key_id(), key_hash=hash_secret(secret), tenant=tenant, roles=(role,),
            name=name, created_at=_now(), created_by=actor,
        )
        await asyncio.to_thread(self.store.add_key, key)
        await (await self.bus.kv(APIKEY_BUCKET)).put(key.key_hash, key.principal().to_json())
        # The bucket watch would bring it too; this makes the key usable here at once.
        self.directory.put(key.key_hash, key.principal())
        await self.bus.publish(
            ApiKeyCreated(key_id=key.key_id, tenant=tenant, roles=list(key.roles), name=name),
            tenant=tenant, actor=actor,
        )
        return key


def _now() -> str:
    return iso_utc(datetime.now(UTC))
