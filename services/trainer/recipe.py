"""LoRA supervised fine-tuning, one readable recipe from top to bottom.

    spec + base model dir + rows  ->  checkpoints under out_dir/checkpoint-<step>/

Steps: seed everything; tokenize rows with loss masking (llmstudio.ml.data); load the model in
fp32; wrap it with a peft LoRA adapter; AdamW with linear warmup/decay; loop over a
deterministic shuffled stream of examples for `max_steps` optimizer steps, reporting metrics,
honouring a stop request and writing checkpoints.

A checkpoint directory holds:
    adapter_model.safetensors, adapter_config.json, README.md   (peft save_pretrained)
    optimizer.safetensors   AdamW state tensors named `state/<param name>/<key>`; the
                            non-tensor state (param_groups) is JSON in the safetensors metadata
    trainer_state.json      step, losses, data position, seeds, spec, metric history
    manifest.json           written LAST: every other file with its sha256 and size
A reader trusts a checkpoint only if manifest.json exists and the hashes match
(`verify_checkpoint`). Nothing is pickled: only safetensors and JSON.

Determinism: the data order is a pure function of (seed, epoch) and each step reseeds torch
with (seed, step), so resuming from a checkpoint (`resume_from`) reproduces the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from llmstudio.jobspec import JobSpec
from llmstudio.ml.data import (
    causal_lm_loss_sum,
    collate,
    count_learned_tokens,
    encode_example,
    pad_id_of,
)

CHECKPOINT_FORMAT = "llmstudio.checkpoint.v1"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"

# LoRA targets per architecture (config.model_type) when the spec names none.
_ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": _ATTENTION_PROJECTIONS,
    "mistral": _ATTENTION_PROJECTIONS,
    "mixtral": _ATTENTION_PROJECTIONS,
    "qwen2": _ATTENTION_PROJECTIONS,
    "qwen2_moe": _ATTENTION_PROJECTIONS,
    "qwen3": _ATTENTION_PROJECTIONS,
    "qwen3_moe": _ATTENTION_PROJECTIONS,
    "gemma": _ATTENTION_PROJECTIONS,
    "gemma2": _ATTENTION_PROJECTIONS,
    "gpt2": ["c_attn"],
}


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    first_loss: float
    tokens_seen: int
    adapter_dir: Path | None  # the last checkpoint written (None if no step ran)
    stopped: bool


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its manifest."""


def _never() -> bool:
    return False


def _ignore(_: dict) -> None:
    return None


def default_target_modules(model_type: str) -> list[str] | str:
    """The modules LoRA adapts by default; 'all-linear' (every linear layer but the output
    head) for architectures without an entry."""
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# the recipe


def train_lora_sft(
    spec: JobSpec,
    model_dir: str,
    train_rows: list[dict],
    out_dir: Path,
    *,
    on_metrics: Callable[[dict], None] = _ignore,
    should_stop: Callable[[], bool] = _never,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    hp = spec.hyperparameters
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. seeds (torch is reseeded per step below, from (seed, step))
    random.seed(hp.seed)
    np.random.seed(hp.seed % 2**32)
    torch.manual_seed(hp.seed)

    # 2. data: tokenize once, with loss masks; drop rows left with nothing to learn
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = pad_id_of(tokenizer)
    examples = [encode_example(tokenizer, row, hp.max_seq_length) for row in train_rows]
    examples = [ex for ex in examples if count_learned_tokens(ex) > 0]
    if not examples:
        raise ValueError(
            f"no training row has a completion token within max_seq_length={hp.max_seq_length}"
        )

    # 3. model + LoRA adapter, fp32
    device = pick_device()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    targets = spec.lora.target_modules or default_target_modules(model.config.model_type)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
    )
    model = get_peft_model(model, lora).to(device)
    model.train()

    # 4. optimizer + schedule
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_names = [n for n, _ in named_params]
    optimizer = torch.optim.AdamW(
        [p for _, p in named_params], lr=hp.learning_rate, weight_decay=hp.weight_decay
    )

    # 5. resume: adapter weights, optimizer state, step, data position
    step, samples_seen, tokens_seen = 0, 0, 0
    first_loss, history, state = math.nan, [], {}
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), model, optimizer, param_names)
        if state["num_examples"] != len(examples):
            raise CheckpointError(
                f"{resume_from}: trained on {state['num_examples']} examples, "
                f"this run has {len(examples)}; cannot resume on different data"
            )
        step, samples_seen = state["step"], state["samples_seen"]
        tokens_seen, first_loss = state["tokens_seen"], state["first_loss"]
        history = state.get("log_history", [])
    scheduler = get_linear_schedule_with_warmup(
        optimizer, hp.warmup_steps, hp.max_steps, last_epoch=step - 1 if step else -1
    )

    # 6. the loop
    stream = _example_stream(len(examples), hp.seed, start=samples_seen)
    loss = state["loss"] if resume_from is not None else math.nan
    last_ckpt: Path | None = None

    def checkpoint() -> Path:
        trainer_state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "max_steps": hp.max_steps,
            "loss": loss,
            "first_loss": first_loss,
            "tokens_seen": tokens_seen,
            "samples_seen": samples_seen,  # data position in the shuffled example stream
            "epoch": samples_seen / len(examples),
            "num_examples": len(examples),
            "seeds": {
                "seed": hp.seed,
                "torch_per_step": "seed * 100003 + step",
                "data_order": "random.Random(f'{seed}:{epoch}').shuffle(range(num_examples))",
            },
            "base_model": model_dir,
            "spec": spec.model_dump(mode="json"),
            "log_history": history,
        }
        path = write_checkpoint(
            out_dir / f"checkpoint-{step}", model, optimizer, param_names, trainer_state
        )
        if on_checkpoint is not None:
            on_checkpoint(path, step)
        return path

    window = _Window()
    stopped = False
    while step < hp.max_steps:
        if should_stop():
            stopped = True
            break
        torch.manual_seed(hp.seed * 100_003 + step)  # dropout depends on (seed, step) only
        batch = collate([examples[next(stream)] for _ in range(hp.batch_size)], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, n_tokens = causal_lm_loss_sum(logits, batch["labels"])
        loss_t = loss_sum / max(n_tokens, 1)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named_params], 1.0)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1
        samples_seen += hp.batch_size
        batch_tokens = int(batch["attention_mask"].sum())
        tokens_seen += batch_tokens
        loss = float(loss_t.detach())
        if step == 1:
            first_loss = loss
        window.add(loss, batch_tokens, hp.batch_size)

        if step % hp.log_every == 0 or step == hp.max_steps:
            metrics = {
                "step": step,
                "max_steps": hp.max_steps,
                "loss": window.mean_loss(),
                "learning_rate": lr,
                "tokens_per_s": window.tokens / window.elapsed(),
                "samples_per_s": window.samples / window.elapsed(),
                "epoch": samples_seen / len(examples),
            }
            history.append(metrics)
            on_metrics(metrics)
            window = _Window()

        if hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < hp.max_steps:
            last_ckpt = checkpoint()

    # 7. final checkpoint (also when stopped early, so no finished step is lost)
    if step > 0 and (last_ckpt is None or last_ckpt.name != f"checkpoint-{step}"):
        last_ckpt = checkpoint()
    return TrainResult(
        steps=step,
        final_loss=loss,
        first_loss=first_loss,
        tokens_seen=tokens_seen,
        adapter_dir=last_ckpt,
        stopped=stopped,
    )


