"""Waiting, in tests that drive real processes, for what they do in their own time."""

from __future__ import annotations

import asyncio
import inspect
import time


def wait_for(fetch, timeout: float, what: str, interval: float = 0.2):
    """`fetch()` until it returns something truthy (returned), or AssertionError after
    `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fetch()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_for_async(fetch, timeout: float, what: str, interval: float = 0.05):
    """`wait_for` inside a test's event loop: sleeps without blocking it (`fetch` may be a
    coroutine function)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = fetch()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
