"""Preference tuning (DPO, ORPO) through TRL, with the same inputs and outputs as the SFT recipe.

    TrainRequest(spec with objective dpo | orpo, {"prompt","chosen","rejected"} rows, out_dir)
        ->  checkpoints under out_dir/checkpoint-<step>/   (the same format as the SFT recipe's)

- The model comes from the method registry (`methods.load_for_training`: full, LoRA, DoRA,
  QLoRA, IA3, LoHa, ... with their quantization and gradient checkpointing).
- DPO: `trl.DPOTrainer` (sigmoid loss, `spec.preference.beta` is DPO's beta). With an adapter
  method the reference model is the base model itself (the adapter disabled), so no second copy
  of the weights is held; a full fine-tune gets a frozen reference copy from TRL.
- ORPO: `trl.experimental.orpo.ORPOTrainer` (no reference model; `beta` is ORPO's lambda).
- Prompts are cut to their last `spec.preference.max_prompt_length` tokens before TRL sees them
  (the text nearest the answer matters most); prompt + answer is cut to `max_seq_length`.
- fp32 on CPU (TRL's configs default to bf16 and gradient checkpointing: both off unless the
  spec asks for them and there is a GPU); nothing reported to W&B & co.
- Checkpoints: transformers decides when (every `checkpoint_every` steps, at `max_steps`, and when
  `should_stop` asks; always after that step's metrics are logged), and what it writes is the
  recipe's checkpoint (`llmstudio.ml.checkpoint.write_checkpoint`, as the SFT recipe's, its
  trainer state also holding the Trainer's own), announced through `on_checkpoint`; the newest
  `keep_last_checkpoints` are kept. TRL and transformers write no files of their own.
- Resume (`resume_from`): transformers' own resume path (global step; the batches of the current
  epoch already trained are skipped; the RNG is restored after them), reading those files instead
  of its pickles, so the run goes on with the same data order, learning rate, optimizer moments
  and counters as if it had never stopped.
- Metrics forwarded to `on_metrics` every `log_every` steps: step, max_steps, loss,
  learning_rate, epoch, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
  (plus TRL's logps/* when present). DPO rewards are beta * log(pi/pi_ref); ORPO rewards are
  beta * log pi (its margin grows as the chosen answer becomes likelier than the rejected one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PrinterCallback, TrainerCallback

from llmstudio.jobspec import JobSpec
from llmstudio.ml.checkpoint import (
    CheckpointError,
    TrainerState,
    load_optimizer_state,
    load_schedule,
    prune_checkpoints,
    read_trainer_state,
    restore_rng_state,
    verify_checkpoint,
    write_checkpoint,
)

from .. import methods
from ..optim import TRANSFORMERS_OPTIM
from ..parallel import pick_device
from .request import TrainRequest, TrainResult

PREFERENCE_OBJECTIVES = ("dpo", "orpo")
# TRL log keys forwarded to on_metrics (besides step / max_steps / loss / learning_rate / epoch).
_FORWARDED_PREFIXES = ("rewards/", "logps/", "log_odds", "nll_loss")
# Key of TrainerState.recipe: the transformers TrainerState, which its resume path reads back.
TRANSFORMERS_STATE = "transformers_state"


# --------------------------------------------------------------------------------------------
# the recipe


def train(request: TrainRequest) -> TrainResult:
    # auto -> what this device trains in; the run's checkpoints record the resolved precision
    request = dataclasses.replace(
        request, spec=methods.resolve_precision(request.spec, pick_device()))
    spec, out_dir = request.spec, request.out_dir
    if spec.objective not in PREFERENCE_OBJECTIVES:
        raise ValueError(f"the preference recipe runs dpo and orpo, not {spec.objective}")
    check_preference_rows(request.rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    from datasets import Dataset
    from transformers import set_seed

    hp, model_dir = spec.hyperparameters, spec.base_model
    set_seed(hp.seed)
    run = _Run(request)
    if request.resume_from is not None:
        run.restore(request.resume_from)
    if run.step >= hp.max_steps:  # resumed from the final checkpoint: nothing left to train
        return run.result()
    if request.should_stop():  # cancelled before the first step (of this process)
        run.stopped = True
        return run.result()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = pick_device()
    # The method registry loads the model (fp32; 4/8-bit base for qlora / lora_8bit) and wraps
    # it with the spec's adapter; TRL then uses the adapter-disabled model as DPO's reference.
    # (A full fine-tune gets a frozen reference copy from TRL, made before a resumed run loads
    # its checkpoint's weights: the reference stays the base model.)
    prepared = methods.load_for_training(spec, model_dir, device)
    run.prepared = prepared
    run.after_backward = prepared.after_backward
    model = prepared.model

    max_prompt = min(spec.preference.max_prompt_length, hp.max_seq_length - 1)
    dataset = Dataset.from_list([
        {
            "prompt": _truncate_prompt(tokenizer, r["prompt"], max_prompt),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
        }
        for r in request.rows
    ])
    config = _config(spec, out_dir, device.type == "cuda")
    trainer = _trainer_class(spec.objective)(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[_Bridge(run)],
    )
    trainer.run = run
    if spec.objective == "dpo":
        # Given a PeftModel, TRL copies its fresh adapter into a frozen "ref" adapter to score
        # the reference. A freshly initialized adapter is the identity, so the base model with
        # adapters disabled (what TRL does without "ref") is the same reference, costs no copy,
        # and keeps "ref/" out of the checkpoints.
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            unwrapped.delete_adapter("ref")
        # DPO's token count starts at 0 in each process: a resumed run goes on from its checkpoint's
        trainer._total_train_tokens = run.tokens_seen
    trainer.remove_callback(PrinterCallback)  # metrics go to on_metrics, not stdout
    _train(trainer, run)
    run.step = trainer.state.global_step
    return run.result()

# --------------------------------------------------------------------------------------------
# the run's state, and how transformers' Trainer reports to it and checkpoints through it


class _Run:
    """Mutable state of one training run, shared by the callback and the checkpoint writer."""

    def __init__(self, request: TrainRequest):
        self.request = request
        self.spec = spec = request.spec
        self.out_dir = request.out_dir
        self.num_examples = len(request.rows)
        hp = spec.hyperparameters
        self.samples_per_step = hp.batch_size * hp.gradient_accumulation_steps
        self.step = 0
        self.tokens_seen = 0  # as of the last log
        self.loss = math.nan
        self.first_loss = math.nan
        self.stopped = False
        self.history: list[dict] = []
        self.last_ckpt: Path | None = None
        self.resume_from: Path | None = None
        self.resume_state: TrainerState | None = None
        self.prepared: methods.PreparedModel | None = None
        self.after_backward: Callable[[int], None] = lambda _step: None
        self.last_log_step, self.last_log_t = 0, time.perf_counter()

    def restore(self, ckpt: Path) -> None:
        """Step, losses, counters and history as `ckpt` left them; the trainer loads the rest
        (`_RecipeCheckpoints`)."""
        verify_checkpoint(ckpt)
        state = read_trainer_state(ckpt)
        if TRANSFORMERS_STATE not in state.recipe:
            raise CheckpointError(
                f"{ckpt}: no Trainer state in its trainer state (an SFT checkpoint, or one "
                "written before preference runs could resume); cannot resume a preference run "
                "from it"
            )
        if state.num_examples != self.num_examples:
            raise CheckpointError(
                f"{ckpt}: trained on {state.num_examples} rows, this run has "
                f"{self.num_examples}; cannot resume on different data"
            )
        self.resume_from, self.resume_state = ckpt, state
        self.step = self.last_log_step = state.step
        self.loss, self.first_loss = state.loss, state.first_loss
        self.tokens_seen = state.tokens_seen
        self.history = state.log_history
        self.last_ckpt = ckpt

    def stop_requested(self) -> bool:
        """should_stop(), asked while steps remain; once true, stays true."""
        if not self.stopped and self.step < self.spec.hyperparameters.max_steps:
            self.stopped = self.request.should_stop()
        return self.stopped

    def checkpoint(self, trainer) -> Path:
        hp = self.spec.hyperparameters
        self.step = trainer.state.global_step
        optimizer = _unwrapped_optimizer(trainer.optimizer)
        samples_seen = self.step * self.samples_per_step
        state = TrainerState(
            objective=self.spec.objective,
            step=self.step,
            max_steps=hp.max_steps,
            loss=self.loss,
            first_loss=self.first_loss,
            # DPO's own count is exact at this step; self.tokens_seen is as of the last log
            tokens_seen=getattr(trainer, "_total_train_tokens", self.tokens_seen),
            samples_seen=samples_seen,
            epoch=samples_seen / max(self.num_examples, 1),
            num_examples=self.num_examples,
            seeds={
                "seed": hp.seed,
                "data_order": "transformers.Trainer: per-epoch shuffle seeded by (seed, epoch)",
            },
            base_model=self.spec.base_model,
            spec=self.spec.model_dump(mode="json"),
            log_history=self.history,
            recipe={TRANSFORMERS_STATE: dataclasses.asdict(trainer.state)},
        )
        path = write_checkpoint(
            self.out_dir, state,
            save_weights=lambda d: methods.save_trainable(self.prepared, d),
            optimizer=optimizer, param_names=_optimizer_param_names(trainer.model, optimizer),
            scheduler=trainer.lr_scheduler, scaler=trainer.accelerator.scaler,
        )
        self.last_ckpt = path
        prune_checkpoints(self.out_dir, hp.keep_last_checkpoints)
        if self.request.on_checkpoint is not None:
            self.request.on_checkpoint(path, self.step)
        return path

    def result(self) -> TrainResult:
        return TrainResult(
            steps=self.step,
            final_loss=self.loss,
            first_loss=self.first_loss,
            tokens_seen=self.tokens_seen,
            adapter_dir=self.last_ckpt,
            stopped=self.stopped,
            stop_reason="stopped" if self.stopped else "max_steps",
        )


class _Bridge(TrainerCallback):
    """TRL/transformers events -> on_metrics, should_stop, when to checkpoint."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def on_optimizer_step(self, args, state, control, **kw):
        # AdaLoRA's rank budget update: after optimizer.step(), before zero_grad().
        self.run.after_backward(state.global_step + 1)
        return control

    def on_step_end(self, args, state, control, **kw):
        run = self.run
        run.step = state.global_step
        hp = run.spec.hyperparameters
        every = hp.checkpoint_every
        # should_save: the Trainer logs this step, then calls _RecipeCheckpoints._save_checkpoint
        if run.step >= hp.max_steps or (every and run.step % every == 0):
            control.should_save = True
        if run.stop_requested():
            control.should_save = True  # no finished step is lost
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kw):
        # A stop asked for while the checkpoint was written (the worker uploads it in
        # on_checkpoint) ends the run at this step, not one step later.
        if self.run.stop_requested():
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs or "train_runtime" in logs:
            return control  # the end-of-training summary, or an eval log
        run = self.run
        loss = float(logs["loss"])
        if math.isnan(run.first_loss):
            run.first_loss = loss
        run.loss = loss
        now = time.perf_counter()
        metrics: dict[str, Any] = {
            "step": state.global_step,
            "max_steps": run.spec.hyperparameters.max_steps,
            "loss": loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "epoch": float(logs.get("epoch", state.epoch or 0.0)),
            "samples_per_s": (state.global_step - run.last_log_step)
            * run.samples_per_step
            / max(now - run.last_log_t, 1e-9),
        }
        if "num_tokens" in logs:  # DPO counts the tokens it trained on (cumulative)
            tokens = int(float(logs["num_tokens"]))
            metrics["tokens_per_s"] = (tokens - run.tokens_seen) / max(now - run.last_log_t, 1e-9)
            run.tokens_seen = tokens
        for key, value in logs.items():
            if key.startswith(_FORWARDED_PREFIXES) and isinstance(value, (int, float)):
                metrics[key] = float(value)
        run.last_log_step, run.last_log_t = state.global_step, now
        run.history.append(metrics)
        run.request.on_metrics(metrics)
        return control


