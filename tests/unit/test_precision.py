"""`precision: auto`: the JobSpec default, what it resolves to (device x bf16 units), where the
scheduler may place it, and a training run that resolves and records it."""

from __future__ import annotations

import pytest
import torch

from llmstudio.jobspec import JobSpec
from services.scheduler.core import Job, Status, Worker, cannot_run
from services.trainer import host, methods
from services.trainer.core import cpu_has_bf16, precision_for

CPUINFO = {  # the flags line of /proc/cpuinfo, as host.py reads it
    "avx512_bf16": "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n",
    "amx_bf16": "flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n",
    "avx512 only": "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n",
    "avx2 only": "flags\t\t: fpu sse2 avx2 fma\n",
    "no /proc": "",
}


@pytest.mark.parametrize(("cpu", "device", "gpu_bf16", "want"), [
    ("avx512_bf16", "cpu", False, "fp32"),  # measured by bench/bf16.py: see AUTO_PRECISION
    ("amx_bf16", "cpu", False, "fp32"),
    ("avx512 only", "cpu", False, "fp32"),
    ("avx2 only", "cpu", False, "fp32"),
    ("no /proc", "cpu", False, "fp32"),
    ("avx2 only", "cuda", True, "bf16"),  # Ampere and newer
    ("avx512_bf16", "cuda", False, "fp32"),  # older GPUs: the CPU's units do not count
])
def test_auto_resolves_by_device_and_bf16_units(cpu, device, gpu_bf16, want):
    units = gpu_bf16 if device == "cuda" else cpu_has_bf16(CPUINFO[cpu])
    assert precision_for("auto", device, units) == want


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(explicit):
    for device, units in (("cpu", True), ("cpu", False), ("cuda", True)):
        assert precision_for(explicit, device, units) == explicit


def test_jobspec_default_is_auto_and_runs_anywhere():
    spec = JobSpec(base_model="m", dataset="d")
    assert spec.precision == "auto"
    assert spec.needs_gpu() == ""
    assert JobSpec(base_model="m", dataset="d", precision="fp16").needs_gpu()
    job = Job(id="j", tenant="t", status=Status.QUEUED, spec=spec.model_dump(mode="json"),
              model_name="m", dataset_id="d", priority=0, created_by="u", created_at="",
              updated_at="")
    for device, bf16 in (("cpu", False), ("cpu", True), ("cuda", False)):
        assert cannot_run(job, Worker("w", "idle", "", device, 0.0, 0, bf16)) == ""
    bf16_job = Job(**{**job.__dict__, "spec": {**job.spec, "precision": "bf16"}})
    assert cannot_run(bf16_job, Worker("w", "idle", "", "cpu", 0.0, 0, False))


def test_the_recipes_resolve_auto_as_the_heartbeat_reports_this_cpu():
    spec = JobSpec(base_model="m", dataset="d")
    resolved = methods.resolve_precision(spec, torch.device("cpu"))
    assert resolved.precision == precision_for("auto", "cpu", host.cpu_has_native_bf16())
    assert resolved.model_dump(exclude={"precision"}) == spec.model_dump(exclude={"precision"})
    explicit = spec.model_copy(update={"precision": "fp32"})
    assert methods.resolve_precision(explicit, torch.device("cpu")) is explicit


@pytest.mark.slow
def test_an_auto_job_trains_and_its_checkpoint_records_the_resolved_precision(tmp_path):
    from llmstudio.demo_data import word_reversal_rows
    from llmstudio.ml.checkpoint import read_trainer_state
    from llmstudio.ml.tiny import build_tiny_model
    from services.trainer.recipes import TrainRequest, train

    model_dir = build_tiny_model(tmp_path / "tiny")
    spec = JobSpec(base_model=str(model_dir), dataset="d",
                   hyperparameters={"max_steps": 3, "batch_size": 4, "max_seq_length": 64,
                                    "learning_rate": 3e-3})
    result = train(TrainRequest(spec, word_reversal_rows(16, seed=1), tmp_path / "out"))
    assert result.steps == 3 and result.final_loss < result.first_loss
    recorded = read_trainer_state(result.adapter_dir).spec["precision"]
    assert recorded == precision_for("auto", "cpu", host.cpu_has_native_bf16())
