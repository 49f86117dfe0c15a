"""The trainer-worker's persistence: one row per job attempt run here (`trainer_runs`) and the
outbox of the job events it reports (`trainer_outbox`).

A report changes the run's row and queues its event in one transaction, so a worker that dies
between the two loses neither: its next start publishes what is queued, and a redelivered work
item of an attempt that finished here is recognised from the row.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, select

from llmstudio.db import UnitOfWorkStore
from llmstudio.outbox import OutboxUnit, now_iso, outbox_table

from .core import RUNNING

metadata = MetaData()

runs = Table(
    "trainer_runs",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("tenant", String(128), nullable=False),
    Column("worker_id", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("checkpoint_key", String(512), nullable=False),
    Column("started_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
)

outbox = outbox_table(metadata, "trainer")


class Unit(OutboxUnit):
    """The queries of one transaction (the outbox's from `OutboxUnit`)."""

    outbox_table = outbox

    def record(
        self, job_id: str, attempt: int, *, tenant: str, worker_id: str, status: str,
        checkpoint_key: str = "",
    ) -> None:
        """The attempt's new status (and newest checkpoint, when one is given)."""
        key = (runs.c.job_id == job_id) & (runs.c.attempt == attempt)
        now = now_iso()
        if self.conn.execute(select(runs.c.job_id).where(key)).first() is None:
            self.conn.execute(runs.insert().values(
                job_id=job_id, attempt=attempt, tenant=tenant, worker_id=worker_id,
                status=status, checkpoint_key=checkpoint_key, started_at=now, updated_at=now,
            ))
            return
        changes = {"status": status, "updated_at": now}
        if checkpoint_key:
            changes["checkpoint_key"] = checkpoint_key
        self.conn.execute(runs.update().where(key).values(**changes))

    def status(self, job_id: str, attempt: int) -> str | None:
        row = self.conn.execute(
            select(runs.c.status).where((runs.c.job_id == job_id) & (runs.c.attempt == attempt))
        ).first()
        return None if row is None else row.status

    def finished(self, job_id: str, attempt: int) -> bool:
        status = self.status(job_id, attempt)
        return status is not None and status != RUNNING


class TrainerStore(UnitOfWorkStore[Unit]):
    service = "trainer"
    metadata = metadata
    unit_class = Unit
    migrations = Path(__file__).parent / "migrations"
