"""The runtime every service's `__main__` wires: settings, logging, tracing, bus, key directory,
gRPC server, background tasks, and a graceful stop on SIGTERM/SIGINT.

A service supplies a `build(rt)` function that subscribes its bus handlers and returns its gRPC
servicers; everything else is the same for all six.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from . import telemetry
from .auth import KeyDirectory
from .authfailures import AuthFailures
from .bus import Bus
from .config import Settings
from .grpcutil import Registration, start_server, stop_server

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    name: str
    settings: Settings
    bus: Bus
    keys: KeyDirectory = field(default_factory=KeyDirectory)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_started: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    grpc_port: int = 0

    def artifact_store(self):
        from .storage import artifact_store_from_settings

        return artifact_store_from_settings(self.settings)


def configure_logging(name: str) -> None:
    level = os.environ.get("LLMSTUDIO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
    )
    # llmstudio.bus.*: the broker's per-message "Received"/"Processed" lines
    for noisy in ("faststream", "nats", "grpc", "llmstudio.bus"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def run(
    name: str,
    build: Callable[[Runtime], Coroutine[Any, Any, list[Registration]]],
    settings: Settings | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    settings = settings or Settings()
    configure_logging(name)
    telemetry.setup_tracing(name, settings.otel_exporter, settings.otel_endpoint)
    rt = Runtime(name, settings, Bus(settings, name))
    registrations = await build(rt)
    await rt.bus.start()
    await rt.keys.start(await rt.bus.kv())

    server = health = None
    if registrations:
        port = settings.listen_port(name)
        refused = AuthFailures(name, lambda e: rt.bus.publish(e, tenant="system", actor=name))
        server, health, rt.grpc_port = await start_server(
            name, registrations, rt.keys, settings.grpc_host, port, on_refused=refused,
            cert_file=settings.tls_cert_file, key_file=settings.tls_key_file,
        )
    for hook in rt.on_started:
        await hook()
    tasks = [asyncio.create_task(fn(), name=f"{name}-bg") for fn in rt.background]

    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    _write_ready_file(settings, name, rt.grpc_port)
    log.info("%s ready (grpc port %s)", name, rt.grpc_port or "-")
    await stop_event.wait()

    log.info("%s stopping", name)
    for hook in rt.on_stop:
        await hook()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if server is not None:
        await stop_server(server, health)
    await rt.keys.stop()
    await rt.bus.stop()
    telemetry.shutdown_tracing()
    _ready_path(settings, name).unlink(missing_ok=True)


def _ready_path(settings: Settings, name: str):
    return settings.data_dir / "run" / f"{name}.ready"


def _write_ready_file(settings: Settings, name: str, port: int) -> None:
    path = _ready_path(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()} {port}\n")


def main(name: str, build: Callable[[Runtime], Coroutine[Any, Any, list[Registration]]]) -> None:
    asyncio.run(run(name, build))
