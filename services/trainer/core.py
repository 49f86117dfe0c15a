"""The trainer-worker's pure logic: worker identity, training rows, job inputs, event payloads."""

from __future__ import annotations

import os
import re
import socket
from collections import OrderedDict

from llmstudio.events import (
    EventData,
    JobCancelled,
    JobCheckpointed,
    JobCompleted,
    JobFailed,
    JobMetrics,
    JobReleased,
    JobStarted,
)

TRAIN_SPLIT = "train"

# A run (one attempt of a job on this worker) takes the status of the last report it made.
RUNNING = "running"
RUN_STATUS: dict[type[EventData], str] = {
    JobStarted: RUNNING,
    JobCheckpointed: RUNNING,
    JobCompleted: "succeeded",
    JobFailed: "failed",
    JobCancelled: "cancelled",
    JobReleased: "released",
}
# The subject token and consumer name are built from the worker id: NATS allows neither dots nor
# wildcards there, so anything but [A-Za-z0-9_-] becomes "-".
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sanitize_worker_id(raw: str) -> str:
    cleaned = _UNSAFE.sub("-", raw).strip("-")
    if not cleaned:
        raise ValueError(f"worker id {raw!r} has no usable character ([A-Za-z0-9_-])")
    return cleaned


def default_worker_id(configured: str = "") -> str:
    """The configured id, else `<hostname>-<pid>`: unique per process on a machine."""
    return sanitize_worker_id(configured or f"{socket.gethostname()}-{os.getpid()}")


def train_split_key(dataset_artifacts: dict[str, str]) -> str:
    key = dataset_artifacts.get(TRAIN_SPLIT)
    if not key:
        raise ValueError(
            f"the work item has no '{TRAIN_SPLIT}' split in dataset_artifacts "
            f"(splits: {sorted(dataset_artifacts) or 'none'})"
        )
    return key


def metrics_event(job_id: str, m: dict, attempt: int = 1) -> JobMetrics:
    """The recipe's metrics dict -> the JobMetrics event of the job's `attempt`."""
    return JobMetrics(
        job_id=job_id,
        attempt=attempt,
        step=int(m["step"]),
        max_steps=int(m["max_steps"]),
        loss=float(m["loss"]),
        learning_rate=float(m["learning_rate"]),
        tokens_per_s=float(m.get("tokens_per_s", 0.0)),
        samples_per_s=float(m.get("samples_per_s", 0.0)),
        epoch=float(m.get("epoch", 0.0)),
        **{k: float(m[k]) for k in OPTIONAL_METRICS if m.get(k) is not None},
    )


OPTIONAL_METRICS = ("grad_norm", "memory_bytes", "eta_s", "eval_loss")


def failure_reason(exc: BaseException, limit: int = 2000) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


class RecentIds:
    """A bounded set (oldest forgotten first): jobs this worker finished or saw cancelled."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, item: str) -> None:
        self._ids[item] = None
        self._ids.move_to_end(item)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, item: str) -> bool:
        return item in self._ids


# -- the hardware: what the heartbeat reports and the hardware check refuses (host.py reads) --

# CPU flags of native bf16 arithmetic (AVX-512 BF16, AMX); AVX2-only CPUs emulate it, slowly.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def mem_available_bytes(meminfo: str) -> int:
    """MemAvailable from /proc/meminfo's text (kB), in bytes; 0 if absent."""
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "MemAvailable":
            parts = value.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return 0


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name a native bf16 instruction set."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return bool(CPU_BF16_FLAGS & set(value.split()))
    return False


# What `precision: auto` becomes, by (device type, native bf16 units); unlisted: fp32. On a GPU
# with bf16 (Ampere and newer), bf16 autocast, as peers train. On a CPU with bf16 units
# (AVX-512 BF16 / AMX), fp32, as measured: `LLMSTUDIO_BENCH_ROUNDS=2 python -m bench.bf16` on a
# quiet 2-core Xeon with AVX-512 BF16 (SmolLM2, the demo's LoRA job, 80 steps, each run in its
# own process) gave bf16/fp32 tokens/s 0.860 / 0.885 / 0.911 (min/median/max; fp32 288, bf16
# 255 tokens/s), loss at step 80 0.0071 (bf16) vs 0.0126: it converges, but slower. The model's
# small matmuls gain less from the bf16 units than autocast's casts cost.
AUTO_PRECISION: dict[tuple[str, bool], str] = {
    ("cuda", True): "bf16",
    ("cpu", True): "fp32",
}


def precision_for(requested: str, device_type: str, bf16_units: bool) -> str:
    """The precision a job trains in: `requested`, or for `auto` what AUTO_PRECISION says."""
    if requested != "auto":
        return requested
    return AUTO_PRECISION.get((device_type, bf16_units), "fp32")
