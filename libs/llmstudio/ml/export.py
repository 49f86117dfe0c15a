"""Export a training checkpoint for use outside LLM Studio.

    export_adapter(checkpoint, out)   the peft adapter alone (adapter_model.safetensors +
                                      adapter_config.json) + a model card; load it with
                                      PeftModel.from_pretrained(base, out)
    export_merged(checkpoint, out)    the adapter merged into its base model: a plain
                                      transformers model dir (config.json, model.safetensors,
                                      generation_config.json, tokenizer + chat template, model
                                      card); load it with AutoModelForCausalLM.from_pretrained(out)

A checkpoint is trusted only if its manifest.json lists every file with a matching sha256 (the
trainer writes the manifest last; llmstudio.ml.checkpoint owns the format and tells an adapter
from full weights), so a half-written checkpoint is refused. Nothing is pickled:
only safetensors and JSON are read or written, and an export that would contain a pickle-format
file (*.bin, *.pt, *.pth, *.pkl) fails. Exports are atomic: everything is written into a hidden
temp dir next to `out_dir`, then renamed into place; a failed export leaves nothing behind.

Full fine-tune checkpoints (config.json + model*.safetensors) are re-saved as a merged export.
Prompt-learning adapters (prefix tuning, prompt tuning, P-tuning) have no weights to fold into
the base model: they are refused by `export_merged` and exported with `export_adapter`.

Torch-side only, no service imports: used by the CLI (`llmstudio models export`) and services.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmstudio.jobspec import METHODS
from llmstudio.ml import checkpoint
from llmstudio.ml.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE, weight_files

EXPORT_INFO = "llmstudio_export.json"
EXPORT_FORMAT = "llmstudio.export.v1"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PROMPT_LEARNING_TYPES = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING",
                         "ADAPTION_PROMPT", "CPT"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# Files of a full-weights checkpoint that are model files (the rest is trainer state).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked (incomplete, wrong kind, missing base...)."""


# --------------------------------------------------------------------------------------------
# the checkpoint


def verify_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """The checkpoint's manifest after checking every file (llmstudio.ml.checkpoint); a bad
    checkpoint is an ExportError: nothing is exported from it."""
    try:
        return checkpoint.verify_checkpoint(ckpt)
    except checkpoint.CheckpointError as e:
        raise ExportError(f"{e}; refusing to export it") from None


def _kind(ckpt: Path) -> str:
    """'adapter', 'prompt_adapter' (prompt learning: cannot be merged) or 'full'."""
    try:
        kind = checkpoint.checkpoint_kind(ckpt)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    if kind == "adapter" and checkpoint.adapter_type(ckpt) in PROMPT_LEARNING_TYPES:
        return "prompt_adapter"
    return kind


def _trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path}: not JSON: {e}") from None


def _check_no_pickles(root: Path) -> None:
    bad = [p.relative_to(root).as_posix() for p in root.rglob("*")
           if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise ExportError(f"export would contain pickle-format files {bad}; only safetensors "
                          "are allowed")


# --------------------------------------------------------------------------------------------
# atomic output


@contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success it becomes `out_dir` in one rename."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir}: already exists and is not empty (choose another --out, "
                          "or overwrite=True)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        _check_no_pickles(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{time.time_ns()}.old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# model card + export info


def _adapter_options(spec: dict) -> dict:
    traits = METHODS.get(spec.get("method", ""))
    if traits is None or not traits.peft:
        return {}
    return spec.get("prompt" if traits.prompt_learning else "lora") or {}


def _lineage(ckpt: Path, state: dict, manifest: dict, kind: str, base_model: str,
             extra: dict | None) -> dict[str, Any]:
    spec = state.get("spec") or {}
    info = {
        "format": EXPORT_FORMAT,
        "export": kind,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_checkpoint": str(ckpt),
        "checkpoint_step": state.get("step", manifest.get("step")),
        "base_model": base_model,
        "method": spec.get("method", ""),
        "objective": spec.get("objective", ""),
        "dataset": spec.get("dataset", ""),
        "final_loss": state.get("loss"),
        "hyperparameters": spec.get("hyperparameters", {}),
        "adapter_options": _adapter_options(spec),
        "seeds": state.get("seeds", {}),
    }
    for k, v in (extra or {}).items():
        if v not in (None, "", {}, []):
            info[k] = v
    return info


def _model_card(info: dict[str, Any], *, merged: bool) -> str:
    base = info.get("base_model") or "unknown"
    name = info.get("model_name") or Path(str(info.get("source_checkpoint", "model"))).name
    version = f" v{info['model_version']}" if info.get("model_version") else ""
    library = "transformers" if merged else "peft"
    front = ["---", f"library_name: {library}", f"base_model: {json.dumps(base)}",
             "tags:", "  - llm-studio", f"  - {info.get('method') or 'fine-tuned'}",
             "  - merged" if merged else "  - adapter", "---", ""]
    if merged:
        usage = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\")\n"
                 "tokenizer = AutoTokenizer.from_pretrained(\"<this dir>\")\n```")
        what = ("The adapter is merged into the base model's weights: this directory is a plain "
                "transformers model (safetensors, config, generation config, tokenizer).")
        if info.get("method") == "full":
            what = "Full fine-tune: every weight was trained; saved as a plain transformers model."
    else:
        usage = ("```python\nfrom transformers import AutoModelForCausalLM\n"
                 "from peft import PeftModel\n"
                 f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})\n"
                 "model = PeftModel.from_pretrained(base, \"<this dir>\")\n```")
        what = "A peft adapter only (no base weights, no optimizer state)."
    rows = [
        ("base model", base),
        ("method", info.get("method")),
        ("objective", info.get("objective")),
        ("checkpoint step", info.get("checkpoint_step")),
        ("final training loss", info.get("final_loss")),
        ("dataset", info.get("dataset")),
        ("dataset sha256", info.get("dataset_sha256")),
        ("job", info.get("job_id")),
        ("registry stage", info.get("stage")),
        ("dtype", info.get("dtype")),
        ("hyperparameters", json.dumps(info.get("hyperparameters") or {}, sort_keys=True)),
    ]
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    body = [f"# {name}{version}", "", what, "", "Exported by LLM Studio "
            f"({info['exported_at']}); full lineage in `{EXPORT_INFO}`.", "", *table, "",
            "## Usage", "", usage, ""]
    return "\n".join(front + body)


