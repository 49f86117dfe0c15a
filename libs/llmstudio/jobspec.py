"""The fine-tuning job spec: what a user writes in JOB.yaml and submits with `jobs create`.

Validated by pydantic at submit time, so a bad spec fails before it is queued, with the field
named. The scheduler stores it; the trainer and the evaluator read it back from events.
This module imports no torch: the scheduler and the CLI validate specs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .names import MAX_NAME_LENGTH, name_error, safe_name


@dataclass(frozen=True)
class MethodTraits:
    """What the platform knows of a fine-tuning method without torch: the JobSpec's checks,
    the memory estimate, the hardware check and export read it. The trainer's registry
    (services/trainer/methods.py) adds how to build, train and save each method, under the same
    names; a unit test checks that both list the same methods."""

    peft: bool = True  # trains a peft adapter; False: every weight of the model
    prompt_learning: bool = False  # virtual tokens instead of weight deltas
    quantized_bits: int | None = None  # the frozen base is loaded in 4 or 8 bits (bitsandbytes)
    fsdp: bool = True  # distributed.strategy fsdp can shard it

    @property
    def needs_bitsandbytes(self) -> bool:
        return self.quantized_bits is not None

    @property
    def mergeable(self) -> bool:
        """Export can fold it into the base weights (a full fine-tune is re-saved as it is)."""
        return not self.prompt_learning


# Not sharded by FSDP: bitsandbytes' quantized weights are not tensors FSDP can split; AdaLoRA's
# rank allocator reads and masks whole matrices and their gradients; peft saves a prompt-learning
# adapter as an embedding computed from the prompt encoder's (there sharded) parameters, and
# these methods train too few parameters for sharding to matter.
_ADAPTER = MethodTraits()
_PROMPT = MethodTraits(prompt_learning=True, fsdp=False)
METHODS: dict[str, MethodTraits] = {
    "full": MethodTraits(peft=False),
    "lora": _ADAPTER,
    "dora": _ADAPTER,
    "qlora": MethodTraits(quantized_bits=4, fsdp=False),  # LoRA on a 4-bit NF4 base
    "lora_8bit": MethodTraits(quantized_bits=8, fsdp=False),  # LoRA on an LLM.int8 base
    "ia3": _ADAPTER,
    "prefix_tuning": _PROMPT,
    "prompt_tuning": _PROMPT,
    "p_tuning": _PROMPT,
    "loha": _ADAPTER,
    "lokr": _ADAPTER,
    "adalora": MethodTraits(fsdp=False),
    "oft": _ADAPTER,
    "vera": _ADAPTER,
}

if TYPE_CHECKING:
    Method = str
else:  # the names of METHODS as a Literal: pydantic checks them and lists them in the schema
    Method = Literal[tuple(METHODS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# sft: prompt/completion or chat messages (loss on completion / assistant tokens);
# pretrain: continued pre-training on {"text"}; dpo / orpo: {"prompt","chosen","rejected"}.
Objective = Literal["sft", "pretrain", "dpo", "orpo"]
# auto: the worker picks at run time (bf16 on a GPU with bf16, fp32 on CPUs: the trainer's
# core.AUTO_PRECISION says why); the scheduler places an auto job on any worker.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]


class LoraOptions(_Strict):
    """Options of the adapter methods: rank, scaling, dropout and which modules to adapt.

    Used by lora, dora, qlora, lora_8bit, loha, lokr, adalora, oft, vera (rank `r`) and ia3
    (target modules only)."""

    r: int = Field(default=8, ge=1, le=1024, description="adapter rank")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        default=None,
        description="module names to adapt; default: the architecture's attention projections",
    )


class PromptOptions(_Strict):
    """Options of prefix tuning, prompt tuning and P-tuning."""

    num_virtual_tokens: int = Field(default=16, ge=1, le=512)
    encoder_hidden_size: int = Field(default=128, ge=1,
                                     description="P-tuning prompt encoder width")


class AdaLoraOptions(_Strict):
    """AdaLoRA's rank budget: starts at init_r per module, pruned to target_r on average
    between steps tinit and max_steps - tfinal, every delta_t steps."""

    init_r: int = Field(default=12, ge=1)
    target_r: int = Field(default=4, ge=1)
    tinit: int = Field(default=0, ge=0)
    tfinal: int = Field(default=0, ge=0)
    delta_t: int = Field(default=1, ge=1)


class PreferenceOptions(_Strict):
    """DPO / ORPO (through TRL)."""

    beta: float = Field(default=0.1, gt=0, description="DPO beta / ORPO lambda")
    max_prompt_length: int = Field(default=128, ge=8)


class EarlyStopping(_Strict):
    metric: Literal["eval_loss"] = "eval_loss"
    patience: int = Field(default=3, ge=1,
                          description="evaluations without improvement before stopping")
    min_delta: float = Field(default=0.0, ge=0)


class Hyperparameters(_Strict):
    max_steps: int = Field(default=100, ge=1, description="optimizer steps to run")
    batch_size: int = Field(default=8, ge=1, description="examples per micro-batch and process")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_seq_length: int = Field(default=256, ge=8)
    seed: int = 42
    optimizer: Optimizer = "adamw"
    packing: bool = Field(default=False,
                          description="pack examples into full rows (no cross-attention)")
    gradient_checkpointing: bool = False
    log_every: int = Field(default=1, ge=1, description="publish metrics every N steps")
    checkpoint_every: int = Field(default=0, ge=0,
                                  description="checkpoint every N steps; 0 = only at the end")
    keep_last_checkpoints: int = Field(default=0, ge=0,
                                       description="keep the newest K; 0 = keep all")
    eval_every: int = Field(default=0, ge=0,
                            description="eval loss on the validation split every N steps")
    early_stopping: EarlyStopping | None = None


class EvalOptions(_Strict):
    max_samples: int = Field(default=64, ge=1, description="validation rows used for exact match")
    max_new_tokens: int = Field(default=32, ge=1)


class DistributedOptions(_Strict):
    """Data parallel training: `num_processes` workers' processes (accelerate / torchrun)."""

    num_processes: int = Field(default=1, ge=1, le=64)
    strategy: Literal["ddp", "fsdp"] = "ddp"