class _Window:
    """Accumulates the steps between two metric reports."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.loss = 0.0
        self.steps = self.tokens = self.samples = 0

    def add(self, loss: float, tokens: int, samples: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.samples += samples

    def mean_loss(self) -> float:
        return self.loss / max(self.steps, 1)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


def _example_stream(n: int, seed: int, *, start: int = 0) -> Iterator[int]:
    """Endless example indices: epoch after epoch, each a seeded shuffle; skips `start`."""
    epoch, offset = divmod(start, n)
    while True:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        yield from order[offset:]
        epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# checkpoints: files first, manifest last; safetensors + JSON only


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, param_names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state dict into named tensors + JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        name = param_names[idx]
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    meta = {"param_names": param_names, "param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, path: Path, param_names: list[str]
) -> None:
    """Inverse of `optimizer_tensors` as stored in optimizer.safetensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["optimizer"])
    if meta["param_names"] != param_names:
        raise CheckpointError(f"{path}: optimizer parameters do not match the model's adapter")
    tensors = load_file(str(path))
    index = {name: i for i, name in enumerate(param_names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, name, field = key.split("/", 2)
        state.setdefault(index[name], {})[field] = value
    for name, extra in meta["scalars"].items():
        state.setdefault(index[name], {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(
    ckpt: Path,
    model,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    trainer_state: dict[str, Any],
) -> Path:
    """Write adapter, optimizer and trainer state into `ckpt`, then manifest.json last."""
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / MANIFEST).unlink(missing_ok=True)  # rewriting: invalid until the new manifest
    model.save_pretrained(str(ckpt), safe_serialization=True)  # peft: adapter only
    tensors, meta = optimizer_tensors(optimizer, param_names)
    save_file(
        tensors,
        str(ckpt / OPTIMIZER_FILE),
        metadata={"format": "llmstudio.optimizer.v1", "optimizer": json.dumps(meta)},
    )
    _write_json_atomic(ckpt / TRAINER_STATE, trainer_state)

    files = []
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files.append({
                "path": p.relative_to(ckpt).as_posix(),
                "sha256": _sha256(p),
                "size": p.stat().st_size,
            })
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "step": trainer_state["step"],
        "created_at": time.time(),
        "files": files,
    }
    _write_json_atomic(ckpt / MANIFEST, manifest)
    return ckpt


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Return the manifest if every listed file exists with its size and sha256."""
    manifest_path = Path(ckpt) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete checkpoint)")
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        p = Path(ckpt) / entry["path"]
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {entry['path']} listed in the manifest is missing")
        if p.stat().st_size != entry["size"] or _sha256(p) != entry["sha256"]:
            raise CheckpointError(f"{ckpt}: {entry['path']} does not match its sha256")
    return manifest


def load_checkpoint(ckpt: Path, model, optimizer, param_names: list[str]) -> dict[str, Any]:
    """Restore adapter weights and optimizer state from a verified checkpoint; return its
    trainer_state."""
    verify_checkpoint(ckpt)
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise CheckpointError(f"{ckpt}: adapter weights do not fit the model: {unexpected[:3]}")
    load_optimizer_state(optimizer, ckpt / OPTIMIZER_FILE, param_names)
    return state


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under `out_dir`, if any."""
    best: tuple[int, Path] | None = None
    for p in Path(out_dir).glob("checkpoint-*"):
        if (p / MANIFEST).is_file() and p.name.split("-", 1)[1].isdigit():
            s = int(p.name.split("-", 1)[1])
            if best is None or s > best[0]:
                best = (s, p)
    return best[1] if best else None


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint, manifest first, so a reader never sees a half-deleted one."""
    (Path(ckpt) / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)
