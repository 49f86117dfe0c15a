"""Data parallel inside one process of a run: which device and rank this is, sums over the
ranks, and the two ways the SFT recipe spreads a model over the ranks (DDP replicates it;
FSDP2 `fully_shard` shards parameters, gradients and optimizer state, and gathers the full
state back for a checkpoint). Launching the processes is services.trainer.distributed's job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from llmstudio.ml.loss import CausalLMLossSum


def pick_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_ranks(x: float | int) -> float | int:
    """`x` summed over the processes (itself when there is one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    out = float(t.item())
    return int(round(out)) if isinstance(x, int) else out


def any_rank(flag: bool) -> bool:
    return bool(sum_ranks(int(flag)))




@contextlib.contextmanager
def gradient_sync(train_model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Context for one micro-batch's forward and backward: without `sync`, gradients only
    accumulate on this rank (DDP's no_sync, FSDP's set_requires_gradient_sync(False)); the
    step's last micro-batch reduces them all at once."""
    from torch.distributed.fsdp import FSDPModule

    if sync:
        yield
    elif isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)
    elif isinstance(train_model, torch.nn.parallel.DistributedDataParallel):
        with train_model.no_sync():
            yield
    else:
        yield




def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (through a peft wrapper): the modules whose
    class is in its `_no_split_modules` (LlamaDecoderLayer, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def shard_model(loss_model: CausalLMLossSum, amp_dtype: torch.dtype | None) -> None:
    """FSDP2, in place: each decoder layer is one shard group, all-gathered for its own forward
    and backward only; the root `loss_model` holds the rest (embeddings, final norm, output
    head: tied weights must share a group) and stays gathered from its forward to its backward.
    With bf16 / fp16 the gathered parameters are cast to that dtype for compute, gradients are
    reduced in fp32 and the sharded parameters (what the optimizer updates) stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(loss_model.model)
    if not layers:
        raise ValueError(
            "distributed.strategy fsdp: found no decoder layers (_no_split_modules) to shard in "
            f"{type(loss_model.model).__name__}; use strategy ddp"
        )
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype,
                                  reduce_dtype=torch.float32 if amp_dtype else None)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(loss_model, mp_policy=policy)


def gather_full_state(model, optimizer: torch.optim.Optimizer, param_names: list[str], *,
                      adapter: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full (unsharded) state dict of an FSDP-sharded `model` (only its trainable parameters
    for an adapter; buffers always) and of its optimizer in `optimizer.state_dict()`'s layout,
    on rank 0's CPU; the other ranks get empty dicts. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter)
    weights = get_model_state_dict(model, options=options)
    # tied parameters (an output head sharing the input embedding) are gathered as separate
    # copies: make them one tensor again, so that save_pretrained stores it once, as unsharded
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(p), name)
        if first != name and name in weights and first in weights:
            weights[name] = weights[first]
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:
        return weights, {}
    index = {name: i for i, name in enumerate(param_names)}  # parameter name -> position
    return weights, {
        "state": {index[name]: s for name, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                         for g in by_name["param_groups"]],
    }
