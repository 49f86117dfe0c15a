"""Keep a process's resident memory close to what it really uses, without slowing training.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the
first training step activations come from the heap, which is fast (memory is reused, no page
faults) but keeps freed memory resident: the process's RSS stays at its high-water mark.

Two tools, for two kinds of process:

- `release_free_memory()` (malloc_trim): gives the heap's free pages back to the OS once, at a
  phase boundary. The SFT recipe calls it after loading the model (its transient copies), after
  each evaluation and checkpoint, and at the end of training (a worker outlives its jobs).
  Measured against the alternatives (issue 9; the table is in the message of the commit that
  added this function: `git log --grep "Trainer allocator"`): pinning the mmap threshold at
  128 KiB made every activation a fresh mapping, a page fault per 4 KiB per step (tiny Llama
  2.1-2.5x, SmolLM2 1.5x the step time, 10-30x the system time) for 15-30% less peak RSS;
  malloc_trim after every step costs a fault per page per step for little less peak; jemalloc
  (LD_PRELOAD) came close to the pin's RSS with few faults, but needs a preload and a package
  in every image.
- `return_freed_tensors_to_os()` pins the mmap threshold: every large block is its own mapping,
  returned when freed. Right where allocations are few and large and memory is the bound (the
  dataset service's bounded ingest), wrong in a training loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the free pages of every malloc arena to the OS (glibc's malloc_trim(0)).
    True when memory was released; False when none was, or where this is not glibc."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:  # a libc without malloc_trim
        return False


def return_freed_tensors_to_os(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold (disables its dynamic growth). False where not glibc."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except AttributeError:  # a libc without mallopt
        return False