class _RecipeCheckpoints:
    """Mixed into TRL's DPOTrainer / ORPOTrainer. transformers keeps deciding when to save and
    how to resume (global step, skipping the batches of the resumed epoch already trained,
    restoring the RNG only after them, so neither the data order nor the random stream changes);
    these overrides make it write and read the recipe's checkpoint files (safetensors + JSON)
    instead of its pickles.
    The `resume_from_checkpoint` path transformers passes in is ignored: the files come from
    `run.resume_from` (see `_train`)."""

    run: _Run

    def _save_checkpoint(self, model, trial) -> None:
        self.run.checkpoint(self)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        methods.load_trainable(self.run.prepared, self.run.resume_from)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        ckpt = self.run.resume_from
        optimizer = _unwrapped_optimizer(self.optimizer)
        load_optimizer_state(optimizer, ckpt, _optimizer_param_names(self.model, optimizer))
        load_schedule(ckpt, self.lr_scheduler, self.accelerator.scaler)

    def _load_rng_state(self, checkpoint) -> None:
        restore_rng_state(self.run.resume_from)


def _trainer_class(objective: str) -> type:
    if objective == "dpo":
        from trl import DPOTrainer as trl_trainer
    else:
        from trl.experimental.orpo import ORPOTrainer as trl_trainer
    return type(trl_trainer.__name__, (_RecipeCheckpoints, trl_trainer), {})


