"""The duplicate scans of a large ingest, the near-duplicate scan in a worker process:
ingest's second core.

    scanner = DuplicateWorker(near_max_rows)  # starts python -m services.dataset.duplicate_worker
    scanner.add(texts)                         # each batch of row texts, in row order
    exact, near = scanner.finish()             # ExactDuplicates/NearDuplicates.finish_arrays()
    scanner.close()                            # always (stops a worker that is still running)

DuplicateScan does it all in this process (small files: a worker costs ~0.3 s to start).

The ingest thread validates, scans for PII, writes rows, normalizes each batch (NFKC, case,
whitespace) and hashes it for exact duplicates, while the worker tokenizes and MinHashes the
previous normalized batches: the split that gives both cores about the same work. A feeder
thread pickles the batches onto the worker's stdin, at most QUEUED_BATCHES ahead (memory stays
bounded when the worker is the slower side); the worker answers once, at end of input, with its
finished arrays. The signatures (72 bytes a row) live in the worker. A subprocess, not
multiprocessing: the service's __main__ starts a service, and forking a process with gRPC
threads is unsafe.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from typing import IO

import numpy as np

from .dedup import ExactDuplicates, NearDuplicates, NormalizedBatch, normalize_batch

QUEUED_BATCHES = 8
_LENGTH = struct.Struct("<Q")
_END = None

Arrays = tuple[np.ndarray, ...]


class WorkerFailed(RuntimeError):
    pass


def _write_message(stream: IO[bytes], value: object) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)


def _read_message(stream: IO[bytes]) -> object:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the other side closed the pipe")
    return pickle.loads(stream.read(_LENGTH.unpack(header)[0]))


class DuplicateWorker:
    def __init__(self, near_max_rows: int) -> None:
        self.local = DuplicateScan(0)  # exact duplicates, and each batch's normalization
        self.near_max_rows = near_max_rows
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "services.dataset.duplicate_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._batches: queue.Queue = queue.Queue(QUEUED_BATCHES)
        self._feed_error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, name="duplicate-feeder", daemon=True)
        self._feeder.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _feed(self) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            while (batch := self._batches.get()) is not _END:
                _write_message(stdin, batch)
            _write_message(stdin, _END)
            stdin.close()
        except BaseException as e:  # a worker that died: finish() reports it
            self._feed_error = e

    def add(self, texts: list[str]) -> None:
        batch = self.local.add(texts)
        room = self.near_max_rows - (self.local.rows - len(batch))
        if room > 0:
            self._send(batch.head(room))

    def _send(self, batch: NormalizedBatch | None) -> None:
        while True:
            if self._feed_error is not None or self._process.poll() is not None:
                raise WorkerFailed(f"duplicate worker stopped ({self._feed_error or 'exited'})")
            try:
                self._batches.put(batch, timeout=1.0)
                return
            except queue.Full:
                continue

    def finish(self) -> tuple[Arrays, Arrays | None]:
        self._send(_END)
        self._feeder.join()
        assert self._process.stdout is not None
        try:
            near = _read_message(self._process.stdout)
        except EOFError:
            raise WorkerFailed(f"duplicate worker exited with {self._process.wait()}") from None
        self._process.wait()
        exact, _ = self.local.finish()
        return exact, near  # type: ignore[return-value]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:  # a broken pipe to a killed worker
                    pass
        if self._feeder.is_alive():
            try:
                self._batches.put_nowait(_END)
            except queue.Full:
                pass


class DuplicateScan:
    """Both scans in this process."""

    def __init__(self, near_max_rows: int) -> None:
        self.exact = ExactDuplicates()
        self.near = NearDuplicates() if near_max_rows > 0 else None
        self.near_max_rows, self.rows = near_max_rows, 0

    def add(self, texts: list[str]) -> NormalizedBatch:
        batch = normalize_batch(texts)  # each row normalized once for both scans
        self.exact.add_batch(batch)
        if self.near is not None and self.rows < self.near_max_rows:
            self.near.add_batch(batch.head(self.near_max_rows - self.rows))
        self.rows += len(batch)
        return batch

    def finish(self) -> tuple[Arrays, Arrays | None]:
        return self.exact.finish_arrays(), self.near.finish_arrays() if self.near else None

    def close(self) -> None:
        pass


def serve(source: IO[bytes], sink: IO[bytes]) -> None:
    """The worker: near duplicates of the normalized batches it reads, until _END."""
    near = NearDuplicates()
    while (batch := _read_message(source)) is not _END:
        near.add_batch(batch)  # type: ignore[arg-type]
    _write_message(sink, near.finish_arrays())
    sink.flush()


if __name__ == "__main__":
    from llmstudio.ml.allocator import return_freed_tensors_to_os

    # Each batch's hash matrix and the finish's per-band arrays are large blocks freed over and
    # over: pinned, they go back to the OS instead of growing the heap (as in the service).
    return_freed_tensors_to_os()
    serve(sys.stdin.buffer, sys.stdout.buffer)
