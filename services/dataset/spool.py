"""The spool: local disk where ingests work, one folder each, removed when the ingest ends. An
upload is streamed into it chunk by chunk (never held whole), up to the upload size limit."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
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


async def receive(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int) -> str:
    """Write the chunks to `dest` as they arrive; returns their sha256. Raises ResourceExhausted
    past `max_bytes` (the caller's workdir goes, and the partial file with it)."""
    digest, size = hashlib.sha256(), 0
    with dest.open("wb") as sink:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise ResourceExhausted(f"upload is larger than the limit of {max_bytes} bytes")
            digest.update(chunk)
            await asyncio.to_thread(sink.write, chunk)
    return digest.hexdigest()
