"""The checkpoint format's one owner (llmstudio.ml.checkpoint): names, manifest-last writing,
listing and pruning on disk and in the artifact store, the kind of weights, the trainer state.
Real files and a real local artifact store; no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmstudio.ml import checkpoint as C
from llmstudio.storage import LocalArtifactStore


def _state(step: int, **kw) -> C.TrainerState:
    fields = dict(
        objective="sft", step=step, max_steps=10, loss=1.0, first_loss=2.0, tokens_seen=40,
        samples_seen=4 * step, epoch=step / 3, num_examples=12, base_model="/m",
        spec={"method": "lora"}, seeds={"seed": 1}, recipe={"num_units": 12},
    )
    return C.TrainerState(**{**fields, **kw})


def _write(out: Path, step: int, weights: bytes = b"w") -> Path:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())  # no step taken: empty moments

    def save_weights(d: Path) -> None:
        (d / C.ADAPTER_WEIGHTS).write_bytes(weights)
        (d / C.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))

    return C.write_checkpoint(out, _state(step), save_weights=save_weights, optimizer=optimizer,
                              param_names=["weight", "bias"])


def test_names_and_store_keys():
    assert C.checkpoint_name(7) == "checkpoint-7" and C.checkpoint_step("a/checkpoint-7") == 7
    assert C.checkpoint_step("checkpoint-x") is None and C.checkpoint_step("ckpt-7") is None
    assert C.store_prefix("acme", "job-1", 8) == "tenants/acme/jobs/job-1/checkpoint-8"


def test_write_lists_every_file_in_the_manifest_written_last(tmp_path):
    path = _write(tmp_path, 3)
    assert path == tmp_path / "checkpoint-3"
    manifest = C.verify_checkpoint(path)
    assert manifest["format"] == C.FORMAT and manifest["step"] == 3
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {p.name for p in path.iterdir()} - {C.MANIFEST}
    assert {C.OPTIMIZER_FILE, C.RNG_FILE, C.SCHEDULER_FILE, C.TRAINER_STATE} <= listed
    newest = max((path / f).stat().st_mtime_ns for f in listed)
    assert (path / C.MANIFEST).stat().st_mtime_ns >= newest
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]  # no staging left
    assert C.read_trainer_state(path) == _state(3)


def test_a_write_that_fails_leaves_no_checkpoint_and_a_rewrite_replaces(tmp_path):
    def crash(d: Path) -> None:
        (d / C.ADAPTER_WEIGHTS).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        C.write_checkpoint(tmp_path, _state(2), save_weights=crash,
                           optimizer=torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()),
                           param_names=["weight", "bias"])
    assert C.complete_checkpoints(tmp_path) == [] and not (tmp_path / "checkpoint-2").exists()
    _write(tmp_path, 2, b"first")
    path = _write(tmp_path, 2, b"second")  # the same step again: replaced whole
    assert (path / C.ADAPTER_WEIGHTS).read_bytes() == b"second"
    C.verify_checkpoint(path)


def test_list_latest_and_prune_by_step_not_by_name(tmp_path):
    for step in (2, 10, 9):
        _write(tmp_path, step)
    (tmp_path / "checkpoint-12").mkdir()  # no manifest: incomplete
    (tmp_path / "checkpoint-final").mkdir()
    names = [p.name for p in C.complete_checkpoints(tmp_path)]
    assert names == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert C.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert C.prune_checkpoints(tmp_path, 0) == []
    assert C.prune_checkpoints(tmp_path, 2) == [tmp_path / "checkpoint-2"]
    assert not (tmp_path / "checkpoint-2").exists()
    assert [p.name for p in C.complete_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert C.latest_checkpoint(tmp_path / "nothing") is None


def test_kind_of_adapter_and_full_checkpoints(tmp_path):
    adapter = _write(tmp_path, 1)
    assert C.checkpoint_kind(adapter) == "adapter" and C.adapter_type(adapter) == "LORA"
    full = tmp_path / "full"
    full.mkdir()
    (full / C.MODEL_CONFIG).write_text("{}")
    with pytest.raises(C.CheckpointError, match="neither an adapter"):
        C.checkpoint_kind(full)  # a config without weights
    (full / "model.safetensors").write_bytes(b"w")
    assert C.checkpoint_kind(full) == "full" and C.adapter_type(full) == ""


def test_trainer_state_reads_the_flat_layout_of_older_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    flat = {k: v for k, v in _state(4).to_json().items() if k not in ("recipe", "objective")}
    (ckpt / C.TRAINER_STATE).write_text(json.dumps({**flat, "num_units": 12}))
    assert C.read_trainer_state(ckpt) == _state(4)
    (ckpt / C.TRAINER_STATE).write_text("{not json")
    with pytest.raises(C.CheckpointError, match="trainer state"):
        C.read_trainer_state(ckpt)


def test_store_lists_prunes_and_downloads_only_complete_checkpoints(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    j = "tenants/t/jobs/j"
    for step in (4, 10):
        store.put_dir(C.store_prefix("t", "j", step), _write(tmp_path / "local", step))
    store.put_bytes(f"{j}/checkpoint-12/adapter_model.safetensors", b"partial upload")
    store.put_dir("tenants/t/jobs/j-other/checkpoint-99", _write(tmp_path / "other", 99))
    # the same job id in another tenant is another job
    store.put_dir("tenants/u/jobs/j/checkpoint-50", _write(tmp_path / "u", 50))
    assert C.stored_checkpoints(store, "t", "j") == [(4, f"{j}/checkpoint-4"),
                                                    (10, f"{j}/checkpoint-10")]

    # the newest one is corrupt in the store: the download falls back to the older one
    store.put_bytes(f"{j}/checkpoint-10/adapter_model.safetensors", b"bit rot")
    stored = C.download_latest_checkpoint(store, "t", "j", tmp_path / "work")
    assert stored == C.StoredCheckpoint(
        f"{j}/checkpoint-4", tmp_path / "work" / "checkpoint-4", 4)
    C.verify_checkpoint(stored.local)
    assert not (tmp_path / "work" / "checkpoint-10").exists()
    assert C.download_latest_checkpoint(store, "t", "nobody", tmp_path / "work") is None

    C.prune_stored_checkpoints(store, "t", "j", 1)
    assert C.stored_checkpoints(store, "t", "j") == [(10, f"{j}/checkpoint-10")]
    assert not store.list(f"{j}/checkpoint-4/")
    assert C.stored_checkpoints(store, "t", "j-other") == [
        (99, "tenants/t/jobs/j-other/checkpoint-99")]
    assert C.stored_checkpoints(store, "u", "j") == [(50, "tenants/u/jobs/j/checkpoint-50")]
