"""Reading back what was published: the messages JetStream holds, through an ephemeral consumer."""

from __future__ import annotations

import asyncio

import nats

from llmstudio.bus import stream_for


async def stream_messages(nats_url: str, subject_filter: str, n: int, timeout: float = 10.0):
    """The messages JetStream holds on `subject_filter`, oldest first, read from the start of the
    stream: waits up to `timeout` for `n` of them, then takes whatever else is there, so a caller
    comparing the list (or its length) sees any extra one."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject_filter, stream=stream_for(subject_filter))
        messages: list = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(messages) < n and asyncio.get_running_loop().time() < deadline:
            try:
                messages += await sub.fetch(n - len(messages), timeout=1)
            except nats.errors.TimeoutError:
                pass
        try:
            messages += await sub.fetch(1, timeout=0.5)
        except nats.errors.TimeoutError:
            pass
        return messages
    finally:
        await nc.close()


async def all_stream_messages(nats_url: str, subject_filter: str, idle_s: float = 1.0):
    """Every message JetStream holds on `subject_filter`, oldest first: read until a fetch
    waits `idle_s` for nothing."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(subject_filter, stream=stream_for(subject_filter))
        messages: list = []
        while True:
            try:
                messages += await sub.fetch(256, timeout=idle_s)
            except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                return messages
    finally:
        await nc.close()
