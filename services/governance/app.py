"""Wiring of governance: store, audit consumers, key bootstrap and bucket sync, gRPC servicer."""

from __future__ import annotations

from llmstudio.grpcutil import Registration
from llmstudio.service import Runtime
from llmstudio.v1 import governance_pb2_grpc

from .api import GovernanceApi
from .audit import AuditLog
from .handlers import AuditHandlers
from .keys import KeyManager
from .store import GovernanceStore

BOOTSTRAP_BANNER = "Bootstrap admin API key (shown once, store it now): "


async def build(rt: Runtime) -> list[Registration]:
    store = GovernanceStore(rt.settings.db_url("governance"))
    audit = AuditLog(store)
    keys = KeyManager(store, rt.bus, rt.keys)
    AuditHandlers(audit).subscribe(rt.bus)

    async def provision_keys() -> None:
        generated = await keys.bootstrap(rt.settings.bootstrap_admin_key)
        if generated:
            # stdout only, never the log: the operator copies it from the first start.
            print(BOOTSTRAP_BANNER + generated, flush=True)
        await keys.sync_bucket()

    async def close_store() -> None:
        store.close()

    rt.on_started.append(provision_keys)
    rt.on_stop.append(close_store)
    return [
        Registration(
            add=governance_pb2_grpc.add_GovernanceServiceServicer_to_server,
            servicer=GovernanceApi(keys, audit),
            full_name="llmstudio.v1.GovernanceService",
        )
    ]
