"""Fine-tuning methods, through one explicit registry: name -> peft config builder -> model.

    METHODS[spec.method](spec, model_type)  ->  a peft config (None for a full fine-tune)
    load_for_training(spec, model_dir, device)  ->  PreparedModel (the model to train, its
                                                    trainable parameters, per-step hook)
    save_trainable / load_trainable              ->  what a checkpoint holds and its inverse

Every name of the JobSpec `Method` literal has exactly one entry in METHODS (a unit test checks
it). What the hardware cannot run is refused up front by `check_hardware`, with a message that
says why, so a job fails before it loads anything rather than crashing mid-run.

Checkpoints hold no pickle: adapters are peft's `adapter_model.safetensors` +
`adapter_config.json`; a full fine-tune is `model.safetensors` (+ config.json) as written by
transformers' save_pretrained.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmstudio.jobspec import PROMPT_METHODS, JobSpec
from llmstudio.ml.targets import DEFAULT_TARGET_MODULES, default_target_modules  # noqa: F401 - part of this module's API

# --------------------------------------------------------------------------------------------
# per-architecture defaults

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

# 8-bit / 4-bit methods: the base weights are quantized by bitsandbytes at load time.
QUANTIZED_METHODS = ("qlora", "lora_8bit")
ADALORA_RANK_PATTERN_FILE = "adalora_rank_pattern.json"
# P-tuning: peft saves only the encoder's *output* (the inference artifact); resuming needs the
# encoder's own weights, kept beside it.
PROMPT_ENCODER_STATE_FILE = "prompt_encoder_state.safetensors"


def _targets(spec: JobSpec, model_type: str) -> list[str] | str:
    return list(spec.lora.target_modules or []) or default_target_modules(model_type)


# --------------------------------------------------------------------------------------------
# the registry: name -> builder(spec, model_type) -> peft config (None = full fine-tune)

MethodBuilder = Callable[[JobSpec, str], Any]


def _full(spec: JobSpec, model_type: str) -> None:
    return None


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


def _ia3(spec: JobSpec, model_type: str):
    from peft import IA3Config

    default_targets, default_ff = IA3_DEFAULTS.get(model_type, (None, None))
    if spec.lora.target_modules:
        targets = list(spec.lora.target_modules)
        ff = [m for m in targets if m in (default_ff or [])]
    else:
        targets, ff = default_targets, default_ff  # None, None: peft's own mapping
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ff)


def _prefix_tuning(spec: JobSpec, model_type: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.prompt.num_virtual_tokens)


def _prompt_tuning(spec: JobSpec, model_type: str):
    from peft import PromptTuningConfig

    return PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=spec.prompt.num_virtual_tokens
    )


def _p_tuning(spec: JobSpec, model_type: str):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=spec.prompt.num_virtual_tokens,
        encoder_hidden_size=spec.prompt.encoder_hidden_size,
    )


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


METHODS: dict[str, MethodBuilder] = {
    "full": _full,
    "lora": _lora,
    "dora": _dora,
    "qlora": _lora,  # LoRA on a 4-bit NF4 base (the quantization is in load_for_training)
    "lora_8bit": _lora,  # LoRA on an 8-bit (LLM.int8) base
    "ia3": _ia3,
    "prefix_tuning": _prefix_tuning,
    "prompt_tuning": _prompt_tuning,
    "p_tuning": _p_tuning,
    "loha": _loha,
    "lokr": _lokr,
    "adalora": _adalora,
    "oft": _oft,
    "vera": _vera,
}


# --------------------------------------------------------------------------------------------
# hardware checks


class UnsupportedOnHardware(ValueError):
    """The spec asks for something this worker's hardware cannot run; the message says why."""


class TrainableMismatch(ValueError):
    """A checkpoint's weights do not fit the model being resumed (other method/rank/model)."""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX512-BF16 / AMX); without them torch emulates
    bf16 and training runs ~25x slower than fp32."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AMX" in cap


