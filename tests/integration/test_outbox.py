"""The shared transactional outbox (`llmstudio.outbox`) against a real nats-server: what is
written while NATS is down is published once it is back, in order, with the ids it was written
with, and removed from the outbox once JetStream has acked it. It runs on the registry's store
(its migrated `registry_outbox` table): any store with an outbox table would do."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import inspect

from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import Envelope, ModelStageChanged
from llmstudio.natsserver import start_nats_server
from llmstudio.outbox import Outbox
from services.registry.store import RegistryStore
from tests.support.bus import stream_messages

SUBJECTS = "llmstudio.model.stage_changed.>"


def migrated_store(tmp_path) -> RegistryStore:
    """A store with an outbox table (`registry_outbox`), as a service has at start."""
    store = RegistryStore(f"sqlite:///{tmp_path / 'o.db'}")
    store.migrate()
    return store


def stage_changed(version: int) -> ModelStageChanged:
    return ModelStageChanged(ref=f"m-v{version}", model_name="m", version=version,
                             from_stage="staging", to_stage="production")


def test_table_keeps_the_service_prefix(tmp_path):
    store = migrated_store(tmp_path)
    assert store.unit_class.outbox_table.name == "registry_outbox"
    assert "registry_outbox" in inspect(store.engine).get_table_names()
    store.dispose()


async def test_events_written_while_nats_is_down_are_published_later_in_order(
    nats_server, tmp_path
):
    store = migrated_store(tmp_path)
    bus = Bus(Settings(nats_url=nats_server.url, data_dir=tmp_path), "demo")
    outbox = Outbox(store, bus, interval_s=0.2)
    await bus.start()
    nats_server.stop()  # NATS goes down
    restarted = None
    try:
        with store.unit() as u:
            for version in (1, 2):
                outbox.add(u, stage_changed(version), tenant="acme", actor="alice",
                           traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        with store.unit() as u:
            outbox.add(u, stage_changed(3), tenant="acme")
        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises while down
            await asyncio.wait_for(outbox.flush(), timeout=10)
        assert await asyncio.wait_for(outbox.try_flush(), timeout=10) is False
        with store.unit() as u:
            pending = u.pending_events()
        assert [p.subject for p in pending] == [
            f"llmstudio.model.stage_changed.m-v{v}" for v in (1, 2, 3)]
        assert pending[0].traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")

        # NATS comes back (same port, same JetStream store); the background loop publishes.
        restarted = start_nats_server(nats_server.store_dir, port=nats_server.port)
        loop = asyncio.create_task(outbox.run())
        try:
            messages = await stream_messages(nats_server.url, SUBJECTS, 3)
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                with store.unit() as u:
                    if u.pending_events() == []:
                        break
                assert asyncio.get_running_loop().time() < deadline, "outbox not emptied"
                await asyncio.sleep(0.1)
        finally:
            loop.cancel()
        ids = [Envelope.model_validate_json(m.data).id for m in messages]
        assert ids == [Envelope.model_validate_json(p.envelope).id for p in pending]
        assert [m.subject for m in messages] == [p.subject for p in pending]
        assert messages[0].headers["Nats-Msg-Id"] == ids[0]
        # published in the stored trace
        trace_id = messages[0].headers["traceparent"].split("-")[1]
        assert trace_id == "0af7651916cd43dd8448eb211c80319c"
        await outbox.flush()  # nothing left: nothing published again
    finally:
        await bus.stop()
        if restarted:
            restarted.stop()
        store.dispose()


async def test_a_published_event_is_removed_from_the_outbox(nats_server, tmp_path):
    store = migrated_store(tmp_path)
    bus = Bus(Settings(nats_url=nats_server.url, data_dir=tmp_path), "demo")
    outbox = Outbox(store, bus)
    await bus.start()
    try:
        with store.unit() as u:
            outbox.add(u, stage_changed(7), tenant="acme")
        with store.unit() as u:
            [event] = u.pending_events()
        await outbox.flush()
        with store.unit() as u:
            assert u.pending_events() == []
        [message] = await stream_messages(nats_server.url, SUBJECTS, 1)
        assert Envelope.model_validate_json(message.data).id == (
            Envelope.model_validate_json(event.envelope).id)
    finally:
        await bus.stop()
        store.dispose()


async def test_a_transaction_s_events_reach_the_stream_in_the_order_written(nats_server, tmp_path):
    """A fresh bus (its first publish sets up the reply subscription) flushing many events of
    one transaction: the stream holds them in the order they were added."""
    store = migrated_store(tmp_path)
    bus = Bus(Settings(nats_url=nats_server.url, data_dir=tmp_path), "demo")
    outbox = Outbox(store, bus)
    await bus.start()
    try:
        with store.unit() as u:
            for version in range(1, 41):
                outbox.add(u, stage_changed(version), tenant="acme")
        await outbox.flush()
        messages = await stream_messages(nats_server.url, SUBJECTS, 40)
        versions = [Envelope.model_validate_json(m.data).data["version"] for m in messages]
        assert versions == list(range(1, 41))
        with store.unit() as u:
            assert u.pending_events() == []
    finally:
        await bus.stop()
        store.dispose()


class CountingStore(RegistryStore):
    """Counts the outbox reads (`pending_events` units)."""

    reads = 0

    async def in_unit(self, fn, *args):
        if fn.__name__ == "pending_events":
            type(self).reads += 1
        return await super().in_unit(fn, *args)


async def test_concurrent_use_cases_share_the_outbox_reads_and_every_event_goes_out(
        nats_server, tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path / 'o.db'}")
    store.migrate()
    bus = Bus(Settings(nats_url=nats_server.url, data_dir=tmp_path), "demo")
    outbox = Outbox(store, bus)
    await bus.start()
    try:
        def announce(u, version):
            outbox.add(u, stage_changed(version), tenant="acme")

        await asyncio.gather(*(outbox.transact(announce, v) for v in range(1, 51)))
        messages = await stream_messages(nats_server.url, SUBJECTS, 50)
        versions = [Envelope.model_validate_json(m.data).data["version"] for m in messages]
        assert sorted(versions) == list(range(1, 51))  # each once
        with store.unit() as u:
            assert u.pending_events() == []
        # a flush whose events a later read already published reads nothing itself
        assert CountingStore.reads < 50, CountingStore.reads
    finally:
        await bus.stop()
        store.dispose()