def _write_info(dest: Path, info: dict[str, Any], *, merged: bool) -> None:
    (dest / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    (dest / "README.md").write_text(_model_card(info, merged=merged))


# --------------------------------------------------------------------------------------------
# exports


def export_adapter(checkpoint_dir: str | Path, out_dir: str | Path, *,
                   lineage: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Copy the adapter of a verified checkpoint (weights + config, no optimizer or trainer
    state) into `out_dir` with a model card; return `out_dir`. `lineage` adds registry facts
    (model_name, model_version, job_id, dataset_sha256, stage...) to the card."""
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    manifest = verify_checkpoint(ckpt)
    kind = _kind(ckpt)
    if kind == "full":
        raise ExportError(f"{ckpt}: a full fine-tune checkpoint has no adapter; export it merged")
    if not (ckpt / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"{ckpt}: no {ADAPTER_WEIGHTS} (only safetensors adapters are exported)")
    state = _trainer_state(ckpt)
    base = str(state.get("base_model") or
               json.loads((ckpt / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "")
    info = _lineage(ckpt, state, manifest, "adapter", base, lineage)
    with _atomic_dir(out, overwrite) as tmp:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy2(ckpt / name, tmp / name)
        _write_info(tmp, info, merged=False)
    return out


def _torch_dtype(dtype: str):
    import torch

    name = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ExportError(f"dtype {dtype!r}: expected one of {sorted(set(DTYPES.values()))}")
    return getattr(torch, name)


def _load_tokenizer(*sources: Path | str | None):
    """The first source with a tokenizer wins."""
    from transformers import AutoTokenizer

    errors = []
    for src in sources:
        if not src:
            continue
        if Path(src).is_dir() and not any((Path(src) / f).is_file() for f in _TOKENIZER_FILES):
            continue
        try:
            return AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            errors.append(f"{src}: {e}")
    raise ExportError("no tokenizer found for the export" + (f": {errors}" if errors else ""))


def export_merged(checkpoint_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                  dtype: str = "float32", *, lineage: dict[str, Any] | None = None,
                  overwrite: bool = False) -> Path:
    """Merge the checkpoint's adapter into its base model and save a plain transformers model
    dir (safetensors + config + generation config + tokenizer with its chat template + model
    card) in `out_dir`; return `out_dir`.

    The base is `base_model` if given, else the `base_model` recorded in trainer_state.json.
    It is loaded in full precision (fp32) for the merge, also for QLoRA / 8-bit LoRA
    adapters, then cast to `dtype` (float32, bfloat16 or float16) to save. A full fine-tune
    checkpoint is re-saved as is (in `dtype`). Prompt-learning adapters are refused."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    manifest = verify_checkpoint(ckpt)
    kind = _kind(ckpt)
    state = _trainer_state(ckpt)
    method = (state.get("spec") or {}).get("method", "")
    if kind == "prompt_adapter":
        raise ExportError(
            f"{ckpt}: {method or 'prompt-learning'} adapters (prefix tuning, prompt tuning, "
            "P-tuning) add virtual tokens, not weights, so they cannot be merged into the base "
            "model; export the adapter alone instead (without --merged)")
    save_dtype = _torch_dtype(dtype)
    base = base_model or state.get("base_model") or ""

    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        tokenizer_sources: tuple[Path | str, ...] = (ckpt, base)
    else:
        if not base:
            raise ExportError(f"{ckpt}: trainer_state.json names no base model; pass base_model "
                              "(--base-model DIR)")
        if "/" in base and not Path(base).exists() and Path(base).is_absolute():
            raise ExportError(f"base model {base} not found on this machine; pass base_model "
                              "(--base-model DIR) pointing at a local copy")
        from peft import PeftModel

        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load base model {base}: {e}; pass base_model "
                              "(--base-model DIR) pointing at a local copy") from None
        peft_model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=False)
        if not hasattr(peft_model, "merge_and_unload"):
            raise ExportError(f"{ckpt}: {method or 'this'} adapter cannot be merged; export the "
                              "adapter alone")
        model = peft_model.merge_and_unload(safe_merge=True)
        tokenizer_sources = (base, ckpt)
    model = model.to(save_dtype)
    model.config.use_cache = True
    model.eval()
    tokenizer = _load_tokenizer(*tokenizer_sources)
    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)

    info = _lineage(ckpt, state, manifest, "merged", str(base), lineage)
    info["dtype"] = str(save_dtype).removeprefix("torch.")
    with _atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(str(tmp))  # transformers 5: safetensors only
        tokenizer.save_pretrained(str(tmp))  # includes the chat template
        if not weight_files(tmp):
            raise ExportError(f"save_pretrained wrote no model*.safetensors in {tmp}")
        _write_info(tmp, info, merged=True)
    return out