def _bitsandbytes_importable() -> str:
    try:
        importlib.import_module("bitsandbytes")
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run"
        return f"{type(e).__name__}: {e}"
    return ""


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
        if spec.precision == "bf16" and not cpu_has_fast_bf16():
            raise UnsupportedOnHardware(
                "precision bf16 on this CPU (no AVX512-BF16/AMX units, capability "
                f"{torch.backends.cpu.get_cpu_capability()}) is emulated and ~25x slower than "
                "fp32; use precision fp32 (or a GPU worker)"
            )
    elif device.type == "cuda":
        if spec.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UnsupportedOnHardware(
                f"precision bf16 needs an Ampere or newer GPU; {torch.cuda.get_device_name(device)} "
                "has no bf16 support; use fp16 or fp32"
            )
    needs_bnb = spec.method in QUANTIZED_METHODS or hp.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    if needs_bnb:
        why = _bitsandbytes_importable()
        if why:
            what = spec.method if spec.method in QUANTIZED_METHODS else f"optimizer {hp.optimizer}"
            raise UnsupportedOnHardware(f"{what} needs bitsandbytes, which does not import here ({why})")


# --------------------------------------------------------------------------------------------
# loading a model for training


def _noop(_: int) -> None:
    return None


@dataclass
class PreparedModel:
    """A model ready to train.

    after_backward(step): call once per optimizer step, AFTER optimizer.step() and BEFORE
        optimizer.zero_grad() (it reads the gradients, and AdaLoRA's rank masking must come after
        the update), with `step` = optimizer steps completed so far (1-based). No-op except for
        AdaLoRA (rank budget update + masking).
    extra_loss(): a regularization term to add to the training loss before backward, or None
        (AdaLoRA: orth_reg_weight * orthogonality penalty of its A/B matrices; peft only adds it
        when the model computes the loss itself from `labels`).
    logits_offset: leading positions of `model(...).logits` that are virtual tokens (prompt /
        P-tuning prepend them; drop them with logits[:, logits_offset:] before the loss).
    """

    model: Any
    trainable: list[tuple[str, torch.nn.Parameter]]
    is_adapter: bool
    after_backward: Callable[[int], None]
    num_trainable: int
    num_total: int
    method: str = "lora"
    extra_loss: Callable[[], torch.Tensor] | None = None
    logits_offset: int = 0
    quantized: bool = False
    info: dict = field(default_factory=dict)


def _quantization_config(spec: JobSpec, device: torch.device):
    from transformers import BitsAndBytesConfig

    if spec.method == "qlora":
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


def _adalora_orth_reg(peft_model) -> Callable[[], torch.Tensor]:
    cfg = peft_model.peft_config[peft_model.active_adapter]
    weight = float(cfg.orth_reg_weight)
    pairs = [
        (n, p) for n, p in peft_model.named_parameters() if ("lora_A" in n or "lora_B" in n)
    ]

    def extra() -> torch.Tensor:
        total = None
        for n, p in pairs:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return weight * total / len(pairs)

    return extra


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
    """Load `model_dir` for `spec.method` on `device`: fp32 weights (4-bit NF4 for qlora, 8-bit
    for lora_8bit), the peft adapter from METHODS, gradient checkpointing if asked."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    check_hardware(spec, device)
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; known: {sorted(METHODS)}")
    gc = spec.hyperparameters.gradient_checkpointing
    quantized = spec.method in QUANTIZED_METHODS

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = _quantization_config(spec, device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantized:
        _release_file_mappings(model)
    else:
        model = model.to(device)
    model.config.use_cache = False
    model_type = model.config.model_type

    gc_kwargs = {"use_reentrant": False}
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)

    peft_config = METHODS[spec.method](spec, model_type)
    after_backward: Callable[[int], None] = _noop
    extra_loss = None
    logits_offset = 0
    if peft_config is None:  # full fine-tune
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for _, p in trainable)
        return PreparedModel(
            model=model, trainable=trainable, is_adapter=False, after_backward=_noop,
            num_trainable=n_train, num_total=n_train, method=spec.method,
        )

    from peft import get_peft_model

    if gc and not quantized:
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config)
    if spec.method == "adalora":
        base = model.base_model

        def after_backward(step: int) -> None:
            base.update_and_allocate(step)

        extra_loss = _adalora_orth_reg(model)
    if spec.method in ("prompt_tuning", "p_tuning"):
        logits_offset = spec.prompt.num_virtual_tokens
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train, n_total = model.get_nb_trainable_parameters()
    return PreparedModel(
        model=model, trainable=trainable, is_adapter=True, after_backward=after_backward,
        num_trainable=int(n_train), num_total=int(n_total), method=spec.method,
        extra_loss=extra_loss, logits_offset=logits_offset, quantized=quantized,
        info={"peft_type": str(peft_config.peft_type), "model_type": model_type},
    )


# --------------------------------------------------------------------------------------------
# saving and restoring what was trained


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _adalora_unpruned(model):
    """Context: AdaLoRA's rank_pattern set to None so peft saves (and expects) full-rank
    tensors; pruned ranks are zero in lora_E, so the adapter computes the same function, and a
    resumed run keeps its parameter shapes (and optimizer state). The pattern itself is kept in
    a side file."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        cfg = model.peft_config[model.active_adapter]
        saved = cfg.rank_pattern
        cfg.rank_pattern = None
        try:
            yield saved
        finally:
            cfg.rank_pattern = saved

    return ctx()


