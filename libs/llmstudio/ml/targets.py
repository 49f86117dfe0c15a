"""Which modules the LoRA family adapts when a spec names none, per architecture
(config.model_type). No torch here: the trainer applies it, the scheduler's memory estimate
counts it, and both must agree."""

from __future__ import annotations

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


def default_target_modules(model_type: str) -> list[str] | str:
    """The modules the LoRA family adapts by default; 'all-linear' (every linear layer but the
    output head) for architectures without an entry."""
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")
