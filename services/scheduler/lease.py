"""Which scheduler replica places jobs: a leader lease in a NATS KV bucket.

Every replica serves gRPC and handles reports (they share the database, and every change is a
compare-and-set on the job's version, so two replicas never both apply one). Placement (and
taking jobs back from lost workers) runs on one replica only, the holder of the lease: the key
`placement` of a bucket whose entries live `ttl_s`. The holder renews it every `ttl_s / 3`
with a compare-and-set on the revision it wrote; the others try to create it as often, which
succeeds only once it has expired, so a dead leader is replaced within `ttl_s + ttl_s / 3`
(under two TTLs). A holder that could not renew for `ttl_s` stops placing on its own, before
any other replica can have taken over. Even two replicas placing at once could not place a job
twice: an assignment is a compare-and-set on the job row.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from llmstudio.bus import LEASE_BUCKET, Bus

log = logging.getLogger(__name__)


KEY = "placement"


class LeaderLease:
    def __init__(self, bus: Bus, replica_id: str, ttl_s: float):
        self.bus = bus
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self._revision: int | None = None  # of our entry, while we hold the lease
        self._valid_until = 0.0  # monotonic: when our lease lapses unless renewed

    def held(self) -> bool:
        return self._revision is not None and time.monotonic() < self._valid_until

    async def run(self) -> None:
        kv = await self.bus.kv(LEASE_BUCKET, ttl_s=self.ttl_s)
        while True:
            try:
                await self.refresh(kv)
            except Exception as e:  # noqa: BLE001 - the broker may be away: try again
                log.warning("leader lease not refreshed: %s", e)
            await asyncio.sleep(self.ttl_s / 3)

    async def refresh(self, kv: KeyValue) -> None:
        """Renew the lease we hold, or take it if it is free."""
        was = self.held()
        value = self.replica_id.encode()
        started = time.monotonic()
        try:
            if self._revision is not None:
                self._revision = await kv.update(KEY, value, last=self._revision)
            else:
                self._revision = await kv.create(KEY, value)
            self._valid_until = started + self.ttl_s
        except (KeyWrongLastSequenceError, NotFoundError):
            self._revision = None  # another replica holds it (or took it over)
        if self.held() != was:
            log.warning("replica %s %s the placement lease", self.replica_id,
                        "holds" if self.held() else "lost")
