"""bench/scheduler_load.py in small: a real scheduler process and nats-server, 20 jobs over gRPC
on 2 simulated workers; every job is placed exactly once and succeeds, and the figures the bench
reports are there and consistent."""

from __future__ import annotations

from bench.scheduler_load import measure


def test_every_job_is_placed_once_and_succeeds(nats_server, tmp_path):
    m = measure(nats_server.url, tmp_path / "data", jobs=20, workers=2)

    assert len(m["work_items"]) == 20
    assert sorted(set(m["work_items"].values())) == [1]  # none placed twice, none never
    assert m["succeeded"] == 20
    assert m["submit_jobs_per_s"] > 0 and m["completed_jobs_per_s"] > 0
    for name in ("dispatch_s", "decision_s", "queue_wait_s"):
        assert 0 <= m[name]["p50"] <= m[name]["p99"] <= m[name]["max"], name
    # Two workers cannot take 20 jobs at once: most wait for a free one, which the queue wait
    # counts and the dispatch latency does not.
    assert m["dispatch_s"]["max"] <= m["queue_wait_s"]["max"]
    assert m["queue_wait_s"]["p99"] > m["dispatch_s"]["p50"]
    assert 0 < m["idle_rss_mb"] <= m["peak_rss_mb"] and m["scheduler_cpu_s"] > 0
