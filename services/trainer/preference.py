"""Preference tuning (DPO, ORPO) through TRL, with the same inputs and outputs as the SFT recipe.

    spec (objective dpo | orpo) + base model dir + {"prompt","chosen","rejected"} rows
        ->  checkpoints under out_dir/checkpoint-<step>/   (same layout as recipe.py)

- The model comes from the method registry (`methods.load_for_training`: full, LoRA, DoRA,
  QLoRA, IA3, LoHa, ... with their quantization and gradient checkpointing).
- DPO: `trl.DPOTrainer` (sigmoid loss, `spec.preference.beta` is DPO's beta). With an adapter
  method the reference model is the base model itself (the adapter disabled), so no second copy
  of the weights is held; a full fine-tune gets a frozen reference copy from TRL.
- ORPO: `trl.experimental.orpo.ORPOTrainer` (no reference model; `beta` is ORPO's lambda).
- Prompts are cut to their last `spec.preference.max_prompt_length` tokens before TRL sees them
  (the text nearest the answer matters most); prompt + answer is cut to `max_seq_length`.
- fp32 on CPU (TRL's configs default to bf16 and gradient checkpointing: both off unless the
  spec asks for them and there is a GPU); nothing reported to W&B & co.; TRL writes no
  checkpoints of its own: checkpoints are written here with `recipe.write_checkpoint` (adapter
  safetensors, optimizer.safetensors, trainer_state.json, manifest.json last) and announced
  through `on_checkpoint`, every `checkpoint_every` steps and at the end (also when stopped).
- Metrics forwarded to `on_metrics` every `log_every` steps: step, max_steps, loss,
  learning_rate, epoch, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
  (plus TRL's logps/* when present). DPO rewards are beta * log(pi/pi_ref); ORPO rewards are
  beta * log pi (its margin grows as the chosen answer becomes likelier than the rejected one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PrinterCallback, TrainerCallback

from llmstudio.jobspec import JobSpec

from . import methods
from .recipe import CHECKPOINT_FORMAT, TrainResult, pick_device, write_checkpoint

PREFERENCE_OBJECTIVES = ("dpo", "orpo")
_OPTIM = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
# TRL log keys forwarded to on_metrics (besides step / max_steps / loss / learning_rate / epoch).
_FORWARDED_PREFIXES = ("rewards/", "logps/", "log_odds", "nll_loss")


def _never() -> bool:
    return False


def _ignore(_: dict) -> None:
    return None


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


class _Bridge(TrainerCallback):
    """TRL/transformers events -> on_metrics, should_stop, our checkpoints."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def on_optimizer_step(self, args, state, control, **kw):
        # AdaLoRA's rank budget update: after optimizer.step(), before zero_grad().
        self.run.after_backward(state.global_step + 1)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        run = self.run
        run.step = state.global_step
        ce = run.spec.hyperparameters.checkpoint_every
        if ce and run.step % ce == 0 and run.step < run.spec.hyperparameters.max_steps:
            run.checkpoint(model, optimizer)
        if run.should_stop():
            run.stopped = True
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
        run.on_metrics(metrics)
        return control