class JobSpec(_Strict):
    name: str | None = Field(
        default=None,
        description="registered model name (a NATS subject token: letters, digits, '_', '-'); "
                    "default: '<base model dir name>-<method>'",
    )
    base_model: str = Field(..., description="local Hugging Face model directory (or a hub id)")
    dataset: str = Field(..., description="dataset id returned by `datasets push`")
    method: Method = "lora"
    objective: Objective = "sft"
    precision: Precision = Field(
        default="auto",
        description="auto: what the worker's device trains fastest in (bf16 on a GPU that has "
                    "it, else fp32); bf16 needs a GPU or a CPU with bf16 units; fp16 a GPU",
    )
    lora: LoraOptions = Field(default_factory=LoraOptions)
    prompt: PromptOptions = Field(default_factory=PromptOptions)
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions)
    preference: PreferenceOptions = Field(default_factory=PreferenceOptions)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    eval: EvalOptions = Field(default_factory=EvalOptions)
    distributed: DistributedOptions = Field(default_factory=DistributedOptions)
    max_attempts: int = Field(
        default=3, ge=1, le=20,
        description="attempts that may end with their worker lost before the job fails; an "
                    "attempt handed back (a worker draining) does not count",
    )

    @field_validator("name")
    @classmethod
    def _subject_token(cls, name: str | None) -> str | None:
        if name is not None and (error := name_error(name)):
            raise ValueError(error)
        return name

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        traits = METHODS[self.method]
        if self.objective in ("dpo", "orpo") and traits.prompt_learning:
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
        if self.distributed.strategy == "fsdp" and not traits.fsdp:
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
        base = safe_name(self.base_model.rstrip("/").split("/")[-1])
        return f"{base[:MAX_NAME_LENGTH - len(self.method) - 1]}-{self.method}"

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
