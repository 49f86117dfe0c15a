"""`make bench`: run every benchmark module named in BENCHMARKS, in order."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = [
    "bench.bus_publish", "bench.packing", "bench.peft_memory", "bench.train_overhead",
    "bench.bf16", "bench.job_overhead", "bench.dataset_ingest", "bench.scheduler_load",
    "bench.serving",
]


def main(argv: list[str]) -> int:
    selected = argv or BENCHMARKS
    for name in selected:
        print(f"== {name}")
        importlib.import_module(name).main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
