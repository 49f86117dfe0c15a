"""The checkpoint format and its one owner: how a checkpoint is written (files first, manifest
last, renamed into place), verified, listed, pruned and resumed, what kind of weights it holds,
and where a job's checkpoints live in the artifact store. The trainer's recipes, the worker,
export and the evaluator all go through here.

    checkpoint-<step>/
        adapter or model weights  safetensors (written by the trainer's method registry)
        optimizer.safetensors     optimizer state tensors named `state/<param name>/<key>`; the
                                  non-tensor state (param_groups, scalars) is JSON in its metadata
        rng.safetensors           torch CPU (+ CUDA) and numpy RNG states as tensors; python's
                                  `random` state and the rest as JSON in its metadata
        scheduler.json            LR scheduler (+ fp16 grad scaler) state
        trainer_state.json        where the run stands (`TrainerState`, the same keys for every
                                  recipe)
        manifest.json             written LAST: every other file with its sha256 and size

A reader trusts a checkpoint only if manifest.json exists and every file matches it
(`verify_checkpoint`). Nothing is pickled: only safetensors and JSON. Listing, verifying and
telling the kind need no torch; the functions that write or restore training state import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

    from llmstudio.storage import ArtifactStore

log = logging.getLogger(__name__)

FORMAT = "llmstudio.checkpoint.v1"
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SCHEDULER_FILE = "scheduler.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"

CheckpointKind = Literal["adapter", "full"]


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, does not match its manifest, or cannot be used."""


# --------------------------------------------------------------------------------------------
# names


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a `checkpoint-<step>` name; None for any other name."""
    tail = Path(path).name.removeprefix(PREFIX)
    return int(tail) if Path(path).name.startswith(PREFIX) and tail.isdigit() else None


def job_root(tenant: str, job_id: str) -> str:
    """Artifact store folder of a job's checkpoints, under its tenant's prefix."""
    from llmstudio.artifactkeys import tenant_key

    return tenant_key(tenant, "jobs", job_id) + "/"


def store_prefix(tenant: str, job_id: str, step: int) -> str:
    """Artifact store prefix of a job's checkpoint (the registered adapter is its files)."""
    return job_root(tenant, job_id) + checkpoint_name(step)


# --------------------------------------------------------------------------------------------
# trainer_state.json


@dataclass
class TrainerState:
    """Where a run stands, written by every recipe with the same keys. `recipe` holds what only
    the recipe that wrote it needs to resume (SFT: early stopping, packing; DPO/ORPO:
    transformers' own TrainerState)."""

    objective: str
    step: int
    max_steps: int
    loss: float
    first_loss: float
    tokens_seen: int
    samples_seen: int  # position in the recipe's stream of examples (or packed rows)
    epoch: float
    num_examples: int
    base_model: str
    spec: dict[str, Any]
    seeds: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    eval_loss: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        # checkpoints written before `recipe` existed kept its keys at the top level
        legacy = {k: v for k, v in data.items() if k not in names and k != "format"}
        known["recipe"] = {**legacy, **known.get("recipe", {})}
        known.setdefault("objective", (data.get("spec") or {}).get("objective", "sft"))
        return cls(**known)


def read_trainer_state(ckpt: str | Path) -> TrainerState:
    path = Path(ckpt) / TRAINER_STATE
    try:
        return TrainerState.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable trainer state: {e}") from None


