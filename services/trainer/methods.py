"""Fine-tuning methods: one entry per method, registered once in REGISTRY.

    REGISTRY[spec.method]                      ->  FineTuningMethod: its peft config builder,
                                                   training hooks, save and load
    load_for_training(spec, model_dir, device) ->  PreparedModel (the model to train, its
                                                   trainable parameters, per-step hooks)
    save_trainable / load_trainable            ->  what a checkpoint holds of it, and back
    check_hardware(spec, device)               ->  refuses, saying why, what this device
                                                   cannot run, before anything is loaded

REGISTRY is the torch side of the kernel's table (llmstudio.jobspec.METHODS), under the same
names: the kernel says what a method is (a peft adapter or every weight, prompt learning, its
base quantized in 4 or 8 bits, FSDP-shardable), this module how to build, train and save it.
A unit test checks that both tables list the same methods.

Checkpoints hold no pickle: adapters are peft's `adapter_model.safetensors` +
`adapter_config.json`; a full fine-tune is `model.safetensors` (+ config.json) as written by
transformers' save_pretrained.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmstudio.jobspec import METHODS, JobSpec
from llmstudio.ml.checkpoint import ADAPTER_WEIGHTS, weight_files
from llmstudio.ml.targets import default_target_modules

from . import host
from .core import precision_for

# IA3 scales keys, values and the feed-forward input (the IA3 paper's choice); the
# feed-forward modules are scaled on their input, the others on their output.
_LLAMA_LIKE_IA3 = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": _LLAMA_LIKE_IA3,
    "mistral": _LLAMA_LIKE_IA3,
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": _LLAMA_LIKE_IA3,
    "qwen3": _LLAMA_LIKE_IA3,
    "gemma": _LLAMA_LIKE_IA3,
    "gemma2": _LLAMA_LIKE_IA3,
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}
ADALORA_RANK_PATTERN_FILE = "adalora_rank_pattern.json"
# P-tuning: peft saves only the encoder's *output* (the inference artifact); resuming needs the
# encoder's own weights, kept beside it.
PROMPT_ENCODER_STATE_FILE = "prompt_encoder_state.safetensors"


class UnsupportedOnHardware(ValueError):
    """The spec asks for something this worker's hardware cannot run; the message says why."""


class TrainableMismatch(ValueError):
    """A checkpoint's weights do not fit the model being resumed (other method/rank/model)."""


# --------------------------------------------------------------------------------------------
# what an entry is made of


def _noop(_: int) -> None:
    return None


@dataclass(frozen=True)
class TrainingHooks:
    """after_backward(step): call once per optimizer step, AFTER optimizer.step() and BEFORE
        optimizer.zero_grad() (it reads the gradients, and AdaLoRA's rank masking must come
        after the update), with `step` = optimizer steps completed so far (1-based).
    extra_loss(): a regularization term to add to the training loss before backward, or None
        (AdaLoRA: orth_reg_weight * orthogonality penalty of its A/B matrices; peft only adds it
        when the model computes the loss itself from `labels`).
    logits_offset: leading positions of `model(...).logits` that are virtual tokens (prompt /
        P-tuning prepend them; drop them with logits[:, logits_offset:] before the loss)."""

    after_backward: Callable[[int], None] = _noop
    extra_loss: Callable[[], torch.Tensor] | None = None
    logits_offset: int = 0


@dataclass
class PreparedModel:
    """A model ready to train: `trainable` are the parameters the optimizer updates, in order;
    after_backward, extra_loss, logits_offset: its method's TrainingHooks."""

    model: Any
    trainable: list[tuple[str, torch.nn.Parameter]]
    method: str
    is_adapter: bool
    num_trainable: int
    num_total: int
    after_backward: Callable[[int], None] = _noop
    extra_loss: Callable[[], torch.Tensor] | None = None
    logits_offset: int = 0


def _no_hooks(peft_model, spec: JobSpec) -> TrainingHooks:
    return TrainingHooks()


def _save_pretrained(model, ckpt_dir: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    """peft (adapter_model.safetensors + adapter_config.json) or transformers (model.safetensors
    + config.json) save_pretrained; `state_dict`: the full state of a sharded (FSDP) model."""
    given = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(ckpt_dir), safe_serialization=True, **given)


