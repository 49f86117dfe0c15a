"""Pure parts of the trainer-worker: identity, inputs, event payloads."""

from __future__ import annotations

import os

import pytest

from services.trainer.core import (
    RecentIds,
    cpu_has_bf16,
    default_worker_id,
    failure_reason,
    mem_available_bytes,
    metrics_event,
    sanitize_worker_id,
    train_split_key,
)
from services.trainer.host import check_local_model_dir


def test_worker_id_is_safe_for_subjects_and_consumer_names():
    assert sanitize_worker_id("gpu-node.example.com:0") == "gpu-node-example-com-0"
    assert sanitize_worker_id("w_1") == "w_1"
    assert default_worker_id("a b*c>") == "a-b-c"
    auto = default_worker_id()
    assert auto.endswith(f"-{os.getpid()}") and sanitize_worker_id(auto) == auto
    with pytest.raises(ValueError, match="no usable character"):
        sanitize_worker_id("...")


def test_train_split_key_required():
    assert train_split_key({"train": "blobs/sha256/ab", "validation": "v"}) == "blobs/sha256/ab"
    with pytest.raises(ValueError, match=r"no 'train' split .*\['validation'\]"):
        train_split_key({"validation": "v"})


def test_local_model_dir_checked_hub_ids_passed_through(tmp_path):
    check_local_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nope does not exist"):
        check_local_model_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_local_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_local_model_dir(str(tmp_path))


def test_metrics_event_and_names():
    ev = metrics_event("job-1", {"step": 4, "max_steps": 8, "loss": 1.5, "learning_rate": 0.01,
                                 "tokens_per_s": 100.0, "samples_per_s": 4.0, "epoch": 0.5})
    assert (ev.job_id, ev.step, ev.max_steps, ev.loss, ev.epoch) == ("job-1", 4, 8, 1.5, 0.5)
    assert ev.subject() == "llmstudio.metrics.job-1"
    assert failure_reason(KeyError("x")) == "KeyError: 'x'"
    assert len(failure_reason(ValueError("y" * 5000))) == 2000


def test_recent_ids_forget_the_oldest():
    ids = RecentIds(capacity=2)
    for x in ("a", "b", "c"):
        ids.add(x)
    assert "a" not in ids and "b" in ids and "c" in ids
    ids.add("b")  # re-adding refreshes: "c" is now the oldest
    ids.add("d")
    assert "c" not in ids and "b" in ids and "d" in ids


def test_heartbeat_hardware_from_proc_files():
    meminfo = "MemTotal:       24683656 kB\nMemFree:  1000 kB\nMemAvailable:   23343756 kB\n"
    assert mem_available_bytes(meminfo) == 23343756 * 1024
    assert mem_available_bytes("MemTotal: 5 kB\n") == 0
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert not cpu_has_bf16(avx2)
    assert cpu_has_bf16(avx2.replace("fma", "avx512f avx512_bf16"))
    assert cpu_has_bf16(avx2.replace("fma", "amx_tile amx_bf16"))
    assert not cpu_has_bf16("")


def test_metrics_event_carries_the_optional_metrics_when_reported():
    base = {"step": 4, "max_steps": 8, "loss": 1.5, "learning_rate": 0.01}
    plain = metrics_event("job-1", base)
    assert plain.grad_norm is None and plain.eval_loss is None
    full = metrics_event("job-1", {**base, "grad_norm": 0.7, "memory_bytes": 2.0e9,
                                   "eta_s": 12.0, "eval_loss": 1.25})
    assert (full.grad_norm, full.memory_bytes, full.eta_s, full.eval_loss) == (
        0.7, 2.0e9, 12.0, 1.25)
