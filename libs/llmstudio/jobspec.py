"""The fine-tuning job spec: what a user writes in JOB.yaml and submits with `jobs create`.

Validated by pydantic at submit time, so a bad spec fails before it is queued, with the field
named. The scheduler stores it; the trainer and the evaluator read it back from events.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraOptions(_Strict):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; default: the architecture's attention projections"
    )


class Hyperparameters(_Strict):
    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(256, ge=8)
    seed: int = 42
    log_every: int = Field(1, ge=1, description="publish metrics every N steps")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end")


class EvalOptions(_Strict):
    max_samples: int = Field(64, ge=1, description="validation rows used for exact match")
    max_new_tokens: int = Field(32, ge=1)


class JobSpec(_Strict):
    name: str | None = Field(
        None, description="registered model name; default: '<base model dir name>-<method>'"
    )
    base_model: str = Field(..., description="local Hugging Face model directory (or a hub id)")
    dataset: str = Field(..., description="dataset id returned by `datasets push`")
    method: Literal["lora"] = "lora"
    lora: LoraOptions = Field(default_factory=LoraOptions)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    eval: EvalOptions = Field(default_factory=EvalOptions)

    def model_name(self) -> str:
        if self.name:
            return self.name
        base = self.base_model.rstrip("/").split("/")[-1] or "model"
        return f"{base}-{self.method}"


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `field.path: reason`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