def _check_keys(ckpt_dir: Path, got: set[str], want: set[str]) -> None:
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise TrainableMismatch(
            f"{ckpt_dir}: checkpoint weights do not match this model (other method, rank, target "
            f"modules or base model?): missing {len(missing)} {missing[:5]}, "
            f"unexpected {len(extra)} {extra[:5]}"
        )


def _load_adapter(prepared: PreparedModel, ckpt_dir: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = ckpt_dir / ADAPTER_WEIGHTS
    if not path.exists():
        raise TrainableMismatch(f"{ckpt_dir}: no {ADAPTER_WEIGHTS} (not an adapter checkpoint)")
    model = prepared.model
    device = prepared.trainable[0][1].device if prepared.trainable else "cpu"
    weights = load_file(str(path), device=str(device))
    _check_keys(ckpt_dir, set(weights), set(get_peft_model_state_dict(model)))
    try:
        set_peft_model_state_dict(model, weights)
    except RuntimeError as e:
        raise TrainableMismatch(f"{ckpt_dir}: {e}") from e


@dataclass(frozen=True)
class FineTuningMethod:
    """How the trainer builds, trains and saves one method.

    peft_config(spec, model_type): the peft config the base model is wrapped with; None: a full
        fine-tune (every weight trained).
    hooks(peft_model, spec): its per-step training hooks (TrainingHooks).
    save(model, ckpt_dir, state_dict): write what was trained into a checkpoint directory.
    load(prepared, ckpt_dir): read it back into `prepared`, in place."""

    peft_config: Callable[[JobSpec, str], Any] | None
    hooks: Callable[[Any, JobSpec], TrainingHooks] = _no_hooks
    save: Callable[[Any, Path, dict[str, torch.Tensor] | None], None] = _save_pretrained
    load: Callable[[PreparedModel, Path], None] = _load_adapter


# --------------------------------------------------------------------------------------------
# the LoRA family, IA3, VeRA, OFT: peft configs


def _targets(spec: JobSpec, model_type: str) -> list[str] | str:
    return list(spec.lora.target_modules or []) or default_target_modules(model_type)


def _lora(spec: JobSpec, model_type: str, *, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=_targets(spec, model_type),
        use_dora=use_dora,
    )


def _dora(spec: JobSpec, model_type: str):
    return _lora(spec, model_type, use_dora=True)


def _loha(spec: JobSpec, model_type: str):
    from peft import LoHaConfig

    return LoHaConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        alpha=spec.lora.alpha,
        module_dropout=spec.lora.dropout,
        target_modules=_targets(spec, model_type),
    )


def _lokr(spec: JobSpec, model_type: str):
    from peft import LoKrConfig

    return LoKrConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        alpha=spec.lora.alpha,
        module_dropout=spec.lora.dropout,
        target_modules=_targets(spec, model_type),
    )


def _ia3(spec: JobSpec, model_type: str):
    from peft import IA3Config

    default_targets, default_ff = IA3_DEFAULTS.get(model_type, (None, None))
    if spec.lora.target_modules:
        targets = list(spec.lora.target_modules)
        ff = [m for m in targets if m in (default_ff or [])]
    else:
        targets, ff = default_targets, default_ff  # None, None: peft's own mapping
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ff)


def _oft(spec: JobSpec, model_type: str):
    from peft import OFTConfig

    # r = number of orthogonal blocks per layer (block size = in_features / r; peft adjusts r
    # to the nearest divisor, with a warning, when it does not divide in_features).
    return OFTConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        oft_block_size=0,
        module_dropout=spec.lora.dropout,
        target_modules=_targets(spec, model_type),
    )


def _vera(spec: JobSpec, model_type: str):
    from peft import VeraConfig

    # peft >= 0.13 shares one random A/B pair sized to the largest targeted layer, so targets
    # of different shapes (q_proj vs the GQA-narrow k_proj/v_proj) are fine.
    return VeraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.r,
        vera_dropout=spec.lora.dropout,
        target_modules=_targets(spec, model_type),
        save_projection=True,  # the frozen random projections go in the checkpoint too
    )


