"""Dataset ingest at scale: a 1 GB JSONL streamed to the dataset service, validated, scanned
(duplicates, near-duplicates, PII, lengths), split and stored — rows/s and the service's peak
RSS — against `datasets.load_dataset("json")` reading the same file (rows/s, its peak RSS).

    python -m bench.dataset_ingest            # LLMSTUDIO_BENCH_INGEST_MB=1024 by default

The service runs in the embedded stack (its own process, as in production); its peak RSS is the
kernel's high-water mark (VmHWM) of that process, startup included. The baseline runs in a fresh
subprocess so its memory is its own. Writes bench/results/dataset_ingest.json.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result

RSS_LIMIT_MB = 300
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


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


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


def main() -> None:
    from llmstudio import local
    from llmstudio.client import Client

    megabytes = int(os.environ.get("LLMSTUDIO_BENCH_INGEST_MB", "1024"))
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        path = tmp / "big.jsonl"
        t = time.perf_counter()
        rows = make_jsonl(path, megabytes << 20)
        print(f"generated {path.stat().st_size / 2**20:.0f} MiB, {rows} rows in "
              f"{time.perf_counter() - t:.0f}s")

        data_dir = tmp / "stack"
        state = local.up(data_dir)
        try:
            client = Client(data_dir=data_dir)
            pid = state.services["dataset"].pid
            idle_mb = peak_rss_mb(pid)
            t = time.perf_counter()
            ds = client.datasets.push(path, name="big")
            service_s = time.perf_counter() - t
            service_mb = peak_rss_mb(pid)
            report = client.datasets.report(ds.id)
        finally:
            local.down(data_dir)
        baseline = run_baseline(path, tmp / "hf-cache")

    value = ds.num_rows / service_s
    base = baseline["rows"] / baseline["seconds"]
    print(f"{'':28}{'rows/s':>10}{'peak RSS MB':>14}")
    print(f"{'dataset service (upload+validate)':34}{value:>10.0f}{service_mb:>14.0f}")
    print(f"{'datasets.load_dataset(json)':34}{base:>10.0f}{baseline['peak_rss_mb']:>14.0f}")
    print(f"ratio {value / base:.2f}; service peak RSS {service_mb:.0f} MB "
          f"(limit {RSS_LIMIT_MB}, idle {idle_mb:.0f}); rows {ds.num_rows}, "
          f"exact duplicates {report.exact_duplicates}, near {report.near_duplicates}, "
          f"PII rows {report.pii_rows}")
    write_result(
        "dataset_ingest", value=value, baseline=base, unit="rows/s",
        file_mib=megabytes, rows=ds.num_rows, service_seconds=service_s,
        service_peak_rss_mb=service_mb, service_idle_rss_mb=idle_mb,
        rss_limit_mb=RSS_LIMIT_MB, rss_ok=service_mb < RSS_LIMIT_MB,
        baseline_seconds=baseline["seconds"], baseline_peak_rss_mb=baseline["peak_rss_mb"],
        exact_duplicates=report.exact_duplicates, near_duplicates=report.near_duplicates,
        pii_rows=report.pii_rows,
    )


if __name__ == "__main__":
    main()
