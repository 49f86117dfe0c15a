"""Dataset ingest at scale: a JSONL file (1 GiB by default) streamed to the dataset service,
validated, scanned (duplicates, near-duplicates, PII, lengths), split and stored — rows/s and
peak RSS — against `datasets.load_dataset("json")` reading the same file (rows/s, its peak RSS).

    python -m bench.dataset_ingest
    LLMSTUDIO_BENCH_INGEST_MB=64 LLMSTUDIO_BENCH_ROUNDS=2 python -m bench.dataset_ingest  # quick

The service runs in the embedded stack (its own process, as in production) and every check is
on (exact and near duplicates, PII, lengths). Each round pushes the file once (a new dataset
name each round) and then runs the baseline in a fresh subprocess; ROUNDS rounds (default 4)
alternate the two. Reported: min / median / max rows/s per side and of the per-round ratio;
value / baseline are the medians. Peak RSS: the kernel's high-water mark (VmHWM) of the service
process over all rounds, startup included, plus the largest high-water mark of its
duplicate-worker process (sampled while it runs), their sum held against RSS_LIMIT_MB.

The allocator A/B (LLMSTUDIO_BENCH_INGEST_ALLOCATOR_MB, default 128; 0 skips it) runs
`ingest.ingest` alone on a file of that size in fresh processes, with glibc's mmap threshold
pinned (`return_freed_tensors_to_os()`, what services/dataset/app.py does) and unpinned,
alternating for ROUNDS rounds: rows/s and peak RSS (the process's and its worker's) each.

Writes bench/results/dataset_ingest.json.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import write_result

RSS_LIMIT_MB = 300
ROUNDS = int(os.environ.get("LLMSTUDIO_BENCH_ROUNDS", "4"))
WORDS = ("the model learns from data while engineers tune adapters on small batches of text and "
         "evaluate the loss on held out rows before they register a version for review by the "
         "platform team who approve promotion to production after checks pass").split()


def make_jsonl(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Prompt/completion rows of 200-2000 characters; 1% exact duplicates, 0.1% with an
    e-mail address. Returns the row count."""
    rng = random.Random(seed)
    rows, size, recent = 0, 0, []
    with path.open("w", encoding="utf-8") as f:
        while size < target_bytes:
            if recent and rng.random() < 0.01:
                line = rng.choice(recent)
            else:
                n = rng.randint(30, 300)
                prompt = " ".join(rng.choice(WORDS) for _ in range(n // 3)) + f" #{rows}?"
                completion = " ".join(rng.choice(WORDS) for _ in range(n))
                if rng.random() < 0.001:
                    completion += f" contact user{rows}@example.com"
                line = json.dumps({"prompt": prompt, "completion": completion}) + "\n"
                if len(recent) < 1000:
                    recent.append(line)
            f.write(line)
            size += len(line.encode())
            rows += 1
    return rows


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def peak_rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM") / 1024


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class ChildPeaks:
    """The largest VmHWM of any child process of `pid` (the duplicate worker), sampled every
    0.05 s while running: a worker lives for one ingest."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _children(self) -> list[int]:
        children: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            children += [int(c) for c in task.read_text().split()]
        return children

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for child in self._children():
                try:
                    self.peak_mb = max(self.peak_mb, peak_rss_mb(child))
                except (OSError, RuntimeError):  # it just exited
                    pass

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


BASELINE = """
import json, resource, sys, time
import datasets
datasets.disable_progress_bars()
t = time.perf_counter()
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train",
                           cache_dir=sys.argv[2])
elapsed = time.perf_counter() - t
print(json.dumps({"rows": len(ds), "seconds": elapsed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_baseline(path: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", BASELINE, str(path), str(cache)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


INGEST_ALONE = """
import json, resource, shutil, sys, time
from pathlib import Path
from llmstudio.ml.allocator import return_freed_tensors_to_os
if sys.argv[3] == "pinned":
    return_freed_tensors_to_os()
from services.dataset import ingest
work = Path(sys.argv[2])
t = time.perf_counter()
done = ingest.ingest(Path(sys.argv[1]), ingest.Options(name="ab"), work)
elapsed = time.perf_counter() - t
shutil.rmtree(work)
kb = lambda who: resource.getrusage(who).ru_maxrss
print(json.dumps({"rows": done.report["rows_read"], "seconds": elapsed,
                  "peak_rss_mb": kb(resource.RUSAGE_SELF) / 1024,
                  "worker_peak_rss_mb": kb(resource.RUSAGE_CHILDREN) / 1024}))
"""


def allocator_ab(tmp: Path, megabytes: int) -> dict:
    """ingest.ingest alone, mmap threshold pinned vs glibc's default, alternating."""
    path = tmp / "allocator.jsonl"
    make_jsonl(path, megabytes << 20, seed=1)
    results: dict[str, list[dict]] = {"pinned": [], "default": []}
    for round_ in range(ROUNDS):
        for side in ("pinned", "default") if round_ % 2 == 0 else ("default", "pinned"):
            out = subprocess.run([sys.executable, "-c", INGEST_ALONE, str(path),
                                  str(tmp / "ab-work"), side],
                                 capture_output=True, text=True, check=True)
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    path.unlink()
    summary = {"file_mib": megabytes}
    for side, runs in results.items():
        summary[side] = {
            "rows_per_s": spread([r["rows"] / r["seconds"] for r in runs]),
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs]),
            "worker_peak_rss_mb": spread([r["worker_peak_rss_mb"] for r in runs]),
        }
    print(f"allocator A/B on {megabytes} MiB, ingest.ingest alone ({ROUNDS} rounds):")
    for side in results:
        s = summary[side]
        rate, rss = s["rows_per_s"], s["peak_rss_mb"]
        print(f"  {side:8} rows/s {rate['min']:8.0f} {rate['median']:8.0f} {rate['max']:8.0f}"
              f"   peak RSS MB {rss['min']:5.0f} {rss['median']:5.0f} {rss['max']:5.0f}"
              f"   worker {s['worker_peak_rss_mb']['median']:4.0f}")
    return summary


def main() -> None:
    from llmstudio import local
    from llmstudio.client import Client

    megabytes = int(os.environ.get("LLMSTUDIO_BENCH_INGEST_MB", "1024"))
    allocator_mb = int(os.environ.get("LLMSTUDIO_BENCH_INGEST_ALLOCATOR_MB", "128"))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        path = tmp / "big.jsonl"
        t = time.perf_counter()
        rows = make_jsonl(path, megabytes << 20)
        print(f"generated {path.stat().st_size / 2**20:.0f} MiB, {rows} rows in "
              f"{time.perf_counter() - t:.0f}s")

        data_dir = tmp / "stack"
        state = local.up(data_dir)
        service_rates, baseline_rates, ratios, worker_peaks, baselines = [], [], [], [], []
        try:
            client = Client(data_dir=data_dir)
            pid = state.services["dataset"].pid
            idle_mb = peak_rss_mb(pid)
            for round_ in range(ROUNDS):
                children = ChildPeaks(pid)
                t = time.perf_counter()
                ds = client.datasets.push(path, name=f"big-{round_}")
                service_s = time.perf_counter() - t
                worker_peaks.append(children.stop())
                baseline = run_baseline(path, tmp / f"hf-cache-{round_}")
                baselines.append(baseline)
                service_rates.append(ds.num_rows / service_s)
                baseline_rates.append(baseline["rows"] / baseline["seconds"])
                ratios.append(service_rates[-1] / baseline_rates[-1])
                print(f"round {round_ + 1}: service {service_rates[-1]:.0f} rows/s "
                      f"({service_s:.1f}s), load_dataset {baseline_rates[-1]:.0f} rows/s, "
                      f"ratio {ratios[-1]:.3f}", flush=True)
            service_mb = peak_rss_mb(pid)
            report = client.datasets.report(ds.id)
        finally:
            local.down(data_dir)
        allocator = allocator_ab(tmp, allocator_mb) if allocator_mb else {}

    worker_mb = max(worker_peaks)
    total_mb = service_mb + worker_mb
    value, base = statistics.median(service_rates), statistics.median(baseline_rates)
    print(f"{'':34}{'min':>9}{'median':>9}{'max':>9}")
    for label, values in (("dataset service rows/s", service_rates),
                          ("datasets.load_dataset rows/s", baseline_rates),
                          ("service / load_dataset", ratios)):
        s = spread(values)
        print(f"{label:34}{s['min']:9.3g}{s['median']:9.3g}{s['max']:9.3g}")
    print(f"peak RSS: service {service_mb:.0f} MB (idle {idle_mb:.0f}) + duplicate worker "
          f"{worker_mb:.0f} MB = {total_mb:.0f} MB (limit {RSS_LIMIT_MB}); load_dataset "
          f"{statistics.median(b['peak_rss_mb'] for b in baselines):.0f} MB; rows {ds.num_rows}, "
          f"exact duplicates {report.exact_duplicates}, near {report.near_duplicates}, "
          f"PII rows {report.pii_rows}")
    write_result(
        "dataset_ingest", value=value, baseline=base, unit="rows/s",
        file_mib=megabytes, rows=ds.num_rows, rounds=ROUNDS,
        service_rows_per_s=spread(service_rates), baseline_rows_per_s=spread(baseline_rates),
        ratio_spread=spread(ratios),
        service_peak_rss_mb=service_mb, service_idle_rss_mb=idle_mb,
        worker_peak_rss_mb=worker_mb, total_peak_rss_mb=total_mb,
        rss_limit_mb=RSS_LIMIT_MB, rss_ok=total_mb < RSS_LIMIT_MB,
        baseline_peak_rss_mb=statistics.median(b["peak_rss_mb"] for b in baselines),
        exact_duplicates=report.exact_duplicates, near_duplicates=report.near_duplicates,
        pii_rows=report.pii_rows, allocator_ab=allocator,
    )


if __name__ == "__main__":
    main()
