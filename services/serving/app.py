"""Wiring of the serving service: store (migrated at start), outbox, model pool, use cases, bus
handlers, the gRPC servicer and the OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio

from llmstudio.grpcutil import Registration
from llmstudio.ml.allocator import return_freed_tensors_to_os
from llmstudio.outbox import Outbox
from llmstudio.service import Runtime
from llmstudio.v1 import serving_pb2_grpc

from .api import ServingApi
from .handlers import ServingHandlers
from .http import build_app, http_server
from .pool import ModelPool
from .store import ServingStore
from .usecases import Serving


async def build(rt: Runtime) -> list[Registration]:
    return_freed_tensors_to_os()  # a long-running torch process: KV caches come and go
    store = ServingStore(rt.settings.db_url("serving"))
    await asyncio.to_thread(store.migrate)
    outbox = Outbox(store, rt.bus, defer_failures=True)
    pool = ModelPool(rt.artifact_store(), rt.settings)
    serving = Serving(store, outbox, pool)
    ServingHandlers(serving).subscribe(rt.bus)
    rt.background.append(outbox.run)

    if rt.settings.serving_http_port:
        server = http_server(build_app(serving, rt.keys), rt.settings)
        serve: list[asyncio.Task] = []

        async def start_http() -> None:  # listening before the service says it is ready
            serve.append(task := asyncio.create_task(server.serve(), name="serving-http"))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            if task.done():
                task.result()  # raises why it could not listen

        async def stop_http() -> None:
            server.should_exit = True
            await asyncio.gather(*serve, return_exceptions=True)

        rt.on_started.append(start_http)
        rt.on_stop.append(stop_http)

    async def close() -> None:
        await pool.close()
        store.dispose()

    rt.on_stop.append(close)
    return [
        Registration(
            add=serving_pb2_grpc.add_ServingServiceServicer_to_server,
            servicer=ServingApi(serving),
            full_name="llmstudio.v1.ServingService",
        )
    ]
