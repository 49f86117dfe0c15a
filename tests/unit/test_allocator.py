"""The allocator tools give freed activation-sized tensors back to the OS: malloc_trim at a phase
boundary (the trainer), or a pinned mmap threshold (the dataset service)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, torch
from llmstudio.ml.allocator import release_free_memory, return_freed_tensors_to_os
if sys.argv[1] == "pin":
    assert return_freed_tensors_to_os()
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024
t = torch.ones(30 * 2**20, dtype=torch.uint8); del t   # glibc now raises its mmap threshold
before = anon_mb()
blocks = [torch.ones(5 * 2**20, dtype=torch.uint8) for _ in range(40)]  # 200 MB of "activations"
pinned = torch.ones(2 * 2**20, dtype=torch.uint8)  # live memory above them, as in training
del blocks
if sys.argv[1] == "trim":
    assert release_free_memory()
print(anon_mb() - before)
"""


def _retained_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_glibc_keeps_freed_activations_resident_by_default():
    assert _retained_mb("default") > 150  # the freed 200 MB stay in the heap


def test_malloc_trim_gives_the_freed_heap_back():
    assert _retained_mb("trim") < 30


def test_a_pinned_mmap_threshold_gives_each_freed_block_back():
    assert _retained_mb("pin") < 30
