"""The spool: local disk where ingests work, one folder each, removed when the ingest ends. An
upload is streamed into it chunk by chunk (never held whole), up to the upload size limit."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmstudio.errors import ResourceExhausted


class Spool:
    def __init__(self, root: Path):
        self.root = root

    def clear(self) -> int:
        """Remove what ingests that died with a previous process left here (call it at start:
        this process owns the spool from then on); returns how many folders."""
        leftovers = list(self.root.glob("ingest-*")) if self.root.is_dir() else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return len(leftovers)

    @contextmanager
    def workdir(self) -> Iterator[Path]:
        """A fresh folder for one ingest, removed with everything in it when the block ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="ingest-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


class TenantUploads:
    """What each tenant may have in the spool at once: `max_uploads` uploads being received,
    `max_bytes` received by them together. Admission is checked before a byte is spooled, the
    bytes as each chunk arrives: one tenant cannot fill the disk or every upload slot."""

    def __init__(self, max_uploads: int, max_bytes: int):
        self.max_uploads, self.max_bytes = max_uploads, max_bytes
        self._uploads: dict[str, int] = {}
        self._bytes: dict[str, int] = {}

    @contextmanager
    def admit(self, tenant: str) -> Iterator[Callable[[int], None]]:
        """An upload of `tenant`, or ResourceExhausted; yields `take(n)`, which counts n more
        bytes against the tenant (ResourceExhausted past its budget). All returned at the end."""
        if self._uploads.get(tenant, 0) >= self.max_uploads:
            raise ResourceExhausted(
                f"tenant {tenant} has {self.max_uploads} uploads in progress; retry when one "
                "ends (LLMSTUDIO_DATASET_MAX_UPLOADS_PER_TENANT)")
        self._uploads[tenant] = self._uploads.get(tenant, 0) + 1
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self._bytes.get(tenant, 0) + n > self.max_bytes:
                raise ResourceExhausted(
                    f"tenant {tenant}'s uploads in progress would hold more than "
                    f"{self.max_bytes} bytes (LLMSTUDIO_DATASET_TENANT_SPOOL_BYTES)")
            self._bytes[tenant] = self._bytes.get(tenant, 0) + n
            taken += n

        try:
            yield take
        finally:
            self._uploads[tenant] -= 1
            self._bytes[tenant] = self._bytes.get(tenant, 0) - taken
            if not self._uploads[tenant]:
                del self._uploads[tenant]
                self._bytes.pop(tenant, None)


async def receive(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int,
                  take: Callable[[int], None] | None = None) -> str:
    """Write the chunks to `dest` as they arrive; returns their sha256. Raises ResourceExhausted
    past `max_bytes` or when `take` refuses a chunk (the caller's workdir goes, and the partial
    file with it)."""
    digest, size = hashlib.sha256(), 0
    with dest.open("wb") as sink:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise ResourceExhausted(f"upload is larger than the limit of {max_bytes} bytes")
            if take is not None:
                take(len(chunk))
            digest.update(chunk)
            await asyncio.to_thread(sink.write, chunk)
    return digest.hexdigest()
