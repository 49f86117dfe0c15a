"""The audit log use cases: append (serialized), query, verify."""

from __future__ import annotations

import asyncio

from .core import AuditEvent, AuditRecord, VerifyResult, verify_chain
from .store import GovernanceStore


class AuditLog:
    def __init__(self, store: GovernanceStore):
        self.store = store
        # Every audit consumer appends here; one append at a time keeps the chain from forking.
        self._append_lock = asyncio.Lock()

    async def append(self, event: AuditEvent) -> AuditRecord | None:
        """The new record, or None when the event is already in the log (a redelivery)."""
        async with self._append_lock:
            return await asyncio.to_thread(self.store.append, event)

    async def query(
        self, *, event_type_prefix: str, entity: str, tenant: str | None, after_sequence: int,
        limit: int,
    ) -> list[AuditRecord]:
        return await asyncio.to_thread(
            self.store.query, event_type_prefix=event_type_prefix, entity=entity, tenant=tenant,
            after_sequence=after_sequence, limit=limit,
        )

    async def verify(self) -> VerifyResult:
        # Appends may land while this reads: the log only grows, so the scan stays consistent.
        return await asyncio.to_thread(lambda: verify_chain(self.store.iter_audit()))
