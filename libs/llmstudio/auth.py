"""API keys -> principals (tenant, roles), and who may call what.

Governance issues keys and publishes `sha256(secret) -> principal` into a JetStream key-value
bucket. Every service watches that bucket into memory (`KeyDirectory`), so checking a key costs
no RPC and a revoked key stops working everywhere as soon as the delete arrives.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import secrets
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

KEY_PREFIX = "lls_"
# An admin of this tenant is a platform admin: it administers every tenant (keys, quotas,
# audit); an admin of any other tenant administers that tenant only.
PLATFORM_TENANT = "default"
ROLES = ("admin", "developer", "reviewer", "viewer")
# What each role may do. "read": get/list/watch; "write": create/cancel/stage and request
# promotions; "approve": approve or reject promotion requests (never one's own); "admin": keys,
# policies, audit.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "developer": frozenset({"read", "write"}),
    "reviewer": frozenset({"read", "approve"}),
    "admin": frozenset({"read", "write", "approve", "admin"}),
}


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    roles: tuple[str, ...] = field(default_factory=tuple)
    name: str = ""

    def can(self, permission: str) -> bool:
        return any(permission in ROLE_PERMISSIONS.get(r, ()) for r in self.roles)

    @property
    def is_platform_admin(self) -> bool:
        return self.tenant == PLATFORM_TENANT and self.can("admin")

    def administers(self, tenant: str) -> bool:
        """May this principal manage `tenant`'s keys and read its audit?"""
        return self.can("admin") and (tenant == self.tenant or self.is_platform_admin)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Principal:
        d = json.loads(raw)
        return cls(d["key_id"], d["tenant"], tuple(d["roles"]), d.get("name", ""))


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "llmstudio_principal", default=None
)


def current_principal() -> Principal:
    p = _current.get()
    if p is None:
        raise RuntimeError("no authenticated principal in this context")
    return p


def set_current_principal(p: Principal | None) -> contextvars.Token:
    return _current.set(p)


class KeyDirectory:
    """In-memory copy of the key bucket, kept current by a KV watch."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Principal] = {}
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    def lookup(self, secret: str) -> Principal | None:
        return self._by_hash.get(hash_secret(secret)) if secret else None

    def put(self, key_hash: str, principal: Principal) -> None:
        self._by_hash[key_hash] = principal

    async def start(self, kv) -> None:
        watcher = await kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher))
        await asyncio.wait_for(self.ready.wait(), 10)

    async def _follow(self, watcher) -> None:
        # nats-py sends None once the initial values are delivered; later entries are live.
        while True:
            try:
                entry = await watcher.updates(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep watching through reconnects
                log.warning("key watch: %s", e)
                await asyncio.sleep(1)
                continue
            if entry is None:
                self.ready.set()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self._by_hash.pop(entry.key, None)
                continue
            try:
                self._by_hash[entry.key] = Principal.from_json(entry.value)
            except (ValueError, KeyError, TypeError) as e:
                # one bad value must not stop the watch (revocations would stop applying):
                # the key it names is unknown here, and the rest go on
                self._by_hash.pop(entry.key, None)
                log.error("key bucket: ignoring the malformed value of %s: %s", entry.key, e)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