def _train(trainer, run: _Run) -> None:
    if run.resume_state is None:
        trainer.train()
        return
    # transformers reads its TrainerState from <dir>/trainer_state.json, the name of the recipe's
    # own state file: hand it a directory holding just that state; _RecipeCheckpoints reads
    # everything else from the checkpoint itself.
    from transformers.trainer import TRAINER_STATE_NAME

    with tempfile.TemporaryDirectory(prefix=".resume-", dir=run.out_dir) as staging:
        state = run.resume_state.recipe[TRANSFORMERS_STATE]
        (Path(staging) / TRAINER_STATE_NAME).write_text(json.dumps(state))
        trainer.train(resume_from_checkpoint=staging)

# --------------------------------------------------------------------------------------------
# TRL's configuration, rows


def _config(spec: JobSpec, out_dir: Path, on_gpu: bool):
    hp = spec.hyperparameters
    common = dict(
        output_dir=str(out_dir / ".trl"),
        max_steps=hp.max_steps,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        optim=TRANSFORMERS_OPTIM[hp.optimizer],
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=hp.log_every,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        # fp32 unless asked (methods.check_hardware refuses what this device cannot run)
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        gradient_checkpointing=False,  # methods.load_for_training enables it when asked
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        beta=spec.preference.beta,
        max_length=hp.max_seq_length,
    )
    if spec.objective == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**common)


def check_preference_rows(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected an object with prompt, chosen, rejected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(
                    f"row {i}: preference objectives need string 'prompt', 'chosen' and "
                    f"'rejected' fields; got keys {sorted(row)}"
                )
    if not rows:
        raise ValueError("no training rows")


def _truncate_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    """Keep the last `max_tokens` tokens of `prompt` (as text)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    return tokenizer.decode(ids[-max_tokens:], skip_special_tokens=False)


def _optimizer_param_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (state index i <-> names[i])."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _unwrapped_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)
