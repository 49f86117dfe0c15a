"""The fine-tuning job spec: what a user writes in JOB.yaml and submits with `jobs create`.

Validated by pydantic at submit time, so a bad spec fails before it is queued, with the field
named. The scheduler stores it; the trainer and the evaluator read it back from events.
This module imports no torch: the scheduler and the CLI validate specs without it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Every fine-tuning method the trainer registers (services/trainer/methods.py).
Method = Literal[
    "full", "lora", "dora", "qlora", "lora_8bit", "ia3", "prefix_tuning", "prompt_tuning",
    "p_tuning", "loha", "lokr", "adalora", "oft", "vera",
]
# sft: prompt/completion or chat messages (loss on completion / assistant tokens);
# pretrain: continued pre-training on {"text"}; dpo / orpo: {"prompt","chosen","rejected"}.
Objective = Literal["sft", "pretrain", "dpo", "orpo"]
Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")


class LoraOptions(_Strict):
    """Options of the adapter methods: rank, scaling, dropout and which modules to adapt.

    Used by lora, dora, qlora, lora_8bit, loha, lokr, adalora, oft, vera (rank `r`) and ia3
    (target modules only)."""

    r: int = Field(8, ge=1, le=1024, description="adapter rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; default: the architecture's attention projections"
    )


class PromptOptions(_Strict):
    """Options of prefix tuning, prompt tuning and P-tuning."""

    num_virtual_tokens: int = Field(16, ge=1, le=512)
    encoder_hidden_size: int = Field(128, ge=1, description="P-tuning prompt encoder width")


class AdaLoraOptions(_Strict):
    """AdaLoRA's rank budget: starts at init_r per module, pruned to target_r on average
    between steps tinit and max_steps - tfinal, every delta_t steps."""

    init_r: int = Field(12, ge=1)
    target_r: int = Field(4, ge=1)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    delta_t: int = Field(1, ge=1)


class PreferenceOptions(_Strict):
    """DPO / ORPO (through TRL)."""

    beta: float = Field(0.1, gt=0, description="DPO beta / ORPO lambda")
    max_prompt_length: int = Field(128, ge=8)


class EarlyStopping(_Strict):
    metric: Literal["eval_loss"] = "eval_loss"
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)


class Hyperparameters(_Strict):
    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch and process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_length: int = Field(256, ge=8)
    seed: int = 42
    optimizer: Optimizer = "adamw"
    packing: bool = Field(False, description="pack examples into full rows (no cross-attention)")
    gradient_checkpointing: bool = False
    log_every: int = Field(1, ge=1, description="publish metrics every N steps")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")
    keep_last_checkpoints: int = Field(0, ge=0, description="keep the newest K; 0 = keep all")
    eval_every: int = Field(0, ge=0, description="eval loss on the validation split every N steps")
    early_stopping: EarlyStopping | None = None


class EvalOptions(_Strict):
    max_samples: int = Field(64, ge=1, description="validation rows used for exact match")
    max_new_tokens: int = Field(32, ge=1)


# Methods the FSDP strategy does not shard: bitsandbytes' quantized weights are not tensors FSDP
# can split; AdaLoRA's rank allocator reads and masks whole matrices and their gradients; peft
# saves a prompt-learning adapter as an embedding computed from the prompt encoder's (there
# sharded) parameters, and these methods train too few parameters for sharding to matter.
FSDP_UNSUPPORTED_METHODS = ("qlora", "lora_8bit", "adalora", *PROMPT_METHODS)


class DistributedOptions(_Strict):
    """Data parallel training: `num_processes` workers' processes (accelerate / torchrun)."""

    num_processes: int = Field(1, ge=1, le=64)
    strategy: Literal["ddp", "fsdp"] = "ddp"


class JobSpec(_Strict):
    name: str | None = Field(
        None, description="registered model name; default: '<base model dir name>-<method>'"
    )
    base_model: str = Field(..., description="local Hugging Face model directory (or a hub id)")
    dataset: str = Field(..., description="dataset id returned by `datasets push`")
    method: Method = "lora"
    objective: Objective = "sft"
    precision: Precision = Field("fp32", description="bf16 / fp16 mixed precision need a GPU")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    prompt: PromptOptions = Field(default_factory=PromptOptions)
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions)
    preference: PreferenceOptions = Field(default_factory=PreferenceOptions)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    distributed: DistributedOptions = Field(default_factory=DistributedOptions)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.objective in ("dpo", "orpo") and self.method in PROMPT_METHODS:
            raise ValueError(f"objective {self.objective} does not support method {self.method}")
        if self.method == "adalora" and self.adalora.target_r > self.adalora.init_r:
            raise ValueError("adalora.target_r must be <= adalora.init_r")
        hp = self.hyperparameters
        if self.objective in ("dpo", "orpo"):  # what only the SFT recipe does
            if hp.packing:
                raise ValueError("hyperparameters.packing applies to sft and pretrain only")
            if hp.eval_every or hp.early_stopping:
                raise ValueError(
                    "hyperparameters.eval_every / early_stopping apply to sft and pretrain only"
                )
            if self.distributed.num_processes > 1:
                raise ValueError(
                    f"objective {self.objective} runs in one process; distributed.num_processes "
                    "> 1 applies to sft and pretrain only"
                )
        if self.distributed.strategy == "fsdp" and self.method in FSDP_UNSUPPORTED_METHODS:
            raise ValueError(
                f"distributed.strategy fsdp does not support method {self.method}; use ddp"
            )
        if self.distributed.strategy == "fsdp" and self.hyperparameters.optimizer != "adamw":
            raise ValueError(
                "distributed.strategy fsdp does not support optimizer "
                f"{self.hyperparameters.optimizer} (bitsandbytes does not update sharded "
                "parameters); use adamw or strategy ddp"
            )
        return self

    def model_name(self) -> str:
        if self.name:
            return self.name
        base = self.base_model.rstrip("/").split("/")[-1] or "model"
        return f"{base}-{self.method}"

    def needs_gpu(self) -> str:
        """Why this spec cannot run on a CPU worker ('' if it can)."""
        if self.precision == "fp16":
            return "precision fp16 needs a CUDA GPU (CPUs have no fp16 training path); use fp32"
        if self.hyperparameters.optimizer == "paged_adamw_8bit":
            return "optimizer paged_adamw_8bit pages optimizer state to CPU memory from a GPU"
        return ""


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `field.path: reason`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
