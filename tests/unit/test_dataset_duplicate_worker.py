"""The duplicate worker process: the same findings as the in-process scan, a dead worker is an
error rather than a hang, and an ingest that stops takes its worker down with it."""

from __future__ import annotations

import json
import random

import pytest

from services.dataset import ingest
from services.dataset.duplicate_worker import DuplicateScan, DuplicateWorker, WorkerFailed

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(count)]
    for index in range(10, count, 10):  # copies and one-word edits
        rows[index] = rows[index - 7] if index % 20 else rows[index - 3] + " zebra"
    return rows


def scan(scanner, rows: list[str], batch: int = 50):
    try:
        for start in range(0, len(rows), batch):
            scanner.add(rows[start:start + batch])
        (exact_rows, exact_firsts), near = scanner.finish()
    finally:
        scanner.close()
    return (exact_rows.tolist(), exact_firsts.tolist(),
            [part.tolist() for part in near] if near is not None else None)


@pytest.mark.parametrize("near_max_rows", [1_000, 130])
def test_the_worker_finds_what_the_in_process_scan_finds(near_max_rows):
    rows = texts(400)
    expected = scan(DuplicateScan(near_max_rows), rows)
    assert expected[0] and expected[2][0]  # both kinds occur
    assert scan(DuplicateWorker(near_max_rows), rows) == expected


def test_a_worker_that_died_is_an_error_not_a_hang():
    worker = DuplicateWorker(1_000)
    try:
        worker._process.kill()
        worker._process.wait()
        with pytest.raises(WorkerFailed):
            for _ in range(100):  # more batches than the queue holds
                worker.add(texts(50))
            worker.finish()
    finally:
        worker.close()


def test_a_cancelled_ingest_stops_its_worker(tmp_path, monkeypatch):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"text": row}) + "\n" for row in texts(3_000)),
                      encoding="utf-8")
    started: list = []
    make_scan = ingest._duplicate_scan

    def recording(path, limits):
        started.append(make_scan(path, limits))
        return started[-1]

    monkeypatch.setattr(ingest, "_duplicate_scan", recording)
    polls = iter(range(10**6))
    with pytest.raises(ingest.Cancelled):
        ingest.ingest(source, ingest.Options(name="stopped"), tmp_path / "work",
                      ingest.Limits(duplicate_worker_min_bytes=0),
                      should_stop=lambda: next(polls) >= 1)
    assert isinstance(started[0], DuplicateWorker)
    assert started[0]._process.poll() is not None  # not left running
