"""The key bucket's watcher (every service's copy of the API keys) outlives a malformed value:
the key it names stays unknown, and later keys and revocations still apply."""

from __future__ import annotations

import asyncio

import nats

from llmstudio.auth import KeyDirectory, hash_secret, new_secret
from llmstudio.bus import APIKEY_BUCKET
from tests.support.harness import put_api_key
from tests.support.waiting import wait_for_async


async def test_a_malformed_value_leaves_the_watch_running(nats_server):
    nc = await nats.connect(nats_server.url)
    directory = KeyDirectory()
    try:
        kv = await nc.jetstream().create_key_value(bucket=APIKEY_BUCKET, history=1)
        before = await put_api_key(nats_server.url, "developer")
        await directory.start(kv)
        known = await wait_for_async(lambda: directory.lookup(before), 10, "the first key")
        assert known.roles == ("developer",)

        broken = new_secret()
        for value in (b"not json", b'{"tenant": "a"}', b'["a", "list"]'):
            await kv.put(hash_secret(broken), value)
        after = await put_api_key(nats_server.url, "viewer")
        await wait_for_async(lambda: directory.lookup(after), 10, "a key put after the bad ones")
        assert directory.lookup(broken) is None
        await kv.delete(hash_secret(before))  # a revocation still applies
        await wait_for_async(lambda: directory.lookup(before) is None, 10, "the revocation")
        await asyncio.sleep(0.1)
        assert directory._task is not None and not directory._task.done()
    finally:
        await directory.stop()
        await nc.close()
