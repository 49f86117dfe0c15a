"""Supervised fine-tuning (sft / pretrain objectives), one readable recipe from top to bottom.

    TrainRequest(spec, rows, out_dir, ...)  ->  checkpoints under out_dir/checkpoint-<step>/

The story is `train`: check the hardware; seed; tokenize rows with loss masking
(llmstudio.ml.data), optionally packed into full rows (llmstudio.ml.packing); load the model the
way the spec's method says (methods.load_for_training: full, LoRA, QLoRA, ... and gradient
checkpointing); AdamW (torch or bitsandbytes 8-bit) with linear warmup/decay; then loop for
`max_steps` optimizer steps over a deterministic shuffled stream of examples. One optimizer step
runs `gradient_accumulation_steps` micro-batches per process, the loss normalized by the learned
tokens of the whole step (all micro-batches, all processes), clips the gradient norm, reports
metrics every `log_every` steps, evaluates every `eval_every` steps (early stopping), honours a
stop request and writes checkpoints, keeping the newest `keep_last_checkpoints`.

The loss: the model runs inside `llmstudio.ml.loss.CausalLMLossSum`, which puts only the
labelled positions through the output head, in chunks, so the full [batch, seq, vocab] logits
never exist (architectures that change the logits after the head, and prompt-learning methods,
keep the full logits).

Data parallel: when torch.distributed is initialized (services/trainer/distributed.py starts
the processes, services/trainer/parallel.py has the helpers), every process runs this function;
each global micro-batch of `batch_size * world_size` examples is cut into one shard per rank,
and only rank 0 writes checkpoints and reports metrics.
Gradients are averaged over the ranks by DistributedDataParallel (strategy ddp: every rank
holds the whole model) or by FSDP2 `fully_shard` (strategy fsdp: each rank holds 1/world of
the parameters, gradients and optimizer state; a decoder layer's parameters are all-gathered
just for its forward and backward). Under FSDP every rank takes part in writing a checkpoint:
the shards are gathered into full tensors on rank 0, so a checkpoint is the same files whatever
the strategy and number of processes, and any of them can resume it.

Checkpoints: `llmstudio.ml.checkpoint` owns the format (weights, optimizer, RNG, schedule,
trainer state, manifest written last); this recipe says when, and the method registry writes
the weights.

Determinism: the data order is a pure function of (seed, epoch) and each step reseeds torch
with (seed, step), so resuming from a checkpoint (`resume_from`) reproduces the same run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from llmstudio.ml.allocator import release_free_memory
from llmstudio.ml.checkpoint import (
    CheckpointError,
    TrainerState,
    load_training_state,
    prune_checkpoints,
    verify_checkpoint,
    write_checkpoint,
)
from llmstudio.ml.data import IGNORE_INDEX, collate, count_learned_tokens, encode_example, pad_id_of
from llmstudio.ml.loss import CausalLMLossSum
from llmstudio.ml.packing import collate_packed, pack_examples

from .. import methods
from ..optim import make_optimizer
from ..parallel import (
    any_rank,
    gather_full_state,
    gradient_sync,
    pick_device,
    rank_and_world,
    shard_model,
    sum_ranks,
)
from .request import TrainRequest, TrainResult

# --------------------------------------------------------------------------------------------
# the recipe


def train(request: TrainRequest) -> TrainResult:
    spec, out_dir, resume_from = request.spec, request.out_dir, request.resume_from
    hp, model_dir = spec.hyperparameters, spec.base_model
    rank, world = rank_and_world()
    main = rank == 0
    sharded = world > 1 and spec.distributed.strategy == "fsdp"
    device = pick_device()
    spec = methods.resolve_precision(spec, device)  # auto -> what this device trains in

    # 0. refuse what this hardware cannot run, before any work (fp16 on a CPU...)
    methods.check_hardware(spec, device)
    if spec.distributed.num_processes != world:
        raise ValueError(
            f"distributed.num_processes={spec.distributed.num_processes} but this run has "
            f"{world} process(es); start it through services.trainer.distributed"
        )
    eval_interval = hp.eval_every or (hp.log_every if hp.early_stopping else 0)
    if eval_interval and not request.eval_rows:
        raise ValueError("eval_every / early_stopping need validation rows (eval_rows)")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # 1. seeds (torch is reseeded per step below, from (seed, step)). The allocator stays
    #    glibc's fast default; free heap pages go back to the OS at phase boundaries (after
    #    loading, evaluating, checkpointing, training: llmstudio.ml.allocator says why)
    random.seed(hp.seed)
    np.random.seed(hp.seed % 2**32)
    torch.manual_seed(hp.seed)

    # 2. data: tokenize once, with loss masks; drop rows left with nothing to learn. A "unit" of
    #    the example stream is one example, or with packing one row of packed examples.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = pad_id_of(tokenizer)
    examples = _encode(tokenizer, request.rows, hp.max_seq_length)
    if not examples:
        raise ValueError(
            f"no training row has a completion token within max_seq_length={hp.max_seq_length}"
        )
    bins = pack_examples(examples, hp.max_seq_length) if hp.packing else None
    units_of = bins if bins is not None else [[i] for i in range(len(examples))]
    num_units = len(units_of)
    unit_tokens = [sum(len(examples[i]["input_ids"]) for i in u) for u in units_of]
    eval_examples = _encode(tokenizer, request.eval_rows or [], hp.max_seq_length)

    def make_batch(units: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """The batch on the device, and its learned tokens (counted on the host: no sync)."""
        if bins is not None:
            batch = collate_packed(examples, [bins[u] for u in units], pad_id)
        else:
            batch = collate([examples[u] for u in units], pad_id)
        return {k: v.to(device) for k, v in batch.items()}, _learned(batch["labels"])

    # 3. model, the way the method says (full weights, adapter, quantized base...); resumed
    #    weights are loaded before sharding, as a checkpoint holds full tensors
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    prepared = methods.load_for_training(spec, model_dir, device)
    model = prepared.model
    model.train()
    if resume_from is not None:
        verify_checkpoint(resume_from)
        methods.load_trainable(prepared, resume_from)
    loss_model = CausalLMLossSum(model, prepared.logits_offset)
    train_model: torch.nn.Module = loss_model
    if sharded:  # gradients reduce-scattered (averaged: see the loss scale below)
        shard_model(loss_model, amp_dtype)
        # fully_shard replaced every parameter by its shard: train those, and drop the
        # references to the full-size originals so that their memory is freed
        prepared.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif world > 1:  # gradients all-reduced (averaged: see the loss scale below)
        train_model = torch.nn.parallel.DistributedDataParallel(
            loss_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    param_names = [n for n, _ in prepared.trainable]
    params = [p for _, p in prepared.trainable]
    release_free_memory()  # the load path's transient copies

    # 4. optimizer + schedule + fp16 loss scaling (on sharded gradients too: DTensor reduces
    #    the inf/NaN check over the ranks)
    optimizer = make_optimizer(hp.optimizer, params, hp.learning_rate, hp.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, hp.warmup_steps, hp.max_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=spec.precision == "fp16")

    # 5. resume: optimizer, scheduler, RNG, step, data position, early stopping
    step, samples_seen, tokens_seen = 0, 0, 0
    loss, first_loss, history = math.nan, math.nan, []
    early = {"best": None, "best_step": 0, "bad_evals": 0}
    eval_loss: float | None = None
    if resume_from is not None:
        state = load_training_state(resume_from, optimizer, param_names,
                                    scheduler=scheduler, scaler=scaler,
                                    sharded_model=model if sharded else None)
        if state.num_examples != len(examples):
            raise CheckpointError(
                f"{resume_from}: trained on {state.num_examples} examples, "
                f"this run has {len(examples)}; cannot resume on different data"
            )
        step, samples_seen = state.step, state.samples_seen
        tokens_seen, first_loss, loss = state.tokens_seen, state.first_loss, state.loss
        history, eval_loss = state.log_history, state.eval_loss
        early = state.recipe.get("early_stopping", early)

    # 6. the loop
    stream = _example_stream(num_units, hp.seed, start=samples_seen)
    micro_units = hp.batch_size * world  # one global micro-batch, every rank's shard
    units_per_step = micro_units * hp.gradient_accumulation_steps
    last_ckpt: Path | None = None  # rank 0's newest checkpoint
    ckpt_step = -1  # its step, known to every rank

    def checkpoint() -> Path | None:
        """Rank 0 writes a checkpoint of this step. Every rank calls it: under FSDP gathering
        the shards into full tensors is a collective."""
        nonlocal ckpt_step
        ckpt_step = step
        model_state = optimizer_state = None
        if sharded:
            model_state, optimizer_state = gather_full_state(
                model, optimizer, param_names, adapter=prepared.is_adapter
            )
        if not main:
            return None
        state = TrainerState(
            objective=spec.objective,
            step=step,
            max_steps=hp.max_steps,
            loss=loss,
            first_loss=first_loss,
            eval_loss=eval_loss,
            tokens_seen=tokens_seen,
            samples_seen=samples_seen,  # data position in the shuffled unit stream
            epoch=samples_seen / num_units,
            num_examples=len(examples),
            seeds={
                "seed": hp.seed,
                "torch_per_step": "seed * 100003 + step",
                "data_order": "random.Random(f'{seed}:{epoch}').shuffle(range(num_units))",
            },
            base_model=model_dir,
            spec=spec.model_dump(mode="json"),
            log_history=history,
            recipe={"early_stopping": early, "num_units": num_units, "world_size": world},
        )
        path = write_checkpoint(
            out_dir, state,
            save_weights=lambda d: methods.save_trainable(prepared, d, state_dict=model_state),
            optimizer=optimizer, param_names=param_names, optimizer_state=optimizer_state,
            scheduler=scheduler, scaler=scaler,
        )
        prune_checkpoints(out_dir, hp.keep_last_checkpoints)
        if request.on_checkpoint is not None:
            request.on_checkpoint(path, step)
        return path

    window = _Window()
    t_start, start_step = time.perf_counter(), step
    stop_reason = "max_steps"
    while step < hp.max_steps:
        if any_rank(request.should_stop() if main else False):
            stop_reason = "stopped"
            break
        torch.manual_seed(hp.seed * 100_003 + step)  # dropout depends on (seed, step) only

        # one optimizer step: this rank's shard of each global micro-batch
        micro, seen_tokens, learned_tokens = [], 0, 0
        for _ in range(hp.gradient_accumulation_steps):
            units = [next(stream) for _ in range(micro_units)]
            batch, learned = make_batch(units[rank * hp.batch_size:(rank + 1) * hp.batch_size])
            micro.append(batch)
            learned_tokens += learned
            seen_tokens += sum(unit_tokens[u] for u in units)  # every rank's, not padding
        step_tokens = sum_ranks(learned_tokens)
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with gradient_sync(train_model, last), torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                part = train_model(**batch)
                # DDP and FSDP average gradients over ranks: scale by world so the result is the
                # gradient of (sum of every rank's loss) / (learned tokens of the step)
                objective = part * world / max(step_tokens, 1)
                if last and prepared.extra_loss is not None:  # e.g. AdaLoRA's regularizer
                    objective = objective + prepared.extra_loss()
                scaler.scale(objective).backward()
            loss_sum += part.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)  # read when reported
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        prepared.after_backward(step + 1)  # after the update, before the gradients are cleared
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1
        samples_seen += units_per_step
        tokens_seen += seen_tokens
        loss = sum_ranks(float(loss_sum)) / max(step_tokens, 1)
        if step == 1:
            first_loss = loss
        window.add(loss, seen_tokens, units_per_step, grad_norm)

        evaluated = bool(eval_interval) and (step % eval_interval == 0 or step == hp.max_steps)
        if evaluated:
            eval_loss = evaluate_loss(loss_model, eval_examples, hp.batch_size, pad_id, device,
                                      amp_dtype)
            release_free_memory()
            improved = early["best"] is None or eval_loss < early["best"] - (
                hp.early_stopping.min_delta if hp.early_stopping else 0.0)
            if improved:
                early = {"best": eval_loss, "best_step": step, "bad_evals": 0}
            else:
                early["bad_evals"] += 1
            if hp.early_stopping and early["bad_evals"] >= hp.early_stopping.patience:
                stop_reason = (
                    f"early_stopping: eval_loss did not improve by {hp.early_stopping.min_delta} "
                    f"for {early['bad_evals']} evaluations (best {early['best']:.6g} at step "
                    f"{early['best_step']})"
                )

        if main and (step % hp.log_every == 0 or step == hp.max_steps or evaluated):
            elapsed = time.perf_counter() - t_start
            metrics = {
                "step": step,
                "max_steps": hp.max_steps,
                "loss": window.mean_loss(),
                "learning_rate": lr,
                "grad_norm": window.mean_grad_norm(),
                "tokens_per_s": window.tokens / window.elapsed(),
                "samples_per_s": window.samples / window.elapsed(),
                "epoch": samples_seen / num_units,
                "memory_bytes": memory_bytes(device),
                "eta_s": elapsed / (step - start_step) * (hp.max_steps - step),
            }
            if evaluated:
                metrics["eval_loss"] = eval_loss
            history.append(metrics)
            request.on_metrics(metrics)
            window = _Window()

        if stop_reason != "max_steps":
            break
        if hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < hp.max_steps:
            last_ckpt = checkpoint()
            release_free_memory()

    # 7. final checkpoint (also when stopped early, so no finished step is lost)
    if step > 0 and ckpt_step != step:
        last_ckpt = checkpoint()
    if world > 1:
        dist.barrier()  # no rank leaves (and tears the group down) before the last checkpoint
    release_free_memory()  # the training's free heap: a worker outlives its jobs
    return TrainResult(
        steps=step,
        final_loss=loss,
        first_loss=first_loss,
        tokens_seen=tokens_seen,
        adapter_dir=last_ckpt,
        stopped=stop_reason == "stopped",
        stop_reason=stop_reason,
        eval_loss=eval_loss,
    )


# --------------------------------------------------------------------------------------------
# helpers of the loop


def evaluate_loss(loss_model: CausalLMLossSum, examples: list[dict], batch_size: int,
                  pad_id: int, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """Mean next-token loss over the learned tokens of `examples` (same masking as training).
    Under FSDP every rank must call it with the same examples (the forward all-gathers)."""
    was_training = loss_model.training
    loss_model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                         enabled=amp_dtype is not None):
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device)
                     for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            total += float(loss_model(**batch))
            count += _learned(batch["labels"])
    loss_model.train(was_training)
    return total / max(count, 1)


def memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, else this process's resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _encode(tokenizer, rows: list[dict], max_len: int) -> list[dict]:
    examples = [encode_example(tokenizer, row, max_len) for row in rows]
    return [ex for ex in examples if count_learned_tokens(ex) > 0]


def _learned(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class _Window:
    """Accumulates the steps between two metric reports."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.loss = self.grad_norm = 0.0
        self.steps = self.tokens = self.samples = 0

    def add(self, loss: float, tokens: int, samples: int, grad_norm: torch.Tensor) -> None:
        self.loss += loss
        self.grad_norm = self.grad_norm + grad_norm.detach()  # summed on the device
        self.steps += 1
        self.tokens += tokens
        self.samples += samples

    def mean_loss(self) -> float:
        return self.loss / max(self.steps, 1)

    def mean_grad_norm(self) -> float:
        return float(self.grad_norm) / max(self.steps, 1)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


def _example_stream(n: int, seed: int, *, start: int = 0) -> Iterator[int]:
    """Endless unit indices: epoch after epoch, each a seeded shuffle; skips `start`."""
    epoch, offset = divmod(start, n)
    while True:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        yield from order[offset:]
        epoch, offset = epoch + 1, 0