# --------------------------------------------------------------------------------------------
# AdaLoRA: a rank budget updated after each step, an orthogonality regularizer, and checkpoints
# that keep the pruned ranks (as zeros) so a resumed run has the same parameter shapes


def _adalora(spec: JobSpec, model_type: str):
    from peft import AdaLoraConfig

    a, total = spec.adalora, spec.hyperparameters.max_steps
    if a.tinit >= total - a.tfinal:
        raise ValueError(
            f"adalora: tinit ({a.tinit}) must be < max_steps ({total}) - tfinal ({a.tfinal}), "
            "or no step is left for the rank budgeting phase"
        )
    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=a.init_r,
        target_r=a.target_r,
        tinit=a.tinit,
        tfinal=a.tfinal,
        deltaT=a.delta_t,
        total_step=total,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=_targets(spec, model_type),
    )


def _adalora_hooks(peft_model, spec: JobSpec) -> TrainingHooks:
    cfg = peft_model.peft_config[peft_model.active_adapter]
    weight = float(cfg.orth_reg_weight)
    pairs = [(n, p) for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n]

    def orthogonality() -> torch.Tensor:
        total = None
        for n, p in pairs:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return weight * total / len(pairs)

    return TrainingHooks(after_backward=peft_model.base_model.update_and_allocate,
                         extra_loss=orthogonality)


@contextlib.contextmanager
def _adalora_unpruned(model) -> Iterator[Any]:
    """AdaLoRA's rank_pattern set to None, so peft saves (and expects) full-rank tensors;
    pruned ranks are zero in lora_E, so the adapter computes the same function. Yields the
    pattern, which the checkpoint keeps in a side file."""
    cfg = model.peft_config[model.active_adapter]
    saved = cfg.rank_pattern
    cfg.rank_pattern = None
    try:
        yield saved
    finally:
        cfg.rank_pattern = saved


def _save_adalora(model, ckpt_dir: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    with _adalora_unpruned(model) as pattern:
        _save_pretrained(model, ckpt_dir, state_dict)
    if pattern:
        (ckpt_dir / ADALORA_RANK_PATTERN_FILE).write_text(json.dumps(pattern))


def _load_adalora(prepared: PreparedModel, ckpt_dir: Path) -> None:
    model = prepared.model
    with _adalora_unpruned(model):
        _load_adapter(prepared, ckpt_dir)
    side = ckpt_dir / ADALORA_RANK_PATTERN_FILE
    cfg = model.peft_config[model.active_adapter]
    cfg.rank_pattern = json.loads(side.read_text()) if side.exists() else None


# --------------------------------------------------------------------------------------------
# prompt learning: virtual tokens (prefix tuning puts them in the attention's keys and values,
# prompt tuning and P-tuning in front of the input, and so in front of the logits)


def _prefix_tuning(spec: JobSpec, model_type: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM",
                              num_virtual_tokens=spec.prompt.num_virtual_tokens)


def _prompt_tuning(spec: JobSpec, model_type: str):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM",
                              num_virtual_tokens=spec.prompt.num_virtual_tokens)


def _p_tuning(spec: JobSpec, model_type: str):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=spec.prompt.num_virtual_tokens,
        encoder_hidden_size=spec.prompt.encoder_hidden_size,
    )


def _virtual_tokens_first(peft_model, spec: JobSpec) -> TrainingHooks:
    return TrainingHooks(logits_offset=spec.prompt.num_virtual_tokens)


