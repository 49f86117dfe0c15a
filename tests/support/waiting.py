"""Waiting, in tests that drive real processes, for what they do in their own time."""

from __future__ import annotations

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