def _peft_type(model) -> str:
    return str(model.peft_config[model.active_adapter].peft_type.value)


def save_trainable(
    model, ckpt_dir: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Adapters: peft `save_pretrained` (adapter_model.safetensors + adapter_config.json); full:
    transformers `save_pretrained` (model.safetensors + config.json). Never pickle.
    `state_dict`: the model's full state when its parameters are sharded (FSDP), saved instead
    of the model's own."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    given = {} if state_dict is None else {"state_dict": state_dict}
    if _is_peft(model):
        if _peft_type(model) == "ADALORA":
            with _adalora_unpruned(model) as pattern:
                model.save_pretrained(str(ckpt_dir), safe_serialization=True, **given)
            if pattern:
                (ckpt_dir / ADALORA_RANK_PATTERN_FILE).write_text(json.dumps(pattern))
        else:
            model.save_pretrained(str(ckpt_dir), safe_serialization=True, **given)
        if _peft_type(model) == "P_TUNING":
            from safetensors.torch import save_file

            state = {
                n: p.detach().contiguous().cpu()
                for n, p in model.named_parameters() if p.requires_grad
            }
            save_file(state, str(ckpt_dir / PROMPT_ENCODER_STATE_FILE))
    else:
        model.save_pretrained(str(ckpt_dir), safe_serialization=True, **given)


def _check_keys(ckpt_dir: Path, got: set[str], want: set[str]) -> None:
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise TrainableMismatch(
            f"{ckpt_dir}: checkpoint weights do not match this model (other method, rank, target "
            f"modules or base model?): missing {len(missing)} {missing[:5]}, "
            f"unexpected {len(extra)} {extra[:5]}"
        )


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


def load_trainable(prepared: PreparedModel, ckpt_dir: Path) -> None:
    """Load what `save_trainable` wrote into `prepared.model` (in place, same Parameter objects,
    so an optimizer built on `prepared.trainable` stays valid). Raises TrainableMismatch when
    names or shapes differ."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    model = prepared.model
    if prepared.is_adapter:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        path = ckpt_dir / "adapter_model.safetensors"
        if not path.exists():
            raise TrainableMismatch(f"{ckpt_dir}: no adapter_model.safetensors (not an adapter checkpoint)")
        device = prepared.trainable[0][1].device if prepared.trainable else "cpu"
        if _peft_type(model) == "P_TUNING":
            _load_by_name(prepared, ckpt_dir / PROMPT_ENCODER_STATE_FILE)
            return
        weights = load_file(str(path), device=str(device))
        is_adalora = _peft_type(model) == "ADALORA"
        if is_adalora:
            with _adalora_unpruned(model):
                want = set(get_peft_model_state_dict(model).keys())
        else:
            want = set(get_peft_model_state_dict(model).keys())
        _check_keys(ckpt_dir, set(weights), want)
        try:
            if is_adalora:
                with _adalora_unpruned(model):
                    set_peft_model_state_dict(model, weights)
            else:
                set_peft_model_state_dict(model, weights)
        except RuntimeError as e:
            raise TrainableMismatch(f"{ckpt_dir}: {e}") from e
        if is_adalora:
            side = ckpt_dir / ADALORA_RANK_PATTERN_FILE
            cfg = model.peft_config[model.active_adapter]
            cfg.rank_pattern = json.loads(side.read_text()) if side.exists() else None
        return

    files = sorted(ckpt_dir.glob("model*.safetensors"))
    if not files:
        raise TrainableMismatch(f"{ckpt_dir}: no model*.safetensors (not a full fine-tune checkpoint)")
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


__all__ = [
    "ADALORA_RANK_PATTERN_FILE", "PROMPT_ENCODER_STATE_FILE", "DEFAULT_TARGET_MODULES", "IA3_DEFAULTS", "METHODS",
    "MethodBuilder", "PROMPT_METHODS", "PreparedModel", "QUANTIZED_METHODS", "TrainableMismatch",
    "UnsupportedOnHardware", "check_hardware", "cpu_has_fast_bf16", "default_target_modules",
    "load_for_training", "load_trainable", "save_trainable",
]
