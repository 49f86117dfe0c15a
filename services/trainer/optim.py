"""The spec's optimizer names, for the SFT recipe's own loop and for transformers' Trainer."""

from __future__ import annotations

import torch

# hyperparameters.optimizer -> transformers TrainingArguments.optim (the preference recipe)
TRANSFORMERS_OPTIM = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """adamw (torch), adamw_8bit / paged_adamw_8bit (bitsandbytes: 8-bit moments)."""
    if name == "adamw":  # fused: one kernel for all parameters (CPU and CUDA), as HF's default
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
