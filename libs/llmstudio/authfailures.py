"""Calls refused for their credentials, announced as AuthenticationFailed (audited by
governance), at most one per caller address and service each interval: a client retrying a bad
key in a loop, or someone guessing keys, cannot flood the audit log. The next record after a
quiet interval says how many refusals it stands for."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .events import AuthenticationFailed
from .grpcutil import Refusal

log = logging.getLogger(__name__)
INTERVAL_S = 10.0
MAX_CALLERS = 10_000  # callers remembered: beyond, the oldest are forgotten


class AuthFailures:
    def __init__(self, service: str, publish: Callable[[AuthenticationFailed], Awaitable[object]],
                 interval_s: float | None = None):
        self.service = service
        self.publish = publish
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self._last: dict[str, float] = {}  # caller address -> when its last record went out
        self._suppressed: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, refusal: Refusal) -> None:
        peer_host = refusal.peer.rsplit(":", 1)[0]  # the address, not its ephemeral port
        now = time.monotonic()
        if now - self._last.get(peer_host, -self.interval_s) < self.interval_s:
            self._suppressed[peer_host] = self._suppressed.get(peer_host, 0) + 1
            return
        if len(self._last) >= MAX_CALLERS:
            oldest = min(self._last, key=self._last.__getitem__)
            self._last.pop(oldest)
            self._suppressed.pop(oldest, None)
        self._last[peer_host] = now
        event = AuthenticationFailed(
            service=self.service, method=refusal.method, peer=refusal.peer, code=refusal.code,
            reason=refusal.reason, key_id=refusal.key_id,
            refused=1 + self._suppressed.pop(peer_host, 0))
        task = asyncio.get_running_loop().create_task(self._send(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, event: AuthenticationFailed) -> None:
        try:
            await self.publish(event)
        except Exception as e:  # noqa: BLE001 - the refusal stands; only its record is lost
            log.warning("could not announce a refused call (%s): %s", event.method, e)