def _save_p_tuning(model, ckpt_dir: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    from safetensors.torch import save_file

    _save_pretrained(model, ckpt_dir, state_dict)
    state = {n: p.detach().contiguous().cpu()
             for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(ckpt_dir / PROMPT_ENCODER_STATE_FILE))


def _load_p_tuning(prepared: PreparedModel, ckpt_dir: Path) -> None:
    _load_by_name(prepared, ckpt_dir / PROMPT_ENCODER_STATE_FILE)


# --------------------------------------------------------------------------------------------
# full fine-tune: every weight


def _load_full(prepared: PreparedModel, ckpt_dir: Path) -> None:
    from safetensors.torch import load_file

    files = weight_files(ckpt_dir)
    if not files:
        raise TrainableMismatch(
            f"{ckpt_dir}: no model*.safetensors (not a full fine-tune checkpoint)")
    model = prepared.model
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    own = dict(model.state_dict())
    unexpected = sorted(set(state) - set(own))
    # tied weights (lm_head = embed_tokens) are saved once; each missing key must share storage
    # with a loaded one
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in loaded_ptrs)
    if unexpected or missing:
        raise TrainableMismatch(
            f"{ckpt_dir}: checkpoint weights do not match this model: missing {len(missing)} "
            f"{missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise TrainableMismatch(f"{ckpt_dir}: {e}") from e


# --------------------------------------------------------------------------------------------
# the registry


REGISTRY: dict[str, FineTuningMethod] = {
    "full": FineTuningMethod(None, load=_load_full),
    "lora": FineTuningMethod(_lora),
    "dora": FineTuningMethod(_dora),
    "qlora": FineTuningMethod(_lora),  # its 4-bit base: METHODS["qlora"].quantized_bits
    "lora_8bit": FineTuningMethod(_lora),
    "ia3": FineTuningMethod(_ia3),
    "prefix_tuning": FineTuningMethod(_prefix_tuning),
    "prompt_tuning": FineTuningMethod(_prompt_tuning, hooks=_virtual_tokens_first),
    "p_tuning": FineTuningMethod(_p_tuning, hooks=_virtual_tokens_first, save=_save_p_tuning,
                                 load=_load_p_tuning),
    "loha": FineTuningMethod(_loha),
    "lokr": FineTuningMethod(_lokr),
    "adalora": FineTuningMethod(_adalora, hooks=_adalora_hooks, save=_save_adalora,
                                load=_load_adalora),
    "oft": FineTuningMethod(_oft),
    "vera": FineTuningMethod(_vera),
}


# --------------------------------------------------------------------------------------------
# hardware checks


def _bitsandbytes_importable() -> str:
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run"
        return f"{type(e).__name__}: {e}"
    return ""


def bf16_units(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: the answer the worker's heartbeat reports."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and host.cpu_has_native_bf16()


def resolve_precision(spec: JobSpec, device: torch.device) -> JobSpec:
    """`spec` with `precision: auto` replaced by what it means on `device` (core.AUTO_PRECISION);
    the recipes train in it and record it in their checkpoints' trainer state."""
    device = torch.device(device)
    if spec.precision != "auto":
        return spec
    resolved = precision_for(spec.precision, device.type, bf16_units(device))
    return spec.model_copy(update={"precision": resolved})


def check_hardware(spec: JobSpec, device: torch.device) -> None:
    """Raise UnsupportedOnHardware (saying why) if `spec` cannot run on `device`."""
    device = torch.device(device)
    hp = spec.hyperparameters
    if device.type == "cpu":
        if spec.precision == "fp16":
            raise UnsupportedOnHardware(
                "precision fp16 needs a CUDA GPU (CPUs have no fp16 training path); "
                "use precision fp32 on a CPU worker"
            )
        if hp.optimizer == "paged_adamw_8bit":
            raise UnsupportedOnHardware(
                "optimizer paged_adamw_8bit pages optimizer state between GPU and CPU memory and "
                "needs a CUDA GPU; use adamw or adamw_8bit on a CPU worker"
            )
        # the heartbeat reports the same answer (host.cpu_hardware), so the scheduler places a
        # bf16 job only on a CPU worker that this check lets run it
        if spec.precision == "bf16" and not host.cpu_has_native_bf16():
            raise UnsupportedOnHardware(
                "precision bf16 on this CPU (no avx512_bf16 / amx_bf16 in its flags) is emulated "
                "and ~25x slower than fp32; use precision fp32 (or a GPU worker)"
            )
    elif device.type == "cuda":
        if spec.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UnsupportedOnHardware(
                "precision bf16 needs an Ampere or newer GPU; "
                f"{torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or fp32"
            )
    method_needs_bnb = METHODS[spec.method].needs_bitsandbytes
    if method_needs_bnb or hp.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        why = _bitsandbytes_importable()
        if why:
            what = spec.method if method_needs_bnb else f"optimizer {hp.optimizer}"
            raise UnsupportedOnHardware(
                f"{what} needs bitsandbytes, which does not import here ({why})")


# --------------------------------------------------------------------------------------------
# loading a model for training


def _quantization_config(bits: int, device: torch.device):
    from transformers import BitsAndBytesConfig

    if bits == 4:  # QLoRA: NF4 with double quantization
        compute = (
            torch.bfloat16
            if device.type == "cuda" and torch.cuda.is_bf16_supported()
            else torch.float32
        )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _release_file_mappings(model) -> None:
    """Copy the parameters bitsandbytes left unquantized (embeddings, norms) out of the
    safetensors memory map. They are views into it, which keeps the whole mapped file resident
    (~the fp32 model size in RSS) after quantization has read every page; copied, the map is
    released: SmolLM2-135M QLoRA after load 485 -> 188 MiB RSS."""
    import gc

    import bitsandbytes as bnb

    quantized_types = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for module in model.modules():
            for _, p in module.named_parameters(recurse=False):
                if not isinstance(p, quantized_types):
                    p.data = p.data.clone()  # same Parameter object: ties are kept
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and b.device.type == "cpu":
                    module._buffers[name] = b.clone()
    gc.collect()


def load_for_training(spec: JobSpec, model_dir: str, device: torch.device) -> PreparedModel:
    """Load `model_dir` for `spec.method` on `device`: fp32 weights (the base in 4 or 8 bits
    where the method says so), wrapped with the method's peft config, gradient checkpointing
    if asked."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    check_hardware(spec, device)
    entry, traits = REGISTRY[spec.method], METHODS[spec.method]
    gc = spec.hyperparameters.gradient_checkpointing
    bits = traits.quantized_bits

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if bits:
        kwargs["quantization_config"] = _quantization_config(bits, device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if bits:
        _release_file_mappings(model)
    else:
        model = model.to(device)
    model.config.use_cache = False
    model_type = model.config.model_type

    gc_kwargs = {"use_reentrant": False}
    if bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)

    if entry.peft_config is None:  # full fine-tune
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for _, p in trainable)
        return PreparedModel(model=model, trainable=trainable, method=spec.method,
                             is_adapter=False, num_trainable=n_train, num_total=n_train)

    from peft import get_peft_model

    if gc and not bits:
        model.enable_input_require_grads()
    model = get_peft_model(model, entry.peft_config(spec, model_type))
    hooks = entry.hooks(model, spec)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train, n_total = model.get_nb_trainable_parameters()
    return PreparedModel(
        model=model, trainable=trainable, method=spec.method, is_adapter=True,
        num_trainable=int(n_train), num_total=int(n_total), after_backward=hooks.after_backward,
        extra_loss=hooks.extra_loss, logits_offset=hooks.logits_offset,
    )


# --------------------------------------------------------------------------------------------
# saving and restoring what was trained


def save_trainable(prepared: PreparedModel, ckpt_dir: Path,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write what `prepared` trains into `ckpt_dir` the way its method says (safetensors, never
    pickle). `state_dict`: the model's full state when its parameters are sharded (FSDP), saved
    instead of the model's own."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    REGISTRY[prepared.method].save(prepared.model, ckpt_dir, state_dict)


def load_trainable(prepared: PreparedModel, ckpt_dir: Path) -> None:
    """Load what `save_trainable` wrote into `prepared.model` (in place, same Parameter objects,
    so an optimizer built on `prepared.trainable` stays valid). Raises TrainableMismatch when
    names or shapes differ."""
    REGISTRY[prepared.method].load(prepared, Path(ckpt_dir))


def _load_by_name(prepared: PreparedModel, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.exists():
        raise TrainableMismatch(f"{path.parent}: no {path.name} (saved by another method?)")
    own = dict(prepared.trainable)
    state = load_file(str(path))
    _check_keys(path.parent, set(state), set(own))
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise TrainableMismatch(
                    f"{path.parent}: {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                    f"{tuple(own[name].shape)} in this model"
                )
            own[name].copy_(tensor)
