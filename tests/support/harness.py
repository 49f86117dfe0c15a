"""Run a service in-process against real servers, and mint API keys, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import nats

from llmstudio.auth import Principal, hash_secret, new_secret
from llmstudio.bus import APIKEY_BUCKET
from llmstudio.config import Settings
from llmstudio.service import run


async def put_api_key(nats_url: str, role: str, tenant: str = "default") -> str:
    """Write a key straight into the key bucket (what governance does) and return its secret."""
    secret = new_secret()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            kv = await js.key_value(APIKEY_BUCKET)
        except Exception:  # noqa: BLE001 - first writer creates the bucket
            kv = await js.create_key_value(bucket=APIKEY_BUCKET, history=1)
        principal = Principal(f"key-{uuid.uuid4().hex[:8]}", tenant, (role,), f"test-{role}")
        await kv.put(hash_secret(secret), principal.to_json())
    finally:
        await nc.close()
    return secret


@contextlib.asynccontextmanager
async def running(name: str, build, settings: Settings, timeout: float = 30):
    """Start `run(name, build)` as a task; yield the gRPC port once its ready file appears."""
    stop = asyncio.Event()
    ready = settings.data_dir / "run" / f"{name}.ready"
    ready.unlink(missing_ok=True)
    task = asyncio.create_task(run(name, build, settings, stop_event=stop))
    deadline = asyncio.get_running_loop().time() + timeout
    while not ready.exists():
        if task.done():
            task.result()  # raises the service's startup error
        assert asyncio.get_running_loop().time() < deadline, f"{name} not ready in {timeout}s"
        await asyncio.sleep(0.05)
    port = int(ready.read_text().split()[1])
    try:
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