class _Run:
    """Mutable state of one training run, shared by the callback and the checkpoint writer."""

    def __init__(self, spec, model_dir, out_dir, on_metrics, should_stop, on_checkpoint, n_rows):
        self.spec = spec
        self.model_dir = model_dir
        self.out_dir = out_dir
        self.on_metrics = on_metrics
        self.should_stop = should_stop
        self.on_checkpoint = on_checkpoint
        self.num_examples = n_rows
        hp = spec.hyperparameters
        self.samples_per_step = hp.batch_size * hp.gradient_accumulation_steps
        self.step = 0
        self.tokens_seen = 0
        self.loss = math.nan
        self.first_loss = math.nan
        self.stopped = False
        self.history: list[dict] = []
        self.last_ckpt: Path | None = None
        self.after_backward: Callable[[int], None] = lambda _step: None
        self.last_log_step, self.last_log_t = 0, time.perf_counter()

    def checkpoint(self, model, optimizer) -> Path:
        hp = self.spec.hyperparameters
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        param_names = _optimizer_param_names(model, inner)
        samples_seen = self.step * self.samples_per_step
        trainer_state = {
            "format": CHECKPOINT_FORMAT,
            "objective": self.spec.objective,
            "step": self.step,
            "max_steps": hp.max_steps,
            "loss": self.loss,
            "first_loss": self.first_loss,
            "tokens_seen": self.tokens_seen,
            "samples_seen": samples_seen,
            "epoch": samples_seen / max(self.num_examples, 1),
            "num_examples": self.num_examples,
            "seeds": {"seed": hp.seed, "trainer": "transformers.Trainer (TRL)"},
            "base_model": self.model_dir,
            "spec": self.spec.model_dump(mode="json"),
            "log_history": self.history,
        }
        path = write_checkpoint(
            self.out_dir / f"checkpoint-{self.step}", model, inner, param_names, trainer_state
        )
        self.last_ckpt = path
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, self.step)
        return path


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
        optim=_OPTIM[hp.optimizer],
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


def train_preference(
    spec: JobSpec,
    model_dir: str,
    train_rows: list[dict],
    out_dir: Path,
    *,
    on_metrics: Callable[[dict], None] = _ignore,
    should_stop: Callable[[], bool] = _never,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> TrainResult:
    if spec.objective not in PREFERENCE_OBJECTIVES:
        raise ValueError(f"train_preference runs dpo and orpo, not {spec.objective}")
    check_preference_rows(train_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from datasets import Dataset
    from transformers import set_seed

    hp = spec.hyperparameters
    set_seed(hp.seed)
    run = _Run(spec, model_dir, out_dir, on_metrics, should_stop, on_checkpoint, len(train_rows))
    if should_stop():  # cancelled before the first step
        return TrainResult(0, math.nan, math.nan, 0, None, True, stop_reason="stopped")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = pick_device()
    # The method registry loads the model (fp32; 4/8-bit base for qlora / lora_8bit) and wraps
    # it with the spec's adapter; TRL then uses the adapter-disabled model as DPO's reference.
    # (A full fine-tune gets a frozen reference copy from TRL.)
    prepared = methods.load_for_training(spec, model_dir, device)
    run.after_backward = prepared.after_backward
    model = prepared.model

    max_prompt = min(spec.preference.max_prompt_length, hp.max_seq_length - 1)
    dataset = Dataset.from_list([
        {
            "prompt": _truncate_prompt(tokenizer, r["prompt"], max_prompt),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
        }
        for r in train_rows
    ])
    config = _config(spec, out_dir, device.type == "cuda")
    if spec.objective == "dpo":
        from trl import DPOTrainer

        trainer = DPOTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[_Bridge(run)],
        )
        # Given a PeftModel, TRL copies its fresh adapter into a frozen "ref" adapter to score
        # the reference. A freshly initialized adapter is the identity, so the base model with
        # adapters disabled (what TRL does without "ref") is the same reference, costs no copy,
        # and keeps "ref/" out of the checkpoints.
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            unwrapped.delete_adapter("ref")
    else:
        from trl.experimental.orpo import ORPOTrainer

        trainer = ORPOTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[_Bridge(run)],
        )
    trainer.remove_callback(PrinterCallback)  # metrics go to on_metrics, not stdout
    trainer.train()

    run.step = trainer.state.global_step
    if run.step > 0 and (run.last_ckpt is None or run.last_ckpt.name != f"checkpoint-{run.step}"):
        run.checkpoint(trainer.model, trainer.optimizer)
    return TrainResult(
        steps=run.step,
        final_loss=run.loss,
        first_loss=run.first_loss,
        tokens_seen=run.tokens_seen,
        adapter_dir=run.last_ckpt,
        stopped=run.stopped,
        stop_reason="stopped" if run.stopped else "max_steps",
    )
