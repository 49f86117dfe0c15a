"""Wiring of governance: store (migrated at start), outbox, audit consumers, the audit chain's
checkpointer (signing key file, artifact store), key bootstrap and bucket sync, gRPC servicer."""

from __future__ import annotations

import asyncio

from llmstudio.grpcutil import Registration
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime
from llmstudio.v1 import governance_pb2_grpc

from .anchor import CheckpointStore, load_or_create_signing_key
from .api import GovernanceApi
from .config import AuditAnchorSettings, PromotionSettings
from .handlers import AuditHandlers, PromotionHandlers
from .store import GovernanceStore
from .usecases import AuditLog, Checkpointer, KeyManager, Lineages, Promotions

BOOTSTRAP_BANNER = "Bootstrap admin API key (shown once, store it now): "


async def build(rt: Runtime) -> list[Registration]:
    store = GovernanceStore(rt.settings.db_url("governance"))
    await asyncio.to_thread(store.migrate)
    # A committed key change is reported as made (a new key's secret exists only in the reply);
    # its event waits in the outbox while NATS is down.
    outbox = Outbox(store, rt.bus, defer_failures=True)
    anchor_settings = AuditAnchorSettings()
    signing_key = await asyncio.to_thread(
        load_or_create_signing_key, anchor_settings.key_path(rt.settings.data_dir))
    checkpointer = Checkpointer(
        store, CheckpointStore(rt.artifact_store()), signing_key, anchor_settings, outbox)
    # Before the consumers append: the checkpointer counts from the newest anchored record.
    await checkpointer.start()
    audit = AuditLog(store, checkpointer)
    keys = KeyManager(store, outbox, rt.bus, rt.keys)
    AuditHandlers(audit).subscribe(rt.bus)
    promotions = Promotions(store, outbox, PromotionSettings())
    PromotionHandlers(promotions).subscribe(rt.bus)
    rt.background.extend([outbox.run, checkpointer.run, promotions.sweep])

    async def provision_keys() -> None:
        generated = await keys.bootstrap(rt.settings.bootstrap_admin_key)
        if generated:
            # stdout only, never the log: the operator copies it from the first start.
            print(BOOTSTRAP_BANNER + generated, flush=True)
        await keys.sync_bucket()

    async def close_store() -> None:
        store.dispose()

    rt.on_started.append(provision_keys)
    rt.on_stop.append(close_store)
    return [
        Registration(
            add=governance_pb2_grpc.add_GovernanceServiceServicer_to_server,
            servicer=GovernanceApi(keys, audit, promotions, Lineages(store)),
            full_name="llmstudio.v1.GovernanceService",
        )
    ]
