"""Event publishing overhead: `Bus.publish` (envelope, pydantic, Nats-Msg-Id and traceparent
headers, JetStream ack) vs a bare nats-py JetStream publish of the same bytes, same server, same
run. value/baseline = events/s through the bus / events/s raw; the ratio shows what the
envelope and tracing cost per event."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import write_result
from llmstudio.bus import Bus
from llmstudio.config import Settings
from llmstudio.events import JobQueued, make_envelope
from llmstudio.natsserver import start_nats_server

EVENTS = 2000


async def _measure(url: str, data_dir: Path) -> tuple[float, float]:
    bus = Bus(Settings(nats_url=url, data_dir=data_dir), "bench")
    await bus.start()
    try:
        raw = make_envelope(JobQueued(job_id="job-raw", dataset_sha256="0" * 64),
                            source="bench", tenant="t").model_dump_json().encode()
        t0 = time.perf_counter()
        for i in range(EVENTS):
            await bus.js.publish(f"llmstudio.job.queued.raw-{i}", raw,
                                 headers={"Nats-Msg-Id": f"raw-{i}"})
        raw_rate = EVENTS / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(EVENTS):
            await bus.publish(JobQueued(job_id=f"job-{i}", dataset_sha256="0" * 64), tenant="t")
        bus_rate = EVENTS / (time.perf_counter() - t0)
    finally:
        await bus.stop()
    return bus_rate, raw_rate


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_nats_server(Path(tmp) / "js")
        try:
            bus_rate, raw_rate = asyncio.run(_measure(server.url, Path(tmp)))
        finally:
            server.stop()
    r = write_result("bus_publish", value=bus_rate, baseline=raw_rate, unit="events/s",
                     events=EVENTS)
    print(f"{'':<22}{'events/s':>12}")
    print(f"{'Bus.publish':<22}{bus_rate:>12.0f}")
    print(f"{'raw js.publish':<22}{raw_rate:>12.0f}")
    print(f"{'ratio':<22}{r['ratio']:>12.2f}")


if __name__ == "__main__":
    main()