# --------------------------------------------------------------------------------------------
# manifest: verify, list, prune


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Return the manifest of `ckpt` if every file it lists exists with its size and sha256;
    raise CheckpointError naming the first problem otherwise."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        entries = [(e["path"], e["sha256"], e.get("size")) for e in manifest["files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed manifest: {e!r}") from None
    for rel, sha, size in entries:
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {rel} is listed in {MANIFEST} but missing")
        if (size is not None and p.stat().st_size != size) or file_sha256(p) != sha:
            raise CheckpointError(f"{ckpt}: {rel} does not match its sha256 in {MANIFEST}")
    return manifest


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` directories under `out_dir` that have their manifest, oldest
    first (not hashed: `verify_checkpoint` before trusting one's contents)."""
    found = [(checkpoint_step(p), p) for p in Path(out_dir).glob(f"{PREFIX}*")]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)
            if (p / MANIFEST).is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `out_dir`, if any."""
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def remove_checkpoint(ckpt: str | Path) -> None:
    """Delete a checkpoint, manifest first, so a reader never sees a half-deleted one."""
    (Path(ckpt) / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints under `out_dir` (0: keep all); return the
    removed ones."""
    removed = complete_checkpoints(out_dir)[:-keep] if keep else []
    for path in removed:
        remove_checkpoint(path)
    return removed


# --------------------------------------------------------------------------------------------
# kind: which weights a checkpoint holds


def weight_files(ckpt: str | Path) -> list[Path]:
    """The full-model weight files (model.safetensors or its shards)."""
    return sorted(Path(ckpt).glob("model*.safetensors"))


def checkpoint_kind(ckpt: str | Path) -> CheckpointKind:
    """'adapter': a peft adapter (PeftModel.from_pretrained(base, ckpt)); 'full': every weight
    of the model (AutoModelForCausalLM.from_pretrained(ckpt)). CheckpointError if neither."""
    ckpt = Path(ckpt)
    if (ckpt / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (ckpt / MODEL_CONFIG).is_file() and weight_files(ckpt):
        return "full"
    raise CheckpointError(f"{ckpt}: neither an adapter ({ADAPTER_CONFIG}) nor full model "
                          f"weights ({MODEL_CONFIG} + model.safetensors)")


def adapter_type(ckpt: str | Path) -> str:
    """The peft type of an adapter checkpoint (LORA, IA3, PREFIX_TUNING...); '' for full."""
    path = Path(ckpt) / ADAPTER_CONFIG
    if not path.is_file():
        return ""
    try:
        return str(json.loads(path.read_text()).get("peft_type", "")).upper()
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON: {e}") from None


# --------------------------------------------------------------------------------------------
# writing: files first, manifest last, then renamed into place


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt: Path, step: int) -> dict[str, Any]:
    """List every file of `ckpt` (but hidden ones) with its sha256 and size in manifest.json."""
    files = [
        {"path": p.relative_to(ckpt).as_posix(), "sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    ]
    manifest = {"format": FORMAT, "step": step, "created_at": time.time(), "files": files}
    _write_json_atomic(ckpt / MANIFEST, manifest)
    return manifest


def write_checkpoint(
    out_dir: str | Path,
    state: TrainerState,
    *,
    save_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    optimizer_state: dict[str, Any] | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write out_dir/checkpoint-<state.step>: weights (`save_weights(dir)`), optimizer,
    scheduler, RNG and trainer state, then manifest.json; all in a hidden staging directory
    renamed into place, so a reader sees the whole checkpoint or none. `optimizer_state`: the
    full state of an optimizer over sharded parameters (FSDP), written instead of its own."""
    from safetensors.torch import save_file

    final = Path(out_dir) / checkpoint_name(state.step)
    staging = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-write
    staging.mkdir(parents=True)
    save_weights(staging)
    tensors, meta = optimizer_tensors(
        optimizer.state_dict() if optimizer_state is None else optimizer_state, param_names
    )
    save_file(tensors, str(staging / OPTIMIZER_FILE),
              metadata={"format": "llmstudio.optimizer.v1", "optimizer": json.dumps(meta)})
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(staging / RNG_FILE),
              metadata={"format": "llmstudio.rng.v1", "rng": json.dumps(rng_meta)})
    schedule: dict[str, Any] = {}
    if scheduler is not None:
        sd = scheduler.state_dict()
        sd["lr_lambdas"] = [None] * len(sd.get("lr_lambdas", []))  # pure functions of the spec
        schedule["scheduler"] = _jsonable(sd)
    if scaler is not None and scaler.is_enabled():
        schedule["grad_scaler"] = _jsonable(scaler.state_dict())
    _write_json_atomic(staging / SCHEDULER_FILE, schedule)
    _write_json_atomic(staging / TRAINER_STATE, state.to_json())
    write_manifest(staging, state.step)
    if final.exists():  # the same step written again (a resumed run in the same directory)
        remove_checkpoint(final)
    os.replace(staging, final)
    return final


# --------------------------------------------------------------------------------------------
# training state: optimizer, schedule and RNG, out and back


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def optimizer_tensors(
    sd: dict[str, Any], param_names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict (`optimizer.state_dict()`) into named tensors + JSON-able
    rest. Nested state (bitsandbytes keeps its quantization state in a dict per parameter)
    becomes `state/<param name>/<key>/<sub key>`."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}

    def flatten(name: str, path: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors[f"state/{name}/{path}"] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            for k, v in value.items():
                flatten(name, f"{path}/{k}", v)
        else:
            scalars.setdefault(name, {})[path] = _jsonable(value)

    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            flatten(param_names[idx], key, value)
    meta = {
        "param_names": param_names,
        "param_groups": _jsonable(sd["param_groups"]),
        "scalars": scalars,
    }
    return tensors, meta


def _set_path(d: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, ckpt: str | Path, param_names: list[str], *,
    sharded_model: torch.nn.Module | None = None,
) -> None:
    """Restore what `write_checkpoint` stored of the optimizer. `param_names`: the trainable
    parameters in the optimizer's order, as when it was written. With `sharded_model` (the
    FSDP-sharded model owning the optimizer's parameters) the full state read from the file is
    sharded like the parameters."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(ckpt) / OPTIMIZER_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["optimizer"])
    if meta["param_names"] != param_names:
        raise CheckpointError(f"{path}: optimizer parameters do not match the trainable ones")
    index = {name: i for i, name in enumerate(param_names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(path)).items():
        _, name, entry = key.split("/", 2)
        _set_path(state.setdefault(index[name], {}), entry, value)
    for name, extra in meta["scalars"].items():
        for entry, value in extra.items():
            _set_path(state.setdefault(index[name], {}), entry, value)
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    if sharded_model is None:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name: dict[str, Any] = {  # torch.distributed.checkpoint's layout: parameters by name
        "state": {param_names[i]: s for i, s in state.items()},
        "param_groups": [{**g, "params": [param_names[i] for i in g["params"]]} for g in groups],
    }
    set_optimizer_state_dict(sharded_model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def load_schedule(ckpt: str | Path, scheduler: Any,
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """Restore the LR scheduler (and an enabled fp16 grad scaler) from scheduler.json."""
    saved = json.loads((Path(ckpt) / SCHEDULER_FILE).read_text())
    if "scheduler" in saved:
        sd = saved["scheduler"]
        sd["lr_lambdas"] = [None] * len(sd.get("lr_lambdas", []))  # functions of the spec
        scheduler.load_state_dict(sd)
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in saved:
        scaler.load_state_dict(saved["grad_scaler"])


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a run draws from: tensors (torch, CUDA, numpy keys) + JSON (python, numpy)."""
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng_state(ckpt: str | Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(ckpt) / RNG_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rng"])
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def load_training_state(
    ckpt: str | Path, optimizer: torch.optim.Optimizer, param_names: list[str], *,
    scheduler: Any = None, scaler: torch.amp.GradScaler | None = None,
    sharded_model: torch.nn.Module | None = None,
) -> TrainerState:
    """Resume from a verified checkpoint: restore optimizer, scheduler, grad scaler and RNG
    states (the weights are the method's: load them first) and return its trainer state.
    `sharded_model`: see `load_optimizer_state`."""
    state = read_trainer_state(ckpt)
    load_optimizer_state(optimizer, ckpt, param_names, sharded_model=sharded_model)
    if scheduler is not None:
        load_schedule(ckpt, scheduler, scaler)
    restore_rng_state(ckpt)
    return state


# --------------------------------------------------------------------------------------------
# a job's checkpoints in the artifact store


def stored_checkpoints(store: ArtifactStore, tenant: str,
                       job_id: str) -> list[tuple[int, str]]:
    """(step, prefix) of the job's complete checkpoints in `store` (those with a manifest),
    oldest first."""
    root = job_root(tenant, job_id)
    found = []
    for key in store.list(root):
        name, _, rest = key[len(root):].partition("/")
        step = checkpoint_step(name)
        if step is not None and rest == MANIFEST:
            found.append((step, root + name))
    return sorted(found)


def prune_stored_checkpoints(store: ArtifactStore, tenant: str, job_id: str,
                             keep: int) -> None:
    """Keep the job's newest `keep` stored checkpoints (0: all); delete each manifest first."""
    if not keep:
        return
    for _step, prefix in stored_checkpoints(store, tenant, job_id)[:-keep]:
        store.delete_prefix(f"{prefix}/{MANIFEST}")
        store.delete_prefix(f"{prefix}/")


@dataclass(frozen=True)
class StoredCheckpoint:
    prefix: str  # where it is in the artifact store
    local: Path  # where it was downloaded
    step: int


def download_latest_checkpoint(
    store: ArtifactStore, tenant: str, job_id: str, dest: Path
) -> StoredCheckpoint | None:
    """Download the job's newest complete checkpoint into dest/checkpoint-<step>, falling back
    to older ones when a download fails its hashes, or None when the job stored none."""
    from llmstudio.storage import CorruptArtifact, IncompleteArtifact

    for step, prefix in reversed(stored_checkpoints(store, tenant, job_id)):
        local = Path(dest) / checkpoint_name(step)
        try:
            store.get_dir(prefix, local)
        except (IncompleteArtifact, CorruptArtifact) as e:
            log.warning("job %s: checkpoint %s unusable, trying an older one: %s",
                        job_id, prefix, e)
            shutil.rmtree(local, ignore_errors=True)
            continue
        log.info("job %s: resuming from %s (step %d)", job_id, prefix, step)
        return StoredCheckpoint(prefix, local, step)
    return None
